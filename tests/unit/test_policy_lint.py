"""`extproc policy lint`: each check on a small policy directory, the demo policies, the CLI.

Every test starts from a policy that lints clean and changes one thing, then asserts exactly the
findings (severity, code, field) that change brings.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml

from extproc.authn.apikey import create_key
from extproc.cli import main
from extproc.demo.issuer import ensure_demo_issuer
from extproc.policy.lint import Finding, constant, lint

REPO = Path(__file__).resolve().parents[2]

JWT: dict[str, Any] = {
    "jwt": {
        "issuer": "https://issuer.demo.local",
        "audiences": ["models"],
        "algorithms": ["ES256"],
        "jwks_file": "demo/jwks.json",
    }
}
CLEAN: dict[str, Any] = {
    "model": "chat",
    "routes": [{"path_prefix": "/v1/chat"}],
    "versions": [
        {"name": "v1", "cluster": "chat-v1", "default": True},
        {"name": "v2", "cluster": "chat-v2", "weight": 10},
    ],
    "authentication": [JWT, {"api_key": {}}],
    "authorization": {
        "rules": [
            {"name": "tenant", "tenants": ["demo"]},
            {"name": "callers", "roles_any": ["chat"]},
        ]
    },
    "input": {"injection": {"action": "block"}},
    "output": {"redact": {"mask": ["email"]}},
}


@pytest.fixture(scope="module")
def demo_keys(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("issuer")
    ensure_demo_issuer(root / "demo")
    return root / "demo"


class Dir:
    """A policy directory: the shipped platform file, the demo issuer's keys, one model."""

    def __init__(self, root: Path, demo_keys: Path) -> None:
        self.root = root
        shutil.copy(REPO / "policies" / "_platform.yaml", root / "_platform.yaml")
        shutil.copytree(demo_keys, root / "demo")
        self.keys = root / "keys.json"
        create_key(self.keys, "kim", tenant="demo", roles=["chat"])

    def write(self, doc: dict[str, Any], name: str = "chat.yaml") -> Path:
        path = self.root / name
        path.write_text(yaml.safe_dump(doc))
        return path

    def platform(self, doc: dict[str, Any]) -> None:
        (self.root / "_platform.yaml").write_text(yaml.safe_dump(doc))

    def lint(self, doc: dict[str, Any] | None = None) -> set[tuple[str, str, str]]:
        """(severity, code, field) of every finding, after writing `doc` as the model."""
        return {(f.severity, f.code, f.field) for f in self.findings(doc)}

    def findings(self, doc: dict[str, Any] | None = None) -> list[Finding]:
        if doc is not None:
            self.write(doc)
        return lint(self.root, self.keys)


@pytest.fixture
def d(tmp_path: Path, demo_keys: Path) -> Dir:
    return Dir(tmp_path, demo_keys)


def policy(**changes: Any) -> dict[str, Any]:
    """CLEAN with top-level sections replaced (or removed, given None); a copy throughout,
    so a test changing it leaves CLEAN alone."""
    doc = copy.deepcopy(CLEAN)
    for key, value in changes.items():
        if value is None:
            doc.pop(key, None)
        else:
            doc[key] = copy.deepcopy(value)
    return doc


def rules(*extra: dict[str, Any], base: bool = True) -> dict[str, Any]:
    return {"rules": [*(CLEAN["authorization"]["rules"] if base else []), *extra]}


def test_the_starting_policy_lints_clean(d: Dir) -> None:
    assert d.lint(CLEAN) == set()


# --- (a) what the loader refuses --------------------------------------------------------------


def test_a_schema_error_is_reported_as_the_loader_words_it(d: Dir) -> None:
    doc = policy(authorization=rules({"name": "typo", "role_any": ["chat"]}))
    findings = d.findings(doc)
    assert [(f.severity, f.code, f.field) for f in findings] == [
        ("error", "load-error", "authorization.rules[2].role_any")
    ]
    assert findings[0].message == "Extra inputs are not permitted"


def test_compile_errors_name_file_and_field_and_are_not_warned_twice(d: Dir) -> None:
    # The shipped platform file requires fail_closed quotas: the loader refuses `local`, so
    # lint reports that error and not also its own fail-open warning on the same field.
    assert d.lint(policy(quotas={"on_store_failure": "local"})) == {
        ("error", "load-error", "quotas.on_store_failure")
    }
    assert "floors.fail_closed" in d.findings()[0].message
    doc = policy()
    doc["authorization"]["rules"][1]["when"] = "identity.rolez.size() > 0"
    assert d.lint(doc) == {("error", "load-error", "authorization.rules[1].when")}
    assert "identity.rolez" in d.findings()[0].message


def test_an_invalid_platform_file_and_api_key_file_are_errors(d: Dir) -> None:
    d.write(CLEAN)
    d.platform({"floors": {"require_tenants": True}})
    d.keys.write_text("{")
    found = d.findings()
    assert {(f.code, Path(f.file).name, f.field) for f in found} == {
        ("api-keys-invalid", "keys.json", ""),
        ("load-error", "_platform.yaml", "floors.require_tenants"),
    }


def test_without_an_api_key_file_lint_still_loads(d: Dir) -> None:
    d.write(CLEAN)
    assert lint(d.root, None) == []


# --- (b) rules that never apply or never pass, and rules that contradict each other ----------

V3 = {"name": "v3", "cluster": "chat-v3"}


def test_a_rule_for_a_version_no_request_is_served(d: Dir) -> None:
    doc = policy(
        versions=[*CLEAN["versions"], V3],
        routing={"pin_header": None},
        authorization=rules({"name": "v3 admins", "versions": ["v3"], "roles_any": ["admin"]}),
    )
    assert d.lint(doc) == {
        ("warning", "version-unreachable", "versions[2]"),
        ("warning", "rule-never-applies", "authorization.rules[2].versions"),
    }
    # A second such rule is not also called a duplicate: it never applies either.
    doc["authorization"]["rules"].append({**doc["authorization"]["rules"][2], "name": "again"})
    assert d.lint(doc) == {
        ("warning", "version-unreachable", "versions[2]"),
        ("warning", "rule-never-applies", "authorization.rules[2].versions"),
        ("warning", "rule-never-applies", "authorization.rules[3].versions"),
    }
    del doc["authorization"]["rules"][3]
    # With pinning on, v3 can be asked for: both findings go.
    doc["routing"] = {}
    assert d.lint(doc) == set()
    # A version something falls back to is served too.
    doc["routing"] = {"pin_header": None}
    doc["versions"][1]["fallback"] = "v3"
    assert d.lint(doc) == set()


def test_a_rule_for_input_types_the_model_refuses(d: Dir) -> None:
    doc = policy(
        input={"input_types": ["text"], "injection": {}},
        authorization=rules({"name": "images", "input_types": ["image"], "roles_any": ["vis"]}),
    )
    assert d.lint(doc) == {("warning", "rule-never-applies", "authorization.rules[2].input_types")}


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"auth_methods": ["mtls"]}, "auth_methods"),
        ({"auth_methods": ["jwt"], "scopes_any": ["chat"], "_scopes": None}, "scopes_any"),
        ({"auth_methods": ["api_key"], "scopes_all": ["chat"]}, "scopes_all"),
        ({"auth_methods": ["jwt"], "roles_all": ["chat"], "_roles": None}, "roles_all"),
        ({"when": "false || 1 == 2"}, "when"),
    ],
)
def test_a_rule_no_caller_can_pass(d: Dir, change: dict[str, Any], field: str) -> None:
    doc = policy()
    rule: dict[str, Any] = {"name": "impossible", "principals": ["kim"]}
    for key, value in change.items():
        if key.startswith("_"):  # turn a claim off for the JWT issuer
            doc["authentication"][0] = {"jwt": {**JWT["jwt"], "claims": {key[1:]: value}}}
        else:
            rule[key] = value
    doc["authorization"]["rules"].append(rule)
    assert d.lint(doc) == {("error", "rule-never-passes", f"authorization.rules[2].{field}")}


def test_roles_need_a_method_that_carries_them(d: Dir) -> None:
    # Only JWTs, whose roles claim is turned off: the `callers` rule can never pass.
    doc = policy(authentication=[{"jwt": {**JWT["jwt"], "claims": {"roles": None}}}])
    assert d.lint(doc) == {("error", "rule-never-passes", "authorization.rules[1].roles_any")}
    # Certificates carry no roles either; API keys do.
    doc["authentication"].append({"mtls": {"trust_domains": ["corp"]}})
    assert d.lint(doc) == {("error", "rule-never-passes", "authorization.rules[1].roles_any")}
    doc["authentication"].append({"api_key": {}})
    assert d.lint(doc) == set()


def test_a_method_the_policy_does_not_accept_is_never_matched(d: Dir) -> None:
    doc = policy(
        authorization=rules({"name": "m", "auth_methods": ["jwt", "mtls"], "roles_any": ["a"]})
    )
    assert d.lint(doc) == {
        ("warning", "auth-method-not-accepted", "authorization.rules[2].auth_methods")
    }


def test_tenants_the_model_or_a_version_never_serves(d: Dir) -> None:
    doc = policy(tenancy={"tenants": ["acme"]})
    found = d.findings(doc)
    assert {(f.severity, f.code, f.field) for f in found} == {
        ("error", "rule-never-passes", "authorization.rules[0].tenants")
    }
    assert "tenancy.tenants: acme" in found[0].message
    # A dedicated version for another tenant: the `tenant` rule (demo only) closes it.
    doc = policy(versions=[*CLEAN["versions"], {**V3, "tenants": ["acme"]}])
    found = d.findings(doc)
    assert {(f.severity, f.code, f.field) for f in found} == {
        ("error", "rule-never-passes", "authorization.rules[0].tenants")
    }
    assert "version v3 is closed to everyone" in found[0].message
    # A dedicated version for a tenant the model never admits is reported on the version.
    doc["tenancy"] = {"tenants": ["demo"]}
    assert d.lint(doc) == {("warning", "version-unreachable", "versions[2].tenants")}


def test_a_rule_in_dry_run_that_never_passes_is_a_warning(d: Dir) -> None:
    doc = policy(authorization=rules({"name": "m", "auth_methods": ["mtls"], "dry_run": True}))
    assert d.lint(doc) == {
        ("warning", "rule-never-passes", "authorization.rules[2].auth_methods"),
        ("warning", "dry-run", "authorization.rules[2].dry_run"),
    }


@pytest.mark.parametrize(
    ("first", "second", "field"),
    [
        ({"tenants": ["demo"]}, {"tenants": ["acme"]}, "tenants"),
        ({"principals": ["kim"]}, {"principals": ["lee"], "roles_any": ["x"]}, "principals"),
        ({"auth_methods": ["jwt"], "roles_any": ["a"]}, {"auth_methods": ["api_key"],
                                                         "roles_any": ["b"]}, "auth_methods"),
        ({"claims": {"tier": "pro"}}, {"claims": {"tier": ["free", 1]}}, "claims"),
    ],
)  # fmt: skip
def test_rules_no_caller_can_pass_together(
    d: Dir, first: dict[str, Any], second: dict[str, Any], field: str
) -> None:
    doc = policy(authorization=rules({"name": "a", **first}, {"name": "b", **second}, base=False))
    found = d.findings(doc)
    assert {(f.severity, f.code, f.field) for f in found} == {
        ("error", "rules-contradict", f"authorization.rules[1].{field}")
    }
    assert "the model is closed to everyone" in found[0].message


def test_contradicting_rules_on_different_versions_close_nothing(d: Dir) -> None:
    doc = policy(
        authorization=rules(
            {"name": "a", "versions": ["v1"], "tenants": ["demo"]},
            {"name": "b", "versions": ["v2"], "tenants": ["acme"]},
            base=False,
        )
    )
    assert d.lint(doc) == set()
    doc["authorization"]["rules"][1]["versions"] = ["v1", "v2"]
    found = d.findings(doc)
    assert [(f.code, f.field) for f in found] == [
        ("rules-contradict", "authorization.rules[1].tenants")
    ]
    assert "version v1 is closed" in found[0].message


# --- (c) rules that add nothing ---------------------------------------------------------------


def test_duplicate_rules(d: Dir) -> None:
    doc = policy(authorization=rules({"name": "callers again", "roles_any": ["chat"]}))
    assert d.lint(doc) == {("warning", "rule-duplicate", "authorization.rules[2]")}
    # Listing every accepted method restricts nothing: still the same rule.
    doc["authorization"]["rules"][2]["auth_methods"] = ["api_key", "jwt"]
    assert d.lint(doc) == {("warning", "rule-duplicate", "authorization.rules[2]")}


@pytest.mark.parametrize(
    ("wide", "narrow"),
    [
        ({"principals": ["kim", "lee"]}, {"principals": ["kim"]}),
        ({"roles_any": ["chat", "admin"]}, {"roles_all": ["chat", "beta"]}),
        ({"scopes_all": ["read"]}, {"scopes_any": ["read"], "tenants": ["demo"]}),
        ({"claims": {"tier": ["pro", "free"]}}, {"claims": {"tier": "pro"}}),
        ({"roles_any": ["x"]}, {"auth_methods": ["jwt"], "roles_any": ["x"]}),
    ],
)
def test_a_rule_implied_by_a_stricter_one_is_redundant(
    d: Dir, wide: dict[str, Any], narrow: dict[str, Any]
) -> None:
    doc = policy(authorization=rules({"name": "wide", **wide}, {"name": "narrow", **narrow},
                                     base=False))  # fmt: skip
    found = d.findings(doc)
    assert {(f.severity, f.code, f.field) for f in found} == {
        ("warning", "rule-redundant", "authorization.rules[0]")
    }
    assert "rule 'narrow' (authorization.rules[1])" in found[0].message


def test_a_rule_is_redundant_only_if_the_other_applies_wherever_it_does(d: Dir) -> None:
    # `beta` (v2 only) implies `callers`, but does not apply to v1: `callers` is needed there.
    doc = policy(
        authorization=rules(
            {"name": "callers", "roles_any": ["beta", "chat"]},
            {"name": "beta", "versions": ["v2"], "roles_any": ["beta"]},
            base=False,
        )
    )
    assert d.lint(doc) == set()
    # Applied everywhere, `beta` makes `callers` redundant...
    del doc["authorization"]["rules"][1]["versions"]
    assert d.lint(doc) == {("warning", "rule-redundant", "authorization.rules[0]")}
    # ... unless it only records (dry run): then `callers` is the one that denies.
    doc["authorization"]["rules"][1]["dry_run"] = True
    assert d.lint(doc) == {("warning", "dry-run", "authorization.rules[1].dry_run")}


def test_a_when_condition_is_only_implied_by_the_same_condition(d: Dir) -> None:
    when = 'request.method == "POST"'
    post = {"name": "post", "roles_any": ["chat"], "when": when}
    doc = policy(authorization=rules(post, {"name": "post2", "when": f" {when}"}, base=False))
    assert d.lint(doc) == {("warning", "rule-redundant", "authorization.rules[1]")}
    doc["authorization"]["rules"][1]["when"] = 'request.method == "GET"'
    assert d.lint(doc) == set()


# --- (d) fail-open settings -------------------------------------------------------------------


def test_dry_run_policy_and_rule(d: Dir) -> None:
    doc = policy(dry_run=True)
    doc["authorization"]["rules"][1]["dry_run"] = True
    assert d.lint(doc) == {
        ("warning", "dry-run", "dry_run"),
        ("warning", "dry-run", "authorization.rules[1].dry_run"),
    }


def test_quotas_counted_locally_when_the_store_fails(d: Dir) -> None:
    d.platform({})  # no fail_closed floor, no defaults
    doc = policy(quotas={"on_store_failure": "local"})
    assert d.lint(doc) == set()  # no quota at all: nothing fails open
    doc["quotas"]["rules"] = [{"name": "rpm", "limit": 60, "window": "1m"}]
    assert d.lint(doc) == {("warning", "quota-fail-open", "quotas.on_store_failure")}


@pytest.mark.parametrize(
    ("section", "value", "expected"),
    [
        ("output", {"sanitize_errors": False, "redact": {"mask": ["email"]}},
         {("warning", "errors-unsanitized", "output.sanitize_errors")}),
        ("input", {"injection": {"action": "log"}},
         {("warning", "injection-log-only", "input.injection.action")}),
        ("input", {"injection": {"action": "flag"}}, set()),
        ("input", None, {("warning", "no-injection-inspection", "input.injection")}),
        ("input", {"input_types": ["tensor"]}, set()),
        ("output", None, {("warning", "no-output-redaction", "output.redact")}),
        ("authorization", {"allow_any_authenticated": True},
         {("warning", "allow-any-authenticated", "authorization.allow_any_authenticated")}),
    ],
)  # fmt: skip
def test_fail_open_settings(
    d: Dir, section: str, value: Any, expected: set[tuple[str, str, str]]
) -> None:
    assert d.lint(policy(**{section: value})) == expected


def test_no_redaction_is_only_noted_for_a_model_that_takes_no_text(d: Dir) -> None:
    doc = policy(input={"input_types": ["tensor"]}, output=None)
    assert d.lint(doc) == {("info", "no-output-redaction", "output.redact")}


# --- (e) rules broader than they look ---------------------------------------------------------


def test_a_rule_that_checks_only_the_method(d: Dir) -> None:
    doc = policy(authorization=rules({"name": "jwt only", "auth_methods": ["jwt"]}))
    assert d.lint(doc) == {
        ("warning", "rule-only-auth-method", "authorization.rules[2].auth_methods")
    }


def test_a_when_condition_that_is_always_true(d: Dir) -> None:
    doc = policy()
    doc["authorization"]["rules"][1]["when"] = "(1 == 1)"
    assert d.lint(doc) == {("warning", "when-always-true", "authorization.rules[1].when")}


@pytest.mark.parametrize(
    ("source", "value"),
    [
        ("true", True), (" ( true ) ", True), ("1 == 1", True), ('"a" == "a"', True),
        ("'a' == \"a\"", True), ("!false", True), ('identity.tenant == "x" || true', True),
        ("1 != 2", True), ("true && (2 == 2)", True),
        ("false", False), ("1 == 2", False), ('true && "a" != "a"', False), ("!true", False),
        ('identity.tenant == "x"', None), ('"x" == identity.tenant', None),
        ('identity.tenant == "true || true"', None), ("1 == 1.0", None),
        ('now.getHours("Europe/Paris") < 20', None), ("(true) || (x)", True),
        ("(a) && (b)", None), ("'a' in identity.roles", None), ("identity.roles == []", None),
    ],
)  # fmt: skip
def test_constant_conditions_are_recognised_literally(source: str, value: bool | None) -> None:
    assert constant(source) is value


@pytest.mark.parametrize("field", ["principals", "tenants", "roles_any"])
def test_wildcard_looking_values_are_literal(d: Dir, field: str) -> None:
    doc = policy(authorization=rules({"name": "everyone?", field: ["*"]}, base=False))
    found = d.findings(doc)
    assert {(f.code, f.field) for f in found} == {
        ("wildcard-literal", f"authorization.rules[0].{field}")
    }
    assert "not as a wildcard" in found[0].message


def test_wildcard_tenants_in_tenancy_and_versions(d: Dir) -> None:
    doc = policy(
        tenancy={"tenants": ["demo", "*"]},
        versions=[*CLEAN["versions"], {**V3, "tenants": ["demo", "acme*"]}],
    )
    assert d.lint(doc) == {
        ("warning", "wildcard-literal", "tenancy.tenants"),
        ("warning", "wildcard-literal", "versions[2].tenants"),
    }


def test_a_model_any_tenant_may_use_while_the_platform_requires_tenants(d: Dir) -> None:
    d.platform({"floors": {"require_tenant": True}})
    no_tenant_rule = policy(tenancy={"require_tenant": True}, authorization=rules(
        {"name": "callers", "roles_any": ["chat"]}, base=False))  # fmt: skip
    assert d.lint(no_tenant_rule) == {("warning", "no-tenant-restriction", "tenancy.tenants")}
    # A rule on tenants for every version, or tenancy.tenants, restricts it.
    assert d.lint(policy(tenancy={"require_tenant": True})) == set()
    assert d.lint(policy(tenancy={"require_tenant": True, "tenants": ["demo"]})) == set()


# --- the demo policies and the command --------------------------------------------------------


@pytest.fixture
def demo_policies(tmp_path: Path) -> Path:
    shutil.copytree(REPO / "policies", tmp_path / "policies")
    ensure_demo_issuer(tmp_path / ".run" / "demo")
    return tmp_path / "policies"


def test_the_demo_policies_have_no_errors(demo_policies: Path) -> None:
    findings = lint(demo_policies, None)
    for finding in findings:
        print(finding)  # shown with -s: what the demo policies are warned about
    assert [f for f in findings if f.severity == "error"] == []


def test_lint_command_prints_one_line_per_finding_and_fails_on_errors(
    d: Dir, capsys: pytest.CaptureFixture[str]
) -> None:
    doc = policy(authorization=rules({"name": "m", "auth_methods": ["mtls"]}))
    path = d.write(doc)
    code = main(["policy", "lint", str(d.root), "--api-keys", str(d.keys)])
    out = capsys.readouterr()
    assert code == 1
    assert out.out.splitlines() == [
        f"{path}: authorization.rules[2].auth_methods: error rule-never-passes: rule 'm' names "
        "only methods this policy does not accept (it accepts api_key, jwt): no caller passes "
        "it, so the model is closed to everyone"
    ]
    assert "1 error, 0 warnings, 0 info" in out.err


def test_lint_command_warnings_fail_only_when_strict(
    d: Dir, capsys: pytest.CaptureFixture[str]
) -> None:
    d.write(policy(output=None))
    args = ["policy", "lint", str(d.root), "--api-keys", str(d.keys)]
    assert main(args) == 0
    assert main([*args, "--strict"]) == 1
    capsys.readouterr()
    assert main([*args, "--format", "json"]) == 0
    findings = json.loads(capsys.readouterr().out)
    assert findings == [{
        "severity": "warning", "file": str(d.root / "chat.yaml"), "field": "output.redact",
        "code": "no-output-redaction",
        "message": "answers leave unscanned: PII and secrets in them reach the caller",
    }]  # fmt: skip


def test_lint_command_on_a_clean_directory(d: Dir, capsys: pytest.CaptureFixture[str]) -> None:
    d.write(CLEAN)
    assert main(["policy", "lint", str(d.root), "--api-keys", str(d.keys), "--strict"]) == 0
    out = capsys.readouterr()
    assert out.out == ""
    assert "0 errors, 0 warnings, 0 info" in out.err
