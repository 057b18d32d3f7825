"""Decisions are values: the pipeline returns one of these, it never raises to deny."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import orjson

from extproc.authn.base import Identity
from extproc.inspect.plan import NO_OUTPUT, OutputPlan
from extproc.inspect.violation import Violation
from extproc.policy.compiled import RouteEntry

if TYPE_CHECKING:
    from extproc.quota.admit import Admission

Phase = Literal["route", "authenticate", "authorize", "admit", "inspect", "internal"]


@dataclass(frozen=True, slots=True)
class Deny:
    """A refusal. `code` and `message` are shown to the client; `reason` goes to audit only."""

    status: int
    code: str
    message: str
    phase: Phase
    reason: str = ""
    headers: tuple[tuple[str, str], ...] = ()
    # The request body's field at fault (a JSON path), when there is one.
    field: str = ""

    def json_body(self, decision_id: str) -> bytes:
        error = {"code": self.code, "message": self.message, "decision_id": decision_id}
        if self.field:
            error["field"] = self.field
        return orjson.dumps({"error": error})


@dataclass(frozen=True, slots=True)
class Allow:
    """Admitted: who the caller is and which model version (and Envoy cluster) serves it."""

    identity: Identity
    policy: str
    model: str
    version: str
    cluster: str
    credential_headers: tuple[str, ...] = ("authorization",)
    # What the request holds under its quotas until its response ends (None: no quotas).
    admission: Admission | None = field(default=None, compare=False)
    # A replacement request body (masked PII, a decoded gzip body, asking the upstream to
    # report streamed usage). Always identity-encoded.
    body: bytes | None = field(default=None, compare=False)
    # Request headers removed on the way up besides credentials (Accept-Encoding, when the
    # response is to be read).
    strip_headers: tuple[str, ...] = ()
    # What the respond phase does with the model's answer.
    output: OutputPlan = field(default=NO_OUTPUT, compare=False)
    # What inspection flagged but let through; shown in x-gateway-flags.
    flags: tuple[str, ...] = field(default=(), compare=False)
    # Envoy retries a failed request on this cluster (the version's fallback), and sends a
    # copy to the mirror cluster (a shadow version); None: neither.
    fallback_cluster: str | None = None
    mirror_cluster: str | None = None


@dataclass(frozen=True, slots=True)
class NeedBody:
    """Authenticated, but the model is named in the body: decide again when it arrives."""

    identity: Identity
    route: RouteEntry
    # Already authorized; the body is needed only to estimate cost for admission.
    allow: Allow | None = None

    @property
    def watch_response(self) -> bool:
        """Envoy must send the response headers too (asked for now: later is too late)."""
        return self.route.watches_response


Decision = Allow | Deny
HeadersDecision = Allow | Deny | NeedBody


def unauthenticated(reason: str, detail: str, realm: str = "models") -> Deny:
    # RFC 6750 section 3: error="invalid_token" only when a token was presented.
    challenge = f'Bearer realm="{realm}"'
    if reason != "missing_credentials":
        challenge += ', error="invalid_token"'
    return Deny(
        status=401,
        code="unauthenticated",
        message=detail,
        phase="authenticate",
        reason=reason,
        headers=(("www-authenticate", challenge),),
    )


def forbidden(reason: str) -> Deny:
    return Deny(
        status=403,
        code="forbidden",
        message="the caller is not allowed to use this model",
        phase="authorize",
        reason=reason,
    )


def no_route(reason: str = "no_policy") -> Deny:
    return Deny(
        status=404,
        code="not_found",
        message="no model is served at this path",
        phase="route",
        reason=reason,
    )


def bad_request(code: str, message: str, reason: str, phase: Phase = "route") -> Deny:
    return Deny(status=400, code=code, message=message, phase=phase, reason=reason)


def refused_input(violation: Violation) -> Deny:
    return Deny(
        status=violation.status,
        code=violation.code,
        message=violation.message,
        phase="inspect",
        reason=violation.code,
        field=violation.field,
    )


def internal_error(reason: str) -> Deny:
    # A fault fails closed; the client learns nothing about it beyond the decision id.
    return Deny(
        status=503,
        code="unavailable",
        message="the request could not be authorized; try again later",
        phase="internal",
        reason=reason,
        headers=(("retry-after", "1"),),
    )


def verifier_unavailable(reason: str) -> Deny:
    # The credential's verifier (an introspection endpoint) did not answer: never an allow,
    # and not the caller's fault either.
    return Deny(
        status=503,
        code="unavailable",
        message="the credential could not be checked; try again later",
        phase="authenticate",
        reason=reason,
        headers=(("retry-after", "1"),),
    )
