"""Tenants, versions and reloads through a real Envoy (ext_proc), over real HTTPS, to the demo
pods: cross-tenant attempts, a CEL time window, a sticky canary split, a blue-green switch under
continuous load, floors and broken files that leave service untouched."""

from __future__ import annotations

import json
import ssl
import threading
import time
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from extproc.demo.stack import free_port
from extproc.testing.gateway import Gateway, make_stack, running
from extproc.tls import CLIENT_TRUST_DOMAIN, DEMO_CLIENT_SPIFFE_ID

CHAT = "/v1/chat/completions"
JWT_METHOD = {
    "jwt": {
        "issuer": "https://issuer.demo.local",
        "audiences": ["models"],
        "algorithms": ["ES256"],
        "jwks_file": "../.run/demo/jwks.json",
    }
}
LEAN_OUTPUT = {"sanitize_errors": False}


def _policy(model: str, **extra: Any) -> dict[str, Any]:
    return {
        "model": model,
        "routes": [{"path_prefix": CHAT, "methods": ["POST"], "select_by_body_model": True}],
        "versions": [{"name": "v1", "cluster": "demo-chat-v1", "default": True}],
        "authentication": [JWT_METHOD],
        "authorization": {"allow_any_authenticated": True},
        "output": LEAN_OUTPUT,
        **extra,
    }


def _window() -> tuple[str, str]:
    now = datetime.now(UTC)
    fmt = "%Y-%m-%dT%H:%M:%SZ"
    return (now - timedelta(hours=1)).strftime(fmt), (now + timedelta(hours=2)).strftime(fmt)


START, END = _window()
POLICIES: dict[str, dict[str, Any]] = {
    "tenant-files": {
        **_policy("tenant-files"),
        "routes": [{"path_prefix": "/v1/tenants"}],
        "tenancy": {
            "path_template": "/v1/tenants/{tenant}/",
            "headers": ["x-tenant-id"],
            "body_fields": ["metadata.tenant"],
        },
    },
    "evil-only": {**_policy("evil-only"), "tenancy": {"tenants": ["evil"]}},
    "canary-chat": _policy(
        "canary-chat",
        versions=[
            {"name": "v1", "cluster": "demo-chat-v1", "default": True},
            {"name": "v2", "cluster": "demo-chat-v2", "weight": 25},
        ],
    ),
    "bluegreen-chat": _policy("bluegreen-chat"),
    "windowed-chat": _policy(
        "windowed-chat",
        authorization={
            "rules": [
                {
                    "name": "open window",
                    "versions": ["v1"],
                    "when": f'now >= timestamp("{START}") && now < timestamp("{END}")',
                },
                {"name": "closed window", "versions": ["v2"], "when": f'now >= timestamp("{END}")'},
                {"name": "this region", "versions": ["v1"], "when": 'region == "local"'},
                {"name": "eu only", "versions": ["v3"], "when": 'region == "eu-west-1"'},
            ]
        },
        versions=[
            {"name": "v1", "cluster": "demo-chat-v1", "default": True},
            {"name": "v2", "cluster": "demo-chat-v2"},
            {"name": "v3", "cluster": "demo-chat-v2"},
        ],
    ),
}
INTROSPECTION_SECRET = "s3cret-for-tests"
# What the local introspection endpoint answers per token (RFC 7662 bodies).
OPAQUE: dict[str, dict[str, Any]] = {
    "opaque-active": {"active": True, "sub": "olga", "tenant": "demo", "scope": "chat"},
    "opaque-inactive": {"active": False, "sub": "olga", "tenant": "demo", "scope": "chat"},
}


class _Introspection(BaseHTTPRequestHandler):
    calls = 0

    def do_POST(self) -> None:
        type(self).calls += 1
        form = self.rfile.read(int(self.headers["content-length"])).decode()
        token = dict(p.split("=", 1) for p in form.split("&")).get("token", "")
        body = json.dumps(OPAQUE.get(token, {"active": False})).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


def _introspected(model: str, port: int) -> dict[str, Any]:
    method = {
        "introspection": {
            "endpoint": f"http://127.0.0.1:{port}/introspect",
            "client_id": "gateway",
            "client_secret_env": "TEST_INTROSPECTION_SECRET",
        }
    }
    return {**_policy(model), "authentication": [method]}


@pytest.fixture(scope="module")
def introspection() -> Iterator[int]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Introspection)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory, introspection: int) -> Iterator[Gateway]:
    root = tmp_path_factory.mktemp("tenancy")
    env = {"TEST_INTROSPECTION_SECRET": INTROSPECTION_SECRET}
    stack = make_stack(root, mode="ext_proc", workers=1, env=env)
    extra = {
        "opaque-chat": _introspected("opaque-chat", introspection),
        "opaque-down": _introspected("opaque-down", free_port()),  # nobody listens there
        "cert-chat": {
            **_policy("cert-chat"),
            "authentication": [
                {
                    "mtls": {
                        "trust_domains": [CLIENT_TRUST_DOMAIN],
                        "tenant_from_path_segment": "tenant",
                    }
                }
            ],
        },
        "shadow-chat": _policy(
            "shadow-chat",
            versions=[
                {"name": "v1", "cluster": "demo-chat-v1", "default": True},
                {"name": "v2", "cluster": "demo-chat-v2"},
            ],
            routing={"shadow": {"version": "v2"}},
        ),
        "fallback-chat": _policy(
            "fallback-chat",
            versions=[
                {"name": "v1", "cluster": "demo-chat-v1", "default": True},
                {"name": "v2", "cluster": "demo-chat-v2", "weight": 100, "fallback": "v1"},
            ],
        ),
    }
    for name, doc in {**POLICIES, **extra}.items():
        (root / "policies" / f"{name}.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    with running(stack) as gw:
        yield gw


@pytest.fixture
def gw(gateway: Gateway) -> Gateway:
    gateway.clear()
    return gateway


def bearer(gw: Gateway, **claims: Any) -> dict[str, str]:
    return {"authorization": f"Bearer {gw.jwt(**claims)}"}


def chat(model: str, **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "hello"}], **extra}


def pod_of(gw: Gateway, before: dict[str, int]) -> str:
    """The one chat pod that received a request since `before` (counts per pod)."""
    grown = [p for p in ("chat-v1", "chat-v2") if len(gw.received(p)) > before[p]]
    assert len(grown) == 1, grown
    return grown[0]


def counts(gw: Gateway) -> dict[str, int]:
    return {p: len(gw.received(p)) for p in ("chat-v1", "chat-v2")}


def gateway_error(response: httpx.Response, status: int, code: str) -> None:
    assert response.status_code == status, response.text
    assert response.json()["error"]["code"] == code, response.text


def test_every_cross_tenant_attempt_is_refused_before_a_pod(gw: Gateway) -> None:
    demo = bearer(gw)
    # Path, header and body naming another tenant: 403, and nothing reaches a pod.
    attempts = [
        ("/v1/tenants/evil/files", demo, None),
        ("/v1/tenants/evil", demo, None),
        ("/v1/tenants/demo/files", {**demo, "x-tenant-id": "evil"}, None),
        ("/v1/tenants/demo/files", demo, {"metadata": {"tenant": "evil"}}),
        ("/v1/tenants/demo/files", demo, {"metadata": {"tenant": ["demo", "evil"]}}),
    ]
    for path, headers, body in attempts:
        response = gw.client.post(path, json=body or {}, headers=headers)
        gateway_error(response, 403, "forbidden")
    assert gw.received_total() == 0
    # A model another tenant owns does not exist for this caller: 404, like an unknown model.
    response = gw.client.post(CHAT, json=chat("evil-only"), headers=demo)
    unknown = gw.client.post(CHAT, json=chat("no-such-model"), headers=demo)
    assert response.status_code == unknown.status_code == 404
    theirs, missing = response.json()["error"], unknown.json()["error"]
    assert (theirs["code"], theirs["message"]) == (missing["code"], missing["message"])
    assert gw.received_total() == 0
    # The tenant's own references pass, and the pod is told the verified tenant only.
    response = gw.client.post(
        "/v1/tenants/demo/files",
        json={"metadata": {"tenant": "demo"}},
        headers={**demo, "x-tenant-id": "demo", "x-gateway-tenant": "evil"},
    )
    assert response.status_code == 404  # the chat pod has no such path; it was reached
    (record,) = gw.received("chat-v1")
    assert dict(record["headers"])["x-gateway-tenant"] == "demo"
    response = gw.client.post(CHAT, json=chat("evil-only"), headers=bearer(gw, tenant="evil"))
    assert response.status_code == 200, response.text


def test_cel_time_window_and_region(gw: Gateway) -> None:
    # v1: inside its window, in this gateway's region ("local", set by Envoy).
    response = gw.client.post(CHAT, json=chat("windowed-chat"), headers=bearer(gw))
    assert response.status_code == 200, response.text
    # v2: its window has not opened yet.
    pinned = {**bearer(gw), "x-model-version": "v2"}
    response = gw.client.post(CHAT, json=chat("windowed-chat"), headers=pinned)
    gateway_error(response, 403, "forbidden")
    # v3: another region only; a client claiming that region changes nothing (Envoy
    # overwrites x-gateway-region).
    pinned = {**bearer(gw), "x-model-version": "v3", "x-gateway-region": "eu-west-1"}
    response = gw.client.post(CHAT, json=chat("windowed-chat"), headers=pinned)
    gateway_error(response, 403, "forbidden")
    assert gw.received_total() == 1


def test_canary_split_is_within_tolerance_and_sticky(gw: Gateway) -> None:
    served: Counter[str] = Counter()
    first: dict[str, str] = {}
    n = 160
    for i in range(n):
        before = counts(gw)
        headers = bearer(gw, sub=f"caller-{i}")
        response = gw.client.post(CHAT, json=chat("canary-chat"), headers=headers)
        assert response.status_code == 200, response.text
        pod = pod_of(gw, before)
        served[pod] += 1
        first[f"caller-{i}"] = pod
    # 25 % of 160 = 40; sd = sqrt(160 * .25 * .75) = 5.5: 4 sd either way.
    assert 40 - 22 <= served["chat-v2"] <= 40 + 22, served
    for i in range(0, n, 8):  # the same caller keeps its version
        before = counts(gw)
        headers = bearer(gw, sub=f"caller-{i}")
        assert gw.client.post(CHAT, json=chat("canary-chat"), headers=headers).status_code == 200
        assert pod_of(gw, before) == first[f"caller-{i}"]


def _write(gw: Gateway, name: str, doc: dict[str, Any] | str) -> None:
    path = Path(gw.stack.config.policy_dir) / f"{name}.yaml"
    text = doc if isinstance(doc, str) else yaml.safe_dump(doc, sort_keys=False)
    path.write_text(text)


def _revision(gw: Gateway) -> str:
    return str(gw.policy_revision().revision)


def test_blue_green_switch_under_load_fails_no_request(gw: Gateway) -> None:
    results: list[tuple[int, float]] = []
    stop = threading.Event()
    headers = bearer(gw, sub="steady")
    tls = gw.tls

    def load() -> None:
        with httpx.Client(base_url=gw.stack.gateway_url, verify=tls, timeout=10) as client:
            for _ in range(2000):  # bounded; stopped long before
                if stop.is_set():
                    return
                response = client.post(CHAT, json=chat("bluegreen-chat"), headers=headers)
                results.append((response.status_code, time.monotonic()))

    before = _revision(gw)
    thread = threading.Thread(target=load)
    thread.start()
    try:
        time.sleep(1.0)
        green = _policy("bluegreen-chat")
        green["versions"] = [
            {"name": "blue", "cluster": "demo-chat-v1"},
            {"name": "green", "cluster": "demo-chat-v2", "default": True},
        ]
        _write(gw, "bluegreen-chat", green)
        deadline = time.monotonic() + 10
        while _revision(gw) == before and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _revision(gw) != before, "the edit was not applied"
        time.sleep(1.0)
    finally:
        stop.set()
        thread.join(timeout=20)
    statuses = Counter(status for status, _ in results)
    assert statuses == Counter({200: len(results)}), statuses
    assert len(results) > 20
    # After the switch, requests land on green.
    before_counts = counts(gw)
    assert gw.client.post(CHAT, json=chat("bluegreen-chat"), headers=headers).status_code == 200
    assert pod_of(gw, before_counts) == "chat-v2"


def _await_rejections(gw: Gateway, count: int) -> None:
    deadline = time.monotonic() + 10
    while gw.policy_revision().rejected_reloads < count and time.monotonic() < deadline:
        time.sleep(0.1)
    assert gw.policy_revision().rejected_reloads >= count, "the change was not refused"


def test_broken_or_floor_breaking_edits_leave_service_untouched(gw: Gateway) -> None:
    headers = bearer(gw)
    good = _revision(gw)
    refused = gw.policy_revision().rejected_reloads
    platform = Path(gw.stack.config.policy_dir) / "_platform.yaml"
    original_platform = platform.read_text() if platform.exists() else None
    broken = Path(gw.stack.config.policy_dir) / "broken.yaml"
    try:
        # A floor the canary policy does not meet (it turns error sanitising off).
        floors = yaml.safe_load(original_platform or "{}") or {}
        floors["floors"] = {"sanitize_errors": True}
        platform.write_text(yaml.safe_dump(floors))
        _await_rejections(gw, refused + 1)
        log = gw.stack.procs["decision-server"].tail(400)
        assert "canary-chat.yaml: output.sanitize_errors: must stay true" in log
        assert "floors.sanitize_errors" in log
        if original_platform is not None:
            platform.write_text(original_platform)
        # A file that is not a policy at all.
        broken.write_text("model: broken\nroutes: 7\n")
        _await_rejections(gw, refused + 2)
        assert "broken.yaml: routes" in gw.stack.procs["decision-server"].tail(400)
        assert _revision(gw) == good
        response = gw.client.post(CHAT, json=chat("canary-chat"), headers=headers)
        assert response.status_code == 200, response.text
    finally:
        broken.unlink(missing_ok=True)
        if original_platform is None:
            platform.unlink(missing_ok=True)
        else:
            platform.write_text(original_platform)


def test_shadow_copy_reaches_the_candidate_while_the_client_gets_the_primary(gw: Gateway) -> None:
    response = gw.client.post(CHAT, json=chat("shadow-chat"), headers=bearer(gw))
    assert response.status_code == 200, response.text
    assert response.headers["x-demo-version"] == "v1"
    deadline = time.monotonic() + 5
    while not gw.received("chat-v2") and time.monotonic() < deadline:
        time.sleep(0.05)  # the mirror is sent asynchronously
    assert len(gw.received("chat-v1")) == 1 and len(gw.received("chat-v2")) == 1


def test_a_failing_candidate_falls_back_to_the_stable_version(gw: Gateway) -> None:
    ok = gw.client.post(CHAT, json=chat("fallback-chat"), headers=bearer(gw))
    assert ok.headers["x-demo-version"] == "v2"  # weight 100: everyone is on the canary
    failing = {**bearer(gw), "x-demo-status": "503", "x-demo-target": "v2"}
    response = gw.client.post(CHAT, json=chat("fallback-chat"), headers=failing)
    assert response.status_code == 200, response.text
    assert response.headers["x-demo-version"] == "v1"


def test_introspected_tokens_active_inactive_and_unreachable(gw: Gateway) -> None:
    def call(model: str, token: str) -> httpx.Response:
        return gw.client.post(CHAT, json=chat(model), headers={"authorization": f"Bearer {token}"})

    response = call("opaque-chat", "opaque-active")
    assert response.status_code == 200, response.text
    (record,) = gw.received("chat-v1")
    assert dict(record["headers"])["x-gateway-principal"] == "olga"
    assert "authorization" not in dict(record["headers"])
    gateway_error(call("opaque-chat", "opaque-inactive"), 401, "unauthenticated")
    gateway_error(call("opaque-chat", "opaque-unknown"), 401, "unauthenticated")
    down = call("opaque-down", "opaque-active")
    gateway_error(down, 503, "unavailable")
    assert down.headers["retry-after"] == "1"
    assert len(gw.received("chat-v1")) == 1


def test_mtls_identity_comes_from_the_verified_certificate(gw: Gateway) -> None:
    pki = gw.stack.pki
    assert pki is not None
    tls = ssl.create_default_context(cafile=str(pki.ca_cert))
    tls.load_cert_chain(str(pki.demo_client_cert), str(pki.demo_client_key))
    with httpx.Client(base_url=gw.stack.gateway_url, verify=tls, timeout=10) as client:
        # A header claiming another identity changes nothing: only the certificate counts.
        response = client.post(
            CHAT, json=chat("cert-chat"), headers={"x-gateway-principal": "spiffe://evil/x"}
        )
    assert response.status_code == 200, response.text
    (record,) = gw.received("chat-v1")
    headers = dict(record["headers"])
    assert headers["x-gateway-principal"] == DEMO_CLIENT_SPIFFE_ID
    assert headers["x-gateway-tenant"] == "demo"
    # Without a certificate there is no identity for this model.
    response = gw.client.post(CHAT, json=chat("cert-chat"))
    gateway_error(response, 401, "unauthenticated")
