"""The platform's floors, checked against each model's policy at load.

A floor is a minimum the platform team sets in `_platform.yaml` (`floors:`); a model owner's
policy may be stricter but never weaker. A breach is a load error on the model's file, naming
the field that breaks the floor and the floor itself, so the owner knows what to change and the
platform team can find the rule.
"""

from __future__ import annotations

from extproc.policy.schema import Floors, Policy
from extproc.quota.schema import Quotas, duration_ms

_FIRMNESS = {"log": 0, "flag": 1, "block": 2}


def _floor(name: str) -> str:
    return f"the platform floor floors.{name} (_platform.yaml)"


def breaches(policy: Policy, quotas: Quotas, floors: Floors) -> list[tuple[str, str]]:
    """(field, message) for every floor the policy weakens; `quotas` are the model's quotas with
    the platform defaults applied (what it will actually enforce)."""
    out: list[tuple[str, str]] = []
    if floors.authentication_methods is not None:
        allowed = set(floors.authentication_methods)
        for i, method in enumerate(policy.authentication):
            kind = method.kind()
            if kind not in allowed:
                out.append((f"authentication[{i}]",
                            f"accepts {kind}, which {_floor('authentication_methods')} does "
                            f"not allow (allowed: {', '.join(sorted(allowed))})"))  # fmt: skip
    if floors.require_tenant and not policy.tenancy.require_tenant:
        out.append(("tenancy.require_tenant", f"must be true: {_floor('require_tenant')}"))
    inp = policy.input
    if floors.max_body_bytes is not None and inp.max_body_bytes > floors.max_body_bytes:
        out.append(("input.max_body_bytes",
                    f"{inp.max_body_bytes} exceeds {floors.max_body_bytes}, "
                    f"{_floor('max_body_bytes')}"))  # fmt: skip
    if floors.injection is not None:
        if inp.injection is None:
            out.append(("input.injection", f"is required by {_floor('injection')} "
                        f"(action {floors.injection} or firmer)"))  # fmt: skip
        elif _FIRMNESS[inp.injection.action] < _FIRMNESS[floors.injection]:
            out.append(("input.injection.action",
                        f"{inp.injection.action} is weaker than {floors.injection}, "
                        f"{_floor('injection')}"))  # fmt: skip
    if (
        floors.max_injection_threshold is not None
        and inp.injection is not None
        and inp.injection.threshold > floors.max_injection_threshold
    ):
        out.append(("input.injection.threshold",
                    f"{inp.injection.threshold} is laxer than {floors.max_injection_threshold}, "
                    f"{_floor('max_injection_threshold')}"))  # fmt: skip
    blocked = set(inp.pii.block) if inp.pii else set()
    masked = set(inp.pii.mask) if inp.pii else set()
    missing = sorted(set(floors.pii_block) - blocked)
    if missing:
        out.append(("input.pii.block",
                    f"must block {', '.join(missing)}: {_floor('pii_block')}"))  # fmt: skip
    missing = sorted(set(floors.pii_mask) - blocked - masked)
    if missing:
        out.append(("input.pii.mask",
                    f"must mask or block {', '.join(missing)}: {_floor('pii_mask')}"))  # fmt: skip
    redact = policy.output.redact
    covered = set(redact.block) | set(redact.mask) if redact else set()
    missing = sorted(set(floors.output_redact) - covered)
    if missing:
        out.append(("output.redact",
                    f"must redact {', '.join(missing)} in answers: "
                    f"{_floor('output_redact')}"))  # fmt: skip
    if floors.sanitize_errors and not policy.output.sanitize_errors:
        out.append(("output.sanitize_errors", f"must stay true: {_floor('sanitize_errors')}"))
    if floors.fail_closed and quotas.on_store_failure != "fail_closed":
        out.append(("quotas.on_store_failure",
                    f"{quotas.on_store_failure} fails open; {_floor('fail_closed')} "
                    "requires fail_closed"))  # fmt: skip
    if floors.forbid_dry_run:
        if policy.dry_run:
            out.append(("dry_run", f"must stay false: {_floor('forbid_dry_run')}"))
        for i, rule in enumerate(policy.authorization.rules):
            if rule.dry_run:
                out.append((f"authorization.rules[{i}].dry_run",
                            f"must stay false: {_floor('forbid_dry_run')}"))  # fmt: skip
    out.extend(_quota_breaches(quotas, len(policy.quotas.rules), floors))
    return out


def _quota_breaches(quotas: Quotas, own: int, floors: Floors) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    for j, ceiling in enumerate(floors.max_quotas):
        floor = _floor(f"max_quotas[{j}]")
        rules = [(i, r) for i, r in enumerate(quotas.rules) if r.kind == ceiling.kind]
        if not rules:
            out.append(("quotas.rules",
                        f"needs a {ceiling.kind} quota (the platform defaults give none): "
                        f"{floor}"))  # fmt: skip
        for i, rule in rules:
            if ceiling.window is None:
                too_much = rule.limit > ceiling.limit
                allowed = f"{ceiling.limit} in flight"
            else:
                # Compare rates, so a ceiling of 100/1m also caps a rule written per hour.
                window = duration_ms(rule.window or "1s")
                too_much = rule.limit * duration_ms(ceiling.window) > ceiling.limit * window
                allowed = f"{ceiling.limit} per {ceiling.window}"
            if too_much:
                # Rules past the policy's own come from the platform's defaults.
                where = f"quotas.rules[{i}].limit" if i < own else "quotas.rules"
                message = f"quota {rule.name!r} allows more than {allowed}: {floor}"
                out.append((where, message))
    return out
