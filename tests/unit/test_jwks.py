"""Key sources: JWKS parsing policy, StaticJwks, HmacSecret and RemoteJwks against a real server."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import jwt as pyjwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey

from extproc.authn.base import Identity
from extproc.authn.jwks import HmacSecret, KeySet, RemoteJwks, StaticJwks
from extproc.authn.jwt import JwtAuthenticator, JwtIssuer
from extproc.testing.clock import FakeClock

# ---------------------------------------------------------------------------------------------
# Keys


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def rsa_key2() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


@pytest.fixture(scope="module")
def ed_key() -> ed25519.Ed25519PrivateKey:
    return ed25519.Ed25519PrivateKey.generate()


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


def jwks(*keys: Any) -> dict[str, Any]:
    return {"keys": list(keys)}


# ---------------------------------------------------------------------------------------------
# Parsing policy


async def test_static_jwks_finds_keys_by_kid_and_alg(
    rsa_key: rsa.RSAPrivateKey, ec_key: ec.EllipticCurvePrivateKey, ed_key: Any
) -> None:
    source = StaticJwks.from_mapping(
        jwks(
            public_jwk(rsa_key, kid="r", use="sig"),
            public_jwk(ec_key, kid="e", alg="ES256"),
            public_jwk(ed_key, kid="d"),
        )
    )
    rsa_public = await source.key_for("r", "RS256")
    assert isinstance(rsa_public, RSAPublicKey)
    assert rsa_public.public_numbers() == rsa_key.public_key().public_numbers()
    # An RSA key without `alg` serves both RSA algorithms, nothing else.
    assert await source.key_for("r", "PS256") is not None
    assert await source.key_for("r", "ES256") is None
    assert await source.key_for("r", "HS256") is None
    assert await source.key_for("e", "ES256") is not None
    assert await source.key_for("d", "EdDSA") is not None
    assert await source.key_for("d", "ES256") is None
    assert await source.key_for("nope", "RS256") is None
    # Several keys and no kid: refuse to guess.
    assert await source.key_for(None, "RS256") is None


async def test_key_bound_to_an_alg_is_not_used_for_another(rsa_key: rsa.RSAPrivateKey) -> None:
    source = StaticJwks.from_mapping(jwks(public_jwk(rsa_key, kid="r", alg="PS256")))
    assert await source.key_for("r", "PS256") is not None
    assert await source.key_for("r", "RS256") is None


async def test_single_key_may_be_used_without_kid(rsa_key: rsa.RSAPrivateKey) -> None:
    source = StaticJwks.from_mapping(jwks(public_jwk(rsa_key, kid="only", alg="RS256")))
    assert await source.key_for(None, "RS256") is not None
    assert await source.key_for(None, "PS256") is None  # still bound to its alg


@pytest.mark.parametrize(
    "members",
    [
        {"use": "enc"},
        {"key_ops": ["encrypt"]},
        {"key_ops": "verify"},
        {"alg": "RS384"},
        {"alg": "RSA-OAEP"},
    ],
)
def test_keys_not_meant_for_our_signatures_are_skipped(
    rsa_key: rsa.RSAPrivateKey, ec_key: Any, members: dict[str, Any]
) -> None:
    keys = KeySet.from_mapping(
        jwks(public_jwk(rsa_key, kid="skip", **members), public_jwk(ec_key, kid="keep")),
        source="test",
    )
    assert len(keys) == 1
    assert keys.find("skip", "RS256") is None
    assert keys.find("keep", "ES256") is not None


def test_weak_and_broken_keys_are_skipped(ec_key: Any, caplog: pytest.LogCaptureFixture) -> None:
    weak = rsa.generate_private_key(public_exponent=65537, key_size=1024)  # noqa: S505
    p384 = ec.generate_private_key(ec.SECP384R1())
    broken = public_jwk(ec_key, kid="broken")
    broken["y"] = broken["x"]  # not on the curve
    keys = KeySet.from_mapping(
        jwks(
            public_jwk(weak, kid="weak"),
            public_jwk(p384, kid="p384"),
            broken,
            {"kty": "RSA", "kid": "no-modulus", "e": "AQAB"},
            {"kty": "oct-ish", "kid": "odd"},
            "not an object",
            public_jwk(ec_key, kid=7),
            public_jwk(ec_key, kid="good"),
        ),
        source="test",
    )
    assert len(keys) == 1 and keys.find("good", "ES256") is not None
    assert "below 2048" in caplog.text


@pytest.mark.parametrize(
    ("document", "message"),
    [
        ([], "not a JWKS"),
        ({"keys": {}}, "not a JWKS"),
        ({"keys": []}, "no usable signature keys"),
        ({"keys": [{"kty": "oct", "k": "c2VjcmV0"}]}, "private or secret key material"),
    ],
)
def test_unusable_documents_raise(document: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        KeySet.from_mapping(document, source="test")


def test_private_key_material_refuses_the_whole_set(rsa_key: rsa.RSAPrivateKey) -> None:
    private = pyjwt.algorithms.RSAAlgorithm.to_jwk(rsa_key, as_dict=True)
    with pytest.raises(ValueError, match="private or secret key material"):
        KeySet.from_mapping(jwks(public_jwk(rsa_key, kid="a"), private), source="test")


def test_duplicate_kid_is_ambiguous(rsa_key: Any, rsa_key2: Any) -> None:
    with pytest.raises(ValueError, match="duplicate kid"):
        KeySet.from_mapping(
            jwks(public_jwk(rsa_key, kid="same"), public_jwk(rsa_key2, kid="same")), source="t"
        )


def test_static_jwks_from_file(tmp_path: Path, rsa_key: rsa.RSAPrivateKey) -> None:
    good = tmp_path / "good.json"
    good.write_text(json.dumps(jwks(public_jwk(rsa_key, kid="a"))))
    assert isinstance(StaticJwks.from_file(good), StaticJwks)

    for name, content in [("bad.json", "{nope"), ("empty.json", '{"keys": []}')]:
        path = tmp_path / name
        path.write_text(content)
        with pytest.raises(ValueError, match=str(path)):
            StaticJwks.from_file(path)
    with pytest.raises(ValueError, match=r"missing\.json"):
        StaticJwks.from_file(tmp_path / "missing.json")


# ---------------------------------------------------------------------------------------------
# HmacSecret


async def test_hmac_secret_needs_32_bytes() -> None:
    with pytest.raises(ValueError, match="31 bytes; HS256 needs at least 32"):
        HmacSecret(b"x" * 31)
    source = HmacSecret(b"s" * 32)
    assert await source.key_for(None, "HS256") == b"s" * 32
    assert await source.key_for("any", "RS256") is None
    assert "s" * 32 not in repr(source)


def test_hmac_secret_from_jwk() -> None:
    k = pyjwt.utils.base64url_encode(b"k" * 32).decode()
    assert isinstance(HmacSecret.from_jwk({"kty": "oct", "k": k, "alg": "HS256"}), HmacSecret)
    bad: list[dict[str, Any]] = [
        {"kty": "oct", "k": k, "alg": "HS512"},
        {"kty": "oct", "k": k, "use": "enc"},
        {"kty": "oct", "k": k, "key_ops": ["sign"]},
        {"kty": "oct", "k": k + "="},
        {"kty": "RSA", "k": k},
        {"kty": "oct", "k": pyjwt.utils.base64url_encode(b"k" * 31).decode()},
    ]
    for jwk in bad:
        with pytest.raises(ValueError):
            HmacSecret.from_jwk(jwk)


# ---------------------------------------------------------------------------------------------
# RemoteJwks against a real HTTP server on 127.0.0.1


class JwksServer:
    """A tiny HTTP/1.1 server whose responses the test controls; it counts requests served."""

    def __init__(self) -> None:
        self.requests = 0
        self.status = 200
        self.body = b"{}"
        self.delay = 0.0
        self.declare_length = True
        self.endless = False  # stream data until the client hangs up
        self.url = ""
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[None]] = set()

    def serve(self, document: Any) -> None:
        self.status, self.body = 200, json.dumps(document).encode()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._on_connect, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}/jwks.json"

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._handlers):
            task.cancel()
        await asyncio.gather(*self._handlers, return_exceptions=True)
        await self._server.wait_closed()

    async def _on_connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        try:
            await reader.readuntil(b"\r\n\r\n")
            self.requests += 1
            await asyncio.sleep(self.delay)
            await self._respond(writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self._handlers.discard(task)
            writer.close()
            with contextlib.suppress(ConnectionError, asyncio.CancelledError):
                await writer.wait_closed()

    async def _respond(self, writer: asyncio.StreamWriter) -> None:
        head = f"HTTP/1.1 {self.status} X\r\nconnection: close\r\n"
        if self.declare_length and not self.endless:
            head += f"content-length: {len(self.body)}\r\n"
        writer.write(head.encode() + b"\r\n")
        if not self.endless:
            writer.write(self.body)
            await writer.drain()
            return
        while True:
            writer.write(b" " * 65536)
            await writer.drain()


@pytest.fixture
async def server() -> AsyncIterator[JwksServer]:
    srv = JwksServer()
    await srv.start()
    yield srv
    await srv.stop()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def remote(server: JwksServer, clock: FakeClock) -> AsyncIterator[RemoteJwks]:
    source = RemoteJwks(server.url, ttl_seconds=300, refetch_cooldown_seconds=30, clock=clock)
    yield source
    await source.aclose()


async def test_fetches_once_and_caches_for_the_ttl(
    server: JwksServer, remote: RemoteJwks, clock: FakeClock, rsa_key: Any
) -> None:
    server.serve(jwks(public_jwk(rsa_key, kid="a")))
    assert await remote.key_for("a", "RS256") is not None
    clock.advance(299)
    assert await remote.key_for("a", "RS256") is not None
    assert server.requests == 1
    clock.advance(2)  # past the TTL: the cached copy serves while one fetch replaces it
    server.delay = 0.5
    started = time.monotonic()
    assert await remote.key_for("a", "RS256") is not None
    assert time.monotonic() - started < 0.4, "a request waited for the identity provider"
    await remote.fetch_settled()
    assert server.requests == 2
    assert await remote.key_for("a", "RS256") is not None
    assert server.requests == 2


async def test_many_concurrent_callers_share_one_fetch(
    server: JwksServer, remote: RemoteJwks, rsa_key: Any
) -> None:
    server.serve(jwks(public_jwk(rsa_key, kid="a")))
    server.delay = 0.1
    results = await asyncio.gather(*(remote.key_for("a", "RS256") for _ in range(50)))
    assert all(key is not None for key in results)
    assert server.requests == 1


async def test_unknown_kid_refetches_at_most_once_per_cooldown(
    server: JwksServer, remote: RemoteJwks, clock: FakeClock, rsa_key: Any, rsa_key2: Any
) -> None:
    server.serve(jwks(public_jwk(rsa_key, kid="old")))
    assert await remote.key_for("new", "RS256") is None
    assert server.requests == 1  # the initial fetch; the copy is too fresh to refetch
    server.serve(jwks(public_jwk(rsa_key, kid="old"), public_jwk(rsa_key2, kid="new")))
    clock.advance(10)
    for _ in range(20):
        assert await remote.key_for("new", "RS256") is None
    assert server.requests == 1
    clock.advance(20)  # cooldown over: the first unknown kid triggers one refetch
    assert await remote.key_for("new", "RS256") is not None
    assert server.requests == 2
    for kid in ("made-up-1", "made-up-2", "made-up-3"):
        assert await remote.key_for(kid, "RS256") is None
    assert server.requests == 2


@pytest.mark.parametrize("failure", ["status", "json", "oversize", "endless", "not_jwks", "slow"])
async def test_failed_fetch_keeps_the_last_good_keys(
    server: JwksServer, clock: FakeClock, rsa_key: Any, failure: str
) -> None:
    remote = RemoteJwks(
        server.url, ttl_seconds=300, max_bytes=4096, timeout_seconds=0.3, clock=clock
    )
    try:
        server.serve(jwks(public_jwk(rsa_key, kid="a")))
        assert await remote.warm()
        if failure == "status":
            server.status = 503
        elif failure == "json":
            server.body = b'{"keys": ['
        elif failure == "oversize":
            server.body = json.dumps({"keys": [], "pad": "x" * 10_000}).encode()
        elif failure == "endless":
            server.endless = True
        elif failure == "not_jwks":
            server.body = b'{"keys": []}'
        elif failure == "slow":
            server.delay = 5
        clock.advance(301)
        started = time.monotonic()
        assert await remote.key_for("a", "RS256") is not None
        assert time.monotonic() - started < 0.25, "a request waited for the identity provider"
        await remote.fetch_settled()
        assert server.requests == 2
        # The failure is not retried on every request, only after the cooldown.
        assert await remote.key_for("a", "RS256") is not None
        assert server.requests == 2
        clock.advance(31)
        assert await remote.key_for("a", "RS256") is not None
        await remote.fetch_settled()
        assert server.requests == 3
    finally:
        await remote.aclose()


async def test_size_cap_counts_streamed_bytes_not_the_header(
    server: JwksServer, clock: FakeClock, rsa_key: Any, caplog: pytest.LogCaptureFixture
) -> None:
    server.serve(jwks(public_jwk(rsa_key, kid="a")))
    server.body += b" " * 10_000
    server.declare_length = False  # nothing to trust but the bytes themselves
    remote = RemoteJwks(server.url, max_bytes=4096, clock=clock)
    try:
        assert not await remote.warm()
        assert "exceeds 4096 bytes" in caplog.text
        server.body = server.body.rstrip()
        assert await remote.warm()
    finally:
        await remote.aclose()


async def test_network_error_before_any_keys(clock: FakeClock) -> None:
    with socket.socket() as sock:  # a port that nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    remote = RemoteJwks(f"http://127.0.0.1:{port}/jwks", clock=clock)
    try:
        assert not await remote.warm()
        assert await remote.key_for("a", "RS256") is None
    finally:
        await remote.aclose()


async def test_redirects_are_not_followed(server: JwksServer, clock: FakeClock) -> None:
    server.status, server.body = 302, b""
    remote = RemoteJwks(server.url, clock=clock)
    try:
        assert not await remote.warm()
    finally:
        await remote.aclose()


async def test_logs_name_the_url_but_carry_no_key_material(
    server: JwksServer, clock: FakeClock, rsa_key: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="extproc.authn.jwks")
    good = public_jwk(rsa_key, kid="a")
    server.serve(jwks(good, public_jwk(rsa_key, kid="enc", use="enc")))
    remote = RemoteJwks(server.url, clock=clock)
    try:
        assert await remote.warm()
        server.serve(jwks(good, pyjwt.algorithms.RSAAlgorithm.to_jwk(rsa_key, as_dict=True)))
        assert await remote.warm()  # refused (private material), last good kept
    finally:
        await remote.aclose()
    assert server.url in caplog.text
    assert "private or secret key material" in caplog.text
    private = pyjwt.algorithms.RSAAlgorithm.to_jwk(rsa_key, as_dict=True)
    for secret in (good["n"], private["d"], private["p"]):
        assert secret[:16] not in caplog.text


def test_constructor_validates() -> None:
    with pytest.raises(ValueError):
        RemoteJwks("file:///etc/jwks.json")
    with pytest.raises(ValueError):
        RemoteJwks("https://idp.example/jwks", ttl_seconds=0)


# ---------------------------------------------------------------------------------------------
# End to end: JwtAuthenticator picks up a rotated key from the remote JWKS


async def test_authenticator_follows_key_rotation(
    server: JwksServer, remote: RemoteJwks, clock: FakeClock, rsa_key: Any, rsa_key2: Any
) -> None:
    server.serve(jwks(public_jwk(rsa_key, kid="k1")))
    issuer = JwtIssuer(
        issuer="https://idp.example",
        audiences=frozenset({"models"}),
        algorithms=frozenset({"RS256"}),
        keys=remote,
    )
    auth = JwtAuthenticator([issuer])
    assert await auth.warm()
    claims = {"iss": "https://idp.example", "aud": "models", "sub": "alice", "exp": 0}
    claims["exp"] = int(time.time()) + 600

    def bearer(key: Any, kid: str) -> dict[str, str]:
        token = pyjwt.encode(claims, key, algorithm="RS256", headers={"kid": kid})
        return {"authorization": f"Bearer {token}"}

    assert isinstance(await auth.authenticate(bearer(rsa_key, "k1")), Identity)
    server.serve(jwks(public_jwk(rsa_key, kid="k1"), public_jwk(rsa_key2, kid="k2")))
    clock.advance(31)
    outcome = await auth.authenticate(bearer(rsa_key2, "k2"))
    assert isinstance(outcome, Identity) and outcome.principal == "alice"
    assert server.requests == 2
    await auth.aclose()
