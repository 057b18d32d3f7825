"""What every authentication method shares: the identity it yields and the Protocol it follows."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

AuthMethod = Literal["jwt", "api_key", "introspection", "mtls"]


@dataclass(frozen=True, slots=True)
class Identity:
    """A verified caller. Nothing here is a secret: it may go upstream and into audit records."""

    principal: str
    method: AuthMethod
    tenant: str | None = None
    roles: frozenset[str] = frozenset()
    scopes: frozenset[str] = frozenset()
    # Verified claims (JWT) or key metadata (API key), for authorization rules on claims.
    claims: Mapping[str, Any] = field(default_factory=dict)
    # The header that carried the credential; it is removed before the request goes upstream.
    credential_header: str = "authorization"
    # Unix time after which this identity must not be served from a cache.
    expires_at: float | None = None
    # Issuer (JWT) or key id (API key): safe to log, identifies which credential was used.
    credential_id: str = ""


@dataclass(frozen=True, slots=True)
class PeerCertificate:
    """The client's TLS certificate as Envoy verified it on the downstream connection.

    Filled by the adapters only from what Envoy itself reports about the connection (ext_authz
    `attributes.source`, ext_proc connection attributes), never from a request header, which a
    client could set.
    """

    subject: str = ""
    uri_sans: tuple[str, ...] = ()
    dns_sans: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class AuthnFailure:
    """A credential of this method was present but is not acceptable.

    `reason` is a stable code for audit and metrics (for example `token_expired`); it is never
    shown with the credential itself. `detail` is a short, client-safe explanation.
    """

    method: AuthMethod
    reason: str
    detail: str = "the credential is not valid"
    # Name of the header that carried the rejected credential.
    credential_header: str = "authorization"
    # The credential could not be checked (its verifier is unreachable): 503, try again, rather
    # than 401. Never an allow.
    unavailable: bool = False


# None means: this method found no credential of its kind in the request.
AuthnOutcome = Identity | AuthnFailure | None


class Authenticator(Protocol):
    """One authentication method. Headers arrive with lower-case names."""

    @property
    def method(self) -> AuthMethod: ...

    async def authenticate(
        self, headers: Mapping[str, str], peer: PeerCertificate | None = None
    ) -> AuthnOutcome: ...


def bearer_token(headers: Mapping[str, str]) -> str | None:
    """The token of an `Authorization: Bearer <token>` header, or None.

    Envoy joins duplicate headers with commas; a joined value is not one token, so it is
    returned as-is and fails verification rather than being split and half-trusted.
    """
    value = headers.get("authorization")
    if value is None:
        return None
    scheme, _, token = value.strip().partition(" ")
    if scheme.lower() != "bearer":
        return None
    token = token.strip()
    return token or None
