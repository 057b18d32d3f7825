"""OIDC discovery as a key source, against a real HTTP server on 127.0.0.1."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import jwt as pyjwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from extproc.authn.base import AuthnFailure, Identity
from extproc.authn.jwt import JwtAuthenticator, JwtIssuer
from extproc.authn.oidc import DiscoveredJwks, discovery_url
from extproc.testing.clock import FakeClock


class Provider:
    """An OpenID provider's two documents, served over HTTP/1.1; it counts requests per path."""

    def __init__(self) -> None:
        self.routes: dict[str, tuple[int, bytes]] = {}
        self.hits: dict[str, int] = {}
        self.delay = 0.0
        self.base = ""
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[None]] = set()

    def serve(self, path: str, document: Any, status: int = 200) -> None:
        self.routes[path] = (status, json.dumps(document).encode())

    def serve_discovery(self, issuer: str, jwks_path: str, **extra: Any) -> None:
        path = issuer.removeprefix(self.base).rstrip("/") + "/.well-known/openid-configuration"
        self.serve(path, {"issuer": issuer, "jwks_uri": self.base + jwks_path, **extra})

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._on_connect, "127.0.0.1", 0)
        self.base = f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"

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
            head = await reader.readuntil(b"\r\n\r\n")
            path = head.split(b" ")[1].decode()
            self.hits[path] = self.hits.get(path, 0) + 1
            await asyncio.sleep(self.delay)
            status, body = self.routes.get(path, (404, b"{}"))
            writer.write(
                f"HTTP/1.1 {status} X\r\nconnection: close\r\ncontent-length: {len(body)}\r\n"
                f"location: {self.base}/elsewhere\r\n\r\n".encode()
                + body
            )
            await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self._handlers.discard(task)
            writer.close()
            with contextlib.suppress(ConnectionError, asyncio.CancelledError):
                await writer.wait_closed()


@pytest.fixture
async def provider() -> AsyncIterator[Provider]:
    server = Provider()
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture(scope="module")
def key_a() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


@pytest.fixture(scope="module")
def key_b() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def jwks(*pairs: tuple[str, ec.EllipticCurvePrivateKey]) -> dict[str, Any]:
    keys = []
    for kid, key in pairs:
        jwk = pyjwt.algorithms.ECAlgorithm.to_jwk(key.public_key(), as_dict=True)
        keys.append({**jwk, "kid": kid, "use": "sig"})
    return {"keys": keys}


def mint(issuer: str, kid: str, key: ec.EllipticCurvePrivateKey) -> str:
    claims = {"iss": issuer, "sub": "alice", "aud": "models", "exp": int(time.time()) + 300}
    return pyjwt.encode(claims, key, algorithm="ES256", headers={"kid": kid})


@contextlib.asynccontextmanager
async def discovered(issuer: str, clock: FakeClock, **options: Any) -> AsyncIterator[Any]:
    source = DiscoveredJwks(issuer, clock=clock, **options)
    try:
        yield source
    finally:
        await source.aclose()


async def verify(issuer: str, source: DiscoveredJwks, token: str) -> Identity | AuthnFailure:
    authenticator = JwtAuthenticator(
        [JwtIssuer(issuer=issuer, audiences={"models"}, algorithms={"ES256"}, keys=source)]
    )
    outcome = await authenticator.authenticate({"authorization": f"Bearer {token}"})
    assert outcome is not None
    return outcome


# ---------------------------------------------------------------------------------------------


def test_discovery_url_drops_one_terminating_slash() -> None:
    assert discovery_url("https://idp.example") == (
        "https://idp.example/.well-known/openid-configuration"
    )
    assert discovery_url("https://idp.example/realms/a/") == (
        "https://idp.example/realms/a/.well-known/openid-configuration"
    )


async def test_token_signed_by_the_discovered_key_verifies(
    provider: Provider, clock: FakeClock, key_a: Any
) -> None:
    issuer = provider.base + "/realms/main"
    provider.serve_discovery(issuer, "/keys")
    provider.serve("/keys", jwks(("a", key_a)))
    async with discovered(issuer, clock) as source:
        identity = await verify(issuer, source, mint(issuer, "a", key_a))
        assert isinstance(identity, Identity) and identity.principal == "alice"
        assert source.jwks_uri == provider.base + "/keys"
    assert provider.hits == {"/realms/main/.well-known/openid-configuration": 1, "/keys": 1}


async def test_issuer_with_a_trailing_slash(
    provider: Provider, clock: FakeClock, key_a: Any
) -> None:
    issuer = provider.base + "/realms/main/"
    provider.serve_discovery(issuer, "/keys")
    provider.serve("/keys", jwks(("a", key_a)))
    async with discovered(issuer, clock) as source:
        assert await source.warm()
        assert await source.key_for("a", "ES256") is not None


@pytest.mark.parametrize(
    "document_issuer",
    ["{base}/realms/other", "{base}/realms/main/", "{base}/REALMS/main", None],
)
async def test_a_document_for_another_issuer_gives_no_keys(
    provider: Provider, clock: FakeClock, key_a: Any, document_issuer: str | None
) -> None:
    issuer = provider.base + "/realms/main"
    stated = None if document_issuer is None else document_issuer.format(base=provider.base)
    provider.serve(
        "/realms/main/.well-known/openid-configuration",
        {"issuer": stated, "jwks_uri": provider.base + "/keys"},
    )
    provider.serve("/keys", jwks(("a", key_a)))
    async with discovered(issuer, clock) as source:
        assert not await source.warm()
        assert await source.key_for("a", "ES256") is None
        outcome = await verify(issuer, source, mint(issuer, "a", key_a))
        assert isinstance(outcome, AuthnFailure)
    assert "/keys" not in provider.hits


async def test_jwks_uri_change_is_picked_up_after_the_ttl(
    provider: Provider, clock: FakeClock, key_a: Any, key_b: Any
) -> None:
    issuer = provider.base
    provider.serve_discovery(issuer, "/keys-1")
    provider.serve("/keys-1", jwks(("a", key_a)))
    provider.serve("/keys-2", jwks(("b", key_b)))
    async with discovered(issuer, clock, discovery_ttl_seconds=3600) as source:
        assert await source.warm()
        provider.serve_discovery(issuer, "/keys-2")
        clock.advance(3599)
        assert await source.key_for("b", "ES256") is None
        assert await source.key_for("a", "ES256") is not None
        clock.advance(1)
        # Due: the request is served from the known location while discovery runs behind it.
        assert await source.key_for("a", "ES256") is not None
        await source.fetch_settled()
        assert source.jwks_uri == provider.base + "/keys-2"
        assert isinstance(await verify(issuer, source, mint(issuer, "b", key_b)), Identity)
        assert await source.key_for("a", "ES256") is None
    assert provider.hits["/.well-known/openid-configuration"] == 2


async def test_a_failed_discovery_keeps_the_last_good_keys(
    provider: Provider, clock: FakeClock, key_a: Any
) -> None:
    issuer = provider.base
    provider.serve_discovery(issuer, "/keys")
    provider.serve("/keys", jwks(("a", key_a)))
    async with discovered(issuer, clock, refetch_cooldown_seconds=30) as source:
        assert await source.warm()
        provider.serve("/.well-known/openid-configuration", {"error": "down"}, status=503)
        clock.advance(3600)
        assert await source.key_for("a", "ES256") is not None
        await source.fetch_settled()
        assert provider.hits["/.well-known/openid-configuration"] == 2
        for _ in range(5):  # not retried on every request
            assert await source.key_for("a", "ES256") is not None
        assert provider.hits["/.well-known/openid-configuration"] == 2
        clock.advance(30)
        assert await source.key_for("a", "ES256") is not None
        await source.fetch_settled()
        assert provider.hits["/.well-known/openid-configuration"] == 3


async def test_a_new_jwks_uri_without_usable_keys_does_not_replace_the_old(
    provider: Provider, clock: FakeClock, key_a: Any
) -> None:
    issuer = provider.base
    provider.serve_discovery(issuer, "/keys-1")
    provider.serve("/keys-1", jwks(("a", key_a)))
    async with discovered(issuer, clock) as source:
        assert await source.warm()
        provider.serve_discovery(issuer, "/keys-2")  # /keys-2 answers 404
        clock.advance(3600)
        assert await source.warm()
        assert source.jwks_uri == provider.base + "/keys-1"
        assert await source.key_for("a", "ES256") is not None


@pytest.mark.parametrize(
    "document",
    [
        b"<html>",
        b'["not", "an", "object"]',
        b'{"issuer": "ISSUER"}',
        b'{"issuer": "ISSUER", "jwks_uri": 5}',
        b'{"issuer": "ISSUER", "jwks_uri": "http://idp.example/keys"}',
        b'{"issuer": "ISSUER", "jwks_uri": "file:///etc/keys.json"}',
        b'{"issuer": "ISSUER", "jwks_uri": "LOCAL/keys", "pad": "' + b"x" * 70_000 + b'"}',
    ],
)
async def test_unusable_documents(
    provider: Provider, clock: FakeClock, key_a: Any, document: bytes
) -> None:
    issuer = provider.base
    body = document.replace(b"ISSUER", issuer.encode()).replace(b"LOCAL", issuer.encode())
    provider.routes["/.well-known/openid-configuration"] = (200, body)
    provider.serve("/keys", jwks(("a", key_a)))
    async with discovered(issuer, clock) as source:
        assert not await source.warm()
        assert await source.key_for("a", "ES256") is None


async def test_redirects_are_not_followed(provider: Provider, clock: FakeClock) -> None:
    provider.serve("/.well-known/openid-configuration", {}, status=302)
    async with discovered(provider.base, clock) as source:
        assert not await source.warm()
    assert "/elsewhere" not in provider.hits


async def test_concurrent_first_requests_share_one_discovery(
    provider: Provider, clock: FakeClock, key_a: Any
) -> None:
    provider.serve_discovery(provider.base, "/keys")
    provider.serve("/keys", jwks(("a", key_a)))
    provider.delay = 0.05
    async with discovered(provider.base, clock, request_wait_seconds=1.0) as source:
        keys = await asyncio.gather(*(source.key_for("a", "ES256") for _ in range(20)))
        assert all(key is not None for key in keys)
    assert provider.hits == {"/.well-known/openid-configuration": 1, "/keys": 1}


async def test_first_request_waits_only_briefly(
    provider: Provider, clock: FakeClock, key_a: Any
) -> None:
    provider.serve_discovery(provider.base, "/keys")
    provider.serve("/keys", jwks(("a", key_a)))
    provider.delay = 0.3
    async with discovered(provider.base, clock, request_wait_seconds=0.05) as source:
        started = time.monotonic()
        assert await source.key_for("a", "ES256") is None
        assert time.monotonic() - started < 0.25
        await source.fetch_settled()
        assert await source.key_for("a", "ES256") is not None


@pytest.mark.parametrize(
    "issuer",
    [
        "http://idp.example",
        "https://idp.example?tenant=a",
        "https://idp.example#x",
        "https://user:pw@idp.example",
        "",
        "idp.example",
    ],
)
def test_constructor_validates_the_issuer(issuer: str) -> None:
    with pytest.raises(ValueError):
        DiscoveredJwks(issuer)


def test_constructor_validates_limits() -> None:
    with pytest.raises(ValueError):
        DiscoveredJwks("https://idp.example", discovery_ttl_seconds=0)
    with pytest.raises(ValueError):
        DiscoveredJwks("https://idp.example", jwks_max_bytes=0)
    DiscoveredJwks("https://idp.example/")
    DiscoveredJwks("http://127.0.0.1:8080/realms/a")
