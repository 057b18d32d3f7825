"""Phase 3, authorize: tenancy, the version served, the credential's constraints, the rules.

Order matters and is the same for every transport:

1. tenancy: a model owned by other tenants does not exist for the caller (404); a path or
   header naming another tenant is refused (403);
2. the version: pinned (claim or header), else the caller's sticky canary, else the default.
   A pinned version that does not exist, or belongs to another tenant, is one answer (400
   unknown_version), so a caller cannot learn which dedicated versions exist;
3. that version is authorized: the credential's constraints (models, version range, region,
   source range) and every rule scoped to it. A canary the caller may not use is skipped for
   the default version; a pinned one is refused (403). Authorization always applies to the
   version actually served;
4. the fallback (Envoy retries a failed candidate on it) and the shadow copy are added only for
   versions this caller could be served too.

What only the body can tell (input types, body tenant fields) is checked by `check_body`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping

from extproc.authn.base import Identity
from extproc.authz.conditions import ConditionFacts
from extproc.authz.constraints import ConstraintError, Request, violated
from extproc.authz.rules import failures, first_failure
from extproc.authz.versions import VersionSpec
from extproc.pipeline.context import RequestContext
from extproc.pipeline.decision import Allow, Decision, Deny, bad_request, forbidden, no_route
from extproc.policy.compiled import CompiledPolicy

# Set by Envoy (which overwrites any client copy) to the region the gateway runs in.
REGION_HEADER = "x-gateway-region"
# What `now` is in conditions (replaceable in tests, which cannot move the real clock).
clock: Callable[[], float] = time.time
# Removed on the way up when the response is to be read: the model then answers uncompressed.
ACCEPT_ENCODING = ("accept-encoding",)


def _constraint_request(
    policy: CompiledPolicy, ctx: RequestContext, version: str, types: frozenset[str] | None
) -> Request:
    return Request(
        model_names=policy.names,
        model=policy.model,
        version=version,
        source_address=ctx.source_address,
        region=ctx.headers.get(REGION_HEADER, ""),
        input_types=types,
    )


def _load(policy: CompiledPolicy) -> float:
    """The model's load: its overload guard's share of the in-flight cap (0 without one)."""
    guard = policy.quotas.overload
    if guard is None:
        return 0.0
    return min(guard.in_flight / max(guard.cap, 1), 1.0)


def _facts(
    policy: CompiledPolicy,
    identity: Identity,
    ctx: RequestContext,
    version: str,
    types: frozenset[str] | None,
    cost: int,
) -> Callable[[], ConditionFacts]:
    def build() -> ConditionFacts:
        hidden = {*policy.credential_headers, identity.credential_header}
        return ConditionFacts(
            principal=identity.principal,
            tenant=identity.tenant or "",
            auth_method=identity.method,
            roles=identity.roles,
            scopes=identity.scopes,
            claims=identity.claims,
            method=ctx.method,
            path=ctx.path,
            host=ctx.host,
            headers={k: v for k, v in ctx.headers.items() if k not in hidden},
            source_ip=ctx.source_address,
            model=policy.model,
            version=version,
            input_types=types or frozenset(),
            cost=cost,
            now=clock(),
            region=ctx.headers.get(REGION_HEADER, ""),
            load=_load(policy),
        )

    return build


def version_denial(
    policy: CompiledPolicy,
    identity: Identity,
    ctx: RequestContext,
    version: str,
    types: frozenset[str] | None = None,
    cost: int = 0,
) -> Deny | None:
    """Why this caller may not be served this version, or None (what is enforced: a policy in
    dry run leaves its constraints and rules to `trial_denials`)."""
    if not policy.dry_run:
        broken = _broken_constraint(policy, identity, ctx, version, types)
        if broken is not None:
            return forbidden(broken)
    facts = _facts(policy, identity, ctx, version, types, cost)
    failed = first_failure(policy.rules, identity, version, types, facts)
    if failed is not None:
        rule, condition = failed
        return forbidden(f"rule {rule!r} failed on {condition}")
    return None


def _broken_constraint(
    policy: CompiledPolicy,
    identity: Identity,
    ctx: RequestContext,
    version: str,
    types: frozenset[str] | None,
) -> str | None:
    try:
        broken = violated(identity.claims, _constraint_request(policy, ctx, version, types))
    except ConstraintError:
        return "credential constraint unreadable"
    return None if broken is None else f"credential constraint {broken}"


def record_trials(
    policy: CompiledPolicy,
    identity: Identity,
    ctx: RequestContext,
    version: str,
    types: frozenset[str] | None = None,
    cost: int = 0,
) -> None:
    """Note in the audit trail what dry run keeps from denying the version served: the
    policy's constraints (the whole policy in dry run) and every failing dry-run rule. With
    `types` (the body was read) only what depends on the body."""
    if policy.dry_run:
        broken = _broken_constraint(policy, identity, ctx, version, types)
        if broken is not None:
            ctx.trail.dry_run("authorize", 403, broken)
    facts = _facts(policy, identity, ctx, version, types, cost)
    for rule, condition in failures(policy.trial_rules, identity, version, types, facts):
        ctx.trail.dry_run("authorize", 403, f"rule {rule!r} failed on {condition}")


def _usable(
    policy: CompiledPolicy, identity: Identity, ctx: RequestContext, spec: VersionSpec | None
) -> bool:
    return (
        spec is not None
        and spec.visible_to(identity)
        and version_denial(policy, identity, ctx, spec.name) is None
    )


def _cluster_if_usable(
    policy: CompiledPolicy, identity: Identity, ctx: RequestContext, spec: VersionSpec | None
) -> str | None:
    """The version's cluster when this caller could be served it (fallback, shadow)."""
    if spec is None or not _usable(policy, identity, ctx, spec):
        return None
    return spec.cluster


def unknown_version() -> Deny:
    return bad_request(
        "unknown_version", "the requested model version does not exist", "unknown_version",
        phase="authorize",
    )  # fmt: skip


def authorize(policy: CompiledPolicy, identity: Identity, ctx: RequestContext) -> Decision:
    tenancy = policy.tenancy
    if not tenancy.visible_to(identity):
        return no_route("tenant_not_owner")
    crossing = tenancy.header_violation(identity, ctx.path, ctx.headers)
    if crossing is not None:
        return forbidden(f"tenancy: {crossing}")
    routing = policy.routing
    pinned = routing.pinned(identity, ctx.headers)
    if pinned is not None:
        spec = routing.versions.get(pinned)
        if spec is None or not spec.visible_to(identity):
            return unknown_version()
        denial = version_denial(policy, identity, ctx, spec.name)
        if denial is not None:
            return denial
    else:
        canary = routing.canary_for(identity)
        if canary is not None and _usable(policy, identity, ctx, canary):
            spec = canary
        else:
            spec = routing.versions[routing.default]
            denial = version_denial(policy, identity, ctx, spec.name)
            if denial is not None:
                return denial
    if policy.has_trials:
        record_trials(policy, identity, ctx, spec.name)
    fallback = routing.versions.get(spec.fallback or "")
    shadow = routing.versions.get(routing.shadow_for(ctx.decision_id) or "")
    return Allow(
        identity, policy.model, policy.model, spec.name, spec.cluster, policy.credential_headers,
        strip_headers=ACCEPT_ENCODING if policy.output.transforms_body else (),
        output=policy.output,
        fallback_cluster=_cluster_if_usable(policy, identity, ctx, fallback),
        mirror_cluster=(
            None if shadow is spec else _cluster_if_usable(policy, identity, ctx, shadow)
        ),
    )  # fmt: skip


def check_body(
    policy: CompiledPolicy, allow: Allow, ctx: RequestContext, doc: object,
    types: frozenset[str] | None, cost: int = 0,
) -> Deny | None:  # fmt: skip
    """What the body decides: its model agrees with the route, its tenant fields name the
    caller's tenant, and the rules and constraints that depend on input types hold."""
    if policy.tenancy.needs_body:
        crossing = policy.tenancy.body_violation(allow.identity, doc)
        if crossing is not None:
            return forbidden(f"tenancy: {crossing}")
    named = doc.get("model") if isinstance(doc, Mapping) else None
    if isinstance(named, str) and named not in policy.names:
        # The path chose this model; a body naming another is not quietly served by it.
        return bad_request(
            "model_mismatch", "the body's `model` does not name the model at this path",
            "body_model_mismatch", phase="authorize",
        )  # fmt: skip
    if types is None:
        return None
    denial = version_denial(policy, allow.identity, ctx, allow.version, types, cost)
    if denial is None and policy.has_trials:
        record_trials(policy, allow.identity, ctx, allow.version, types, cost)
    return denial
