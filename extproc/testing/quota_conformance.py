"""The quota store semantics of extproc/quota/store.py, as tests every store must pass.

A test module subclasses `QuotaStoreConformance` (pytest collects the subclass) and provides a
`harness` fixture: the store, a way to let time pass (a fake clock for the embedded store, real
sleeps against Valkey) and the TTLs of what the store holds. Tests that need time to pass use
short windows (200 to 400 ms) so a real store runs them in well under a second each; values that
depend on the time are compared within `slack_ms` (0 on a fake clock).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Sequence
from typing import Protocol

import pytest
import redis.asyncio

from extproc.quota.memory import MemoryStore
from extproc.quota.store import (
    Algorithm,
    Counter,
    Outcome,
    QuotaStore,
    Take,
    Verdict,
)
from extproc.testing.clock import FakeClock

MINUTE = 60_000
WINDOWS = (Algorithm.GCRA, Algorithm.SLIDING_WINDOW, Algorithm.FIXED_WINDOW)


class StoreHarness(Protocol):
    store: QuotaStore
    slack_ms: int  # how far a time-derived value may fall short (time moves on real stores)

    def key(self, name: str) -> str:
        """A key unique to this test; every key of one test shares one hash tag."""
        ...

    async def advance(self, ms: float) -> None:
        """Let `ms` milliseconds pass on the store's clock."""
        ...

    async def ttls(self) -> dict[str, int]:
        """PTTL of every key the store holds (-1: no TTL)."""
        ...


def quota_clock() -> FakeClock:
    """Starts off a whole second, so windows are not aligned to the start."""
    return FakeClock(start=1000.1234)


class MemoryHarness:
    slack_ms = 0

    def __init__(self, store: MemoryStore | None = None, clock: FakeClock | None = None) -> None:
        self.clock = clock or quota_clock()
        self.memory = store or MemoryStore(clock=self.clock)
        self.store: QuotaStore = self.memory
        self._tag = uuid.uuid4().hex[:12]

    def key(self, name: str) -> str:
        return f"gq:{{{self._tag}}}:{name}"

    async def advance(self, ms: float) -> None:
        self.clock.advance_ms(ms)

    async def ttls(self) -> dict[str, int]:
        self.memory.sweep()
        return {key: self.memory.pttl(key) for key in self.memory}


class ValkeyHarness:
    """A store on real Valkey nodes; `nodes` are (host, port) of every primary, to SCAN them."""

    slack_ms = 30

    def __init__(self, store: QuotaStore, nodes: Sequence[tuple[str, int]]) -> None:
        self.store = store
        self.nodes = list(nodes)
        self._tag = uuid.uuid4().hex[:12]

    def key(self, name: str) -> str:
        return f"gq:{{{self._tag}}}:{name}"

    async def advance(self, ms: float) -> None:
        await asyncio.sleep(ms / 1000)

    async def ttls(self) -> dict[str, int]:
        found: dict[str, int] = {}
        for host, port in self.nodes:
            client = redis.asyncio.Redis(host=host, port=port, decode_responses=True)
            try:
                async for key in client.scan_iter(count=1000):
                    found[key] = await client.pttl(key)
            finally:
                await client.aclose()
        return {key: ttl for key, ttl in found.items() if ttl != -2}  # -2: expired meanwhile


def near(value: int, expected: float, slack: int) -> bool:
    """`value` is `expected`, or up to `slack` below it (time passed on a real clock)."""
    return expected - slack - 1 <= value <= expected + 1


async def probe(store: QuotaStore, counter: Counter) -> Verdict:
    """The counter's state, by a take of 0 (which consumes nothing)."""
    return (await store.take([Take(counter, 0)], "probe")).verdicts[0]


async def take1(store: QuotaStore, counter: Counter, amount: int = 1, rid: str = "r") -> Outcome:
    return await store.take([Take(counter, amount)], rid)


async def window_start(h: StoreHarness, counter: Counter) -> None:
    """Wait until a new window of `counter` has just begun."""
    await h.advance((await probe(h.store, counter)).reset_ms + 2)


def counter(h: StoreHarness, name: str, algorithm: Algorithm, limit: int, window: int) -> Counter:
    return Counter(h.key(name), algorithm, limit, window)


class QuotaStoreConformance:
    """Subclass in a test module and provide a `harness` fixture yielding a StoreHarness."""

    # -- all or nothing -------------------------------------------------------------------------

    async def test_empty_call_is_admitted(self, harness: StoreHarness) -> None:
        outcome = await harness.store.take([], "r")
        assert outcome == Outcome(True, (), ())
        await harness.store.adjust([])

    async def test_denied_call_applies_no_take(self, harness: StoreHarness) -> None:
        store = harness.store
        counters = [counter(harness, a.value, a, 10, MINUTE) for a in Algorithm]
        blocker = counter(harness, "blocker", Algorithm.FIXED_WINDOW, 1, MINUTE)
        assert (await take1(store, blocker)).admitted

        outcome = await store.take([Take(c, 2) for c in counters] + [Take(blocker, 1)], "r1")

        assert not outcome.admitted
        assert outcome.receipts == ()
        assert [v.allowed for v in outcome.verdicts] == [True, True, True, True, False]
        assert [v.remaining for v in outcome.verdicts[:4]] == [8, 8, 8, 8]
        for c in counters:  # none of the fitting takes was applied
            assert (await probe(store, c)).remaining == 10

    async def test_admitted_call_applies_every_take(self, harness: StoreHarness) -> None:
        counters = [counter(harness, a.value, a, 10, MINUTE) for a in Algorithm]
        outcome = await harness.store.take([Take(c, 3) for c in counters], "r1")
        assert outcome.admitted
        assert [r.amount for r in outcome.receipts] == [3, 3, 3, 3]
        assert [r.counter for r in outcome.receipts] == counters
        assert outcome.receipts[3].ref == "r1"  # a slot is held by the request id
        for c in counters[:3]:
            assert (await probe(harness.store, c)).remaining == 7

    @pytest.mark.parametrize("algorithm", WINDOWS)
    async def test_same_counter_twice_in_one_call_adds_up(
        self, harness: StoreHarness, algorithm: Algorithm
    ) -> None:
        c = counter(harness, "twice", algorithm, 5, MINUTE)
        outcome = await harness.store.take([Take(c, 3), Take(c, 3)], "r")
        assert [v.allowed for v in outcome.verdicts] == [True, False]
        assert (await probe(harness.store, c)).remaining == 5

    @pytest.mark.parametrize("algorithm", list(Algorithm))
    async def test_concurrent_takes_admit_exactly_the_limit(
        self, harness: StoreHarness, algorithm: Algorithm
    ) -> None:
        c = counter(harness, "race", algorithm, 50, MINUTE)
        outcomes = await asyncio.gather(
            *(harness.store.take([Take(c, 1)], f"r{i}") for i in range(200))
        )
        assert sum(o.admitted for o in outcomes) == 50

    # -- taking more than needed (up_to) ---------------------------------------------------------

    @pytest.mark.parametrize("algorithm", WINDOWS)
    async def test_up_to_grants_what_fits_beyond_the_amount(
        self, harness: StoreHarness, algorithm: Algorithm
    ) -> None:
        store = harness.store
        c = counter(harness, "upto", algorithm, 10, MINUTE)
        full = await store.take([Take(c, 2, up_to=6)], "r1")
        assert full.admitted and full.receipts[0].amount == 6
        assert full.verdicts[0].remaining == 4
        partial = await store.take([Take(c, 1, up_to=8)], "r2")  # 4 left: 1 needed, 3 more
        assert partial.admitted and partial.receipts[0].amount == 4
        assert partial.verdicts[0].remaining == 0
        denied = await store.take([Take(c, 1, up_to=5)], "r3")
        assert not denied.admitted and denied.receipts == ()
        # A grant is settled like any take: giving back 3 of the 4 makes room for 3.
        await store.adjust([(partial.receipts[0], -3)])
        assert (await probe(store, c)).remaining == 3

    async def test_up_to_never_grants_when_the_call_is_denied(self, harness: StoreHarness) -> None:
        store = harness.store
        c = counter(harness, "upto", Algorithm.FIXED_WINDOW, 10, MINUTE)
        blocker = counter(harness, "blocker", Algorithm.FIXED_WINDOW, 1, MINUTE)
        assert (await take1(store, blocker)).admitted
        outcome = await store.take([Take(c, 1, up_to=10), Take(blocker, 1)], "r")
        assert not outcome.admitted
        assert (await probe(store, c)).remaining == 10
        with pytest.raises(ValueError, match="up_to"):
            slots = counter(harness, "slots", Algorithm.CONCURRENCY, 5, MINUTE)
            await store.take([Take(slots, 1, up_to=3)], "r")

    # -- GCRA -----------------------------------------------------------------------------------

    async def test_gcra_burst_then_steady_rate(self, harness: StoreHarness) -> None:
        # 10 per second: one unit every 100 ms, up to 3 at once.
        store, slack = harness.store, harness.slack_ms
        c = Counter(harness.key("gcra"), Algorithm.GCRA, 10, 1000, burst=3)
        verdicts = [(await take1(store, c)).verdicts[0] for _ in range(3)]
        assert [v.allowed for v in verdicts] == [True, True, True]
        assert [v.remaining for v in verdicts] == [2, 1, 0]
        for verdict, reset in zip(verdicts, (100, 200, 300), strict=True):
            assert near(verdict.reset_ms, reset, slack), verdict  # until the bucket is full
            assert verdict.retry_after_ms == 0
            assert verdict.limit == 10

        denied = (await take1(store, c)).verdicts[0]
        assert not denied.allowed
        assert denied.remaining == 0
        assert near(denied.reset_ms, 300, slack)
        assert near(denied.retry_after_ms, 100, slack)

        await harness.advance(110)  # one emission interval: room for exactly one more
        assert (await take1(store, c)).admitted
        assert not (await take1(store, c)).admitted

    async def test_gcra_amounts_and_default_burst(self, harness: StoreHarness) -> None:
        # burst 0 means the limit: 5 per 500 ms, 100 ms per unit, 5 at once.
        store, slack = harness.store, harness.slack_ms
        c = Counter(harness.key("gcra"), Algorithm.GCRA, 5, 500)
        first = (await take1(store, c, 4)).verdicts[0]
        assert (first.allowed, first.remaining) == (True, 1)
        assert near(first.reset_ms, 400, slack)
        denied = (await take1(store, c, 2)).verdicts[0]
        assert (denied.allowed, denied.remaining) == (False, 1)
        # max(TAT, now) + 2 * 100 - 500 - now = 400 + 200 - 500
        assert near(denied.retry_after_ms, 100, slack)
        assert (await take1(store, c, 1)).admitted

    # -- sliding window -------------------------------------------------------------------------

    async def test_sliding_window_weights_the_previous_window(self, harness: StoreHarness) -> None:
        store, window = harness.store, 400
        c = counter(harness, "sliding", Algorithm.SLIDING_WINDOW, 10, window)
        await window_start(harness, c)
        verdicts = [(await take1(store, c)).verdicts[0] for _ in range(11)]
        assert [v.allowed for v in verdicts] == [True] * 10 + [False]
        assert [v.remaining for v in verdicts] == [9, 8, 7, 6, 5, 4, 3, 2, 1, 0, 0]
        # The current window alone is full: nothing fits before it ends.
        assert verdicts[-1].retry_after_ms == verdicts[-1].reset_ms > 0

        # 45 % into the next window the previous 10 weigh 5.5: 4 more fit (estimate 9.5).
        await harness.advance(verdicts[-1].reset_ms + 0.45 * window)
        first = (await take1(store, c)).verdicts[0]
        elapsed = window - first.reset_ms  # where in the window the store is, by its own clock
        fit = int(10 - 10 * (1 - elapsed / window))  # floor(10 - estimate)
        assert fit == 4, elapsed  # else the sleep overshot: the machine is too loaded
        assert first.allowed
        assert first.remaining == 3
        more = [(await take1(store, c)).verdicts[0] for _ in range(fit)]
        assert [v.allowed for v in more] == [True] * (fit - 1) + [False]
        denied = more[-1]
        assert denied.remaining == 0
        # The previous window must slide out until 10 * (1 - t / window) <= 10 - 4 - 1.
        expected = window * (1 - 5 / 10) - (window - denied.reset_ms)
        assert abs(denied.retry_after_ms - expected) <= 2
        await harness.advance(denied.retry_after_ms + 2)
        assert (await take1(store, c)).admitted

    # -- fixed window ---------------------------------------------------------------------------

    async def test_fixed_window_passes_twice_the_limit_around_an_edge(
        self, harness: StoreHarness
    ) -> None:
        # Documented to policy authors: up to 2x the limit within a short time across an edge.
        store, window = harness.store, 300
        c = counter(harness, "fixed", Algorithm.FIXED_WINDOW, 5, window)
        await window_start(harness, c)
        await harness.advance(0.6 * window)
        late = [await take1(store, c) for _ in range(6)]
        assert [o.admitted for o in late] == [True] * 5 + [False]
        denied = late[-1].verdicts[0]
        assert denied.remaining == 0
        assert denied.retry_after_ms == denied.reset_ms  # until the window ends
        assert near(denied.reset_ms, 0.4 * window - 2, harness.slack_ms)

        await harness.advance(denied.reset_ms + 2)
        early = [await take1(store, c) for _ in range(6)]
        assert [o.admitted for o in early] == [True] * 5 + [False]
        assert near(early[0].verdicts[0].reset_ms, window - 2, harness.slack_ms)
        assert int(early[0].receipts[0].ref) == int(late[0].receipts[0].ref) + 1

    # -- concurrency ----------------------------------------------------------------------------

    async def test_concurrency_acquire_and_release(self, harness: StoreHarness) -> None:
        store = harness.store
        c = counter(harness, "slots", Algorithm.CONCURRENCY, 2, 10_000)
        one = await take1(store, c, rid="r1")
        two = await take1(store, c, rid="r2")
        assert [v.remaining for v in one.verdicts + two.verdicts] == [1, 0]
        assert [v.reset_ms for v in one.verdicts + two.verdicts] == [0, 0]
        denied = (await take1(store, c, rid="r3")).verdicts[0]
        assert (denied.allowed, denied.remaining, denied.reset_ms) == (False, 0, 0)
        # Until the earliest lease ends, if nobody releases before.
        assert near(denied.retry_after_ms, 10_000, harness.slack_ms)
        # The same request id taking again holds the same slot.
        assert (await take1(store, c, rid="r2")).admitted

        await store.adjust([(one.receipts[0], -1)])
        assert (await take1(store, c, rid="r3")).admitted
        assert not (await take1(store, c, rid="r4")).admitted

    async def test_concurrency_lease_expires(self, harness: StoreHarness) -> None:
        c = counter(harness, "lease", Algorithm.CONCURRENCY, 1, 250)
        assert (await take1(harness.store, c, rid="crashed")).admitted
        denied = (await take1(harness.store, c, rid="r2")).verdicts[0]
        assert near(denied.retry_after_ms, 250, harness.slack_ms)
        await harness.advance(260)
        assert (await take1(harness.store, c, rid="r2")).admitted

    async def test_concurrency_partial_and_extra_release(self, harness: StoreHarness) -> None:
        store = harness.store
        c = counter(harness, "slots", Algorithm.CONCURRENCY, 3, MINUTE)
        held = (await take1(store, c, 3, rid="big")).receipts[0]
        assert (await probe(store, c)).remaining == 0
        await store.adjust([(held, -1)])
        assert (await probe(store, c)).remaining == 1
        await store.adjust([(held, 1)])  # holds 3 again
        assert (await probe(store, c)).remaining == 0
        await store.adjust([(held, -3)])
        assert (await probe(store, c)).remaining == 3
        await store.adjust([(held, -3)])  # a second release is harmless
        assert (await probe(store, c)).remaining == 3
        await store.adjust([(held, 2)])  # after its release, a request holds nothing to extend
        assert (await probe(store, c)).remaining == 3

    # -- adjust ---------------------------------------------------------------------------------

    @pytest.mark.parametrize("algorithm", WINDOWS)
    async def test_adjust_settles_refunds_and_never_goes_below_empty(
        self, harness: StoreHarness, algorithm: Algorithm
    ) -> None:
        # GCRA: 100 per 100 s, so one unit per second and no measurable refill meanwhile.
        store = harness.store
        window = 100_000 if algorithm is Algorithm.GCRA else MINUTE
        c = counter(harness, "cost", algorithm, 100, window)
        receipt = (await take1(store, c, 10)).receipts[0]
        assert (await probe(store, c)).remaining == 90
        await store.adjust([(receipt, 15)])  # used more than reserved
        assert (await probe(store, c)).remaining == 75
        await store.adjust([(receipt, -20)])  # and then less
        assert (await probe(store, c)).remaining == 95
        await store.adjust([(receipt, -1000)])
        assert (await probe(store, c)).remaining == 100
        assert (await take1(store, c, 100)).admitted  # empty, not below it
        assert not (await take1(store, c, 1)).admitted

    async def test_adjust_in_one_call_changes_every_counter(self, harness: StoreHarness) -> None:
        store = harness.store
        counters = [counter(harness, a.value, a, 10, MINUTE) for a in Algorithm]
        outcome = await store.take([Take(c, 4) for c in counters], "r1")
        await store.adjust([(r, -r.amount) for r in outcome.receipts])
        for c in counters:
            assert (await probe(store, c)).remaining == 10

    async def test_adjust_of_a_gone_window_is_a_no_op(self, harness: StoreHarness) -> None:
        store, window = harness.store, 200
        c = counter(harness, "gone", Algorithm.FIXED_WINDOW, 5, window)
        receipt = (await take1(store, c, 5)).receipts[0]
        await harness.advance((await probe(store, c)).reset_ms + 2)
        assert (await take1(store, c, 2)).admitted
        await store.adjust([(receipt, -5)])  # not applied to the new window
        assert (await probe(store, c)).remaining == 3
        await store.adjust([(receipt, 5)])
        assert (await probe(store, c)).remaining == 3

    async def test_sliding_refund_reaches_the_previous_window(self, harness: StoreHarness) -> None:
        store, window = harness.store, 300
        c = counter(harness, "sliding", Algorithm.SLIDING_WINDOW, 10, window)
        await window_start(harness, c)
        receipt = (await take1(store, c, 10)).receipts[0]
        await harness.advance((await probe(store, c)).reset_ms + 2)
        assert not (await take1(store, c, 2)).admitted  # the previous window still weighs ~10
        await store.adjust([(receipt, -10)])
        assert (await take1(store, c, 10)).admitted

    async def test_gcra_refund_after_expiry_is_a_no_op(self, harness: StoreHarness) -> None:
        store = harness.store
        c = Counter(harness.key("gcra"), Algorithm.GCRA, 10, 200)  # 20 ms per unit
        receipt = (await take1(store, c, 5)).receipts[0]
        await harness.advance(120)  # the bucket is full again
        await store.adjust([(receipt, -5)])
        assert (await probe(store, c)).remaining == 10
        await store.adjust([(receipt, 5)])  # nothing to settle against either
        assert (await probe(store, c)).remaining == 10

    # -- keys -----------------------------------------------------------------------------------

    async def test_every_key_has_a_ttl_sized_to_its_window(self, harness: StoreHarness) -> None:
        store = harness.store
        windows = {
            Algorithm.GCRA: 200,  # 10 per 200 ms: 5 units live until the TAT, 100 ms
            Algorithm.SLIDING_WINDOW: 150,  # two windows, 300 ms
            Algorithm.FIXED_WINDOW: 300,  # to the window's end
            Algorithm.CONCURRENCY: 250,  # the lease
        }
        counters = [counter(harness, a.value, a, 10, w) for a, w in windows.items()]
        outcome = await store.take([Take(c, 5) for c in counters], "r1")
        await store.adjust([(r, 1) for r in outcome.receipts])

        ttls = await harness.ttls()
        assert all(ttl > 0 for ttl in ttls.values()), "a key without a TTL"
        mine = {c.algorithm: ttls.get(c.key, -2) for c in counters}
        assert 0 < mine[Algorithm.GCRA] <= 120
        assert 0 < mine[Algorithm.SLIDING_WINDOW] <= 300
        assert 0 < mine[Algorithm.FIXED_WINDOW] <= 300
        assert 0 < mine[Algorithm.CONCURRENCY] <= 250

        await harness.advance(310)
        left = await harness.ttls()
        assert not [c for c in counters if c.key in left]
