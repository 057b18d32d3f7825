"""ValkeyStore against real valkey-server processes: one server and a 3-master Cluster."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from extproc.quota.store import Algorithm, Counter, Outcome, StoreError, Take
from extproc.quota.valkey import ValkeyStore
from extproc.testing.quota_conformance import QuotaStoreConformance, ValkeyHarness
from extproc.testing.valkey import ValkeyCluster, ValkeyNode, valkey_cluster, valkey_server

GCRA = Counter("gq:{m}:gcra", Algorithm.GCRA, 1000, 1000)


# The conformance suite checks semantics, not latency: a loaded machine may take longer than the
# production budget to serve 200 concurrent first calls.
def relaxed(url: str) -> ValkeyStore:
    return ValkeyStore.from_url(url, connect_timeout=1.0, read_timeout=1.0, timeout=5.0)


@pytest.fixture(scope="module")
def single(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ValkeyNode]:
    with valkey_server(tmp_path_factory.mktemp("single")) as node:
        yield node


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ValkeyCluster]:
    with valkey_cluster(tmp_path_factory.mktemp("cluster")) as started:
        yield started


class TestSingleServerConformance(QuotaStoreConformance):
    @pytest.fixture
    async def harness(self, single: ValkeyNode) -> AsyncIterator[ValkeyHarness]:
        store = relaxed(single.url)
        await store.connect()
        yield ValkeyHarness(store, [(single.host, single.port)])
        await store.close()


class TestClusterConformance(QuotaStoreConformance):
    @pytest.fixture
    async def harness(self, cluster: ValkeyCluster) -> AsyncIterator[ValkeyHarness]:
        store = relaxed(cluster.url)
        await store.connect()
        yield ValkeyHarness(store, [(node.host, node.port) for node in cluster.nodes])
        await store.close()


async def test_two_replicas_sharing_a_server_admit_exactly_the_limit(single: ValkeyNode) -> None:
    counter = Counter("gq:{replicas}:p", Algorithm.FIXED_WINDOW, 50, 60_000)
    replicas = [relaxed(single.url) for _ in range(2)]
    try:
        outcomes = await asyncio.gather(
            *(replicas[i % 2].take([Take(counter, 1)], f"r{i}") for i in range(200))
        )
    finally:
        for replica in replicas:
            await replica.close()
    assert sum(o.admitted for o in outcomes) == 50


async def test_killed_server_fails_fast_and_recovers_after_restart(tmp_path: Path) -> None:
    with valkey_server(tmp_path) as node:
        store = ValkeyStore.from_url(node.url, connect_timeout=0.05, read_timeout=0.05)
        try:
            await store.connect()
            assert (await store.take([Take(GCRA, 1)], "r")).admitted
            node.kill()
            started = time.monotonic()
            with pytest.raises(StoreError):
                await store.take([Take(GCRA, 1)], "r")
            assert time.monotonic() - started < 0.1 + 0.1  # its budget, plus scheduling
            node.start()
            assert (await store.take([Take(GCRA, 1)], "r")).admitted
        finally:
            await store.close()


async def test_hung_server_times_out_within_the_budget(tmp_path: Path) -> None:
    with valkey_server(tmp_path) as node:
        store = ValkeyStore.from_url(node.url, connect_timeout=0.05, read_timeout=0.05)
        try:
            await store.connect()
            assert (await store.take([Take(GCRA, 1)], "r")).admitted
            node.pause()
            started = time.monotonic()
            with pytest.raises(StoreError):
                await store.take([Take(GCRA, 1)], "r")
            assert time.monotonic() - started < 0.1 + 0.1
            node.resume()
            assert (await store.take([Take(GCRA, 1)], "r")).admitted
        finally:
            await store.close()


async def test_killed_cluster_node_fails_fast_and_recovers(tmp_path: Path) -> None:
    with valkey_cluster(tmp_path) as started_cluster:
        store = ValkeyStore.from_url(started_cluster.url, connect_timeout=0.05, read_timeout=0.05)
        try:
            await store.connect()
            assert (await store.take([Take(GCRA, 1)], "r")).admitted
            owner = await _node_owning(started_cluster, GCRA.key)
            owner.kill()
            started = time.monotonic()
            with pytest.raises(StoreError):
                await store.take([Take(GCRA, 1)], "r")
            assert time.monotonic() - started < 0.1 + 0.1
            owner.start()
            started_cluster.wait_ok()
            assert (await _eventually_admitted(store)).admitted
        finally:
            await store.close()


async def test_scripts_are_reloaded_after_a_flush(single: ValkeyNode) -> None:
    store = ValkeyStore.from_url(single.url)
    try:
        assert (await store.take([Take(GCRA, 1)], "r")).admitted
        with single.client() as client:
            client.script_flush()
        assert (await store.take([Take(GCRA, 1)], "r")).admitted
        with single.client() as client:
            client.script_flush()
        outcome = await store.take([Take(GCRA, 1)], "r")
        await store.adjust([(outcome.receipts[0], -1)])
    finally:
        await store.close()


async def test_errors_do_not_name_keys(single: ValkeyNode, cluster: ValkeyCluster) -> None:
    secret = "gq:{tenant-secret}:p"
    with single.client() as client:
        client.set(secret, "a string, not a sorted set", px=10_000)
    store = ValkeyStore.from_url(single.url)
    try:
        slots = Counter(secret, Algorithm.CONCURRENCY, 1, 1000)
        with pytest.raises(StoreError, match="WRONGTYPE") as wrong_type:
            await store.take([Take(slots, 1)], "r")
        assert "secret" not in str(wrong_type.value)
    finally:
        await store.close()

    store = ValkeyStore.from_url(cluster.url)
    try:
        apart = [Counter(f"gq:{{secret-{i}}}:p", Algorithm.GCRA, 1, 1000) for i in range(2)]
        with pytest.raises(StoreError) as cross_slot:
            await store.take([Take(c, 1) for c in apart], "r")
        assert "secret" not in str(cross_slot.value)
    finally:
        await store.close()


def test_url_schemes() -> None:
    with pytest.raises(ValueError, match="scheme"):
        ValkeyStore.from_url("http://localhost:6379")
    with pytest.raises(ValueError, match="scheme"):
        ValkeyStore.from_url("localhost:6379")


async def _node_owning(started: ValkeyCluster, key: str) -> ValkeyNode:
    with started.nodes[0].client() as client:
        slot = int(client.execute_command("CLUSTER", "KEYSLOT", key))
        shards = client.execute_command("CLUSTER", "SLOTS")
    for first, last, (_, port, *_) in shards:
        if first <= slot <= last:
            return next(node for node in started.nodes if node.port == port)
    raise AssertionError("no node owns the slot")


async def _eventually_admitted(store: ValkeyStore) -> Outcome:
    """The first call after a node came back may still find the old topology; a later one
    (within a second) must work."""
    for _ in range(20):
        try:
            return await store.take([Take(GCRA, 1)], "r")
        except StoreError:
            await asyncio.sleep(0.05)
    raise AssertionError("the cluster store did not recover")
