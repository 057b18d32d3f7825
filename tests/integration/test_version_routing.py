"""Per-version upstream behaviour that Envoy enforces: fallback, mirroring, timeouts.

Through the real decision server, a real Envoy (both modes) and the demo pods. Until the
decision server computes selection keys from a version's fallback and shadow, the test policy
names them directly: version v3 is served by `demo-chat-v2__fallback__demo-chat-v1` (the
candidate v2, retried on v1) and v4 by `demo-chat-v1__mirror__demo-chat-v2` (v1, with a copy to
v2); Envoy's routes come from UPSTREAMS below, as they will from the policies.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from extproc.demo.pods import start_pod
from extproc.envoy_routes import VersionUpstream, selection_key
from extproc.testing.gateway import Gateway, make_stack, running

CHAT = "/v1/chat/completions"
CANARY = selection_key("demo-chat-v2", fallback="demo-chat-v1")
SHADOWED = selection_key("demo-chat-v1", mirror="demo-chat-v2")
TIMEOUT_S = 2.5  # demo-chat-v2's route timeout here
PER_TRY_S = 1.0
UPSTREAMS = (
    VersionUpstream("demo-chat-v1", mirror_clusters=("demo-chat-v2",)),
    VersionUpstream(
        "demo-chat-v2",
        timeout_seconds=TIMEOUT_S,
        per_try_timeout_seconds=PER_TRY_S,
        fallback_cluster="demo-chat-v1",
    ),
    VersionUpstream("demo-oip-v1"),
)
TEST_VERSIONS = [
    {"name": "v3", "cluster": CANARY},
    {"name": "v4", "cluster": SHADOWED},
    {"name": "v5", "cluster": "demo-chat-v9"},  # a cluster Envoy has no route for
]


def _add_versions(policy_dir: Path) -> None:
    path = policy_dir / "demo-chat.yaml"
    policy = yaml.safe_load(path.read_text())
    for version in policy["versions"]:
        version.pop("fallback", None)  # v2 alone here; v3 is the candidate with a fallback
        version.pop("weight", None)
    policy["versions"].extend(TEST_VERSIONS)
    path.write_text(yaml.safe_dump(policy, sort_keys=False))


@pytest.fixture(scope="module", params=["ext_proc", "ext_authz"])
def routing(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Gateway]:
    root = tmp_path_factory.mktemp(f"routing-{request.param}")
    stack = make_stack(root, mode=request.param, upstreams=UPSTREAMS)
    _add_versions(stack.config.policy_dir)
    with running(stack) as gw:
        yield gw


@pytest.fixture
def gw(routing: Gateway) -> Gateway:
    routing.clear()
    return routing


def chat(text: str = "hello") -> dict[str, Any]:
    return {"model": "demo-chat", "messages": [{"role": "user", "content": text}]}


def post(gw: Gateway, version: str | None, **headers: str) -> httpx.Response:
    sent = {"x-api-key": gw.beta_key, **{k.replace("_", "-"): v for k, v in headers.items()}}
    if version is not None:
        sent["x-model-version"] = version
    return gw.client.post(CHAT, json=chat(f"to {version}"), headers=sent)


def headers_of(record: dict[str, Any]) -> dict[str, list[str]]:
    values: dict[str, list[str]] = {}
    for name, value in record["headers"]:
        values.setdefault(name.lower(), []).append(value)
    return values


def stat(gw: Gateway, name: str) -> int:
    url = f"http://127.0.0.1:{gw.stack.admin_port}/stats?filter=^{name}$"
    for line in gw.pods.get(url).text.splitlines():
        key, _, value = line.partition(": ")
        if key == name:
            return int(value)
    return 0


def fallback_retries(gw: Gateway) -> int:
    return stat(gw, f"cluster.{CANARY}.upstream_rq_retry_success")


def wait_for(check: Callable[[], bool], within: float = 10.0) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.1)
    return check()


def candidate_still_serves(gw: Gateway) -> None:
    """A failed attempt did not take the candidate out: it serves the next request. (Also
    ends its run of consecutive failures, which outlier detection would eject it for.)"""
    assert post(gw, "v3").headers["x-demo-version"] == "v2"


def health_flags(gw: Gateway, cluster: str) -> str:
    url = f"http://127.0.0.1:{gw.stack.admin_port}/clusters"
    for line in gw.pods.get(url).text.splitlines():
        if line.startswith(f"{cluster}::") and "::health_flags::" in line:
            return line.rsplit("::", 1)[1]
    return "missing"


# -- fallback -------------------------------------------------------------------------------


def test_a_healthy_candidate_serves(gw: Gateway) -> None:
    r = post(gw, "v3")
    assert r.status_code == 200, r.text
    assert r.headers["x-demo-version"] == "v2"
    assert gw.received("chat-v1") == []
    (seen,) = gw.received("chat-v2")
    assert headers_of(seen)["x-gateway-cluster"] == [CANARY]


def test_candidate_answering_503_falls_back_to_stable(gw: Gateway) -> None:
    before = fallback_retries(gw)
    r = post(gw, "v3", x_demo_status="503", x_demo_target="v2")
    assert r.status_code == 200, r.text
    assert r.headers["x-demo-version"] == "v1"
    assert r.json()["choices"][0]["message"]["content"] == "to v3"
    (failed,) = gw.received("chat-v2")
    (served,) = gw.received("chat-v1")
    # The router kept the (already inspected) body and sent it again, byte for byte.
    assert served["body"] == failed["body"] and served["body_size"] > 0
    assert fallback_retries(gw) == before + 1
    candidate_still_serves(gw)


def test_a_streamed_request_body_is_buffered_for_the_fallback(gw: Gateway) -> None:
    body = b'{"model": "demo-chat", "messages": [{"role": "user", "content": "sent in pieces"}]}'

    def pieces() -> Iterator[bytes]:  # chunked transfer encoding, no content-length
        yield body[:20]
        yield body[20:]

    headers = {
        "x-api-key": gw.chat_key,
        "x-model-version": "v3",
        "content-type": "application/json",
        "x-demo-status": "503",
        "x-demo-target": "v2",
    }
    r = gw.client.post(CHAT, content=pieces(), headers=headers)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == "sent in pieces"
    assert r.headers["x-demo-version"] == "v1"
    assert gw.received("chat-v1")[0]["body"] == body.decode()
    candidate_still_serves(gw)


def test_no_fallback_from_the_fallback(gw: Gateway) -> None:
    """The stable version gets one try: when it fails too, the client sees the failure."""
    r = post(gw, "v3", x_demo_status="503")
    assert r.status_code == 503
    assert len(gw.received("chat-v2")) == 1 and len(gw.received("chat-v1")) == 1
    candidate_still_serves(gw)


def test_slow_candidate_falls_back_after_its_per_try_timeout(gw: Gateway) -> None:
    started = time.monotonic()
    r = post(gw, "v3", x_demo_wait_ms="4000", x_demo_target="v2")
    elapsed = time.monotonic() - started
    assert r.status_code == 200, r.text
    assert r.headers["x-demo-version"] == "v1"
    assert PER_TRY_S <= elapsed < TIMEOUT_S, elapsed
    candidate_still_serves(gw)


# -- timeout --------------------------------------------------------------------------------


def test_the_versions_timeout_is_enforced_by_envoy(gw: Gateway) -> None:
    started = time.monotonic()
    r = post(gw, "v2", x_demo_wait_ms="6000")  # v2 alone: no retries, no fallback
    elapsed = time.monotonic() - started
    assert r.status_code == 504, r.text
    assert TIMEOUT_S - 0.1 <= elapsed < TIMEOUT_S + 1.5, elapsed  # not the default 120 s
    assert len(gw.received("chat-v2")) == 1
    candidate_still_serves(gw)


# -- mirror ---------------------------------------------------------------------------------


def test_the_mirror_gets_a_copy_and_the_client_the_primarys_answer(gw: Gateway) -> None:
    r = post(gw, "v4")
    assert r.status_code == 200, r.text
    assert r.headers["x-demo-version"] == "v1"
    assert wait_for(lambda: len(gw.received("chat-v2")) == 1), "no copy reached the mirror"
    (primary,) = gw.received("chat-v1")
    (copy,) = gw.received("chat-v2")
    assert copy["body"] == primary["body"] and copy["path"] == primary["path"]
    assert headers_of(copy)["host"][0].partition(":")[0].endswith("-shadow")  # Envoy marks it
    # Identity headers travel with the copy; the credential does not.
    assert headers_of(copy)["x-gateway-principal"] == ["bea"]
    assert "x-api-key" not in headers_of(copy)


def test_a_failing_mirror_does_not_touch_the_answer(gw: Gateway) -> None:
    r = post(gw, "v4", x_demo_status="500", x_demo_target="v2")
    assert r.status_code == 200, r.text
    assert r.headers["x-demo-version"] == "v1"
    assert wait_for(lambda: len(gw.received("chat-v2")) == 1)


# -- what a client cannot do ----------------------------------------------------------------


def test_client_routing_headers_neither_route_nor_mirror(gw: Gateway) -> None:
    r = post(gw, None, x_gateway_cluster=SHADOWED, x_gateway_mirror="demo-chat-v2")
    assert r.status_code == 200, r.text
    assert r.headers["x-demo-version"] == "v1"
    time.sleep(0.5)  # a mirrored copy would have arrived by now
    assert gw.received("chat-v2") == []
    (seen,) = gw.received("chat-v1")
    values = headers_of(seen)
    assert values["x-gateway-cluster"] == ["demo-chat-v1"]
    assert "x-gateway-mirror" not in values


def test_client_routing_header_without_credentials_reaches_nothing(gw: Gateway) -> None:
    for key in ("demo-chat-v1", CANARY, SHADOWED, "decision_server"):
        r = gw.client.post(CHAT, json=chat(), headers={"x-gateway-cluster": key})
        assert r.status_code == 401, (key, r.status_code)
    assert gw.received_total() == 0


def test_a_version_without_a_route_fails_closed(gw: Gateway) -> None:
    r = post(gw, "v5")
    assert r.status_code == 503, r.text
    assert gw.received_total() == 0


# -- the candidate goes away and comes back -------------------------------------------------


def test_candidate_down_falls_back_and_gets_its_traffic_back(gw: Gateway) -> None:
    """Two down-and-up cycles: the second is where an aggregate cluster's health view went
    stale and kept the recovered candidate out (see extproc.envoy_routes)."""
    for _ in range(2):
        assert wait_for(lambda: health_flags(gw, "demo-chat-v2") == "healthy")
        before = fallback_retries(gw)
        gw.stop_pod("chat-v2")
        try:
            # Refused connection, retried on the stable pod; before and after the health
            # checks noticed: the candidate is always tried first.
            assert post(gw, "v3").headers["x-demo-version"] == "v1"
            assert wait_for(lambda: "failed_active_hc" in health_flags(gw, "demo-chat-v2"))
            assert post(gw, "v3").headers["x-demo-version"] == "v1"
            assert fallback_retries(gw) == before + 2
        finally:
            gw.start_pod("chat-v2")
        assert wait_for(lambda: health_flags(gw, "demo-chat-v2") == "healthy")
        candidate_still_serves(gw)


def test_an_ejected_candidate_of_one_pod_is_still_tried(gw: Gateway) -> None:
    """Outlier detection ejects the candidate's only pod after 5 gateway failures in a row;
    requests still try it (panic mode), so it serves again as soon as it can."""
    ejected = "cluster.demo-chat-v2.outlier_detection.ejections_enforced_total"
    before = stat(gw, ejected)
    for _ in range(5):
        r = post(gw, "v3", x_demo_status="503", x_demo_target="v2")
        assert r.headers["x-demo-version"] == "v1"
    assert stat(gw, ejected) == before + 1
    assert "failed_outlier_check" in health_flags(gw, "demo-chat-v2")
    candidate_still_serves(gw)


# -- the demo pod knobs these tests stand on (no Envoy) ---------------------------------------


def test_pods_answer_health_checks_without_recording_them() -> None:
    with start_pod("chat", name="demo-chat", version="v1") as pod:
        r = httpx.get(f"{pod.url}/healthz")
        assert r.status_code == 200 and r.json()["status"] == "ok"
        assert pod.received() == []


def test_demo_knobs_apply_only_to_the_targeted_version() -> None:
    knobs = {"x-demo-status": "503", "x-demo-target": "v2, v3"}
    with (
        start_pod("chat", name="demo-chat", version="v1") as v1,
        start_pod("chat", name="demo-chat", version="v2") as v2,
    ):
        assert httpx.post(f"{v1.url}{CHAT}", json=chat(), headers=knobs).status_code == 200
        assert httpx.post(f"{v2.url}{CHAT}", json=chat(), headers=knobs).status_code == 503
        # Recorded as sent, knobs included.
        assert headers_of(dict(v1.received()[0]))["x-demo-target"] == ["v2, v3"]


def test_demo_wait_delays_the_answer_and_stop_cuts_it_short() -> None:
    pod = start_pod("chat", name="demo-chat", version="v1")
    try:
        started = time.monotonic()
        r = httpx.post(f"{pod.url}{CHAT}", json=chat(), headers={"x-demo-wait-ms": "300"})
        assert r.status_code == 200 and time.monotonic() - started >= 0.3
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{pod.url}{CHAT}", json=chat(), headers={"x-demo-wait-ms": "9000"},
                       timeout=0.3)  # fmt: skip
    finally:
        started = time.monotonic()
        pod.stop()
        assert time.monotonic() - started < 2  # the waiting handler did not hold it up
