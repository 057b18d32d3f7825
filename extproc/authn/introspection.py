"""OAuth 2.0 Token Introspection (RFC 7662) for opaque bearer tokens.

The authorization server is asked whether `Authorization: Bearer <token>` is active; its answer
becomes an Identity, mapped from the response members like JWT claims.

Which tokens are sent: only opaque ones. Our own API keys (`gk_...`) are never sent to the
authorization server, and JWT-shaped tokens are left to the JWT method (`skip_jwt_shaped`).

How the answer is judged: `active` must be exactly JSON `true`, otherwise the token is
inactive whatever else the response says. A present `exp` in the past (beyond `leeway_seconds`)
or `nbf` in the future rejects it; a configured `issuer` must equal `iss`; configured
`audiences` must meet `aud`. The principal is the `principal_claim` member (`sub` by default).
There is no silent fallback to `username`: RFC 7662 calls it a human-readable identifier, which
need not be unique nor live in the same namespace as `sub`; set `principal_claim="username"` (or
`"client_id"` for client-credentials tokens) when the authorization server works that way.
`scope` is RFC 7662's space-separated string (a JSON list is accepted too).

Caching, keyed by the SHA-256 of the token (never the token):
- active tokens for at most `cache_ttl_seconds` and never past their `exp` (a revoked token
  stays usable for at most that long; 0 disables caching);
- rejected tokens for `inactive_cache_seconds`, in a separate, smaller cache, so a flood of bad
  tokens neither reaches the authorization server nor evicts good identities;
- concurrent requests with the same uncached token share one call.

An unreachable, slow (beyond `timeout_seconds`, 1 s by default: well inside Envoy's message
timeout), failing (5xx, 4xx) or malformed endpoint yields `introspection_unavailable` with
`unavailable=True` (503, never an allow); new tokens then fail fast for
`unavailable_backoff_seconds` instead of each waiting for the timeout. A 4xx usually means our
client credentials are wrong; it is logged once as a configuration error.

Nothing here logs a token, a client secret or a response body.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import math
import re
import time
from collections.abc import Callable, Collection, Mapping
from types import MappingProxyType
from typing import Any
from urllib.parse import quote_plus, urlsplit

import httpx

from extproc.authn.apikey import looks_like_api_key
from extproc.authn.base import (
    AuthMethod,
    AuthnFailure,
    AuthnOutcome,
    Identity,
    PeerCertificate,
    bearer_token,
)
from extproc.authn.claims import (
    CredentialError,
    audience_accepted,
    claim_set,
    numeric_date,
    principal,
    strict_json_object,
    tenant,
)
from extproc.authn.http_fetch import (
    FetchError,
    StatusError,
    describe,
    new_client,
    read_bounded,
    require_https,
)
from extproc.authn.outcome_cache import OutcomeCache

logger = logging.getLogger(__name__)

MAX_LEEWAY_SECONDS = 300
UNAVAILABLE = AuthnFailure(
    method="introspection",
    reason="introspection_unavailable",
    detail="the credential cannot be checked right now",
    unavailable=True,
)
# RFC 6750 b64token: what a bearer token may consist of.
_B64TOKEN = re.compile(r"[A-Za-z0-9\-._~+/]+=*")
# Three base64url segments, as jwt.py recognises them; the header is then decoded to be sure.
_JWT_SHAPE = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")
# Rejections that may turn into success without the token changing are not cached.
_UNCACHEABLE_REASONS = frozenset({"token_not_yet_valid"})


def looks_like_jwt(token: str) -> bool:
    """Three base64url segments whose first decodes to a JSON object: a JWT to route elsewhere.

    Only a routing hint, so the decoding is lenient; the JWT method verifies strictly.
    """
    if _JWT_SHAPE.fullmatch(token) is None:
        return False
    header = token.partition(".")[0]
    try:
        decoded = json.loads(base64.urlsafe_b64decode(header + "=" * (-len(header) % 4)))
    except ValueError:  # binascii.Error, UnicodeDecodeError and JSONDecodeError
        return False
    return isinstance(decoded, dict)


class IntrospectionAuthenticator:
    """Authenticates opaque `Authorization: Bearer` tokens with an RFC 7662 endpoint.

    The client secret is given as a value (the caller reads it from the environment) and is
    sent only as HTTP Basic client authentication. The HTTP client is created lazily inside the
    running loop; the authenticator belongs to that loop.
    """

    def __init__(
        self,
        endpoint: str,
        *,
        client_id: str,
        client_secret: str,
        issuer: str | None = None,
        audiences: Collection[str] = (),
        principal_claim: str = "sub",
        tenant_claim: str | None = "tenant",
        roles_claim: str | None = "roles",
        scopes_claim: str | None = "scope",
        skip_jwt_shaped: bool = True,
        leeway_seconds: int = 30,
        timeout_seconds: float = 1.0,
        max_response_bytes: int = 64 * 1024,
        max_token_bytes: int = 8192,
        cache_ttl_seconds: float = 60.0,
        inactive_cache_seconds: float = 10.0,
        cache_size: int = 100_000,
        inactive_cache_size: int = 10_000,
        max_concurrent_calls: int = 64,
        unavailable_backoff_seconds: float = 1.0,
        clock: Callable[[], float] = time.time,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        require_https(endpoint, "introspection endpoint")
        _check_names(principal_claim, tenant_claim, roles_claim, scopes_claim)
        _check_limits(
            leeway_seconds=leeway_seconds,
            timeout_seconds=timeout_seconds,
            max_response_bytes=max_response_bytes,
            max_token_bytes=max_token_bytes,
            max_concurrent_calls=max_concurrent_calls,
            cache_ttl_seconds=cache_ttl_seconds,
            inactive_cache_seconds=inactive_cache_seconds,
            unavailable_backoff_seconds=unavailable_backoff_seconds,
        )
        if issuer is not None and (not isinstance(issuer, str) or not issuer):
            raise ValueError("introspection issuer must be a non-empty string")
        parts = urlsplit(endpoint)
        self._endpoint = endpoint
        # For logs: no query string, which some deployments abuse for credentials.
        self._endpoint_name = f"{parts.scheme}://{parts.netloc}{parts.path}"
        self._authorization = _basic_auth(client_id, client_secret)
        self._issuer = issuer
        self._audiences = _audience_set(audiences)
        self._credential_id = issuer or parts.netloc
        self._principal_claim = principal_claim
        self._tenant_claim = tenant_claim
        self._roles_claim = roles_claim
        self._scopes_claim = scopes_claim
        self._skip_jwt_shaped = skip_jwt_shaped
        self._leeway = leeway_seconds
        self._timeout = timeout_seconds
        self._max_response_bytes = max_response_bytes
        self._max_token_bytes = max_token_bytes
        self._cache_ttl = cache_ttl_seconds
        self._inactive_ttl = inactive_cache_seconds
        self._max_calls = max_concurrent_calls
        self._backoff = unavailable_backoff_seconds
        self._clock = clock
        self._transport = transport
        self._client: httpx.AsyncClient | None = None
        self._active = OutcomeCache(cache_size)
        self._rejected = OutcomeCache(inactive_cache_size)
        self._inflight: dict[bytes, asyncio.Task[Identity | AuthnFailure]] = {}
        self._unavailable_until = -math.inf
        self._config_error_logged = False

    def __repr__(self) -> str:
        return f"IntrospectionAuthenticator({self._endpoint_name!r})"  # never the secret

    @property
    def method(self) -> AuthMethod:
        return "introspection"

    async def authenticate(
        self, headers: Mapping[str, str], peer: PeerCertificate | None = None
    ) -> AuthnOutcome:
        token = bearer_token(headers)
        if token is None or looks_like_api_key(token):
            return None  # our API keys never leave this process
        if self._skip_jwt_shaped and looks_like_jwt(token):
            return None
        if len(token) > self._max_token_bytes:
            return _failure("token_too_large", "the token is larger than allowed")
        if _B64TOKEN.fullmatch(token) is None:
            return _failure("malformed_token", "the token is not a valid bearer token")
        now = self._clock()
        digest = hashlib.sha256(token.encode("ascii")).digest()
        cached = self._active.get(digest, now) or self._rejected.get(digest, now)
        if cached is not None:
            return cached
        task = self._inflight.get(digest)
        if task is None:
            if now < self._unavailable_until or len(self._inflight) >= self._max_calls:
                return UNAVAILABLE
            task = asyncio.get_running_loop().create_task(self._introspect(token, digest))
            self._inflight[digest] = task
        # shield: a cancelled request must not cancel the call other requests are waiting for.
        return await asyncio.shield(task)

    def cache_size(self) -> int:
        return len(self._active)

    async def aclose(self) -> None:
        tasks = list(self._inflight.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    async def _introspect(self, token: str, digest: bytes) -> Identity | AuthnFailure:
        try:
            outcome = await self._call(token)
            self._remember(digest, outcome, self._clock())
            return outcome
        finally:
            self._inflight.pop(digest, None)

    async def _call(self, token: str) -> Identity | AuthnFailure:
        if self._client is None:
            self._client = new_client(self._timeout, self._transport)
        try:
            body = await read_bounded(
                self._client,
                "POST",
                self._endpoint,
                max_bytes=self._max_response_bytes,
                timeout_seconds=self._timeout,
                headers={
                    "authorization": self._authorization,
                    "accept": "application/json",
                    "accept-encoding": "identity",
                },
                form={"token": token, "token_type_hint": "access_token"},
            )
            response = _json_object(body)
        except Exception as exc:  # any failure to get an answer: unavailable, never an allow
            return self._unavailable(exc)
        return self._judge(response, self._clock())

    def _unavailable(self, exc: Exception) -> AuthnFailure:
        self._unavailable_until = self._clock() + self._backoff
        if isinstance(exc, StatusError) and 400 <= exc.status < 500 and exc.status != 429:
            if not self._config_error_logged:
                self._config_error_logged = True
                logger.error(
                    "token introspection at %s refused our request (HTTP %d): check the "
                    "introspection client id and secret; answering 503 until it is fixed",
                    self._endpoint_name,
                    exc.status,
                )
        else:
            logger.warning(
                "token introspection at %s failed (%s)", self._endpoint_name, describe(exc)
            )
        return UNAVAILABLE

    def _judge(self, response: Mapping[str, Any], now: float) -> Identity | AuthnFailure:
        # Exactly JSON true: not 1, not "true", not missing. Nothing else in an inactive
        # response is looked at.
        if response.get("active") is not True:
            return _failure("token_inactive", "the token is not active")
        try:
            return self._identity(response, now)
        except CredentialError as exc:
            return _failure(exc.reason, exc.detail)

    def _identity(self, response: Mapping[str, Any], now: float) -> Identity:
        exp = numeric_date(response, "exp")
        if exp is not None and now >= exp + self._leeway:
            raise CredentialError("token_expired", "the token has expired")
        nbf = numeric_date(response, "nbf")
        if nbf is not None and now + self._leeway < nbf:
            raise CredentialError("token_not_yet_valid", "the token is not valid yet")
        if self._issuer is not None and response.get("iss") != self._issuer:
            raise CredentialError("unknown_issuer", "the token's issuer is not trusted")
        # Here a missing or malformed `aud` is just not this audience.
        if self._audiences and not audience_accepted(response.get("aud"), self._audiences):
            raise CredentialError("wrong_audience", "the token is not meant for this service")
        return Identity(
            principal=principal(response, self._principal_claim),
            method="introspection",
            tenant=tenant(response, self._tenant_claim),
            roles=claim_set(response, self._roles_claim),
            scopes=claim_set(response, self._scopes_claim),
            claims=MappingProxyType(dict(response)),
            credential_header="authorization",
            expires_at=exp,
            credential_id=self._credential_id,
        )

    def _remember(self, digest: bytes, outcome: Identity | AuthnFailure, now: float) -> None:
        if isinstance(outcome, Identity):
            until = now + self._cache_ttl
            if outcome.expires_at is not None:
                until = min(until, outcome.expires_at)
            self._active.put(digest, outcome, until, now)
        elif not outcome.unavailable and outcome.reason not in _UNCACHEABLE_REASONS:
            self._rejected.put(digest, outcome, now + self._inactive_ttl, now)


def _failure(reason: str, detail: str) -> AuthnFailure:
    return AuthnFailure(method="introspection", reason=reason, detail=detail)


def _basic_auth(client_id: str, client_secret: str) -> str:
    """RFC 6749 2.3.1: id and secret are form-urlencoded, then joined for HTTP Basic."""
    if not isinstance(client_id, str) or not client_id:
        raise ValueError("introspection client_id must be a non-empty string")
    if not isinstance(client_secret, str) or not client_secret:
        raise ValueError("introspection client_secret must be a non-empty string")
    pair = f"{quote_plus(client_id)}:{quote_plus(client_secret)}"
    return "Basic " + base64.b64encode(pair.encode("ascii")).decode("ascii")


def _check_names(principal: str, *optional: str | None) -> None:
    if not isinstance(principal, str) or not principal:
        raise ValueError("introspection principal_claim must be a non-empty string")
    for name in optional:
        if name is not None and (not isinstance(name, str) or not name):
            raise ValueError("introspection claim names must be non-empty strings or None")


def _check_limits(*, leeway_seconds: int, **positive: float) -> None:
    if isinstance(leeway_seconds, bool) or not isinstance(leeway_seconds, int):
        raise ValueError("introspection leeway_seconds must be an integer")
    if not 0 <= leeway_seconds <= MAX_LEEWAY_SECONDS:
        raise ValueError(f"introspection leeway_seconds must be 0..{MAX_LEEWAY_SECONDS}")
    may_be_zero = {"cache_ttl_seconds", "inactive_cache_seconds", "unavailable_backoff_seconds"}
    for name, value in positive.items():
        if not math.isfinite(value) or value < 0 or (value == 0 and name not in may_be_zero):
            raise ValueError(f"introspection {name} must be positive, got {value}")


def _audience_set(audiences: Collection[str]) -> frozenset[str]:
    if isinstance(audiences, str | bytes):
        raise ValueError("introspection audiences must be a collection of strings")
    result = frozenset(audiences)
    if not all(isinstance(item, str) and item for item in result):
        raise ValueError("introspection audiences must be non-empty strings")
    return result


def _json_object(body: bytes) -> dict[str, Any]:
    try:
        return strict_json_object(body)
    except ValueError:  # JSONDecodeError, UnicodeDecodeError, a duplicate member, not an object
        raise FetchError("the response is not a valid JSON object") from None
