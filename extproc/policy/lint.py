"""`extproc policy lint`: what loads but is probably not what the owner meant.

Load errors are the loader's own (PolicyStore), never re-checked here. The other checks read the
validated policies:

- rules that never apply (only to versions no request is routed to) or never pass (a method the
  policy does not accept, roles from methods that carry none, tenants a version never serves),
  and pairs of rules no caller can pass together: under AND semantics each of these closes the
  model, or some of its versions, to everyone;
- rules that add nothing, because another rule applying at least as widely implies them;
- fail-open settings: dry runs, quotas counted locally when the store fails, unsanitised errors,
  injection only logged or not inspected, answers not redacted, any authenticated caller let in;
- rules broader than they look: only a method, a `when:` that is always true, `*` taken for a
  wildcard, a model any tenant may use while the platform requires tenants.

Rule analysis is deliberately conservative: a finding means the policy says so, whatever the
callers; CEL is not evaluated, only literal constants are recognised.
"""

from __future__ import annotations

import os
import re
from collections.abc import Collection, Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

from extproc.authn.apikey import ApiKeyError, ApiKeyStore
from extproc.policy.load import (
    NO_PLATFORM,
    PlatformFile,
    PolicyLoadError,
    read_platform_file,
    read_policy_dir,
)
from extproc.policy.schema import AuthMethod, Floors, Policy, Rule
from extproc.policy.store import PolicyStore
from extproc.quota.schema import Quotas

Severity = Literal["error", "warning", "info"]
SEVERITIES: tuple[Severity, ...] = ("error", "warning", "info")


@dataclass(frozen=True, slots=True)
class Finding:
    severity: Severity
    file: str
    field: str  # dotted path, e.g. authorization.rules[1].roles_any; "" for the whole file
    code: str
    message: str

    def __str__(self) -> str:
        where = f"{self.file}: {self.field}" if self.field else self.file
        return f"{where}: {self.severity} {self.code}: {self.message}"

    def as_dict(self) -> dict[str, str]:
        return asdict(self)


def lint(directory: Path, api_keys: Path | None) -> list[Finding]:
    """Every finding for a policy directory: load errors first, then each file's checks."""
    loaded = _load_errors(directory, api_keys)
    try:
        files = read_policy_dir(directory)
    except PolicyLoadError:
        # Some file does not even read (reported above): the set is refused as a whole, and
        # what the other files mean is best looked at once it reads.
        return loaded
    platform = _platform(directory)
    # A field the loader already refuses is not warned about again.
    refused = {(f.file, f.field) for f in loaded}
    found = [
        finding
        for pf in files
        for finding in lint_policy(str(pf.path), pf.policy, platform)
        if (finding.file, finding.field) not in refused
    ]
    return loaded + found


def _load_errors(directory: Path, api_keys: Path | None) -> list[Finding]:
    """What the server would refuse to start with, as the loader words it."""
    found = []
    # Lint authenticates nobody: without a key file an empty store does, and is never read.
    keys = ApiKeyStore(os.devnull)
    if api_keys is not None:
        try:
            keys = ApiKeyStore.load(api_keys)
        except ApiKeyError as exc:
            message = str(exc).removeprefix(f"{api_keys}: ")
            found.append(Finding("error", str(api_keys), "", "api-keys-invalid", message))
    try:
        PolicyStore(directory, keys, os.environ)
    except PolicyLoadError as exc:
        found += [Finding("error", e.file, e.field, "load-error", e.message) for e in exc.errors]
    return found


def _platform(directory: Path) -> PlatformFile:
    try:
        return read_platform_file(directory)
    except PolicyLoadError:
        return NO_PLATFORM  # reported as a load error; lint the models without its floors


def lint_policy(file: str, policy: Policy, platform: PlatformFile = NO_PLATFORM) -> list[Finding]:
    """The findings for one validated model policy."""
    model = _Model.of(file, policy, platform)
    return [finding for check in _CHECKS for finding in check(model)]


# --- what a policy makes possible -----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Model:
    file: str
    policy: Policy
    floors: Floors
    quotas: Quotas  # the model's own with the platform's defaults: what it enforces
    accepted: frozenset[str]  # authentication methods
    routed: frozenset[str]  # versions some request can be served (or mirrored)

    @classmethod
    def of(cls, file: str, policy: Policy, platform: PlatformFile) -> _Model:
        return cls(
            file=file,
            policy=policy,
            floors=platform.platform.floors,
            quotas=platform.platform.quotas.apply(policy.quotas),
            accepted=frozenset(m.kind() for m in policy.authentication),
            routed=_routed_versions(policy),
        )

    def finding(self, severity: Severity, field: str, code: str, message: str) -> Finding:
        return Finding(severity, self.file, field, code, message)

    def version_tenants(self, version: str) -> frozenset[str] | None:
        """The tenants that can be served this version; None: any (or none)."""
        spec = next(v for v in self.policy.versions if v.name == version)
        return _meet(_set(self.policy.tenancy.tenants), _set(spec.tenants))

    def in_scope(self, rule: Rule) -> list[str]:
        """The routed versions a rule applies to, in policy order; none when the rule is
        limited to input types the model refuses anyway."""
        accepted_types = self.policy.input.input_types
        if (
            rule.input_types is not None
            and accepted_types is not None
            and set(rule.input_types).isdisjoint(accepted_types)
        ):
            return []
        return [
            v.name
            for v in self.policy.versions
            if v.name in self.routed and (rule.versions is None or v.name in rule.versions)
        ]

    def enforced(self, rule: Rule) -> bool:
        return not (rule.dry_run or self.policy.dry_run)


def _routed_versions(policy: Policy) -> frozenset[str]:
    routing = policy.routing
    if routing.pin_header is not None or routing.pin_claim is not None:
        routed = {v.name for v in policy.versions}  # a caller may pin any of them
    else:
        routed = {policy.default_version().name} | {v.name for v in policy.versions if v.weight}
    if routing.shadow is not None:
        routed.add(routing.shadow.version)
    fallbacks = {v.name: v.fallback for v in policy.versions}
    while True:  # what a routed version falls back to serves its callers too
        more = {fallbacks[name] for name in routed if fallbacks[name] is not None} - routed
        if not more:
            return frozenset(routed)
        routed |= {name for name in more if name is not None}


def _set(values: Iterable[str] | None) -> frozenset[str] | None:
    return None if values is None else frozenset(values)


def _meet(a: frozenset[str] | None, b: frozenset[str] | None) -> frozenset[str] | None:
    """Both restrictions at once; None is no restriction."""
    if a is None:
        return b
    return a if b is None else a & b


def _rule_field(index: int, name: str = "") -> str:
    return f"authorization.rules[{index}]" + (f".{name}" if name else "")


def _names(values: Iterable[str]) -> str:
    return ", ".join(sorted(values))


def _scope(model: _Model, rule: Rule, versions: Iterable[str] | None = None) -> str:
    """What a rule that never passes closes, in words."""
    names = list(versions if versions is not None else model.in_scope(rule))
    if rule.versions is None and versions is None:
        where = "the model"
    else:
        where = f"version{'s' if len(names) > 1 else ''} {', '.join(names)}"
    if rule.input_types is not None:
        where += f" (for requests carrying {_names(rule.input_types)})"
    return where


def _severity(model: _Model, *rules: Rule) -> Severity:
    # A rule in dry run records what it would deny instead of denying: it closes nothing yet.
    return "error" if all(model.enforced(r) for r in rules) else "warning"


# Which identity attributes each method can carry (see authn: API keys have roles and a tenant
# but no scopes; certificates a tenant only from a SPIFFE path segment).
def _carries(method: AuthMethod, attribute: Literal["tenant", "roles", "scopes"]) -> bool:
    if method.api_key is not None:
        return attribute != "scopes"
    if method.mtls is not None:
        return attribute == "tenant" and method.mtls.tenant_from_path_segment is not None
    token = method.jwt or method.introspection
    return token is not None and getattr(token.claims, attribute) is not None


_NEEDS: tuple[tuple[str, Literal["tenant", "roles", "scopes"]], ...] = (
    ("tenants", "tenant"), ("roles_any", "roles"), ("roles_all", "roles"),
    ("scopes_any", "scopes"), ("scopes_all", "scopes"),
)  # fmt: skip


def _never_passes(model: _Model, rule: Rule) -> tuple[str, str] | None:
    """(condition, why) when no caller can pass the rule wherever it applies, else None."""
    methods = [
        m for m in model.policy.authentication
        if rule.auth_methods is None or m.kind() in rule.auth_methods
    ]  # fmt: skip
    if not methods:
        return "auth_methods", (
            f"names only methods this policy does not accept (it accepts {_names(model.accepted)})"
        )
    for condition, attribute in _NEEDS:
        needed = getattr(rule, condition) is not None
        if needed and not any(_carries(m, attribute) for m in methods):
            kinds = _names({m.kind() for m in methods})
            return condition, f"needs {attribute}, which no method it admits ({kinds}) carries"
    tenancy = _set(model.policy.tenancy.tenants)
    if rule.tenants is not None and tenancy is not None and tenancy.isdisjoint(rule.tenants):
        return "tenants", (
            f"admits only tenants {_names(rule.tenants)}, none of which may reach the model "
            f"(tenancy.tenants: {_names(tenancy)})"
        )
    if rule.when is not None and constant(rule.when) is False:
        return "when", "its condition is always false"
    return None


# --- checks -------------------------------------------------------------------------------


def _check_versions(model: _Model) -> Iterator[Finding]:
    """Versions no request is served, and rules that apply only to those."""
    for k, version in enumerate(model.policy.versions):
        if version.name not in model.routed:
            yield model.finding(
                "warning", f"versions[{k}]", "version-unreachable",
                f"no request is served {version.name!r}: it is not the default, has no canary "
                "weight, no version falls back to it and pinning is off "
                "(routing.pin_header and routing.pin_claim are null)",
            )  # fmt: skip
        elif model.version_tenants(version.name) == frozenset():
            yield model.finding(
                "warning", f"versions[{k}].tenants", "version-unreachable",
                f"dedicated to {_names(version.tenants or ())}, none of which may reach the "
                f"model (tenancy.tenants: {_names(model.policy.tenancy.tenants or ())})",
            )  # fmt: skip
    for i, rule in enumerate(model.policy.authorization.rules):
        if model.in_scope(rule):
            continue
        if rule.input_types is not None and model.policy.input.input_types is not None:
            field, why = (
                "input_types",
                (
                    f"the model takes only {_names(model.policy.input.input_types)} "
                    "(input.input_types)"
                ),
            )
        else:
            field, why = "versions", f"no request is served {_names(rule.versions or ())}"
        yield model.finding(
            "warning", _rule_field(i, field), "rule-never-applies",
            f"rule {rule.name!r} never applies: {why}",
        )  # fmt: skip


def _check_never_passes(model: _Model) -> Iterator[Finding]:
    for i, rule in enumerate(model.policy.authorization.rules):
        if not model.in_scope(rule):
            continue  # never applies: reported by _check_versions
        reason = _never_passes(model, rule)
        if reason is not None:
            condition, why = reason
            yield model.finding(
                _severity(model, rule), _rule_field(i, condition), "rule-never-passes",
                f"rule {rule.name!r} {why}: no caller passes it, so {_scope(model, rule)} "
                "is closed to everyone",
            )  # fmt: skip
            continue
        unaccepted = set(rule.auth_methods or ()) - model.accepted
        if unaccepted:
            yield model.finding(
                "warning", _rule_field(i, "auth_methods"), "auth-method-not-accepted",
                f"{_names(unaccepted)}: not accepted by this policy (authentication), so "
                "never matched",
            )  # fmt: skip
        tenants = rule.tenants
        closed = [
            name for name in model.in_scope(rule)
            if tenants is not None
            and (served := model.version_tenants(name))  # empty: reported on the version
            and served.isdisjoint(tenants)
        ]  # fmt: skip
        if tenants is not None and closed:
            yield model.finding(
                _severity(model, rule), _rule_field(i, "tenants"), "rule-never-passes",
                f"rule {rule.name!r} admits only tenants {_names(tenants)}, which are never "
                f"served {', '.join(closed)} (dedicated to other tenants): "
                f"{_scope(model, rule, closed)} is closed to everyone",
            )  # fmt: skip


def _typed(values: object) -> frozenset[tuple[type, object]]:
    # As rules compare claims: `true` never equals `1`.
    items = values if isinstance(values, list) else [values]
    return frozenset((type(v), v) for v in items)


def _conflict(model: _Model, a: Rule, b: Rule) -> str | None:
    """The condition no caller can satisfy in both rules, or None."""
    for condition in ("principals", "tenants"):
        x, y = getattr(a, condition), getattr(b, condition)
        if x is not None and y is not None and set(x).isdisjoint(y):
            return condition
    if a.auth_methods is not None and b.auth_methods is not None:
        # Each admits some accepted method (else it never passes, reported on its own).
        mine, theirs = model.accepted & set(a.auth_methods), model.accepted & set(b.auth_methods)
        if mine and theirs and mine.isdisjoint(theirs):
            return "auth_methods"
    for claim in sorted(set(a.claims or {}) & set(b.claims or {})):
        if _typed((a.claims or {})[claim]).isdisjoint(_typed((b.claims or {})[claim])):
            return f"claims.{claim}"
    return None


def _check_contradictions(model: _Model) -> Iterator[Finding]:
    rules = model.policy.authorization.rules
    for j, later in enumerate(rules):
        for i, earlier in enumerate(rules[:j]):
            shared = [name for name in model.in_scope(earlier) if name in model.in_scope(later)]
            condition = _conflict(model, earlier, later) if shared else None
            if condition is None:
                continue
            everywhere = earlier.versions is None and later.versions is None
            where = _scope(model, later, None if everywhere else shared)
            if earlier.input_types is not None and later.input_types is None:
                where += " (for requests both apply to)"
            yield model.finding(
                _severity(model, earlier, later), _rule_field(j, condition.split(".")[0]),
                "rules-contradict",
                f"no caller passes both rule {later.name!r} and rule {earlier.name!r} "
                f"({_rule_field(i)}): their {condition} have nothing in common, so {where} "
                "is closed to everyone",
            )  # fmt: skip
            break


def _covers(wide: Collection[str] | None, narrow: Collection[str] | None) -> bool:
    """Every value `narrow` allows, `wide` allows (None allows everything)."""
    return wide is None or (narrow is not None and set(narrow) <= set(wide))


def _implies(model: _Model, a: Rule, b: Rule) -> bool:
    """Every caller who passes `a` passes `b`."""
    if b.when is not None and (a.when is None or _normal(a.when) != _normal(b.when)):
        return False
    if not (_covers(b.principals, a.principals) and _covers(b.tenants, a.tenants)):
        return False
    admitted = model.accepted & set(a.auth_methods or model.accepted)
    if b.auth_methods is not None and not admitted <= set(b.auth_methods):
        return False
    for any_of, all_of in (("roles_any", "roles_all"), ("scopes_any", "scopes_all")):
        a_any, a_all = getattr(a, any_of), set(getattr(a, all_of) or ())
        held = a_all | (set(a_any) if a_any is not None and len(a_any) == 1 else set())
        b_any, b_all = getattr(b, any_of), getattr(b, all_of)
        if b_any is not None and not (_covers(b_any, a_any) or held & set(b_any)):
            return False
        if b_all is not None and not set(b_all) <= held:
            return False
    a_claims = a.claims or {}
    return all(
        claim in a_claims and _typed(a_claims[claim]) <= _typed(allowed)
        for claim, allowed in (b.claims or {}).items()
    )


def _check_redundant(model: _Model) -> Iterator[Finding]:
    rules = model.policy.authorization.rules
    for j, rule in enumerate(rules):
        for i, other in enumerate(rules):
            if i == j or (other.dry_run and not rule.dry_run):
                continue  # a rule in dry run denies nothing, so it makes no other redundant
            if not model.in_scope(other) or _never_passes(model, other):
                continue  # reported as such; implying anything adds no news
            if not (_covers(other.versions, rule.versions)
                    and _covers(other.input_types, rule.input_types)
                    and _implies(model, other, rule)):  # fmt: skip
                continue
            same = (other.versions == rule.versions and other.input_types == rule.input_types
                    and _implies(model, rule, other))  # fmt: skip
            if same and i > j:
                continue  # duplicates: reported on the later one
            code, what = (
                ("rule-duplicate", "has the same conditions and scope as")
                if same
                else ("rule-redundant", "adds nothing: every caller it would refuse is refused by")
            )
            yield model.finding(
                "warning", _rule_field(j), code,
                f"rule {rule.name!r} {what} rule {other.name!r} ({_rule_field(i)}), which "
                "applies wherever it does",
            )  # fmt: skip
            break


def _takes_text(policy: Policy) -> bool:
    types = policy.input.input_types
    return types is None or "text" in types


def _check_fail_open(model: _Model) -> Iterator[Finding]:
    policy = model.policy
    if policy.dry_run:
        yield model.finding(
            "warning", "dry_run", "dry-run",
            "the policy only records what it would deny (authorization, input inspection, "
            "quotas): only authentication and routing are enforced",
        )  # fmt: skip
    for i, rule in enumerate(policy.authorization.rules):
        if rule.dry_run:
            yield model.finding(
                "warning", _rule_field(i, "dry_run"), "dry-run",
                f"rule {rule.name!r} only records the callers it would refuse",
            )  # fmt: skip
    if model.quotas.rules and model.quotas.on_store_failure != "fail_closed":
        yield model.finding(
            "warning", "quotas.on_store_failure", "quota-fail-open",
            f"{model.quotas.on_store_failure}: when the shared store fails each replica counts "
            "alone, so together they admit more than the limits",
        )  # fmt: skip
    if not policy.output.sanitize_errors:
        yield model.finding(
            "warning", "output.sanitize_errors", "errors-unsanitized",
            "upstream 5xx bodies (stack traces, internal names) reach the caller",
        )  # fmt: skip
    injection = policy.input.injection
    if injection is not None and injection.action == "log":
        yield model.finding(
            "warning", "input.injection.action", "injection-log-only",
            "prompts that look like injection are only logged, never refused or flagged",
        )  # fmt: skip
    elif injection is None and _takes_text(policy):
        yield model.finding(
            "warning", "input.injection", "no-injection-inspection",
            "text reaches the model without injection inspection",
        )  # fmt: skip
    if policy.output.redact is None:
        yield model.finding(
            "warning" if _takes_text(policy) else "info", "output.redact", "no-output-redaction",
            "answers leave unscanned: PII and secrets in them reach the caller",
        )  # fmt: skip
    if policy.authorization.allow_any_authenticated:
        yield model.finding(
            "warning", "authorization.allow_any_authenticated", "allow-any-authenticated",
            f"any caller with a valid credential ({_names(model.accepted)}) may use the model",
        )  # fmt: skip


_CONDITIONS = ("principals", "tenants", "roles_any", "roles_all", "scopes_any", "scopes_all",
               "claims", "when")  # fmt: skip
_IDENTITY_LISTS = ("principals", "tenants", "roles_any", "roles_all", "scopes_any", "scopes_all")
_WILDCARD = re.compile(r"[*?]|^\.[*+]$")


def _check_broad(model: _Model) -> Iterator[Finding]:
    policy = model.policy
    for i, rule in enumerate(policy.authorization.rules):
        only_method = all(getattr(rule, c) is None for c in _CONDITIONS)
        if rule.auth_methods is not None and only_method and not _never_passes(model, rule):
            yield model.finding(
                "warning", _rule_field(i, "auth_methods"), "rule-only-auth-method",
                f"rule {rule.name!r} checks only the method: anyone holding a "
                f"{_names(set(rule.auth_methods) & model.accepted) or 'valid'} credential passes",
            )  # fmt: skip
        if rule.when is not None and constant(rule.when) is True:
            yield model.finding(
                "warning", _rule_field(i, "when"), "when-always-true",
                f"{rule.when!r} is always true: the condition restricts nothing",
            )  # fmt: skip
        for condition in _IDENTITY_LISTS:
            yield from _wildcards(model, _rule_field(i, condition), getattr(rule, condition))
    yield from _wildcards(model, "tenancy.tenants", policy.tenancy.tenants)
    for k, version in enumerate(policy.versions):
        yield from _wildcards(model, f"versions[{k}].tenants", version.tenants)
    if model.floors.require_tenant and policy.tenancy.tenants is None and not any(
        rule.tenants is not None and rule.versions is None and rule.input_types is None
        and model.enforced(rule)
        for rule in policy.authorization.rules
    ):  # fmt: skip
        yield model.finding(
            "warning", "tenancy.tenants", "no-tenant-restriction",
            "the platform requires every caller to have a tenant (floors.require_tenant), "
            "yet callers of any tenant may use this model: set tenancy.tenants or a rule "
            "with tenants",
        )  # fmt: skip


def _wildcards(model: _Model, field: str, values: list[str] | None) -> Iterator[Finding]:
    for value in values or ():
        if _WILDCARD.search(value):
            yield model.finding(
                "warning", field, "wildcard-literal",
                f"{value!r} is matched literally, not as a wildcard: only the value "
                f"{value!r} itself matches",
            )  # fmt: skip


_CHECKS = (
    _check_versions, _check_never_passes, _check_contradictions, _check_redundant,
    _check_fail_open, _check_broad,
)  # fmt: skip


# --- constant conditions ------------------------------------------------------------------

_LITERAL = re.compile(
    r"""(?P<num>-?\d+)|"(?P<dq>[^"\\]*)"|'(?P<sq>[^'\\]*)'|(?P<word>true|false|null)"""
)


def constant(source: str) -> bool | None:
    """True or False when a CEL condition is literally constant (`true`, `1 == 1`, `x || true`),
    else None. Recognises literals only; anything that reads a variable is not constant."""
    text = _unwrap(source.strip())
    for operator, absorbing in (("||", True), ("&&", False)):
        parts = _split(text, operator)
        if len(parts) > 1:
            values = [constant(p) for p in parts]
            if absorbing in values:
                return absorbing
            return (not absorbing) if all(v is (not absorbing) for v in values) else None
    if text.startswith("!") and not text.startswith("!="):
        inner = constant(text[1:])
        return None if inner is None else not inner
    if text in ("true", "false"):
        return text == "true"
    for operator in ("==", "!="):
        parts = _split(text, operator)
        if len(parts) == 2:
            left, right = (_literal(_unwrap(p)) for p in parts)
            if left is None or right is None or left[0] != right[0]:
                return None  # not literals, or of different kinds (CEL may convert numbers)
            return (left == right) is (operator == "==")
    return None


def _literal(text: str) -> tuple[str, str] | None:
    """(kind, value) of a literal int, string, bool or null; None for anything else."""
    match = _LITERAL.fullmatch(text)
    if match is None:
        return None
    if match["num"] is not None:
        return "int", str(int(match["num"]))
    if match["word"] is not None:
        return match["word"], match["word"]
    return "string", match["dq"] if match["dq"] is not None else match["sq"]


def _normal(source: str) -> str:
    return re.sub(r"\s+", "", source)


def _outside_strings(text: str) -> str:
    """The text with string literals blanked, so operators inside them are not seen."""
    return re.sub(r""""[^"\\]*"|'[^'\\]*'""", lambda m: "_" * len(m[0]), text)


def _unwrap(text: str) -> str:
    """`(x)` as `x`, when the brackets enclose the whole text."""
    while text.startswith("(") and _closing(text) == len(text) - 1:
        text = text[1:-1].strip()
    return text


def _closing(text: str) -> int:
    """Where the bracket opening the text closes; -1 if it does not."""
    depth = 0
    for k, char in enumerate(_outside_strings(text)):
        depth += {"(": 1, ")": -1}.get(char, 0)
        if depth == 0:
            return k
    return -1


def _split(text: str, operator: str) -> list[str]:
    """The parts of `text` between top-level occurrences of `operator`."""
    plain = _outside_strings(text)
    parts, depth, start, k = [], 0, 0, 0
    while k < len(plain):
        depth += {"(": 1, ")": -1, "[": 1, "]": -1}.get(plain[k], 0)
        if depth == 0 and plain.startswith(operator, k):
            parts.append(text[start:k].strip())
            start = k = k + len(operator)
            continue
        k += 1
    parts.append(text[start:].strip())
    return parts
