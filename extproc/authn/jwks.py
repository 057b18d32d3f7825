"""Where JWT verification keys come from: a JWKS file, a remote JWKS URL or an HMAC secret.

Every source answers one question, `key_for(kid, alg)`, with a key object that is already
checked to fit the algorithm, or None. Key material is never logged; fetch events log the URL.
"""

from __future__ import annotations

import base64
import functools
import json
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import httpx
from cryptography.hazmat.primitives.asymmetric.ec import SECP256R1, EllipticCurvePublicKey
from cryptography.hazmat.primitives.asymmetric.ed448 import Ed448PublicKey
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey
from jwt import PyJWK

from extproc.authn.http_fetch import Refresher, describe, new_client, read_bounded

logger = logging.getLogger(__name__)

# The only algorithms we verify. Anything else (none, RS384, ES512, HS512 ...) is refused.
ASYMMETRIC_ALGORITHMS = frozenset({"RS256", "PS256", "ES256", "EdDSA"})
SUPPORTED_ALGORITHMS = ASYMMETRIC_ALGORITHMS | {"HS256"}

MIN_HMAC_SECRET_BYTES = 32  # RFC 7518 3.2: an HS256 key must be at least as long as the hash.
MIN_RSA_BITS = 2048

# A key ready for verification: a cryptography public key, or the HMAC secret for HS256.
VerificationKey = RSAPublicKey | EllipticCurvePublicKey | Ed25519PublicKey | Ed448PublicKey | bytes

# JWK members that only a private or secret key has. A JWKS we consume is public by
# definition; one carrying these leaks a signing key and is refused as a whole.
_PRIVATE_MEMBERS = frozenset({"d", "p", "q", "dp", "dq", "qi", "oth", "k"})


def key_matches_alg(key: VerificationKey, alg: str) -> bool:
    """Whether `key` is of the family `alg` needs, so a token cannot pick a confusing pairing."""
    if alg in ("RS256", "PS256"):
        return isinstance(key, RSAPublicKey)
    if alg == "ES256":
        return isinstance(key, EllipticCurvePublicKey) and isinstance(key.curve, SECP256R1)
    if alg == "EdDSA":
        return isinstance(key, Ed25519PublicKey | Ed448PublicKey)
    if alg == "HS256":
        return isinstance(key, bytes)
    return False


def b64url_decode_strict(value: str) -> bytes:
    """Decode unpadded base64url, refusing anything a lenient decoder would silently repair.

    Python's decoder drops characters outside the alphabet and ignores non-zero padding
    bits, so two different strings could verify as one; we accept only the canonical form.
    """
    if len(value) % 4 == 1 or not _is_b64url(value):
        raise ValueError("not canonical base64url")
    raw = base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))
    if base64.urlsafe_b64encode(raw).rstrip(b"=") != value.encode("ascii"):
        raise ValueError("not canonical base64url")
    return raw


_B64URL_ALPHABET = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")


def _is_b64url(value: str) -> bool:
    return _B64URL_ALPHABET.issuperset(value)


class KeySource(Protocol):
    """Anything JwtAuthenticator can ask for a verification key."""

    async def key_for(self, kid: str | None, alg: str) -> VerificationKey | None:
        """The key for this key id and algorithm, or None when there is none we may use."""
        ...

    async def warm(self) -> bool:
        """Load keys ahead of the first request; True when keys are available."""
        ...

    async def aclose(self) -> None: ...


# ---------------------------------------------------------------------------------------------
# Parsing a JWKS into usable keys


@dataclass(frozen=True, slots=True)
class Jwk:
    """One usable signature key from a JWKS."""

    kid: str | None
    alg: str | None  # the JWK's own `alg`, which then binds the key to that algorithm
    key: VerificationKey

    def usable_for(self, alg: str) -> bool:
        return (self.alg is None or self.alg == alg) and key_matches_alg(self.key, alg)


class KeySet:
    """An immutable set of signature keys, indexed by kid."""

    __slots__ = ("_by_kid", "_keys")

    def __init__(self, keys: Sequence[Jwk]) -> None:
        self._keys = tuple(keys)
        self._by_kid: dict[str, Jwk] = {}
        for jwk in self._keys:
            if jwk.kid is None:
                continue
            if jwk.kid in self._by_kid:
                # Two keys under one kid make the choice depend on list order: ambiguous.
                raise ValueError(f"duplicate kid {jwk.kid!r}")
            self._by_kid[jwk.kid] = jwk

    def __len__(self) -> int:
        return len(self._keys)

    def find(self, kid: str | None, alg: str) -> VerificationKey | None:
        if kid is None:
            # Without a kid we may only guess when there is nothing to guess between.
            only = self._keys[0] if len(self._keys) == 1 else None
            return only.key if only is not None and only.usable_for(alg) else None
        jwk = self._by_kid.get(kid)
        return jwk.key if jwk is not None and jwk.usable_for(alg) else None

    @classmethod
    def from_mapping(cls, jwks: object, *, source: str) -> KeySet:
        """Parse a JWKS object. Unusable keys are skipped; an unusable set raises ValueError."""
        if not isinstance(jwks, Mapping) or not isinstance(jwks.get("keys"), list):
            raise ValueError(f"{source}: not a JWKS (expected an object with a 'keys' list)")
        members: list[Any] = jwks["keys"]
        for member in members:
            if isinstance(member, Mapping) and _PRIVATE_MEMBERS.intersection(member):
                raise ValueError(f"{source}: JWKS contains private or secret key material")
        keys = [jwk for jwk in (_parse_jwk(m, source) for m in members) if jwk is not None]
        if not keys:
            raise ValueError(f"{source}: JWKS has no usable signature keys")
        try:
            return cls(keys)
        except ValueError as exc:
            raise ValueError(f"{source}: {exc}") from None

    @classmethod
    def from_json(cls, data: bytes | str, *, source: str) -> KeySet:
        try:
            parsed = json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise ValueError(f"{source}: JWKS is not valid JSON") from None
        return cls.from_mapping(parsed, source=source)


def _parse_jwk(member: object, source: str) -> Jwk | None:
    """One JWKS member as a usable key, or None (with the reason logged) when we must not use it."""
    if not isinstance(member, Mapping):
        logger.warning("JWKS %s: skipping a member that is not an object", source)
        return None
    kid = member.get("kid")
    if kid is not None and not isinstance(kid, str):
        logger.warning("JWKS %s: skipping a key whose kid is not a string", source)
        return None
    problem = _unusable_reason(member)
    if problem is not None:
        # Encryption keys and other algorithms are normal in a shared JWKS: not a warning.
        logger.debug("JWKS %s: skipping key kid=%r: %s", source, kid, problem)
        return None
    key = _build_key(member)
    problem = "malformed or unsupported key parameters" if key is None else _weakness(key)
    if key is None or problem is not None:
        logger.warning("JWKS %s: skipping key kid=%r: %s", source, kid, problem)
        return None
    return Jwk(kid=kid, alg=member.get("alg"), key=key)


def _unusable_reason(member: Mapping[str, Any]) -> str | None:
    """Why the JWK's metadata forbids using it for verifying our tokens, if it does."""
    use = member.get("use")
    if use is not None and use != "sig":
        return f"use is {use!r}, not 'sig'"
    key_ops = member.get("key_ops")
    if key_ops is not None and (not isinstance(key_ops, list) or "verify" not in key_ops):
        return "key_ops does not allow 'verify'"
    alg = member.get("alg")
    if alg is not None and alg not in ASYMMETRIC_ALGORITHMS:
        return f"alg {alg!r} is not supported"
    if member.get("kty") not in ("RSA", "EC", "OKP"):
        return f"kty {member.get('kty')!r} is not supported"
    return None


# PyJWK needs an algorithm to pick its parser; our own `usable_for` decides what the key may
# actually verify, so this is only "which parser", not "which algorithm".
_PARSER_FOR_KTY = {"RSA": "RS256", "EC": "ES256", "OKP": "EdDSA"}


def _build_key(member: Mapping[str, Any]) -> VerificationKey | None:
    try:
        key = PyJWK(dict(member), _PARSER_FOR_KTY[member["kty"]]).key
    except Exception:  # untrusted input: any failure just means "not a usable key"
        return None
    # Private keys were refused earlier; this also keeps out unexpected types.
    if isinstance(key, RSAPublicKey | EllipticCurvePublicKey | Ed25519PublicKey | Ed448PublicKey):
        return key
    return None


def _weakness(key: VerificationKey) -> str | None:
    if isinstance(key, RSAPublicKey):
        if key.key_size < MIN_RSA_BITS:
            return f"RSA key of {key.key_size} bits is below {MIN_RSA_BITS}"
        if _has_roca_fingerprint(key.public_numbers().n):
            return "RSA key has the ROCA fingerprint (CVE-2017-15361), its factors are recoverable"
    if isinstance(key, EllipticCurvePublicKey) and not isinstance(key.curve, SECP256R1):
        return f"EC curve {key.curve.name} is not supported"
    return None


@functools.cache
def _roca_subgroups() -> tuple[tuple[int, frozenset[int]], ...]:
    """For each odd prime up to 701, the subgroup that 65537 generates modulo it.

    Infineon's flawed generator (ROCA) made primes p = k*M + 65537^a mod M, where M is the
    product of the first 126 primes for 2048-bit and larger keys. So n mod r lies in <65537>
    for every such r. For an honest key that happens with probability about 2^-167.
    """
    primes = [p for p in range(3, 702, 2) if all(p % d for d in range(3, int(p**0.5) + 1, 2))]
    groups = []
    for p in primes:
        element, members = 1, set()
        while element not in members:
            members.add(element)
            element = element * 65537 % p
        groups.append((p, frozenset(members)))
    return tuple(groups)


def _has_roca_fingerprint(modulus: int) -> bool:
    return all(modulus % p in subgroup for p, subgroup in _roca_subgroups())


# ---------------------------------------------------------------------------------------------
# Sources


class StaticJwks:
    """Keys from a JWKS document, parsed once at construction."""

    def __init__(self, keys: KeySet) -> None:
        self._keys = keys

    @classmethod
    def from_file(cls, path: str | Path) -> StaticJwks:
        path = Path(path)
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise ValueError(f"cannot read JWKS file {path}: {exc.strerror}") from None
        return cls(KeySet.from_json(data, source=f"JWKS file {path}"))

    @classmethod
    def from_mapping(cls, jwks: Mapping[str, Any], *, source: str = "inline JWKS") -> StaticJwks:
        return cls(KeySet.from_mapping(jwks, source=source))

    async def key_for(self, kid: str | None, alg: str) -> VerificationKey | None:
        return self._keys.find(kid, alg)

    async def warm(self) -> bool:
        return True

    async def aclose(self) -> None:
        return None


class HmacSecret:
    """The shared secret for HS256. It is the only way to configure a symmetric key."""

    __slots__ = ("_secret",)

    def __init__(self, secret: bytes) -> None:
        if not isinstance(secret, bytes):
            raise TypeError("the HMAC secret must be bytes")
        if len(secret) < MIN_HMAC_SECRET_BYTES:
            raise ValueError(
                f"HMAC secret is {len(secret)} bytes; HS256 needs at least "
                f"{MIN_HMAC_SECRET_BYTES} bytes"
            )
        self._secret = secret

    @classmethod
    def from_jwk(cls, jwk: Mapping[str, Any]) -> HmacSecret:
        """An `oct` JWK meant for HS256 signatures (the form some identity providers export)."""
        if jwk.get("kty") != "oct" or not isinstance(jwk.get("k"), str):
            raise ValueError("not a symmetric (kty 'oct') JWK")
        if jwk.get("use", "sig") != "sig" or jwk.get("alg", "HS256") != "HS256":
            raise ValueError("the JWK is not an HS256 signature key")
        key_ops = jwk.get("key_ops")
        if key_ops is not None and (not isinstance(key_ops, list) or "verify" not in key_ops):
            raise ValueError("the JWK's key_ops do not allow 'verify'")
        try:
            secret = b64url_decode_strict(jwk["k"])
        except ValueError:  # binascii.Error is a ValueError
            raise ValueError("the JWK's 'k' is not base64url") from None
        return cls(secret)

    def __repr__(self) -> str:
        return "HmacSecret(<redacted>)"  # never show the secret, even in debug output

    async def key_for(self, kid: str | None, alg: str) -> VerificationKey | None:
        return self._secret if alg == "HS256" else None

    async def warm(self) -> bool:
        return True

    async def aclose(self) -> None:
        return None


_REQUEST_HEADERS = {"accept": "application/json", "accept-encoding": "identity"}


class RemoteJwks:
    """A JWKS fetched over HTTP(S), cached for a TTL, with the last good copy kept on failure.

    - At most one fetch is in flight; concurrent callers await the same task.
    - A kid we do not know triggers a refetch (key rotation), at most once per cooldown, so a
      flood of made-up kids cannot turn into a flood of requests to the identity provider.
    - A failed fetch (network, non-200, oversize, bad JSON, no usable key) keeps the previous
      keys and is retried after the cooldown, not on every request.
    - The body is streamed and counted, so a huge or endless response cannot exhaust memory.
    - Redirects are not followed: the configured URL is the trust anchor.
    - A request never waits long for the identity provider: once keys are cached, an expired
      copy keeps serving while one background fetch replaces it; with no keys yet, or for an
      unknown kid, a request waits at most `request_wait_seconds` (well inside Envoy's
      per-message timeout) and the fetch goes on without it.

    The HTTP client is created lazily inside the running loop; the source belongs to that loop.
    """

    def __init__(
        self,
        url: str,
        *,
        ttl_seconds: float = 300,
        refetch_cooldown_seconds: float = 30,
        max_bytes: int = 256 * 1024,
        timeout_seconds: float = 2.0,
        request_wait_seconds: float = 0.15,
        clock: Callable[[], float] = time.monotonic,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        if not url.startswith(("https://", "http://")):
            raise ValueError(f"JWKS URL must be http(s): {url!r}")
        if ttl_seconds <= 0 or refetch_cooldown_seconds < 0 or max_bytes <= 0:
            raise ValueError("JWKS ttl and max_bytes must be positive, cooldown non-negative")
        if timeout_seconds <= 0 or request_wait_seconds <= 0:
            raise ValueError("JWKS timeout and request wait must be positive")
        self.url = url
        self._cooldown = refetch_cooldown_seconds
        self._max_bytes = max_bytes
        self._timeout = timeout_seconds
        self._transport = transport
        self._client: httpx.AsyncClient | None = None
        self._keys: KeySet | None = None
        self._refresher = Refresher(
            self._fetch_and_store,
            ttl_seconds=ttl_seconds,
            cooldown_seconds=refetch_cooldown_seconds,
            request_wait_seconds=request_wait_seconds,
            clock=clock,
            what=f"JWKS {url}",
        )

    @property
    def has_keys(self) -> bool:
        """Whether a usable key set has been fetched (it may be stale)."""
        return self._keys is not None

    async def key_for(self, kid: str | None, alg: str) -> VerificationKey | None:
        if self._refresher.due():
            if self._keys is None:
                await self._refresher.refresh_briefly()
            else:
                self._refresher.start()  # stale-while-revalidate: serve the copy we have
        key = self._find(kid, alg)
        if key is None and kid is not None and self._may_refetch_for_unknown_kid():
            await self._refresher.refresh_briefly()  # the issuer may have rotated keys
            key = self._find(kid, alg)
        return key

    async def warm(self) -> bool:
        """Fetch now (or join the fetch in flight); True when keys are available."""
        await self._refresher.refresh()
        return self._keys is not None

    async def fetch_settled(self) -> None:
        """Wait for the fetch in flight, if any (a background refresh, say); never starts one."""
        await self._refresher.settled()

    async def aclose(self) -> None:
        await self._refresher.aclose()
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    def _find(self, kid: str | None, alg: str) -> VerificationKey | None:
        return self._keys.find(kid, alg) if self._keys is not None else None

    def _may_refetch_for_unknown_kid(self) -> bool:
        # Measured from the last fetch of any kind: a copy fetched a moment ago will not
        # contain the kid either, and made-up kids must not translate into requests.
        return self._refresher.since_last_start() >= self._cooldown

    async def _fetch_and_store(self) -> bool:
        if self._client is None:
            self._client = new_client(self._timeout, self._transport)
        try:
            body = await read_bounded(
                self._client,
                "GET",
                self.url,
                max_bytes=self._max_bytes,
                timeout_seconds=self._timeout,
                headers=_REQUEST_HEADERS,
            )
            keys = KeySet.from_json(body, source=self.url)
        except Exception as exc:  # a fetch failure of any kind must leave the last good keys
            kept = "keeping the last good keys" if self._keys is not None else "no keys yet"
            logger.warning("JWKS fetch from %s failed (%s); %s", self.url, describe(exc), kept)
            return False
        self._keys = keys
        logger.info("JWKS fetched from %s: %d usable keys", self.url, len(keys))
        return True
