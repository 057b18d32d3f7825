"""JWT bearer authentication.

Two layers, each used by both the authenticator and the Wycheproof tests:

- the JWS layer (`parse_compact`, `verify_signature`, `verify_compact`): compact serialisation
  only, strict base64url, a JSON-object header, no key-bearing or critical header parameters,
  an algorithm from the caller's allow-list (never from the token alone), a key the key source
  vouches for, and a signature check;
- the JWT layer (`JwtAuthenticator`): issuer selection by exact `iss`, the registered time
  claims with a bounded leeway, audience, principal, and a cache of verified tokens.

Nothing here logs: tokens and claims must never reach a log line.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from jwt.algorithms import Algorithm, get_default_algorithms

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
from extproc.authn.jwks import (
    SUPPORTED_ALGORITHMS,
    HmacSecret,
    KeySource,
    b64url_decode_strict,
    key_matches_alg,
)
from extproc.authn.outcome_cache import OutcomeCache

# Three base64url segments; the signature may be empty so that `alg: none` tokens are still
# recognised as JWTs (and rejected) instead of being handed to the API-key method.
_JWT_SHAPE = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")

# Header parameters that point at or carry keys. Following them lets the token choose its own
# key, so a token carrying any of them is refused outright (x5c included: we never use it).
_FORBIDDEN_HEADER_PARAMS = frozenset({"jku", "x5u", "jwk", "x5c"})
# We understand no critical extension (RFC 7515 4.1.11); b64=false (RFC 7797) would change
# what the signature covers, so it is refused even outside `crit`.
_CRITICAL_HEADER_PARAMS = frozenset({"crit", "b64"})

_ALGORITHMS: Mapping[str, Algorithm] = MappingProxyType(
    {name: get_default_algorithms()[name] for name in SUPPORTED_ALGORITHMS}
)

MAX_LEEWAY_SECONDS = 300
# A failed verification is remembered this long, so a client retrying a bad token in a tight
# loop costs a dict lookup instead of a signature check each time.
NEGATIVE_CACHE_SECONDS = 5.0
# Failures that may turn into success without the token changing are never cached.
_UNCACHEABLE_REASONS = frozenset({"unknown_kid", "missing_kid", "token_not_yet_valid"})


# Verification failed; `reason` is a stable code, `detail` is safe to show the client.
JwtError = CredentialError


@dataclass(frozen=True, slots=True)
class CompactJws:
    """A structurally valid, not yet verified, compact JWS."""

    header: Mapping[str, Any]
    alg: str
    kid: str | None
    payload: bytes
    signing_input: bytes
    signature: bytes


def parse_compact(token: str) -> CompactJws:
    """Split and decode a compact JWS, refusing anything structurally doubtful."""
    if token.lstrip().startswith("{"):
        raise JwtError("malformed_token", "only the compact JWS serialisation is accepted")
    parts = token.split(".")
    if len(parts) != 3:
        raise JwtError("malformed_token", "a signed token has exactly three parts")
    header_b64, payload_b64, signature_b64 = parts
    header = _json_object(_b64(header_b64), "header")
    alg, kid = _check_header(header)
    return CompactJws(
        header=MappingProxyType(header),
        alg=alg,
        kid=kid,
        payload=_b64(payload_b64),
        signing_input=f"{header_b64}.{payload_b64}".encode("ascii"),
        signature=_b64(signature_b64),
    )


async def verify_signature(jws: CompactJws, keys: KeySource, algorithms: Collection[str]) -> None:
    """Check the signature with a key from `keys`, for an algorithm the caller allows."""
    alg = jws.alg
    if alg not in algorithms or alg not in SUPPORTED_ALGORITHMS:
        raise JwtError("algorithm_not_allowed", "the token's signing algorithm is not accepted")
    key = await keys.key_for(jws.kid, alg)
    if key is None:
        if jws.kid is None:
            raise JwtError("missing_kid", "the token has no key id and one is required")
        raise JwtError("unknown_kid", "no key is known for the token's key id and algorithm")
    # Key sources already filter by algorithm; re-checking here means no source bug can ever
    # pair, say, an RSA public key with HS256.
    if not key_matches_alg(key, alg):
        raise JwtError("unknown_kid", "no key is known for the token's key id and algorithm")
    try:
        valid = _ALGORITHMS[alg].verify(jws.signing_input, key, jws.signature)
    except (ValueError, TypeError):
        valid = False
    if not valid:
        raise JwtError("bad_signature", "the token's signature is not valid")


async def verify_compact(token: str, keys: KeySource, algorithms: Collection[str]) -> CompactJws:
    """Parse and verify a compact JWS; the claims are not looked at."""
    jws = parse_compact(token)
    await verify_signature(jws, keys, algorithms)
    return jws


def _b64(segment: str) -> bytes:
    try:
        return b64url_decode_strict(segment)
    except ValueError:
        raise JwtError("malformed_token", "the token is not valid base64url") from None


def _json_object(raw: bytes, what: str) -> dict[str, Any]:
    try:
        return strict_json_object(raw)
    except ValueError:  # includes JSONDecodeError and UnicodeDecodeError
        raise JwtError("malformed_token", f"the token {what} is not a valid JSON object") from None


def _check_header(header: Mapping[str, Any]) -> tuple[str, str | None]:
    if not _FORBIDDEN_HEADER_PARAMS.isdisjoint(header):
        raise JwtError("forbidden_header", "the token header may not carry or point to keys")
    if not _CRITICAL_HEADER_PARAMS.isdisjoint(header):
        raise JwtError("unsupported_crit", "the token uses header extensions we do not support")
    alg = header.get("alg")
    if not isinstance(alg, str) or not alg:
        raise JwtError("malformed_token", "the token header has no algorithm")
    kid = header.get("kid")
    if kid is not None and not isinstance(kid, str):
        raise JwtError("malformed_token", "the token's key id is not a string")
    return alg, kid


# ---------------------------------------------------------------------------------------------
# JWT layer


@dataclass(frozen=True, slots=True)
class JwtIssuer:
    """One trusted issuer, compiled from configuration. Construction validates everything."""

    issuer: str
    audiences: frozenset[str]
    algorithms: frozenset[str]
    keys: KeySource
    leeway_seconds: int = 60
    principal_claim: str = "sub"
    tenant_claim: str | None = "tenant"
    roles_claim: str | None = "roles"
    scopes_claim: str | None = "scope"
    max_token_bytes: int = 8192

    def __post_init__(self) -> None:
        if not isinstance(self.issuer, str) or not self.issuer:
            raise ValueError("JWT issuer must be a non-empty string")
        # Accept any collection from config code, but a bare string would split into letters.
        object.__setattr__(self, "audiences", _string_set(self.audiences, "audiences"))
        object.__setattr__(self, "algorithms", _string_set(self.algorithms, "algorithms"))
        self._check_algorithms()
        leeway = self.leeway_seconds
        if isinstance(leeway, bool) or not isinstance(leeway, int):
            raise ValueError(f"issuer {self.issuer}: leeway_seconds must be an integer")
        if not 0 <= leeway <= MAX_LEEWAY_SECONDS:
            raise ValueError(
                f"issuer {self.issuer}: leeway_seconds must be 0..{MAX_LEEWAY_SECONDS}, "
                f"got {leeway}"
            )
        if isinstance(self.max_token_bytes, bool) or not isinstance(self.max_token_bytes, int):
            raise ValueError(f"issuer {self.issuer}: max_token_bytes must be an integer")
        if self.max_token_bytes < 1:
            raise ValueError(f"issuer {self.issuer}: max_token_bytes must be positive")
        if not isinstance(self.principal_claim, str) or not self.principal_claim:
            raise ValueError(f"issuer {self.issuer}: principal_claim must be a non-empty string")
        for name in ("tenant_claim", "roles_claim", "scopes_claim"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise ValueError(f"issuer {self.issuer}: {name} must be a non-empty string")

    def _check_algorithms(self) -> None:
        unsupported = self.algorithms - SUPPORTED_ALGORITHMS
        if unsupported:
            raise ValueError(
                f"issuer {self.issuer}: unsupported JWT algorithm(s) {sorted(unsupported)}; "
                f"supported: {sorted(SUPPORTED_ALGORITHMS)}"
            )
        symmetric = isinstance(self.keys, HmacSecret)
        # One issuer is either HS256 with a secret or asymmetric with public keys, never both:
        # mixing them is what makes algorithm-confusion attacks possible.
        if "HS256" in self.algorithms and not symmetric:
            raise ValueError(f"issuer {self.issuer}: HS256 needs an HmacSecret key source")
        if symmetric and self.algorithms != {"HS256"}:
            raise ValueError(f"issuer {self.issuer}: an HmacSecret can only verify HS256")


def _string_set(value: object, what: str) -> frozenset[str]:
    if isinstance(value, str | bytes) or not isinstance(value, Collection):
        raise ValueError(f"JWT issuer {what} must be a collection of strings")
    result = frozenset(value)
    if not result or not all(isinstance(item, str) and item for item in result):
        raise ValueError(f"JWT issuer {what} must be a non-empty set of non-empty strings")
    return result


class JwtAuthenticator:
    """Authenticates `Authorization: Bearer <JWT>` against the configured issuers."""

    def __init__(
        self,
        issuers: Sequence[JwtIssuer],
        *,
        cache_size: int = 100_000,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not issuers:
            raise ValueError("JwtAuthenticator needs at least one issuer")
        self._issuers: dict[str, JwtIssuer] = {}
        for issuer in issuers:
            if issuer.issuer in self._issuers:
                raise ValueError(f"JWT issuer {issuer.issuer} is configured twice")
            self._issuers[issuer.issuer] = issuer
        # Before the issuer is known only the most generous limit can be applied.
        self._max_token_bytes = max(issuer.max_token_bytes for issuer in issuers)
        self._clock = clock
        self._verified = OutcomeCache(cache_size)
        # Separate and smaller, so a flood of garbage tokens cannot evict verified identities.
        self._rejected = OutcomeCache(max(1, cache_size // 10))

    @property
    def method(self) -> AuthMethod:
        return "jwt"

    async def authenticate(
        self, headers: Mapping[str, str], peer: PeerCertificate | None = None
    ) -> AuthnOutcome:
        token = bearer_token(headers)
        if token is None:
            return None
        now = self._clock()
        if len(token) > self._max_token_bytes:
            # Not decoded, not hashed: the shape check is a linear scan, nothing more.
            if _JWT_SHAPE.fullmatch(token) is None:
                return None
            return _failure("token_too_large", "the token is larger than allowed")
        digest = hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()
        cached = self._verified.get(digest, now) or self._rejected.get(digest, now)
        if cached is not None:
            return cached
        if _JWT_SHAPE.fullmatch(token) is None:
            return None  # not a JWT: maybe an API key, for another method to judge
        outcome = await self._verify(token, now)
        self._remember(digest, outcome, now)
        return outcome

    async def warm(self) -> bool:
        """Prefetch every issuer's keys; True when all of them have keys."""
        results = await asyncio.gather(*(source.warm() for source in self._key_sources()))
        return all(results)

    async def aclose(self) -> None:
        for source in self._key_sources():
            await source.aclose()

    def cache_size(self) -> int:
        return len(self._verified)

    def _key_sources(self) -> list[KeySource]:
        unique: dict[int, KeySource] = {}
        for issuer in self._issuers.values():
            unique.setdefault(id(issuer.keys), issuer.keys)
        return list(unique.values())

    def _remember(self, digest: bytes, outcome: Identity | AuthnFailure, now: float) -> None:
        if isinstance(outcome, Identity):
            # Served from cache only while the token itself is valid: never past `exp`.
            assert outcome.expires_at is not None
            self._verified.put(digest, outcome, outcome.expires_at, now)
        elif outcome.reason not in _UNCACHEABLE_REASONS:
            self._rejected.put(digest, outcome, now + NEGATIVE_CACHE_SECONDS, now)

    async def _verify(self, token: str, now: float) -> Identity | AuthnFailure:
        try:
            jws = parse_compact(token)
            claims = _json_object(jws.payload, "payload")
            # Unverified read, used only to choose whose keys and rules apply.
            issuer = self._select_issuer(claims)
            if len(token) > issuer.max_token_bytes:
                raise JwtError("token_too_large", "the token is larger than allowed")
            await verify_signature(jws, issuer.keys, issuer.algorithms)
            # From here on `claims` are verified: the signature covers these exact bytes.
            return _identity(issuer, claims, now)
        except JwtError as exc:
            return _failure(exc.reason, exc.detail)

    def _select_issuer(self, claims: Mapping[str, Any]) -> JwtIssuer:
        iss = claims.get("iss")
        if not isinstance(iss, str):
            raise JwtError("missing_claim", "the token has no issuer")
        issuer = self._issuers.get(iss)
        if issuer is None:
            raise JwtError("unknown_issuer", "the token's issuer is not trusted")
        return issuer


def _failure(reason: str, detail: str) -> AuthnFailure:
    return AuthnFailure(method="jwt", reason=reason, detail=detail)


def _identity(issuer: JwtIssuer, claims: dict[str, Any], now: float) -> Identity:
    exp = _check_times(claims, issuer.leeway_seconds, now)
    _check_audience(claims, issuer.audiences)
    return Identity(
        principal=principal(claims, issuer.principal_claim),
        method="jwt",
        tenant=tenant(claims, issuer.tenant_claim),
        roles=claim_set(claims, issuer.roles_claim),
        scopes=claim_set(claims, issuer.scopes_claim),
        claims=MappingProxyType(claims),
        credential_header="authorization",
        expires_at=exp,
        credential_id=issuer.issuer,
    )


def _check_times(claims: Mapping[str, Any], leeway: int, now: float) -> float:
    """Check exp, nbf and iat; returns exp."""
    exp = numeric_date(claims, "exp")
    if exp is None:
        raise JwtError("missing_claim", "the token has no expiry")
    if now >= exp + leeway:
        raise JwtError("token_expired", "the token has expired")
    nbf = numeric_date(claims, "nbf")
    if nbf is not None and now + leeway < nbf:
        raise JwtError("token_not_yet_valid", "the token is not valid yet")
    iat = numeric_date(claims, "iat")
    if iat is not None and iat > now + leeway:
        raise JwtError("token_not_yet_valid", "the token was issued in the future")
    return exp


def _check_audience(claims: Mapping[str, Any], audiences: frozenset[str]) -> None:
    aud = claims.get("aud")
    if aud is None:
        raise JwtError("missing_claim", "the token has no audience")
    accepted = audience_accepted(aud, audiences)
    if accepted is None:
        raise JwtError("invalid_claim", "the token's audience is not a string or list of strings")
    if not accepted:
        raise JwtError("wrong_audience", "the token is not meant for this service")
