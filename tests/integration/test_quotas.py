"""Quotas through a real Envoy, over real HTTPS, with the decision server's workers sharing a real
valkey-server: exact admission under concurrency, cost reservation and settlement, concurrency
slots, refunds, RateLimit fields, store failure and recovery."""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import redis
import yaml

from extproc.authn.apikey import ApiKeyStore
from extproc.pipeline.context import RequestContext
from extproc.pipeline.decision import Allow
from extproc.pipeline.run import DecisionCore
from extproc.policy.store import PolicyStore
from extproc.quota.admit import QuotaEngine
from extproc.quota.valkey import ValkeyStore
from extproc.testing.gateway import Gateway, make_stack, running
from extproc.testing.valkey import ValkeyCluster, ValkeyNode, valkey_cluster, valkey_server

CHAT = "/v1/chat/completions"

# One model per behaviour, so tests never share a counter. All are served by the demo chat pod.
POLICIES: dict[str, dict[str, Any]] = {
    "q-requests": {
        "rules": [{"name": "per-caller", "limit": 20, "window": "1m", "burst": 20}],
    },
    "q-window": {
        "rules": [
            {"name": "per-caller-window", "limit": 5, "window": "2s",
             "algorithm": "fixed_window"},
        ],
    },
    "q-cost": {
        "rules": [
            {"name": "tokens", "kind": "cost", "key": ["tenant"], "limit": 1000, "window": "1h",
             "cost": {"estimate": "max_tokens", "actual": "total_tokens"}},
        ],
    },
    "q-cost-fixed": {  # no settlement: what is reserved stays spent
        "rules": [
            {"name": "tokens-fixed", "kind": "cost", "key": ["tenant"], "limit": 1000,
             "window": "1h", "cost": {"estimate": "max_tokens"}},
        ],
    },
    "q-concurrency": {
        "rules": [{"name": "in-flight", "kind": "concurrency", "limit": 3, "lease": "1m"}],
    },
    "q-leased": {  # gcra 20 per hour: no unit comes back on its own during the test
        "rules": [
            {"name": "leased", "limit": 20, "window": "1h",
             "local_lease": {"units": 5, "ttl": "1s"}},
        ],
    },
    "q-leased-fast": {
        "rules": [
            {"name": "leased-fast", "limit": 100000, "window": "1m",
             "local_lease": {"units": 10, "ttl": "10s"}},
        ],
    },
    "q-local": {
        "on_store_failure": "local",
        "local_fraction": 1.0,
        "rules": [{"name": "per-caller-local", "limit": 1000, "window": "1m"}],
    },
    "q-closed": {
        "rules": [{"name": "per-caller-closed", "limit": 1000, "window": "1m"}],
    },
}  # fmt: skip


def policy(model: str, quotas: dict[str, Any]) -> dict[str, Any]:
    return {
        "model": model,
        "routes": [{"path_prefix": CHAT, "methods": ["POST"], "select_by_body_model": True}],
        "versions": [{"name": "v1", "cluster": "demo-chat-v1", "default": True}],
        "authentication": [{"api_key": {"header": "x-api-key"}}],
        "authorization": {"allow_any_authenticated": True},
        "quotas": quotas,
    }


def body(model: str, max_tokens: int = 16, stream: bool = False) -> dict[str, Any]:
    return {
        "model": model,
        "messages": [{"role": "user", "content": "hello quota"}],
        "max_tokens": max_tokens,
        "stream": stream,
    }


@pytest.fixture(scope="module", params=["single", "cluster"])
def store(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ValkeyNode | ValkeyCluster]:
    """One valkey-server, or a Cluster of three masters: every admission test runs on both."""
    if request.param == "single":
        with valkey_server(tmp_path_factory.mktemp("valkey")) as server:
            yield server
    else:
        with valkey_cluster(tmp_path_factory.mktemp("cluster")) as cluster:
            yield cluster


@pytest.fixture
def node(store: ValkeyNode | ValkeyCluster) -> ValkeyNode:
    """Tests that inspect or stop the one server. A Cluster node's failure is tested at the
    store level (test_quota_valkey.py)."""
    if not isinstance(store, ValkeyNode):
        pytest.skip("single-server test")
    return store


@pytest.fixture(scope="module")
def gw(
    store: ValkeyNode | ValkeyCluster, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Gateway]:
    root = tmp_path_factory.mktemp("quotas")
    stack = make_stack(root, mode="ext_proc", workers=2, quota_store=store.url)
    # Each model here is one behaviour: no platform default rules added to them.
    (root / "policies" / "_platform.yaml").unlink()
    for model, quotas in POLICIES.items():
        (root / "policies" / f"{model}.yaml").write_text(yaml.safe_dump(policy(model, quotas)))
    with running(stack) as gateway:
        yield gateway


def keyed(key: str) -> dict[str, str]:
    return {"x-api-key": key}


async def _burst(gw: Gateway, n: int, build: Any) -> list[httpx.Response]:
    async with httpx.AsyncClient(
        base_url=gw.stack.gateway_url, verify=gw.tls, timeout=30, http2=True
    ) as client:
        return list(await asyncio.gather(*(build(client, i) for i in range(n))))


def test_exactly_the_limit_is_admitted_across_workers(gw: Gateway) -> None:
    key = gw.stack.create_api_key("carol", "demo", ["chat"])
    time.sleep(1.5)  # the server picks up the new key

    async def one(client: httpx.AsyncClient, _i: int) -> httpx.Response:
        return await client.post(CHAT, json=body("q-requests"), headers=keyed(key))

    responses = asyncio.run(_burst(gw, 60, one))
    statuses = [r.status_code for r in responses]
    assert statuses.count(200) == 20, statuses
    assert statuses.count(429) == 40, statuses
    limited = next(r for r in responses if r.status_code == 429)
    assert int(limited.headers["retry-after"]) >= 1
    assert limited.headers["ratelimit-policy"] == '"per-caller";q=20;w=60'
    assert limited.headers["ratelimit"].startswith('"per-caller";r=0;t=')
    error = limited.json()["error"]
    assert error["code"] == "rate_limited" and "per-caller" in error["message"]
    assert "carol" not in limited.text  # nothing about the caller, let alone others
    ok = next(r for r in responses if r.status_code == 200)
    assert ok.headers["ratelimit-policy"] == '"per-caller";q=20;w=60'
    assert ok.headers["ratelimit"].startswith('"per-caller";r=')


def test_leased_units_never_exceed_the_limit_and_unspent_ones_come_back(gw: Gateway) -> None:
    key = gw.stack.create_api_key("lena", "demo", ["chat"])
    time.sleep(1.5)

    async def one(client: httpx.AsyncClient, _i: int) -> httpx.Response:
        return await client.post(CHAT, json=body("q-leased"), headers=keyed(key))

    waves = []
    for _ in range(6):  # bounded: each wave spends what the last one's leases gave back
        statuses = [r.status_code for r in asyncio.run(_burst(gw, 40, one))]
        assert set(statuses) <= {200, 429}, statuses
        waves.append(statuses.count(200))
        if sum(waves) >= 20 and waves[-1] == 0:
            break
        time.sleep(1.5)  # past the lease time: unspent units go back to the store
    # Two workers hold at most 5 units each: the first wave gets at least 20 - 2 x 5.
    assert 10 <= waves[0] <= 20, waves
    assert sum(waves) == 20, waves  # once returned, every unit is spent exactly once


def test_leases_spare_store_round_trips(gw: Gateway, node: ValkeyNode) -> None:
    key = gw.stack.create_api_key("lars", "demo", ["chat"])
    time.sleep(1.5)
    client = redis.Redis(host=node.host, port=node.port)
    try:
        before = _script_calls(client)
        statuses = [
            gw.client.post(CHAT, json=body("q-leased-fast"), headers=keyed(key)).status_code
            for _ in range(40)
        ]
        calls = _script_calls(client) - before
    finally:
        client.close()
    assert statuses == [200] * 40
    # Without leases: 40 takes. With batches of 10 per worker, refilled at half: about 10.
    assert calls <= 14, calls


def _script_calls(client: redis.Redis) -> int:
    stats = client.info("commandstats")
    return sum(int(stats.get(f"cmdstat_{c}", {}).get("calls", 0)) for c in ("evalsha", "eval"))


def test_fixed_window_resets_at_its_edge(gw: Gateway) -> None:
    key = gw.stack.create_api_key("wendy", "demo", ["chat"])
    time.sleep(1.5)
    # Start just after an edge of the 2 s window, so the whole burst lands in one window.
    time.sleep(2 - (time.time() % 2) + 0.05)
    statuses = [
        gw.client.post(CHAT, json=body("q-window"), headers=keyed(key)).status_code
        for _ in range(7)
    ]
    assert statuses.count(200) == 5 and statuses[-1] == 429, statuses
    time.sleep(2 - (time.time() % 2) + 0.05)
    assert gw.client.post(CHAT, json=body("q-window"), headers=keyed(key)).status_code == 200


def test_cost_is_reserved_so_concurrent_requests_never_overspend(gw: Gateway) -> None:
    key = gw.stack.create_api_key("cora", "cost-tenant-1", ["chat"])
    time.sleep(1.5)

    async def one(client: httpx.AsyncClient, _i: int) -> httpx.Response:
        payload = body("q-cost-fixed", max_tokens=300)
        return await client.post(CHAT, json=payload, headers=keyed(key))

    # 1000 tokens, 300 each: exactly 3 fit, whatever the interleaving. (With settlement more
    # would fit, as finished requests give back what they did not use.)
    statuses = [r.status_code for r in asyncio.run(_burst(gw, 12, one))]
    assert statuses.count(200) == 3, statuses


def test_cost_settles_to_the_real_usage(gw: Gateway) -> None:
    key = gw.stack.create_api_key("sam", "cost-tenant-2", ["chat"])
    time.sleep(1.5)
    r = gw.client.post(CHAT, json=body("q-cost", max_tokens=900), headers=keyed(key))
    assert r.status_code == 200, r.text
    used = r.json()["usage"]["total_tokens"]
    assert used < 50
    # Reserved 900, settled to `used`: another 900 fits once the settlement has landed.
    gw.await_status(CHAT, body("q-cost", max_tokens=900), keyed(key), 200, within=5)


def test_streamed_usage_is_asked_for_settled_and_hidden(gw: Gateway) -> None:
    key = gw.stack.create_api_key("stella", "cost-tenant-3", ["chat"])
    time.sleep(1.5)
    with gw.client.stream(
        "POST", CHAT, json=body("q-cost", max_tokens=900, stream=True), headers=keyed(key)
    ) as r:
        assert r.status_code == 200
        # RateLimit fields arrive with the headers, before the first byte of the stream.
        assert r.headers["ratelimit-policy"] == '"tokens";q=1000;w=3600'
        text = r.read().decode()
    assert text.rstrip().endswith("data: [DONE]")
    assert '"usage"' not in text.replace('"usage":null', "")  # the client did not ask for it
    sent = [json.loads(x["body"]) for x in gw.received("chat-v1")]
    streamed = [doc for doc in sent if doc.get("stream") is True]
    assert streamed[-1]["stream_options"] == {"include_usage": True}
    gw.await_status(CHAT, body("q-cost", max_tokens=900), keyed(key), 200, within=5)


def test_failed_upstream_refunds_the_reservation(gw: Gateway) -> None:
    key = gw.stack.create_api_key("fred", "cost-tenant-4", ["chat"])
    time.sleep(1.5)
    for _ in range(5):  # 5 x 900 reserved would be far over 1000 without refunds
        r = gw.client.post(
            CHAT,
            json=body("q-cost", max_tokens=900),
            headers={**keyed(key), "x-demo-status": "503"},
        )
        assert r.status_code == 503, r.text
        time.sleep(0.3)  # the refund is applied after the response
    r = gw.client.post(CHAT, json=body("q-cost", max_tokens=900), headers=keyed(key))
    assert r.status_code == 200, r.text


def test_concurrency_slots_come_back_when_clients_go_away(gw: Gateway) -> None:
    key = gw.stack.create_api_key("connie", "demo", ["chat"])
    time.sleep(1.5)
    slow = {**keyed(key), "x-demo-delay-ms": "400"}  # about 4 s per streamed answer
    clients = [
        httpx.Client(base_url=gw.stack.gateway_url, verify=gw.tls, timeout=10) for _ in range(3)
    ]
    try:
        streams = [
            c.stream("POST", CHAT, json=body("q-concurrency", stream=True), headers=slow)
            for c in clients
        ]
        held = [s.__enter__() for s in streams]
        assert [r.status_code for r in held] == [200, 200, 200]
        r = gw.client.post(CHAT, json=body("q-concurrency"), headers=keyed(key))
        assert r.status_code == 429, r.text
        assert r.headers["ratelimit-policy"] == '"in-flight";q=3;qu="concurrent-requests"'
        # Two clients hang up mid-stream: their slots are freed, not kept for the lease.
        for s in streams[:2]:
            s.__exit__(None, None, None)
        for c in clients[:2]:
            c.close()
        gw.await_status(CHAT, body("q-concurrency"), keyed(key), 200, within=5)
    finally:
        for c in clients:
            c.close()


def test_every_key_in_the_store_expires(gw: Gateway, node: ValkeyNode) -> None:
    client = redis.Redis(host=node.host, port=node.port)
    try:
        keys = list(client.scan_iter(count=1000))
        assert keys, "the tests above wrote counters"
        for key in keys:
            ttl = client.pttl(key)
            assert ttl > 0 or ttl == -2, (key, ttl)  # -2: gone since the scan; -1: no TTL
            assert key.startswith(b"gq:{q-")
    finally:
        client.close()


def test_unauthenticated_callers_create_no_store_keys(gw: Gateway, node: ValkeyNode) -> None:
    client = redis.Redis(host=node.host, port=node.port)
    try:
        before = client.dbsize()
        for i in range(300):
            r = gw.client.post(CHAT, json=body("q-requests"), headers=keyed(f"gk_nobody{i}_x"))
            assert r.status_code == 401
        assert client.dbsize() == before
    finally:
        client.close()


async def test_100k_distinct_unauthenticated_callers_write_nothing(
    gw: Gateway, node: ValkeyNode
) -> None:
    """The whole decision core against the same valkey-server, minus Envoy (100,000 HTTPS
    requests would take minutes here; the test above sends a few hundred through Envoy)."""
    policies = PolicyStore(gw.stack.config.policy_dir, ApiKeyStore.load(gw.stack.api_keys_file), {})
    valkey = ValkeyStore.from_url(node.url)
    core = DecisionCore(policies, QuotaEngine(valkey))
    client = redis.Redis(host=node.host, port=node.port)
    try:
        before = client.dbsize()
        payload = json.dumps(body("q-requests")).encode()
        statuses: set[int] = set()
        for i in range(100_000):
            token = (f"gk_{i:08x}_{'s' * 30}", f"eyJ{i}.eyJ{i}.sig", secrets.token_hex(8))[i % 3]
            c = RequestContext(
                method="POST", path=CHAT, host="gw", headers={"x-api-key": token}, body=payload
            )
            d = await core.decide(c)
            statuses.add(200 if isinstance(d, Allow) else d.status)
        assert statuses == {401}
        assert client.dbsize() == before
    finally:
        client.close()
        await core.quotas.close()


def test_store_down_fails_closed_or_degrades_as_declared_then_recovers(
    gw: Gateway, node: ValkeyNode
) -> None:
    key = gw.stack.create_api_key("dora", "demo", ["chat"])
    time.sleep(1.5)
    assert gw.client.post(CHAT, json=body("q-closed"), headers=keyed(key)).status_code == 200
    node.stop()
    try:
        started = time.monotonic()
        closed = gw.client.post(CHAT, json=body("q-closed"), headers=keyed(key))
        assert time.monotonic() - started < 1.0  # decided well inside Envoy's 1 s timeout
        assert closed.status_code == 503
        assert closed.headers["retry-after"] == "1"
        local = gw.client.post(CHAT, json=body("q-local"), headers=keyed(key))
        assert local.status_code == 200, local.text
    finally:
        node.start()
    gw.await_status(CHAT, body("q-closed"), keyed(key), 200, within=15)
