"""LeasingStore: batches taken in the request's own round trip, spent locally, refilled in the
background, given back when unspent, and the over-admission bound the policy reference states."""

from __future__ import annotations

import asyncio
import random

import pytest

from extproc.quota.lease import LeasingStore
from extproc.quota.memory import MemoryStore
from extproc.quota.store import Algorithm, Counter, StoreError, Take
from extproc.testing.clock import FakeClock
from extproc.testing.instrumented import Instrumented
from extproc.testing.quota_conformance import probe, quota_clock

MINUTE = 60_000


def leased(
    name: str = "k",
    limit: int = 100,
    units: int = 10,
    algorithm: Algorithm = Algorithm.FIXED_WINDOW,
    window_ms: int = MINUTE,
    lease_ms: int = 1000,
) -> Counter:
    return Counter(
        f"gq:{{m}}:{name}", algorithm, limit, window_ms, lease_units=units, lease_ms=lease_ms
    )


async def settle_tasks() -> None:
    """Let background refills and give-backs run."""
    for _ in range(5):
        await asyncio.sleep(0)


async def test_a_batch_comes_with_the_first_take_and_serves_the_next_ones(
    inner: Instrumented, clock: FakeClock
) -> None:
    store = LeasingStore(inner, clock=clock)
    counter = leased(units=10)
    first = await store.take([Take(counter, 1)], "r0")
    assert first.admitted and inner.takes == 1
    assert first.receipts[0].amount == 1  # the request's own units, not the batch
    assert (await probe(inner.inner, counter)).remaining == 90  # the store counted all 10
    # The caller is told what the store has left plus what this replica holds.
    assert first.verdicts[0].remaining == 99
    for i in range(4):
        outcome = await store.take([Take(counter, 1)], f"r{i + 1}")
        assert outcome.admitted
        assert outcome.receipts[0].ref == first.receipts[0].ref  # lands in the batch's window
    assert inner.takes == 1 and store.stats.local == 4
    assert store.held == 5


async def test_a_background_refill_keeps_requests_off_the_store(
    inner: Instrumented, clock: FakeClock
) -> None:
    store = LeasingStore(inner, clock=clock)
    counter = leased(units=10)
    requests = 100
    for i in range(requests):
        assert (await store.take([Take(counter, 1)], f"r{i}")).admitted
        await settle_tasks()
    # One synchronous take at first; then refills of about half a batch each, in the background.
    assert store.stats.local >= requests - 1
    assert inner.takes <= 1 + requests // 5 + 1
    assert store.held <= counter.lease_units
    assert (await probe(inner.inner, counter)).remaining == 100 - requests - store.held


async def test_denied_when_the_store_has_nothing_left(
    inner: Instrumented, clock: FakeClock
) -> None:
    store = LeasingStore(inner, clock=clock)
    counter = leased(limit=12, units=5)
    admitted = 0
    for i in range(30):
        admitted += (await store.take([Take(counter, 1)], f"r{i}")).admitted
        await settle_tasks()
    assert admitted == 12  # within one window the limit holds exactly once nothing is held
    denied = await store.take([Take(counter, 1)], "late")
    assert not denied.admitted
    assert denied.verdicts[0].retry_after_ms > 0


async def test_unspent_units_go_back_after_the_lease_time(
    inner: Instrumented, clock: FakeClock
) -> None:
    store = LeasingStore(inner, clock=clock)
    counter = leased(units=10, lease_ms=1000)
    assert (await store.take([Take(counter, 1)], "r")).admitted
    assert (await probe(inner.inner, counter)).remaining == 90
    clock.advance(0.5)
    store.expire()
    await settle_tasks()
    assert store.held == 9  # not yet
    clock.advance(0.6)
    store.expire()
    await settle_tasks()
    assert store.held == 0
    assert store.stats.returned == 9
    assert (await probe(inner.inner, counter)).remaining == 99
    # An expired batch is never spent from, even before the give-back ran.
    assert (await store.take([Take(counter, 1)], "r2")).admitted
    assert inner.takes == 2


async def test_the_timer_gives_back_on_a_real_clock() -> None:
    memory = MemoryStore()
    store = LeasingStore(memory)
    counter = leased(units=10, lease_ms=100)
    assert (await store.take([Take(counter, 1)], "r")).admitted
    assert (await probe(memory, counter)).remaining == 90
    await asyncio.sleep(0.25)
    assert store.held == 0
    assert (await probe(memory, counter)).remaining == 99


async def test_all_or_nothing_with_a_leased_counter(inner: Instrumented, clock: FakeClock) -> None:
    store = LeasingStore(inner, clock=clock)
    counter = leased(units=10)
    blocker = Counter("gq:{m}:b", Algorithm.FIXED_WINDOW, 1, MINUTE)
    assert (await store.take([Take(counter, 1)], "r0")).admitted
    assert (await store.take([Take(blocker, 1)], "r1")).admitted
    held = store.held
    denied = await store.take([Take(counter, 3), Take(blocker, 1)], "r2")
    assert not denied.admitted and denied.receipts == ()
    assert [v.allowed for v in denied.verdicts] == [True, False]
    assert store.held == held  # the local units were not spent


async def test_a_failing_store_spends_nothing_and_raises(
    inner: Instrumented, clock: FakeClock
) -> None:
    store = LeasingStore(inner, clock=clock)
    counter = leased(units=10)
    other = Counter("gq:{m}:o", Algorithm.FIXED_WINDOW, 10, MINUTE)
    assert (await store.take([Take(counter, 1)], "r0")).admitted
    inner.failing = True
    with pytest.raises(StoreError):
        await store.take([Take(counter, 1), Take(other, 1)], "r1")
    assert store.held == 9
    # Leased units still serve while the store is down.
    assert (await store.take([Take(counter, 1)], "r2")).admitted


async def test_settlement_and_refund_reach_the_store_in_the_batch_window(
    inner: Instrumented, clock: FakeClock
) -> None:
    store = LeasingStore(inner, clock=clock)
    cost = leased("cost", limit=10_000, units=1000, algorithm=Algorithm.SLIDING_WINDOW)
    first = await store.take([Take(cost, 300)], "r0")
    assert first.receipts[0].amount == 300
    assert (await probe(inner.inner, cost)).remaining == 9000  # a batch of 1000
    second = await store.take([Take(cost, 300)], "r1")  # local
    assert inner.takes == 1
    await store.adjust([(second.receipts[0], -300)])  # refunded: the upstream failed
    await store.adjust([(first.receipts[0], 200)])  # settled: 500 used, 300 reserved
    assert (await probe(inner.inner, cost)).remaining == 9000 + 300 - 200


async def test_a_take_larger_than_a_batch_goes_to_the_store_as_it_is(
    inner: Instrumented, clock: FakeClock
) -> None:
    store = LeasingStore(inner, clock=clock)
    cost = leased("cost", limit=10_000, units=100)
    outcome = await store.take([Take(cost, 500)], "r")
    assert outcome.admitted and store.held == 0
    assert (await probe(inner.inner, cost)).remaining == 9500


async def test_leases_are_bounded_and_evicted_ones_give_back(
    inner: Instrumented, clock: FakeClock
) -> None:
    store = LeasingStore(inner, clock=clock, max_leases=3)
    counters = [leased(f"k{i}", units=10) for i in range(5)]
    for c in counters:
        assert (await store.take([Take(c, 1)], "r")).admitted
    await settle_tasks()
    assert store.held == 3 * 9
    for c in counters[:2]:  # the two oldest were evicted and their units given back
        assert (await probe(inner.inner, c)).remaining == 99
    for c in counters[2:]:
        assert (await probe(inner.inner, c)).remaining == 90


async def test_close_gives_back_everything(
    inner: Instrumented, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    memory = inner.inner
    store = LeasingStore(inner, clock=clock)
    counter = leased(units=10)
    assert (await store.take([Take(counter, 1)], "r")).admitted
    assert (await probe(memory, counter)).remaining == 90
    assert store.held == 9

    async def stay_open() -> None:  # so the counts can be read after close()
        return None

    monkeypatch.setattr(memory, "close", stay_open)
    await store.close()
    assert store.held == 0
    assert (await probe(memory, counter)).remaining == 99


async def test_a_new_limit_for_the_same_key_starts_a_new_lease(
    inner: Instrumented, clock: FakeClock
) -> None:
    store = LeasingStore(inner, clock=clock)
    old = leased(limit=100, units=10)
    assert (await store.take([Take(old, 1)], "r")).admitted
    new = leased(limit=200, units=10)  # a reloaded policy raised the limit
    assert (await store.take([Take(new, 1)], "r2")).admitted
    await settle_tasks()
    assert inner.takes == 2
    assert store.stats.returned == 9


# -- the over-admission bound -------------------------------------------------------------------


async def run_replicas(
    algorithm: Algorithm,
    *,
    limit: int,
    units: int,
    replicas: int,
    window_ms: int,
    steps: int,
    seed: int,
) -> tuple[list[float], FakeClock]:
    """Several LeasingStores (replicas) over one store, callers arriving at random on random
    replicas faster than the limit allows; returns the times (ms) of admitted requests."""
    clock = quota_clock()
    memory = MemoryStore(clock=clock)
    stores = [LeasingStore(Instrumented(clock, memory), clock=clock) for _ in range(replicas)]
    counter = leased(
        limit=limit, units=units, algorithm=algorithm, window_ms=window_ms, lease_ms=window_ms
    )
    rng = random.Random(seed)
    admitted: list[float] = []
    pace = 1.0
    for step in range(steps):
        if step % 100 == 0:  # phases of light and heavy demand, so replicas carry units over
            pace = rng.choice([0.3, 1.0, 3.0])
        clock.advance_ms(rng.uniform(0, 2 * window_ms / limit / pace))
        store = rng.choice(stores)
        if (await store.take([Take(counter, 1)], f"r{step}")).admitted:
            admitted.append(clock.now * 1000)
        await settle_tasks()
        if step % 50 == 0:
            for s in stores:
                s.expire()
    return admitted, clock


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_fixed_window_admits_at_most_limit_plus_replicas_times_units(seed: int) -> None:
    limit, units, replicas, window = 50, 8, 3, 1000
    admitted, _ = await run_replicas(
        Algorithm.FIXED_WINDOW,
        limit=limit,
        units=units,
        replicas=replicas,
        window_ms=window,
        steps=4000,
        seed=seed,
    )
    per_window: dict[int, int] = {}
    for at in admitted:
        per_window[int(at // window)] = per_window.get(int(at // window), 0) + 1
    assert len(per_window) >= 10
    assert max(per_window.values()) <= limit + replicas * units
    # Leases cost little on average: over the run, within a window's worth of the limit.
    assert len(admitted) <= len(per_window) * limit + replicas * units


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_gcra_admits_at_most_its_rate_plus_replicas_times_units_in_any_span(
    seed: int,
) -> None:
    limit, units, replicas, window = 50, 8, 3, 1000
    admitted, _ = await run_replicas(
        Algorithm.GCRA,
        limit=limit,
        units=units,
        replicas=replicas,
        window_ms=window,
        steps=4000,
        seed=seed,
    )
    interval = window / limit
    assert len(admitted) > 5 * limit
    # In any span [a, b], GCRA alone admits at most burst + (b - a) / interval (+1 for the
    # unit at a); leases add at most replicas x units.
    for i, start in enumerate(admitted):
        for j in range(i, len(admitted)):
            span = admitted[j] - start
            if span > window:
                break
            count = j - i + 1
            assert count <= limit + span / interval + 1 + replicas * units, (start, span, count)


async def test_the_bound_is_reached_when_every_replica_carries_a_full_batch_over() -> None:
    """The worst case, step by step: each replica holds a full batch at a window's end and the
    new window's limit is taken at once; exactly limit + replicas x units pass in that window."""
    limit, units, replicas, window = 50, 8, 3, 1000
    clock = quota_clock()
    memory = MemoryStore(clock=clock)
    stores = [LeasingStore(Instrumented(clock, memory), clock=clock) for _ in range(replicas)]
    counter = leased(limit=limit, units=units, window_ms=window, lease_ms=window)
    await window_edge(clock, window, before_ms=50)
    for store in stores:  # 1 synchronous take (a batch of 8), 4 local, then a refill to 8
        for i in range(5):
            assert (await store.take([Take(counter, 1)], f"r{i}")).admitted
        await settle_tasks()
        assert store.held == units
    await window_edge(clock, window, before_ms=0)
    clock.advance_ms(1)
    admitted_in_new_window = 0
    for i in range(200):
        store = stores[i % replicas]
        admitted_in_new_window += (await store.take([Take(counter, 1)], f"n{i}")).admitted
        await settle_tasks()
    assert admitted_in_new_window == limit + replicas * units


async def window_edge(clock: FakeClock, window_ms: int, before_ms: float) -> None:
    """Move the clock to `before_ms` before the next fixed-window edge."""
    now_ms = clock.now * 1000
    edge = (now_ms // window_ms + 1) * window_ms
    clock.advance_ms(edge - before_ms - now_ms)
