"""The decision core: the numbered phases of DESIGN.md, written once for every transport.

1. route        which policy owns the request (host, path; the body's model on shared paths)
2. authenticate the first accepted method that succeeds wins; none -> 401
3. authorize    every applicable rule passes -> else 403; picks the version and its cluster
4. inspect      what the headers decide (413, 415) at once; the body, when a rule needs it:
                size, encoding, strict JSON, profile or schema, input types, images,
                injection, PII -> 400/413/415/422 naming the field
5. admit        every applicable quota has room -> else 429 (or 503 when the store is down)
The respond phase (extproc.inspect.response) runs in the transport, which sees the response.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from typing import Protocol

import orjson

from extproc.authn.base import Authenticator, AuthnFailure, Identity, PeerCertificate
from extproc.authz.constraints import narrows_input_types
from extproc.inspect.body import check_headers, content_encoding, decode_body, parse_json
from extproc.inspect.profiles import input_types
from extproc.inspect.request import inspect_request
from extproc.inspect.violation import Violation
from extproc.observe import Observer
from extproc.pipeline.authorize import authorize, check_body
from extproc.pipeline.context import RequestContext
from extproc.pipeline.decision import (
    Allow,
    Decision,
    Deny,
    HeadersDecision,
    NeedBody,
    bad_request,
    internal_error,
    no_route,
    refused_input,
    unauthenticated,
    verifier_unavailable,
)
from extproc.pipeline.snapshot import request_snapshot
from extproc.pipeline.timeline import Verdict
from extproc.policy.compiled import CompiledPolicy, PolicySet
from extproc.quota.admit import QuotaEngine
from extproc.quota.cost import request_facts
from extproc.quota.memory import MemoryStore
from extproc.quota.usage import ensure_stream_usage

log = logging.getLogger(__name__)

MAX_MODEL_NAME = 256


class PolicySource(Protocol):
    @property
    def current(self) -> PolicySet: ...


class DecisionCore:
    def __init__(
        self,
        policies: PolicySource,
        quotas: QuotaEngine | None = None,
        observer: Observer | None = None,
    ) -> None:
        self._policies = policies
        self.quotas = quotas if quotas is not None else QuotaEngine(MemoryStore())
        self.observer = observer if observer is not None else Observer()

    def finished(self, ctx: RequestContext, decision: Allow | Deny | None, transport: str) -> None:
        """The exchange is over: record it (audit, metrics, trace), however it ended."""
        self.observer.finished(ctx, decision, transport)

    @property
    def revision(self) -> str:
        return self._policies.current.revision

    async def on_headers(self, ctx: RequestContext) -> HeadersDecision:
        try:
            decision = await self._on_headers(ctx)
        except Exception:  # a fault fails closed
            log.exception("decision %s failed at request headers", ctx.decision_id)
            decision = internal_error("exception_at_headers")
        if isinstance(decision, Deny):
            _mark_denial(ctx, decision)
        return decision

    async def on_body(self, ctx: RequestContext, pending: NeedBody, body: bytes) -> Decision:
        ctx.trail.timeline.resume()
        try:
            decision = await self._on_body(ctx, pending, body)
        except Exception:
            log.exception("decision %s failed at request body", ctx.decision_id)
            decision = internal_error("exception_at_body")
        if isinstance(decision, Deny):
            _mark_denial(ctx, decision)
        return decision

    async def decide(self, ctx: RequestContext) -> Decision:
        """Both steps at once, for transports that deliver headers and body together."""
        first = await self.on_headers(ctx)
        if isinstance(first, NeedBody):
            return await self.on_body(ctx, first, ctx.body or b"")
        return first

    async def _on_headers(self, ctx: RequestContext) -> HeadersDecision:
        timeline = ctx.trail.timeline
        current = self._policies.current
        ctx.trail.revision = current.revision
        route = current.match(ctx.host, ctx.path)
        if route is None:
            return no_route()
        if route.methods is not None and ctx.method not in route.methods:
            return method_not_allowed(route.methods)
        timeline.mark("route")
        authenticators = route.owner.authenticators if route.owner else route.authenticators
        identity = await self._authenticate(authenticators, ctx)
        if isinstance(identity, Deny):
            return identity
        timeline.mark("authenticate")
        ctx.trail.identity = identity
        policy = route.owner
        if policy is None:
            return NeedBody(identity, route)
        ctx.trail.model = policy.model
        decision = authorize_headers(policy, identity, ctx)
        if isinstance(decision, Deny):
            return decision
        timeline.mark("authorize")
        if policy.needs_body or narrows_input_types(identity.claims) or policy.record_requests:
            return NeedBody(identity, route, allow=decision)
        if not policy.quotas.active:
            return decision
        return await self._admit(policy, decision, ctx, None)

    @staticmethod
    async def _authenticate(
        authenticators: tuple[Authenticator, ...], ctx: RequestContext
    ) -> Identity | Deny:
        given = ctx.given_identity
        if given is None:
            return await authenticate(authenticators, ctx.headers, ctx.peer)
        # The policy tools decide for a stated caller, as a real credential of its method would
        # be decided: refused where that method is not accepted.
        accepted = {a.method for a in authenticators}
        if given.method in accepted:
            return given
        return unauthenticated(
            f"method_not_accepted: the given identity's method {given.method} is not accepted "
            f"here (accepted: {', '.join(sorted(accepted))})",
            "this credential is not accepted here",
        )

    async def _on_body(self, ctx: RequestContext, pending: NeedBody, body: bytes) -> Decision:
        """Inspect the body, then admit: a request refused for its content holds no quota."""
        policy = pending.route.owner
        allow = pending.allow
        encoding = content_encoding(ctx.headers)
        timeline = ctx.trail.timeline
        if policy is None or allow is None:
            chosen = await self._choose_by_body(ctx, pending, body, encoding)
            if isinstance(chosen, Deny):
                return chosen
            policy, allow, body = chosen
            timeline.mark("authorize")
            ctx.trail.model, ctx.trail.identity = policy.model, allow.identity
        plan = policy.inspect
        decoded = decode_body(body, None if pending.route.owner is None else encoding, plan.limits)
        if isinstance(decoded, Violation):
            return refused_input(decoded)
        doc: object = None
        # A decoded body goes up as the gateway read it: never one it did not inspect.
        new_body = None if encoding is None else decoded
        # An empty body carries nothing to inspect (GET and the like); the model judges it.
        inspects = plan.needs_body and bool(decoded)
        wants_types = policy.typed_rules or narrows_input_types(allow.identity.claims)
        if inspects or wants_types or policy.quotas.needs_body or policy.tenancy.needs_body:
            doc = parse_json(decoded or b"{}", plan.limits.max_depth)
            if isinstance(doc, Violation):
                return refused_input(doc)
        types: frozenset[str] = frozenset()
        inspected = inspect_request(plan, doc) if inspects else None
        if isinstance(inspected, Violation):
            if not policy.dry_run:
                return refused_input(inspected)
            ctx.trail.dry_run("inspect", inspected.status, inspected.code)
            inspected = None
            types = frozenset(input_types(doc)) if wants_types and decoded else frozenset()
        if inspected is not None:
            if inspected.notes:
                ctx.trail.event("inspect", inspected.notes)
            types = inspected.input_types
            if inspected.changed:
                if not ctx.rewrites_body:
                    return refused_input(Violation(
                        400, "sensitive_data", "",
                        "the request contains sensitive data that this gateway must mask; "
                        "remove it and send the request again",
                    ))  # fmt: skip
                new_body = orjson.dumps(doc)
            if inspected.flags:
                allow = dataclasses.replace(allow, flags=inspected.flags)
        elif wants_types and decoded and not inspects:
            types = frozenset(input_types(doc))
        timeline.mark("inspect")
        if policy.record_requests is not None:
            ctx.trail.request = request_snapshot(
                ctx, policy, doc if new_body is None else orjson.loads(new_body), decoded
            )
        cost = 0
        if policy.rules_read_cost and isinstance(doc, dict):
            # What a `when:` condition sees as request.cost: the tokens it may use at most.
            est = request_facts(doc, len(decoded))
            cost = int(est["prompt_tokens"]) + int(est["max_tokens"]) * max(int(est["n"]), 1)
        denial = check_body(policy, allow, ctx, doc, types if wants_types else None, cost)
        if denial is not None:
            return denial
        timeline.mark("authorize")
        if new_body is not None:
            allow = dataclasses.replace(allow, body=new_body)
        if not policy.quotas.active:
            return allow
        return await self._admit(policy, allow, ctx, decoded, doc)

    async def _choose_by_body(
        self, ctx: RequestContext, pending: NeedBody, body: bytes, encoding: str | None
    ) -> tuple[CompiledPolicy, Allow, bytes] | Deny:
        """On a shared path: the policy the body's `model` names, authorized for the caller."""
        candidates = [p.inspect.limits for p in pending.route.by_model.values()]
        # What no model here would take (its type, encoding, declared size) is refused as
        # such, before the body is parsed for its model.
        refusals = [check_headers(ctx.headers, limits) for limits in candidates]
        first = refusals[0] if refusals else None
        if first is not None and all(refusals):
            return refused_input(first)
        if encoding is not None:
            # The model is inside the body: decode under the strictest caps any candidate
            # sets; the chosen policy then decides whether it takes this encoding at all.
            caps = min(candidates, key=lambda c: c.max_decoded_bytes)
            if not any(encoding in c.encodings for c in candidates):
                return refused_input(unreadable_encoding())
            decoded = decode_body(
                body, encoding, dataclasses.replace(caps, encodings=frozenset({encoding}))
            )
            if isinstance(decoded, Violation):
                return refused_input(decoded)
            body = decoded
        doc = parse_json(body)
        if isinstance(doc, Violation):
            return refused_input(doc)
        model = body_model(doc)
        if isinstance(model, Deny):
            return model
        policy = pending.route.by_model.get(model)
        if policy is None or not policy.tenancy.visible_to(pending.identity):
            # Another tenant's model answers exactly like one that does not exist.
            return Deny(404, "model_not_found", "no such model", "route", "unknown_body_model")
        methods = pending.route.model_methods.get(model)
        if methods is not None and ctx.method not in methods:
            return method_not_allowed(methods)
        identity = pending.identity
        if policy.authenticators != pending.route.authenticators:
            # The caller was authenticated by any model on this path; the model the body names
            # must accept the credential itself (its issuers, its certificates). Token results
            # are cached, so asking again costs little.
            again = await self._authenticate(policy.authenticators, ctx)
            if isinstance(again, Deny):
                if again.status == 503:
                    return again  # its verifier is down: not the caller's fault
                return unauthenticated(
                    "method_not_accepted", "this credential is not accepted for this model"
                )
            identity = again
        decision = authorize_headers(policy, identity, ctx)
        if isinstance(decision, Deny):
            return decision
        return policy, decision, body

    async def _admit(
        self,
        policy: CompiledPolicy,
        allow: Allow,
        ctx: RequestContext,
        body: bytes | None,
        doc: object = None,
    ) -> Decision:
        plan = policy.quotas
        facts = None
        new_body = allow.body
        strip_usage = False
        if plan.needs_body:
            if doc is None:
                doc = parse_json(body or b"{}")
                if isinstance(doc, Violation):
                    return refused_input(doc)
            facts = request_facts(doc, len(body or b""))
            if plan.settles and isinstance(doc, dict) and ensure_stream_usage(doc):
                # The upstream reports streamed usage only when asked; the client did not
                # ask, so the extra usage event is taken out of its stream again.
                new_body, strip_usage = orjson.dumps(doc), True
        outcome = await self.quotas.admit(
            plan, allow.identity, allow.version, facts, ctx.decision_id
        )
        if isinstance(outcome, Deny):
            if not policy.dry_run:
                return outcome
            # Admitted without holding anything: the next request would be refused as well.
            ctx.trail.dry_run("admit", outcome.status, outcome.reason)
            return dataclasses.replace(allow, body=new_body)
        ctx.trail.timeline.mark("admit")
        outcome.strip_usage = strip_usage
        return dataclasses.replace(allow, admission=outcome, body=new_body)


def _mark_denial(ctx: RequestContext, deny: Deny) -> None:
    verdict: Verdict = "error" if deny.phase == "internal" else "deny"
    ctx.trail.timeline.mark(deny.phase, verdict, deny.reason)


def authorize_headers(policy: CompiledPolicy, identity: Identity, ctx: RequestContext) -> Decision:
    """Authorized, and nothing in the headers refuses the input (size, type, encoding)."""
    decision = authorize(policy, identity, ctx)
    if isinstance(decision, Deny):
        return decision
    violation = check_headers(ctx.headers, policy.inspect.limits)
    return decision if violation is None else refused_input(violation)


def unreadable_encoding() -> Violation:
    return Violation(415, "unsupported_content_encoding", "", "this encoding is not accepted")


def method_not_allowed(methods: frozenset[str]) -> Deny:
    allow = ", ".join(sorted(methods))
    return Deny(405, "method_not_allowed", "method not allowed here", "route", "method",
                (("allow", allow),))  # fmt: skip


async def authenticate(
    authenticators: tuple[Authenticator, ...],
    headers: Mapping[str, str],
    peer: PeerCertificate | None = None,
) -> Identity | Deny:
    failure: AuthnFailure | None = None
    for authenticator in authenticators:
        outcome = await authenticator.authenticate(headers, peer)
        if isinstance(outcome, Identity):
            return outcome
        if outcome is not None and failure is None:
            failure = outcome
    if failure is not None:
        if failure.unavailable:
            return verifier_unavailable(f"{failure.method}:{failure.reason}")
        return unauthenticated(f"{failure.method}:{failure.reason}", failure.detail)
    if "authorization" in headers:
        # Presented, but of no kind this route accepts: still an invalid token (RFC 6750).
        return unauthenticated("unrecognized_credentials", "the credential is not valid")
    return unauthenticated("missing_credentials", "credentials are required")


def body_model(doc: object) -> str | Deny:
    """The JSON body's top-level `model` field: the one authoritative model name."""
    model = doc.get("model") if isinstance(doc, dict) else None
    if not isinstance(model, str) or not model or len(model) > MAX_MODEL_NAME:
        return bad_request(
            "model_required", "the request body must name a model in `model`", "no_body_model"
        )
    return model
