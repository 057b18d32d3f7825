"""GuardedStore: the over-limit cache, the time budget, the in-flight bound, the breaker."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from extproc.quota.guarded import GuardedStore
from extproc.quota.store import (
    Algorithm,
    Counter,
    StoreError,
    Take,
)
from extproc.quota.valkey import ValkeyStore
from extproc.testing.clock import FakeClock
from extproc.testing.instrumented import Instrumented
from extproc.testing.valkey import valkey_server

PER_SECOND = Counter("gq:{m}:p", Algorithm.FIXED_WINDOW, 2, 1000)
OTHER = Counter("gq:{m}:t", Algorithm.FIXED_WINDOW, 100, 1000)


# -- over-limit cache --------------------------------------------------------------------------


async def test_a_denied_counter_is_denied_locally_until_its_retry_after(
    inner: Instrumented, clock: FakeClock
) -> None:
    store = GuardedStore(inner, clock=clock)
    clock.now = 1000.5  # half way through a 1 s window
    assert (await store.take([Take(PER_SECOND, 1)], "r")).admitted
    assert (await store.take([Take(PER_SECOND, 1)], "r")).admitted
    denied = await store.take([Take(PER_SECOND, 1)], "r")
    assert not denied.admitted
    assert inner.calls == 3
    assert denied.verdicts[0].retry_after_ms == 500

    clock.advance_ms(100)
    local = await store.take([Take(OTHER, 1), Take(PER_SECOND, 2)], "r")
    assert inner.calls == 3  # answered without the store
    assert not local.admitted
    assert [v.allowed for v in local.verdicts] == [True, False]
    assert local.verdicts[1].retry_after_ms == 400
    assert local.verdicts[1].reset_ms == 400
    assert store.stats.local_denials == 1
    assert (await inner.inner.take([Take(OTHER, 0)], "probe")).verdicts[0].remaining == 100

    await store.take([Take(PER_SECOND, 0)], "r")  # a smaller take asks the store
    assert inner.calls == 4

    clock.advance_ms(400)  # the window ended: ask the store again
    assert (await store.take([Take(PER_SECOND, 1)], "r")).admitted
    assert inner.calls == 5


async def test_units_given_back_here_end_a_cached_denial(
    inner: Instrumented, clock: FakeClock
) -> None:
    store = GuardedStore(inner, clock=clock)
    clock.now = 1000.5
    first = await store.take([Take(PER_SECOND, 1)], "r")
    assert (await store.take([Take(PER_SECOND, 1)], "r")).admitted
    assert not (await store.take([Take(PER_SECOND, 1)], "r")).admitted
    await store.adjust([(first.receipts[0], 0)])  # no room given back: the denial stands
    assert not (await store.take([Take(PER_SECOND, 1)], "r")).admitted
    calls = inner.calls
    await store.adjust([(first.receipts[0], -1)])  # a refund: room again
    assert (await store.take([Take(PER_SECOND, 1)], "r")).admitted
    assert inner.calls == calls + 2  # the adjust and the take both reached the store


async def test_concurrency_denials_are_not_cached(inner: Instrumented, clock: FakeClock) -> None:
    store = GuardedStore(inner, clock=clock)
    slots = Counter("gq:{m}:c", Algorithm.CONCURRENCY, 1, 60_000)
    held = await store.take([Take(slots, 1)], "r1")
    assert not (await store.take([Take(slots, 1)], "r2")).admitted
    await store.adjust([(held.receipts[0], -1)])  # released long before the lease ends
    assert (await store.take([Take(slots, 1)], "r2")).admitted
    assert inner.calls == 4


async def test_the_cache_is_bounded(inner: Instrumented, clock: FakeClock) -> None:
    store = GuardedStore(inner, clock=clock, denied_cache_size=2)
    full = [Counter(f"gq:{{m}}:{i}", Algorithm.FIXED_WINDOW, 1, 60_000) for i in range(3)]
    for counter in full:
        await store.take([Take(counter, 1)], "r")
        assert not (await store.take([Take(counter, 1)], "r")).admitted
    calls = inner.calls
    await store.take([Take(full[0], 1)], "r")  # evicted, least recently used
    await store.take([Take(full[2], 1)], "r")
    assert inner.calls == calls + 1


# -- time budget, in-flight bound ----------------------------------------------------------------


async def test_a_slow_store_fails_within_the_budget(inner: Instrumented, clock: FakeClock) -> None:
    store = GuardedStore(inner, clock=clock, timeout=0.05)
    inner.delay = 1.0
    started = time.monotonic()
    with pytest.raises(StoreError, match="50 ms"):
        await store.take([Take(PER_SECOND, 1)], "r")
    assert time.monotonic() - started < 0.5
    assert (store.stats.timeouts, store.stats.failures) == (1, 1)
    assert store.in_flight == 0


async def test_calls_beyond_the_in_flight_bound_fail_at_once(
    inner: Instrumented, clock: FakeClock
) -> None:
    store = GuardedStore(inner, clock=clock, max_in_flight=2, timeout=5)
    inner.gate = asyncio.Event()
    waiting = [asyncio.create_task(store.take([Take(OTHER, 1)], f"r{i}")) for i in range(2)]
    await asyncio.sleep(0)
    assert store.in_flight == 2
    with pytest.raises(StoreError, match="in flight"):
        await store.take([Take(OTHER, 1)], "r3")
    assert store.stats.overloaded == 1
    inner.gate.set()
    assert all(o.admitted for o in await asyncio.gather(*waiting))
    assert store.in_flight == 0
    assert store.healthy  # overload is ours, not the store's


# -- circuit breaker -----------------------------------------------------------------------------


async def test_breaker_opens_after_consecutive_failures_and_recovers(
    inner: Instrumented, clock: FakeClock
) -> None:
    store = GuardedStore(inner, clock=clock, failure_threshold=3, cooldown=1.0)
    inner.failing = True
    for _ in range(3):
        with pytest.raises(StoreError, match="down"):
            await store.take([Take(OTHER, 1)], "r")
    assert not store.healthy
    assert store.stats.breaker_opened == 1

    with pytest.raises(StoreError, match="circuit open"):
        await store.take([Take(OTHER, 1)], "r")
    with pytest.raises(StoreError, match="circuit open"):
        await store.adjust([])
    assert inner.calls == 3  # the store was left alone
    assert store.stats.short_circuited == 2

    clock.advance_ms(1000)  # one probe; it fails, so the breaker stays open another cool-down
    with pytest.raises(StoreError, match="down"):
        await store.take([Take(OTHER, 1)], "r")
    with pytest.raises(StoreError, match="circuit open"):
        await store.take([Take(OTHER, 1)], "r")
    assert inner.calls == 4

    inner.failing = False
    clock.advance_ms(1000)
    assert (await store.take([Take(OTHER, 1)], "r")).admitted
    assert store.healthy
    assert store.consecutive_failures == 0
    assert store.stats.failures == 4


async def test_only_one_probe_at_a_time(inner: Instrumented, clock: FakeClock) -> None:
    store = GuardedStore(inner, clock=clock, failure_threshold=1, cooldown=1.0)
    inner.failing = True
    with pytest.raises(StoreError):
        await store.take([Take(OTHER, 1)], "r")
    inner.failing = False
    inner.gate = asyncio.Event()
    clock.advance_ms(1000)
    probe = asyncio.create_task(store.take([Take(OTHER, 1)], "probe"))
    await asyncio.sleep(0)
    with pytest.raises(StoreError, match="circuit open"):
        await store.take([Take(OTHER, 1)], "r")
    inner.gate.set()
    assert (await probe).admitted
    assert store.healthy


async def test_failures_in_between_successes_do_not_open_it(
    inner: Instrumented, clock: FakeClock
) -> None:
    store = GuardedStore(inner, clock=clock, failure_threshold=2)
    for _ in range(3):
        inner.failing = True
        with pytest.raises(StoreError):
            await store.take([Take(OTHER, 1)], "r")
        inner.failing = False
        await store.take([Take(OTHER, 1)], "r")
    assert store.healthy
    assert store.stats.failures == 3


async def test_a_killed_valkey_opens_the_breaker_and_a_restart_closes_it(tmp_path: Path) -> None:
    with valkey_server(tmp_path) as node:
        valkey = ValkeyStore.from_url(node.url, timeout=0.5)
        store = GuardedStore(valkey, timeout=0.5, failure_threshold=2, cooldown=0.2)
        try:
            await valkey.connect()
            assert (await store.take([Take(OTHER, 1)], "r")).admitted
            node.kill()
            for _ in range(2):
                with pytest.raises(StoreError, match="valkey"):
                    await store.take([Take(OTHER, 1)], "r")
            assert not store.healthy
            started = time.monotonic()
            with pytest.raises(StoreError, match="circuit open"):
                await store.take([Take(OTHER, 1)], "r")
            assert time.monotonic() - started < 0.01  # no store call at all

            node.start()
            await asyncio.sleep(0.25)  # the cool-down
            assert (await store.take([Take(OTHER, 1)], "r")).admitted
            assert store.healthy
        finally:
            await store.close()
