"""JwtAuthenticator and the JWS layer: algorithms, headers, claims, identity and the cache."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from collections.abc import Callable
from typing import Any

import jwt as pyjwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from extproc.authn.base import AuthnFailure, AuthnOutcome, Identity
from extproc.authn.jwks import HmacSecret, KeySource, StaticJwks, VerificationKey
from extproc.authn.jwt import (
    NEGATIVE_CACHE_SECONDS,
    JwtAuthenticator,
    JwtError,
    JwtIssuer,
    parse_compact,
    verify_compact,
)

ISS = "https://idp.example"
ISS_HS = "https://hs.example"
AUD = "models"
NOW = 1_700_000_000.0
SECRET = b"0123456789abcdef0123456789abcdef"  # 32 bytes
ASYMMETRIC = frozenset({"RS256", "PS256", "ES256", "EdDSA"})

# ---------------------------------------------------------------------------------------------
# Keys, tokens and the authenticator under test


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def other_rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


@pytest.fixture(scope="module")
def ed_key() -> ed25519.Ed25519PrivateKey:
    return ed25519.Ed25519PrivateKey.generate()


@pytest.fixture(scope="module")
def signing_keys(rsa_key: Any, ec_key: Any, ed_key: Any) -> dict[str, tuple[Any, str]]:
    """alg -> (private key, kid)"""
    return {
        "RS256": (rsa_key, "rsa"),
        "PS256": (rsa_key, "rsa"),
        "ES256": (ec_key, "ec"),
        "EdDSA": (ed_key, "ed"),
        "HS256": (SECRET, "hs"),
    }


def public_jwk(key: Any, **members: Any) -> dict[str, Any]:
    jwk: dict[str, Any]
    if isinstance(key, rsa.RSAPrivateKey):
        jwk = pyjwt.algorithms.RSAAlgorithm.to_jwk(key.public_key(), as_dict=True)
    elif isinstance(key, ec.EllipticCurvePrivateKey):
        jwk = pyjwt.algorithms.ECAlgorithm.to_jwk(key.public_key(), as_dict=True)
    else:
        jwk = pyjwt.algorithms.OKPAlgorithm.to_jwk(key.public_key(), as_dict=True)
    jwk.update(members)
    return jwk


@pytest.fixture(scope="module")
def static_jwks(rsa_key: Any, ec_key: Any, ed_key: Any) -> StaticJwks:
    return StaticJwks.from_mapping(
        {
            "keys": [
                public_jwk(rsa_key, kid="rsa", use="sig"),
                public_jwk(ec_key, kid="ec", alg="ES256"),
                public_jwk(ed_key, kid="ed"),
            ]
        }
    )


class Clock:
    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> float:
        return self.now


class CountingSource:
    """Wraps a key source and counts lookups, to see what the cache saves."""

    def __init__(self, inner: KeySource) -> None:
        self.inner = inner
        self.calls = 0

    async def key_for(self, kid: str | None, alg: str) -> VerificationKey | None:
        self.calls += 1
        return await self.inner.key_for(kid, alg)

    async def warm(self) -> bool:
        return True

    async def aclose(self) -> None:
        return None


def make_issuer(keys: KeySource, **overrides: Any) -> JwtIssuer:
    options: dict[str, Any] = {
        "issuer": ISS,
        "audiences": frozenset({AUD, "other-service"}),
        "algorithms": ASYMMETRIC,
        "keys": keys,
        "leeway_seconds": 30,
    }
    options.update(overrides)
    return JwtIssuer(**options)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def auth(static_jwks: StaticJwks, clock: Clock) -> JwtAuthenticator:
    return JwtAuthenticator(
        [
            make_issuer(static_jwks),
            make_issuer(HmacSecret(SECRET), issuer=ISS_HS, algorithms=frozenset({"HS256"})),
        ],
        clock=clock,
    )


_DROP = object()


def claims(**overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "iss": ISS,
        "aud": AUD,
        "sub": "alice",
        "exp": int(NOW) + 600,
        "iat": int(NOW) - 10,
        "nbf": int(NOW) - 10,
    }
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not _DROP}


def mint(payload: dict[str, Any], key: Any, alg: str, kid: str | None, **headers: Any) -> str:
    if kid is not None:
        headers["kid"] = kid
    return pyjwt.encode(payload, key, algorithm=alg, headers=headers)


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def forge(
    header: dict[str, Any] | bytes, payload: dict[str, Any] | bytes, sign: Callable[[bytes], bytes]
) -> str:
    """A token built by hand, for shapes pyjwt refuses to produce."""
    raw_header = header if isinstance(header, bytes) else json.dumps(header).encode()
    raw_payload = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    signing_input = f"{b64(raw_header)}.{b64(raw_payload)}"
    return f"{signing_input}.{b64(sign(signing_input.encode()))}"


def hs256(secret: bytes) -> Callable[[bytes], bytes]:
    return lambda data: hmac.new(secret, data, hashlib.sha256).digest()


def bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


def rs256(key: rsa.RSAPrivateKey) -> Callable[[bytes], bytes]:
    algorithm = pyjwt.algorithms.RSAAlgorithm(pyjwt.algorithms.RSAAlgorithm.SHA256)
    return lambda data: algorithm.sign(data, key)


async def reason_of(auth: JwtAuthenticator, token: str) -> str:
    outcome = await auth.authenticate(bearer(token))
    assert isinstance(outcome, AuthnFailure), outcome
    assert outcome.method == "jwt"
    # The detail is shown to clients: never the token, nor any part of it.
    for part in token.split("."):
        if len(part) >= 8:
            assert part not in outcome.detail
    return outcome.reason


# ---------------------------------------------------------------------------------------------
# Algorithms


@pytest.mark.parametrize("alg", ["RS256", "PS256", "ES256", "EdDSA", "HS256"])
async def test_accepts_every_supported_algorithm(
    auth: JwtAuthenticator, signing_keys: dict[str, tuple[Any, str]], alg: str
) -> None:
    key, kid = signing_keys[alg]
    iss = ISS_HS if alg == "HS256" else ISS
    outcome = await auth.authenticate(bearer(mint(claims(iss=iss), key, alg, kid)))
    assert isinstance(outcome, Identity)
    assert outcome.principal == "alice" and outcome.credential_id == iss


@pytest.mark.parametrize("alg", ["none", "None", "NONE"])
async def test_alg_none_is_always_rejected(auth: JwtAuthenticator, alg: str) -> None:
    token = forge({"alg": alg, "kid": "rsa"}, claims(), lambda _: b"")
    assert token.endswith(".")
    assert await reason_of(auth, token) == "algorithm_not_allowed"


async def test_allow_list_comes_from_the_issuer_not_the_token(
    static_jwks: StaticJwks, rsa_key: Any, ec_key: Any, clock: Clock
) -> None:
    only_ec = JwtAuthenticator([make_issuer(static_jwks, algorithms={"ES256"})], clock=clock)
    assert isinstance(
        await only_ec.authenticate(bearer(mint(claims(), ec_key, "ES256", "ec"))), Identity
    )
    assert await reason_of(only_ec, mint(claims(), rsa_key, "RS256", "rsa")) == (
        "algorithm_not_allowed"
    )
    # Supported by PyJWT and signed with a real key, but not by us.
    assert await reason_of(only_ec, mint(claims(), rsa_key, "RS384", "rsa")) == (
        "algorithm_not_allowed"
    )


async def test_hs256_signed_with_the_rsa_public_key_is_rejected(
    auth: JwtAuthenticator, static_jwks: StaticJwks, rsa_key: Any
) -> None:
    """The classic confusion: the attacker HMACs with the (public) RSA key as the secret."""
    public = rsa_key.public_key()
    pem = public.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    der = public.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.PKCS1)
    for secret in (pem, der):
        token = forge({"alg": "HS256", "kid": "rsa"}, claims(), hs256(secret))
        assert await reason_of(auth, token) == "algorithm_not_allowed"
        # Even if a caller allowed HS256 next to RS256, a JWKS never yields an HMAC key.
        with pytest.raises(JwtError) as caught:
            await verify_compact(token, static_jwks, {"HS256", "RS256"})
        assert caught.value.reason == "unknown_kid"


async def test_hs256_token_is_not_accepted_by_an_asymmetric_issuer(auth: JwtAuthenticator) -> None:
    token = mint(claims(), SECRET, "HS256", "rsa")  # iss is the asymmetric issuer
    assert await reason_of(auth, token) == "algorithm_not_allowed"


# ---------------------------------------------------------------------------------------------
# Not our credential: None


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"authorization": "Basic YWxpY2U6cHc="},
        {"authorization": "Bearer "},
        {"authorization": "Bearer sk-live-0123456789abcdef"},
        {"authorization": "Bearer abc.def"},
        {"authorization": "Bearer a.b.c.d"},
        {"authorization": "Bearer abc.d!f.ghi"},
        {"authorization": "Bearer abc..ghi"},
        {"authorization": "Bearer eyJhbGciOiJIUzI1NiJ9.e30=.c2ln"},  # padded: not base64url
        {"x-api-key": "eyJhbGciOiJIUzI1NiJ9.e30.c2ln"},
    ],
)
async def test_no_jwt_bearer_returns_none(auth: JwtAuthenticator, headers: dict[str, str]) -> None:
    assert await auth.authenticate(headers) is None


async def test_json_serialisation_is_not_accepted(auth: JwtAuthenticator, rsa_key: Any) -> None:
    compact = mint(claims(), rsa_key, "RS256", "rsa")
    header, payload, signature = compact.split(".")
    serialised = json.dumps({"protected": header, "payload": payload, "signature": signature})
    with pytest.raises(JwtError) as caught:
        parse_compact(serialised)
    assert caught.value.reason == "malformed_token"
    # Through the authenticator it is not JWT-shaped at all, so it is not ours to accept.
    assert await auth.authenticate(bearer(serialised.replace(" ", ""))) is None


# ---------------------------------------------------------------------------------------------
# Size and structure


async def test_token_size_is_capped(static_jwks: StaticJwks, rsa_key: Any, clock: Clock) -> None:
    auth = JwtAuthenticator(
        [
            make_issuer(static_jwks, max_token_bytes=8192),
            make_issuer(
                HmacSecret(SECRET), issuer=ISS_HS, algorithms={"HS256"}, max_token_bytes=600
            ),
        ],
        clock=clock,
    )
    assert await reason_of(auth, mint(claims(pad="x" * 9000), rsa_key, "RS256", "rsa")) == (
        "token_too_large"
    )
    # The per-issuer limit applies once the issuer is known.
    small_issuer = mint(claims(iss=ISS_HS, pad="x" * 1000), SECRET, "HS256", None)
    assert await reason_of(auth, small_issuer) == "token_too_large"
    assert isinstance(
        await auth.authenticate(bearer(mint(claims(iss=ISS_HS), SECRET, "HS256", None))), Identity
    )
    # Something huge that is not a JWT is still not ours.
    assert await auth.authenticate(bearer("k" * 20_000)) is None


@pytest.mark.parametrize(
    "header",
    [b"[1,2]", b'"RS256"', b"not json", b'{"alg":"RS256","alg":"none"}', b'{"kid":"rsa"}'],
)
async def test_header_must_be_a_json_object_with_alg(
    auth: JwtAuthenticator, rsa_key: Any, header: bytes
) -> None:
    token = forge(header, claims(), rs256(rsa_key))
    assert await reason_of(auth, token) == "malformed_token"


@pytest.mark.parametrize(
    "payload",
    [b"[]", b'"alice"', b"\xff\xfe", b'{"sub":"alice","sub":"mallory"}', b'{"exp": NaN}'],
)
async def test_payload_must_be_a_json_object(
    auth: JwtAuthenticator, rsa_key: Any, payload: bytes
) -> None:
    token = forge({"alg": "RS256", "kid": "rsa"}, payload, rs256(rsa_key))
    assert await reason_of(auth, token) == "malformed_token"


@pytest.mark.parametrize(
    ("segment", "mutation"),
    [(0, "="), (1, "="), (2, "=="), (2, " "), (1, "?")],
)
def test_only_canonical_base64url_is_accepted(rsa_key: Any, segment: int, mutation: str) -> None:
    """What Wycheproof 367/370 meant to test (their published bytes lost the padding)."""
    parts = mint(claims(), rsa_key, "RS256", "rsa").split(".")
    parts[segment] += mutation
    with pytest.raises(JwtError) as caught:
        parse_compact(".".join(parts))
    assert caught.value.reason == "malformed_token"


def test_non_canonical_trailing_bits_are_rejected() -> None:
    # "e30" is "{}"; "e31" decodes to the same byte with different unused bits.
    parse_compact("eyJhbGciOiJFUzI1NiJ9.e30.AAAA")
    with pytest.raises(JwtError):
        parse_compact("eyJhbGciOiJFUzI1NiJ9.e31.AAAA")


@pytest.mark.parametrize(
    ("param", "value"),
    [
        ("jku", "https://evil.example/jwks.json"),
        ("x5u", "https://evil.example/cert.pem"),
        ("jwk", {"kty": "oct", "k": "AAAA"}),
        ("x5c", ["MIIB..."]),
    ],
)
async def test_key_bearing_headers_are_refused(
    auth: JwtAuthenticator, rsa_key: Any, param: str, value: Any
) -> None:
    # Correctly signed with the trusted key: the header alone is the reason.
    token = mint(claims(), rsa_key, "RS256", "rsa", **{param: value})
    assert await reason_of(auth, token) == "forbidden_header"


@pytest.mark.parametrize(
    "extra", [{"crit": ["exp"]}, {"crit": []}, {"b64": False, "crit": ["b64"]}, {"b64": True}]
)
async def test_critical_extensions_are_refused(
    auth: JwtAuthenticator, rsa_key: Any, extra: dict[str, Any]
) -> None:
    token = forge({"alg": "RS256", "kid": "rsa", **extra}, claims(), rs256(rsa_key))
    assert await reason_of(auth, token) == "unsupported_crit"


# ---------------------------------------------------------------------------------------------
# Keys and signatures


async def test_bad_signatures(auth: JwtAuthenticator, rsa_key: Any, other_rsa_key: Any) -> None:
    header, payload, signature = mint(claims(), rsa_key, "RS256", "rsa").split(".")
    tampered = b64(json.dumps(claims(sub="mallory")).encode())
    assert await reason_of(auth, f"{header}.{tampered}.{signature}") == "bad_signature"
    assert await reason_of(auth, f"{header}.{payload}.") == "bad_signature"
    forged = mint(claims(), other_rsa_key, "RS256", "rsa")
    assert await reason_of(auth, forged) == "bad_signature"


async def test_kid_rules(auth: JwtAuthenticator, rsa_key: Any, ec_key: Any, clock: Clock) -> None:
    assert await reason_of(auth, mint(claims(), rsa_key, "RS256", "unknown")) == "unknown_kid"
    # Three keys and no kid: we do not guess.
    assert await reason_of(auth, mint(claims(), rsa_key, "RS256", None)) == "missing_kid"
    # The EC key's JWK says ES256; an RS256 token naming it finds no key.
    assert await reason_of(auth, mint(claims(), rsa_key, "RS256", "ec")) == "unknown_kid"
    assert await reason_of(auth, forge({"alg": "RS256", "kid": 5}, claims(), rs256(rsa_key))) == (
        "malformed_token"
    )
    # A set with exactly one key may be used without a kid.
    single = StaticJwks.from_mapping({"keys": [public_jwk(ec_key, kid="only")]})
    one_key = JwtAuthenticator([make_issuer(single)], clock=clock)
    assert isinstance(
        await one_key.authenticate(bearer(mint(claims(), ec_key, "ES256", None))), Identity
    )


async def test_encryption_keys_are_not_used(rsa_key: Any, clock: Clock) -> None:
    keys = StaticJwks.from_mapping(
        {"keys": [public_jwk(rsa_key, kid="enc", use="enc"), public_jwk(rsa_key, kid="sig")]}
    )
    auth = JwtAuthenticator([make_issuer(keys)], clock=clock)
    assert await reason_of(auth, mint(claims(), rsa_key, "RS256", "enc")) == "unknown_kid"
    assert isinstance(
        await auth.authenticate(bearer(mint(claims(), rsa_key, "RS256", "sig"))), Identity
    )


# ---------------------------------------------------------------------------------------------
# Claims


async def test_issuer_selection(auth: JwtAuthenticator, rsa_key: Any) -> None:
    evil = mint(claims(iss="https://evil.example"), rsa_key, "RS256", "rsa")
    assert await reason_of(auth, evil) == "unknown_issuer"
    # Exact match only: no trailing-slash or case folding.
    assert await reason_of(auth, mint(claims(iss=ISS + "/"), rsa_key, "RS256", "rsa")) == (
        "unknown_issuer"
    )
    assert await reason_of(auth, mint(claims(iss=_DROP), rsa_key, "RS256", "rsa")) == (
        "missing_claim"
    )
    listed = forge({"alg": "RS256", "kid": "rsa"}, claims(iss=[ISS]), rs256(rsa_key))
    assert await reason_of(auth, listed) == "missing_claim"


@pytest.mark.parametrize(
    ("overrides", "reason"),
    [
        ({"exp": _DROP}, "missing_claim"),
        ({"exp": int(NOW) - 31}, "token_expired"),
        ({"exp": int(NOW) - 30}, "token_expired"),  # exp + leeway must still be in the future
        ({"exp": "tomorrow"}, "invalid_claim"),
        ({"exp": True}, "invalid_claim"),
        ({"nbf": int(NOW) + 31}, "token_not_yet_valid"),
        ({"iat": int(NOW) + 31}, "token_not_yet_valid"),
        ({"nbf": "now"}, "invalid_claim"),
        ({"aud": _DROP}, "missing_claim"),
        ({"aud": "someone-else"}, "wrong_audience"),
        ({"aud": ["a", "b"]}, "wrong_audience"),
        ({"aud": []}, "wrong_audience"),
        ({"aud": 7}, "invalid_claim"),
        ({"aud": [AUD, 7]}, "invalid_claim"),
        ({"sub": _DROP}, "missing_claim"),
        ({"sub": ""}, "missing_claim"),
        ({"sub": 42}, "missing_claim"),
        ({"tenant": 12}, "invalid_claim"),
        ({"tenant": ""}, "invalid_claim"),
        ({"roles": ["admin", 1]}, "invalid_claim"),
        ({"scope": {"read": True}}, "invalid_claim"),
    ],
)
async def test_claim_failures(
    auth: JwtAuthenticator, rsa_key: Any, overrides: dict[str, Any], reason: str
) -> None:
    assert await reason_of(auth, mint(claims(**overrides), rsa_key, "RS256", "rsa")) == reason


async def test_exp_that_parses_as_infinity_is_refused(auth: JwtAuthenticator, rsa_key: Any) -> None:
    payload = json.dumps(claims()).replace(str(int(NOW) + 600), "1e400").encode()
    assert b"1e400" in payload
    token = forge({"alg": "RS256", "kid": "rsa"}, payload, rs256(rsa_key))
    assert await reason_of(auth, token) == "invalid_claim"


@pytest.mark.parametrize(
    "overrides",
    [
        {"exp": int(NOW) - 29},  # expired, but within the 30 s leeway
        {"nbf": int(NOW) + 29},
        {"iat": int(NOW) + 29},
        {"nbf": _DROP, "iat": _DROP},
        {"aud": ["someone-else", AUD]},
        {"aud": "other-service"},
        {"exp": NOW + 600.5},
    ],
)
async def test_claims_accepted(
    auth: JwtAuthenticator, rsa_key: Any, overrides: dict[str, Any]
) -> None:
    outcome = await auth.authenticate(bearer(mint(claims(**overrides), rsa_key, "RS256", "rsa")))
    assert isinstance(outcome, Identity)


async def test_identity_from_claims(auth: JwtAuthenticator, ec_key: Any) -> None:
    payload = claims(tenant="acme", roles=["admin", "user"], scope="read write  read", email="a@x")
    outcome = await auth.authenticate(bearer(mint(payload, ec_key, "ES256", "ec")))
    assert isinstance(outcome, Identity)
    assert outcome == Identity(
        principal="alice",
        method="jwt",
        tenant="acme",
        roles=frozenset({"admin", "user"}),
        scopes=frozenset({"read", "write"}),
        claims=payload,
        credential_header="authorization",
        expires_at=float(payload["exp"]),
        credential_id=ISS,
    )
    with pytest.raises(TypeError):
        outcome.claims["sub"] = "mallory"  # type: ignore[index]


async def test_claim_names_are_configurable(static_jwks: StaticJwks, ec_key: Any) -> None:
    issuer = make_issuer(
        static_jwks,
        principal_claim="email",
        tenant_claim=None,
        roles_claim="groups",
        scopes_claim="scp",
    )
    auth = JwtAuthenticator([issuer], clock=Clock())
    payload = claims(email="a@x", tenant="ignored", groups="ops dev", scp=["models.read"])
    outcome = await auth.authenticate(bearer(mint(payload, ec_key, "ES256", "ec")))
    assert isinstance(outcome, Identity)
    assert outcome.principal == "a@x" and outcome.tenant is None
    assert outcome.roles == {"ops", "dev"} and outcome.scopes == {"models.read"}
    bare = await auth.authenticate(bearer(mint(claims(email="b@x"), ec_key, "ES256", "ec")))
    assert isinstance(bare, Identity) and bare.roles == frozenset() == bare.scopes


# ---------------------------------------------------------------------------------------------
# Configuration


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"leeway_seconds": -1}, "leeway_seconds must be 0..300"),
        ({"leeway_seconds": 301}, "leeway_seconds must be 0..300"),
        ({"leeway_seconds": True}, "leeway_seconds must be an integer"),
        ({"algorithms": frozenset({"none"})}, "unsupported JWT algorithm"),
        ({"algorithms": frozenset({"RS384"})}, "unsupported JWT algorithm"),
        ({"algorithms": frozenset()}, "non-empty"),
        ({"algorithms": frozenset({"RS256", "HS256"})}, "HS256 needs an HmacSecret"),
        ({"audiences": "models"}, "collection of strings"),
        ({"audiences": frozenset()}, "non-empty"),
        ({"issuer": ""}, "non-empty"),
        ({"principal_claim": ""}, "principal_claim"),
        ({"roles_claim": ""}, "roles_claim"),
        ({"max_token_bytes": 0}, "max_token_bytes"),
    ],
)
def test_issuer_validation(
    static_jwks: StaticJwks, overrides: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        make_issuer(static_jwks, **overrides)


def test_hmac_issuer_rules() -> None:
    with pytest.raises(ValueError, match="at least 32 bytes"):
        HmacSecret(b"short-secret")
    with pytest.raises(ValueError, match="an HmacSecret can only verify HS256"):
        make_issuer(HmacSecret(SECRET), algorithms={"HS256", "RS256"})
    issuer = make_issuer(HmacSecret(SECRET), algorithms=["HS256"], audiences=[AUD])
    assert issuer.algorithms == frozenset({"HS256"}) and issuer.audiences == frozenset({AUD})


def test_authenticator_validation(static_jwks: StaticJwks) -> None:
    with pytest.raises(ValueError, match="at least one issuer"):
        JwtAuthenticator([])
    with pytest.raises(ValueError, match="configured twice"):
        JwtAuthenticator([make_issuer(static_jwks), make_issuer(static_jwks)])
    assert JwtAuthenticator([make_issuer(static_jwks)]).method == "jwt"


# ---------------------------------------------------------------------------------------------
# Cache


def cached_authenticator(
    static_jwks: StaticJwks, clock: Clock, **kwargs: Any
) -> tuple[JwtAuthenticator, CountingSource]:
    source = CountingSource(static_jwks)
    issuer = make_issuer(source, leeway_seconds=30)
    return JwtAuthenticator([issuer], clock=clock, **kwargs), source


async def test_verified_tokens_are_cached_until_exp(
    static_jwks: StaticJwks, ec_key: Any, clock: Clock
) -> None:
    auth, source = cached_authenticator(static_jwks, clock)
    token = mint(claims(exp=int(NOW) + 100), ec_key, "ES256", "ec")
    first = await auth.authenticate(bearer(token))
    assert isinstance(first, Identity)
    clock.now = NOW + 99.9
    assert await auth.authenticate(bearer(token)) is first
    assert source.calls == 1
    # Cached by digest, never by the token itself.
    entries = auth._verified._entries
    assert list(entries) == [hashlib.sha256(token.encode()).digest()]
    # At exp the cache stops answering, even though the leeway still lets the token verify:
    # every call now verifies afresh, and nothing is cached past exp.
    clock.now = NOW + 100
    for calls in (2, 3):
        assert isinstance(await auth.authenticate(bearer(token)), Identity)
        assert source.calls == calls
    clock.now = NOW + 130
    assert await reason_of(auth, token) == "token_expired"


async def test_cache_is_bounded_and_evicts_the_oldest(
    static_jwks: StaticJwks, ec_key: Any, clock: Clock
) -> None:
    auth, source = cached_authenticator(static_jwks, clock, cache_size=3)
    tokens = [mint(claims(jti=str(i)), ec_key, "ES256", "ec") for i in range(4)]
    for token in tokens:
        assert isinstance(await auth.authenticate(bearer(token)), Identity)
    assert auth.cache_size() == 3
    digests = set(auth._verified._entries)
    assert hashlib.sha256(tokens[0].encode()).digest() not in digests
    await auth.authenticate(bearer(tokens[3]))
    assert source.calls == 4  # the newest is still cached
    await auth.authenticate(bearer(tokens[0]))
    assert source.calls == 5  # the oldest was evicted


async def test_failures_are_cached_only_briefly(
    static_jwks: StaticJwks, rsa_key: Any, other_rsa_key: Any, clock: Clock
) -> None:
    auth, source = cached_authenticator(static_jwks, clock)
    forged = mint(claims(), other_rsa_key, "RS256", "rsa")
    assert await reason_of(auth, forged) == "bad_signature"
    assert await reason_of(auth, forged) == "bad_signature"
    assert source.calls == 1
    clock.now += NEGATIVE_CACHE_SECONDS
    assert await reason_of(auth, forged) == "bad_signature"
    assert source.calls == 2
    # A kid we do not know yet may become known (rotation): never cached.
    unknown = mint(claims(), rsa_key, "RS256", "next")
    for _ in range(3):
        assert await reason_of(auth, unknown) == "unknown_kid"
    assert source.calls == 5


async def test_cost_of_a_cache_hit_and_of_a_cold_verify(
    static_jwks: StaticJwks, rsa_key: Any, ec_key: Any, clock: Clock
) -> None:
    """Loose bounds so CI noise cannot fail it; the printed numbers are the measurement."""
    auth = JwtAuthenticator([make_issuer(static_jwks)], clock=clock)
    headers = bearer(mint(claims(), rsa_key, "RS256", "rsa"))
    assert isinstance(await auth.authenticate(headers), Identity)
    rounds = 20_000
    started = time.perf_counter()
    for _ in range(rounds):
        await auth.authenticate(headers)
    hit_us = (time.perf_counter() - started) / rounds * 1e6

    cold: dict[str, float] = {}
    for alg, key, kid in (("RS256", rsa_key, "rsa"), ("ES256", ec_key, "ec")):
        tokens = [bearer(mint(claims(jti=f"{alg}{i}"), key, alg, kid)) for i in range(300)]
        started = time.perf_counter()
        for token_headers in tokens:
            outcome: AuthnOutcome = await auth.authenticate(token_headers)
            assert isinstance(outcome, Identity)
        cold[alg] = (time.perf_counter() - started) / len(tokens) * 1e6
    print(f"\ncache hit {hit_us:.2f} us; cold verify (us): {cold}")
    assert hit_us < 50
    assert cold["RS256"] > hit_us * 5
