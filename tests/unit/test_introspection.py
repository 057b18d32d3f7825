"""Token introspection (RFC 7662) against a real HTTP endpoint on 127.0.0.1."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, quote_plus

import pytest

from extproc.authn.base import AuthnFailure, Identity
from extproc.authn.introspection import IntrospectionAuthenticator, looks_like_jwt
from extproc.testing.clock import FakeClock

CLIENT_ID = "gateway client"  # a space: RFC 6749 form-encodes it before HTTP Basic
CLIENT_SECRET = "s3cr3t+/=value"
NOW = 1_700_000_000.0
ISSUER = "https://as.example"


def active(**claims: Any) -> dict[str, Any]:
    return {
        "active": True,
        "sub": "alice",
        "iss": ISSUER,
        "aud": ["models", "other"],
        "exp": NOW + 3600,
        "scope": "chat:write models:read",
        "tenant": "acme",
        "roles": ["chat"],
        "client_id": "app-1",
        "username": "Alice A.",
    } | claims


class Endpoint:
    """An introspection endpoint: checks client authentication and the form, counts calls,
    and answers each token as the test configured it."""

    def __init__(self) -> None:
        self.answers: dict[str, tuple[int, bytes]] = {}
        self.delay = 0.0
        self.calls: list[str] = []
        self.problems: list[str] = []
        self.secret = CLIENT_SECRET
        self.released = threading.Event()  # ends every pending delay when the test is over
        self.url = ""
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    def answer(self, token: str, document: Any, status: int = 200) -> None:
        self.answers[token] = (status, json.dumps(document).encode())

    def answer_raw(self, token: str, body: bytes, status: int = 200) -> None:
        self.answers[token] = (status, body)

    def start(self) -> None:
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                endpoint.handle(self)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/introspect"
        # A short poll interval: shutdown() waits for the next poll.
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        self.released.set()
        assert self._server is not None and self._thread is not None
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def handle(self, request: BaseHTTPRequestHandler) -> None:
        length = int(request.headers.get("content-length", "0"))
        form = parse_qs(request.rfile.read(length).decode("ascii"), strict_parsing=True)
        token = form["token"][0]
        self.calls.append(token)
        if request.headers.get("content-type") != "application/x-www-form-urlencoded":
            self.problems.append(f"content-type {request.headers.get('content-type')}")
        if form.get("token_type_hint") != ["access_token"]:
            self.problems.append(f"token_type_hint {form.get('token_type_hint')}")
        if request.headers.get("authorization") != basic(CLIENT_ID, self.secret):
            self._send(request, 401, b'{"error": "invalid_client"}')
            return
        if self.delay:
            self.released.wait(self.delay)
        status, body = self.answers.get(token, (200, b'{"active": false}'))
        self._send(request, status, body)

    @staticmethod
    def _send(request: BaseHTTPRequestHandler, status: int, body: bytes) -> None:
        request.send_response(status)
        request.send_header("content-type", "application/json")
        request.send_header("content-length", str(len(body)))
        request.end_headers()
        request.wfile.write(body)


def basic(client_id: str, secret: str) -> str:
    pair = f"{quote_plus(client_id)}:{quote_plus(secret)}".encode()
    return "Basic " + base64.b64encode(pair).decode()


@pytest.fixture
def endpoint() -> Iterator[Endpoint]:
    server = Endpoint()
    server.start()
    yield server
    server.stop()
    assert server.problems == []


@pytest.fixture
def wall() -> FakeClock:
    return FakeClock(start=NOW)


def make(endpoint: Endpoint, wall: FakeClock, **options: Any) -> IntrospectionAuthenticator:
    settings: dict[str, Any] = {
        "client_id": CLIENT_ID,
        "client_secret": CLIENT_SECRET,
        "clock": wall,
        "unavailable_backoff_seconds": 0,
    }
    return IntrospectionAuthenticator(endpoint.url, **(settings | options))


async def check(
    authenticator: IntrospectionAuthenticator, token: str | None
) -> Identity | AuthnFailure | None:
    headers = {} if token is None else {"authorization": f"Bearer {token}"}
    return await authenticator.authenticate(headers)


def failure(outcome: object) -> AuthnFailure:
    assert isinstance(outcome, AuthnFailure), outcome
    assert outcome.method == "introspection"
    return outcome


@pytest.fixture
async def authn(endpoint: Endpoint, wall: FakeClock) -> Any:
    authenticator = make(endpoint, wall, issuer=ISSUER, audiences=["models"])
    yield authenticator
    await authenticator.aclose()


# ---------------------------------------------------------------------------------------------
# What an answer means


async def test_active_token_becomes_an_identity(
    endpoint: Endpoint, authn: IntrospectionAuthenticator
) -> None:
    endpoint.answer("opaque-1", active())
    identity = await check(authn, "opaque-1")
    assert isinstance(identity, Identity)
    assert identity.principal == "alice"
    assert identity.method == "introspection"
    assert identity.tenant == "acme"
    assert identity.roles == {"chat"}
    assert identity.scopes == {"chat:write", "models:read"}
    assert identity.expires_at == NOW + 3600
    assert identity.credential_id == ISSUER
    assert identity.credential_header == "authorization"
    assert identity.claims["client_id"] == "app-1"
    assert "opaque-1" not in repr(identity)
    assert endpoint.calls == ["opaque-1"]


@pytest.mark.parametrize(
    "document",
    [
        {"active": False},
        {"active": False, "sub": "alice", "exp": NOW + 3600, "scope": "admin", "iss": ISSUER},
        active(active="true"),
        active(active=1),
        active(active=None),
        {k: v for k, v in active().items() if k != "active"},
    ],
)
async def test_anything_but_active_true_is_inactive(
    endpoint: Endpoint, authn: IntrospectionAuthenticator, document: dict[str, Any]
) -> None:
    endpoint.answer("t", document)
    outcome = failure(await check(authn, "t"))
    assert outcome.reason == "token_inactive" and not outcome.unavailable


@pytest.mark.parametrize(
    ("claims", "reason"),
    [
        ({"exp": NOW - 31}, "token_expired"),
        ({"exp": "soon"}, "invalid_claim"),
        ({"exp": True}, "invalid_claim"),
        ({"nbf": NOW + 31}, "token_not_yet_valid"),
        ({"iss": "https://other.example"}, "unknown_issuer"),
        ({"iss": None}, "unknown_issuer"),
        ({"aud": "other"}, "wrong_audience"),
        ({"aud": ["a", "b"]}, "wrong_audience"),
        ({"aud": None}, "wrong_audience"),
        ({"aud": [1]}, "wrong_audience"),
        ({"sub": None}, "missing_claim"),
        ({"sub": ""}, "missing_claim"),
        ({"tenant": 7}, "invalid_claim"),
        ({"scope": {"a": 1}}, "invalid_claim"),
    ],
)
async def test_active_but_unacceptable(
    endpoint: Endpoint, authn: IntrospectionAuthenticator, claims: dict[str, Any], reason: str
) -> None:
    endpoint.answer("t", active(**claims))
    assert failure(await check(authn, "t")).reason == reason


@pytest.mark.parametrize(
    "claims",
    [{"exp": NOW - 29}, {"nbf": NOW + 29}, {"aud": "models"}, {"exp": None}, {"scope": ["a"]}],
)
async def test_within_leeway_and_other_accepted_forms(
    endpoint: Endpoint, authn: IntrospectionAuthenticator, claims: dict[str, Any]
) -> None:
    endpoint.answer("t", active(**claims))
    assert isinstance(await check(authn, "t"), Identity)


async def test_claim_names_are_configurable(endpoint: Endpoint, wall: FakeClock) -> None:
    authenticator = make(
        endpoint, wall, principal_claim="client_id", tenant_claim="org", roles_claim=None
    )
    endpoint.answer("t", active(sub=None, org="globex"))
    identity = await check(authenticator, "t")
    await authenticator.aclose()
    assert isinstance(identity, Identity)
    assert (identity.principal, identity.tenant, identity.roles) == ("app-1", "globex", set())
    # Neither issuer nor audiences configured: not checked; the endpoint names the credential.
    assert identity.credential_id == endpoint.url.split("/")[2]


# ---------------------------------------------------------------------------------------------
# Which tokens are sent at all


async def test_only_opaque_bearer_tokens_are_sent(
    endpoint: Endpoint, authn: IntrospectionAuthenticator
) -> None:
    jwt_shaped = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJhIn0.c2ln"
    assert looks_like_jwt(jwt_shaped)
    assert await check(authn, None) is None
    assert await authn.authenticate({"authorization": "Basic dXNlcjpwYXNz"}) is None
    assert await check(authn, "gk_abcdefghijklmnop_" + "x" * 43) is None  # our API key
    assert await check(authn, jwt_shaped) is None
    assert failure(await check(authn, "x" * 8193)).reason == "token_too_large"
    assert failure(await check(authn, "bad,token")).reason == "malformed_token"
    assert endpoint.calls == []


async def test_jwt_shaped_tokens_can_be_sent_too(endpoint: Endpoint, wall: FakeClock) -> None:
    authenticator = make(endpoint, wall, skip_jwt_shaped=False)
    token = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJhIn0.c2ln"
    endpoint.answer(token, active())
    assert isinstance(await check(authenticator, token), Identity)
    await authenticator.aclose()


def test_what_looks_like_a_jwt() -> None:
    assert not looks_like_jwt("a.b.c")  # three segments, but no JSON header
    assert not looks_like_jwt("W10.e30.x")  # header `[]`: not an object
    assert looks_like_jwt("e30.e30.")  # `{}` header, empty signature


# ---------------------------------------------------------------------------------------------
# Caching


async def test_active_result_is_cached_up_to_the_max_ttl(
    endpoint: Endpoint, authn: IntrospectionAuthenticator, wall: FakeClock
) -> None:
    endpoint.answer("t", active())
    for _ in range(5):
        assert isinstance(await check(authn, "t"), Identity)
    assert len(endpoint.calls) == 1
    wall.advance(59)
    assert isinstance(await check(authn, "t"), Identity)
    assert len(endpoint.calls) == 1
    wall.advance(1)  # 60 s: the default max TTL, so a revocation shows within a minute
    endpoint.answer("t", {"active": False})
    assert failure(await check(authn, "t")).reason == "token_inactive"
    assert len(endpoint.calls) == 2


async def test_cache_never_outlives_exp(
    endpoint: Endpoint, authn: IntrospectionAuthenticator, wall: FakeClock
) -> None:
    endpoint.answer("t", active(exp=NOW + 10))
    assert isinstance(await check(authn, "t"), Identity)
    wall.advance(9)
    assert isinstance(await check(authn, "t"), Identity)
    assert len(endpoint.calls) == 1
    wall.advance(1)  # at exp: asked again (the server may have extended it; here it did not)
    assert isinstance(await check(authn, "t"), Identity)  # within leeway
    assert len(endpoint.calls) == 2
    wall.advance(30)
    assert failure(await check(authn, "t")).reason == "token_expired"
    assert len(endpoint.calls) == 3


async def test_rejections_are_cached_briefly(
    endpoint: Endpoint, authn: IntrospectionAuthenticator, wall: FakeClock
) -> None:
    for _ in range(20):
        assert failure(await check(authn, "unknown")).reason == "token_inactive"
    assert endpoint.calls == ["unknown"]
    wall.advance(10)
    await check(authn, "unknown")
    assert len(endpoint.calls) == 2


async def test_not_yet_valid_is_not_cached(
    endpoint: Endpoint, authn: IntrospectionAuthenticator, wall: FakeClock
) -> None:
    endpoint.answer("t", active(nbf=NOW + 60))
    assert failure(await check(authn, "t")).reason == "token_not_yet_valid"
    wall.advance(31)
    assert isinstance(await check(authn, "t"), Identity)
    assert len(endpoint.calls) == 2


async def test_caches_are_bounded(endpoint: Endpoint, wall: FakeClock) -> None:
    authenticator = make(endpoint, wall, cache_size=2, inactive_cache_size=1)
    for token in ("a", "b", "c"):
        endpoint.answer(token, active())
        await check(authenticator, token)
    assert authenticator.cache_size() == 2
    assert isinstance(await check(authenticator, "c"), Identity)
    assert len(endpoint.calls) == 3
    await check(authenticator, "a")  # the oldest went
    assert len(endpoint.calls) == 4
    await authenticator.aclose()


async def test_concurrent_requests_share_one_call(
    endpoint: Endpoint, authn: IntrospectionAuthenticator
) -> None:
    endpoint.answer("t", active())
    endpoint.delay = 0.2
    outcomes = await asyncio.gather(*(check(authn, "t") for _ in range(30)))
    assert all(isinstance(outcome, Identity) for outcome in outcomes)
    assert endpoint.calls == ["t"]


async def test_a_cancelled_request_does_not_cancel_the_shared_call(
    endpoint: Endpoint, authn: IntrospectionAuthenticator
) -> None:
    endpoint.answer("t", active())
    endpoint.delay = 0.2
    first = asyncio.ensure_future(check(authn, "t"))
    second = asyncio.ensure_future(check(authn, "t"))
    await asyncio.sleep(0.05)
    first.cancel()
    assert isinstance(await second, Identity)
    assert isinstance(await check(authn, "t"), Identity)  # and the result was cached
    assert endpoint.calls == ["t"]


# ---------------------------------------------------------------------------------------------
# When the endpoint cannot answer: 503, never an allow


def assert_unavailable(outcome: object) -> None:
    result = failure(outcome)
    assert result.reason == "introspection_unavailable" and result.unavailable


@pytest.mark.parametrize(
    ("status", "body"),
    [
        (500, b'{"active": true, "sub": "alice"}'),
        (503, b""),
        (200, b"<html>busy</html>"),
        (200, b'[{"active": true}]'),
        (200, b'{"active": false, "active": true, "sub": "alice"}'),
        (200, b'{"active": true, "sub": "a", "exp": Infinity}'),
        (200, json.dumps(active(pad="x" * 70_000)).encode()),
        (302, b""),
    ],
)
async def test_broken_answers_are_unavailable_not_allowed(
    endpoint: Endpoint, authn: IntrospectionAuthenticator, status: int, body: bytes
) -> None:
    endpoint.answer_raw("t", body, status)
    assert_unavailable(await check(authn, "t"))
    # Not cached: the next request asks again.
    endpoint.answer("t", active())
    assert isinstance(await check(authn, "t"), Identity)
    assert len(endpoint.calls) == 2


async def test_slow_endpoint_times_out(endpoint: Endpoint, wall: FakeClock) -> None:
    authenticator = make(endpoint, wall, timeout_seconds=0.2)
    endpoint.answer("t", active())
    endpoint.delay = 3
    started = time.monotonic()
    assert_unavailable(await check(authenticator, "t"))
    assert time.monotonic() - started < 1.0
    await authenticator.aclose()


async def test_unreachable_endpoint(wall: FakeClock) -> None:
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    authenticator = IntrospectionAuthenticator(
        f"http://127.0.0.1:{port}/introspect",
        client_id=CLIENT_ID,
        client_secret=CLIENT_SECRET,
        clock=wall,
    )
    assert_unavailable(await check(authenticator, "t"))
    await authenticator.aclose()


async def test_after_a_failure_new_tokens_fail_fast_for_the_backoff(
    endpoint: Endpoint, wall: FakeClock
) -> None:
    authenticator = make(endpoint, wall, unavailable_backoff_seconds=1.0)
    endpoint.answer_raw("a", b"", 500)
    assert_unavailable(await check(authenticator, "a"))
    endpoint.answer("b", active())
    assert_unavailable(await check(authenticator, "b"))
    assert endpoint.calls == ["a"]
    wall.advance(1)
    assert isinstance(await check(authenticator, "b"), Identity)
    await authenticator.aclose()


async def test_concurrent_calls_are_bounded(endpoint: Endpoint, wall: FakeClock) -> None:
    authenticator = make(endpoint, wall, max_concurrent_calls=1)
    endpoint.answer("a", active())
    endpoint.answer("b", active())
    endpoint.delay = 0.2
    a, b = await asyncio.gather(check(authenticator, "a"), check(authenticator, "b"))
    assert isinstance(a, Identity)
    assert_unavailable(b)
    await authenticator.aclose()


async def test_rejected_client_credentials_are_logged_once_without_secrets(
    endpoint: Endpoint, wall: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    endpoint.secret = "the-right-one"
    authenticator = make(endpoint, wall)
    for token in ("tok-a", "tok-b", "tok-c"):
        assert_unavailable(await check(authenticator, token))
    await authenticator.aclose()
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1
    assert "HTTP 401" in errors[0].getMessage()
    assert "client id and secret" in errors[0].getMessage()
    for secret in (CLIENT_SECRET, "tok-a", "tok-b", basic(CLIENT_ID, CLIENT_SECRET)[6:]):
        assert secret not in caplog.text


async def test_logs_and_repr_carry_no_token_or_secret(
    endpoint: Endpoint, wall: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    authenticator = make(endpoint, wall)
    endpoint.answer_raw("secret-token-1", b"oops", 500)
    assert_unavailable(await check(authenticator, "secret-token-1"))
    assert "secret-token-1" not in caplog.text
    assert "oops" not in caplog.text
    assert endpoint.url.split("?")[0] in caplog.text
    assert CLIENT_SECRET not in repr(authenticator)
    await authenticator.aclose()


# ---------------------------------------------------------------------------------------------
# Configuration


@pytest.mark.parametrize(
    ("endpoint_url", "options"),
    [
        ("http://as.example/introspect", {}),  # plain http off loopback
        ("ftp://127.0.0.1/introspect", {}),
        ("https://user:pw@as.example/introspect", {}),
        ("https://as.example/introspect", {"client_secret": ""}),
        ("https://as.example/introspect", {"client_id": ""}),
        ("https://as.example/introspect", {"timeout_seconds": 0}),
        ("https://as.example/introspect", {"leeway_seconds": 301}),
        ("https://as.example/introspect", {"audiences": "models"}),
        ("https://as.example/introspect", {"principal_claim": ""}),
        ("https://as.example/introspect", {"issuer": ""}),
        ("https://as.example/introspect", {"max_response_bytes": 0}),
        ("https://as.example/introspect", {"cache_ttl_seconds": -1}),
    ],
)
def test_constructor_validates(endpoint_url: str, options: dict[str, Any]) -> None:
    settings = {"client_id": CLIENT_ID, "client_secret": CLIENT_SECRET} | options
    with pytest.raises(ValueError):
        IntrospectionAuthenticator(endpoint_url, **settings)


def test_https_and_loopback_http_are_accepted() -> None:
    for url in ("https://as.example/introspect", "http://localhost:8080/i", "http://[::1]/i"):
        IntrospectionAuthenticator(url, client_id=CLIENT_ID, client_secret=CLIENT_SECRET)
