"""MemoryStore: the conformance suite on a fake clock, plus its bounds (cap, sweep)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import pytest

from extproc.quota.memory import MemoryStore
from extproc.quota.store import Algorithm, Counter, StoreError, Take
from extproc.testing.quota_conformance import MemoryHarness, QuotaStoreConformance, quota_clock


@pytest.fixture
async def harness() -> AsyncIterator[MemoryHarness]:
    h = MemoryHarness()
    yield h
    await h.store.close()


class TestMemoryConformance(QuotaStoreConformance):
    pass


def fixed(key: str, window: int = 1000, limit: int = 10) -> Counter:
    return Counter(key, Algorithm.FIXED_WINDOW, limit, window)


async def test_full_store_refuses_new_counters_but_serves_known_ones() -> None:
    clock = quota_clock()
    store = MemoryStore(max_entries=3, clock=clock)
    for name in "abc":
        assert (await store.take([Take(fixed(name), 1)], "r")).admitted
    with pytest.raises(StoreError, match="full"):
        await store.take([Take(fixed("d"), 1)], "r")
    assert len(store) == 3
    assert (await store.take([Take(fixed("a"), 1)], "r")).admitted  # no new entry needed

    clock.advance_ms(1000)  # every window ended: their entries make room again
    assert (await store.take([Take(fixed("d"), 1)], "r")).admitted
    assert len(store) == 1


async def test_expired_entries_are_swept_without_being_touched() -> None:
    clock = quota_clock()
    store = MemoryStore(clock=clock)
    for i in range(1000):
        await store.take([Take(fixed(f"short{i}", window=100), 1)], "r")
    await store.take([Take(fixed("long", window=60_000), 1)], "r")
    clock.advance_ms(200)
    # Each call reclaims a few expired entries, oldest first, so a steady trickle of calls
    # frees memory without any call paying for all of it.
    for _ in range(40):
        await store.take([Take(fixed("long", window=60_000), 1)], "r")
    assert len(store) == 1
    assert store.pttl("short0") == -2


async def test_refreshed_entries_survive_the_sweep() -> None:
    clock = quota_clock()
    store = MemoryStore(clock=clock)
    gcra = Counter("g", Algorithm.GCRA, 10, 1000)  # 100 ms per unit
    await store.take([Take(gcra, 1)], "r")  # expires in 100 ms
    clock.advance_ms(50)
    await store.take([Take(gcra, 5)], "r")  # now in 550 ms
    clock.advance_ms(100)
    assert store.sweep() == 1
    assert (await store.take([Take(gcra, 0)], "r")).verdicts[0].remaining == 5  # 450 ms owed


async def test_concurrency_leases_of_different_lengths_still_expire() -> None:
    clock = quota_clock()
    store = MemoryStore(clock=clock)
    long = Counter("k", Algorithm.CONCURRENCY, 2, 1000)
    short = Counter("k", Algorithm.CONCURRENCY, 2, 100)  # the same key, after a policy change
    assert (await store.take([Take(long, 1)], "r1")).admitted
    assert (await store.take([Take(short, 1)], "r2")).admitted
    clock.advance_ms(150)
    assert (await store.take([Take(short, 1)], "r3")).admitted  # r2's lease has ended
    assert not (await store.take([Take(short, 1)], "r4")).admitted


async def test_invalid_counters_are_refused() -> None:
    store = MemoryStore()
    with pytest.raises(ValueError):
        await store.take([Take(fixed("a", limit=0), 1)], "r")
    with pytest.raises(ValueError):
        await store.take([Take(fixed("a"), -1)], "r")


def test_take_cost_is_a_few_microseconds() -> None:
    store = MemoryStore()
    takes = [Take(Counter("gq:{m}:p", Algorithm.GCRA, 1_000_000, 1000), 1)]
    rounds = 20_000
    started = time.perf_counter()
    for _ in range(rounds):
        store.take_now(takes, "r")
    per_call_us = (time.perf_counter() - started) / rounds * 1e6
    assert per_call_us < 50, per_call_us  # generous: shared CI machines are slow
