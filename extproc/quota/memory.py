"""The embedded quota store: one replica's counters in process memory.

Same semantics as the Valkey store (store.py states them; lua/take.lua and lua/adjust.lua do the
same arithmetic, step by step), with the process's monotonic clock as the time source. Memory is
bounded: every entry expires (checked whenever it is touched, and swept a few at a time, oldest
first, from a heap of expiry times), and beyond `max_entries` entries take() raises StoreError
instead of growing.

Everything runs synchronously inside the coroutine, so one event loop's calls never interleave.
"""

from __future__ import annotations

import heapq
import itertools
import math
import time
from collections.abc import Callable, Iterator, Sequence

from extproc.quota.store import (
    Algorithm,
    Counter,
    Outcome,
    Receipt,
    StoreError,
    Take,
    Verdict,
)

__all__ = ["MemoryStore"]

# GCRA compares sums of float milliseconds; this absorbs their rounding (one microsecond) so a
# take that fits exactly is not denied by the last bit.
EPS_MS = 0.001
# Sliding-window estimates are fractional counts; the same idea for them.
EPS_COUNT = 1e-9
SWEEP_STEP = 32  # expired entries reclaimed per call, so no call pays for a large sweep
DEFAULT_MAX_ENTRIES = 1_000_000


class _Entry:
    """A stored counter. `expires` is in ms on the store's clock; past it the entry is gone."""

    __slots__ = ("expires", "key")

    def __init__(self, key: str) -> None:
        self.key = key
        self.expires = 0.0


class _Gcra(_Entry):
    __slots__ = ("tat",)

    def __init__(self, key: str, tat: float) -> None:
        super().__init__(key)
        self.tat = tat


class _Windows(_Entry):
    __slots__ = ("current", "previous", "window")

    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.window = 0
        self.current = 0
        self.previous = 0


class _Leases(_Entry):
    """Slots held: member (`<request id>#<n>`) -> lease end. Members are kept in insertion
    order, which is lease-end order while every lease has the same length, so expired ones are
    popped from the front; `ordered` turns off (and the whole dict is scanned) when not."""

    __slots__ = ("members", "ordered")

    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.members: dict[str, float] = {}
        self.ordered = True

    def purge(self, now: float) -> None:
        """Drop leases that ended at or before `now`."""
        members = self.members
        if self.ordered:
            while members:
                member, end = next(iter(members.items()))
                if end > now:
                    return
                del members[member]
        else:
            for member in [m for m, end in members.items() if end <= now]:
                del members[member]
            if not members:
                self.ordered = True

    def hold(self, member: str, end: float) -> None:
        members = self.members
        members.pop(member, None)
        if members and self.ordered and next(reversed(members.values())) > end:
            self.ordered = False
        members[member] = end

    def last_end(self) -> float:
        if self.ordered:
            return next(reversed(self.members.values()))
        return max(self.members.values())

    def nth_end(self, n: int) -> float | None:
        """The n-th earliest lease end (1-based), None when fewer leases are held."""
        if n > len(self.members):
            return None
        if self.ordered:
            return next(itertools.islice(self.members.values(), n - 1, None))
        return sorted(self.members.values())[n - 1]


class _Pending:
    """One counter's state during a take call: read once, changed by each take that fits,
    written back only when every take in the call fits (all or nothing)."""

    __slots__ = ("added", "count", "counter", "current", "entry", "previous", "tat", "window")

    def __init__(self, counter: Counter, entry: _Entry | None) -> None:
        self.counter = counter
        self.entry = entry
        self.tat = 0.0
        self.window = 0
        self.current = 0
        self.previous = 0
        self.count = 0
        self.added: dict[str, float] = {}


class MemoryStore:
    """QuotaStore in this process. `clock` returns seconds (monotonic); tests inject their own."""

    def __init__(
        self,
        *,
        max_entries: int = DEFAULT_MAX_ENTRIES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        self._max_entries = max_entries
        self._clock = clock
        self._entries: dict[str, _Entry] = {}
        # (expiry, tiebreak, entry): at most one item per entry, pushed when it is created and
        # pushed again with the new expiry when popped early; stale items are skipped.
        self._expiries: list[tuple[float, int, _Entry]] = []
        self._sequence = itertools.count()

    # -- QuotaStore -------------------------------------------------------------------------

    async def take(self, takes: Sequence[Take], request_id: str) -> Outcome:
        return self.take_now(takes, request_id)

    async def adjust(self, adjustments: Sequence[tuple[Receipt, int]]) -> None:
        self.adjust_now(adjustments)

    async def close(self) -> None:
        self._entries.clear()
        self._expiries.clear()

    # -- the same, callable without an event loop ---------------------------------------------

    def take_now(self, takes: Sequence[Take], request_id: str) -> Outcome:
        now = self._clock() * 1000.0
        self._sweep(now, SWEEP_STEP)
        pending: dict[str, _Pending] = {}
        verdicts: list[Verdict] = []
        refs: list[str] = []
        granted: list[int] = []
        admitted = True
        for take in takes:
            counter = take.counter
            _check_take(take)
            state = pending.get(counter.key)
            if state is None:
                state = pending[counter.key] = self._load(counter, now)
            algorithm = counter.algorithm
            if algorithm is Algorithm.CONCURRENCY:
                verdict = _leases(state, counter, take.amount, request_id, now)
                refs.append(request_id)
                granted.append(take.amount)
            else:
                window_take = _WINDOW_TAKES[algorithm]
                verdict = window_take(state, counter, take.amount, now)
                amount = take.amount
                extra = min(take.up_to - amount, verdict.remaining)
                if verdict.allowed and extra > 0:
                    more = window_take(state, counter, extra, now)
                    if more.allowed:  # always, by the first verdict's arithmetic
                        verdict, amount = more, amount + extra
                refs.append("" if algorithm is Algorithm.GCRA else str(state.window))
                granted.append(amount)
            admitted = admitted and verdict.allowed
            verdicts.append(verdict)
        if not admitted:
            return Outcome(False, tuple(verdicts), ())
        self._commit(pending, now)
        receipts = [Receipt(take.counter, granted[i], refs[i]) for i, take in enumerate(takes)]
        return Outcome(True, tuple(verdicts), tuple(receipts))

    def adjust_now(self, adjustments: Sequence[tuple[Receipt, int]]) -> None:
        now = self._clock() * 1000.0
        for receipt, delta in adjustments:
            entry = self._live(receipt.counter.key, now)
            if entry is None or delta == 0:
                continue  # its window has gone (or nothing to change)
            counter = receipt.counter
            if isinstance(entry, _Gcra):
                _adjust_gcra(entry, counter, delta, now)
                if entry.tat <= now:
                    del self._entries[entry.key]
            elif isinstance(entry, _Windows):
                _adjust_windows(entry, counter, receipt.ref, delta, now)
            elif isinstance(entry, _Leases):
                _adjust_leases(entry, counter, receipt.ref, delta, now)
                if not entry.members:
                    del self._entries[entry.key]

    # -- for tests and metrics ----------------------------------------------------------------

    def __len__(self) -> int:
        """Entries held, including expired ones not yet swept."""
        return len(self._entries)

    def __iter__(self) -> Iterator[str]:
        """The keys held (a snapshot), including expired ones not yet swept."""
        return iter(list(self._entries))

    def pttl(self, key: str) -> int:
        """Like Valkey's PTTL: ms until the entry expires, -2 when there is none."""
        now = self._clock() * 1000.0
        entry = self._live(key, now)
        return -2 if entry is None else math.ceil(entry.expires - now)

    def sweep(self) -> int:
        """Reclaim every expired entry now; returns how many entries remain."""
        self._sweep(self._clock() * 1000.0, None)
        return len(self._entries)

    # -- internals ----------------------------------------------------------------------------

    def _live(self, key: str, now: float) -> _Entry | None:
        entry = self._entries.get(key)
        if entry is not None and entry.expires <= now:
            del self._entries[key]
            return None
        return entry

    def _load(self, counter: Counter, now: float) -> _Pending:
        entry = self._live(counter.key, now)
        state = _Pending(counter, entry)
        algorithm = counter.algorithm
        if algorithm is Algorithm.GCRA:
            state.tat = entry.tat if isinstance(entry, _Gcra) else now
        elif algorithm is Algorithm.CONCURRENCY:
            if isinstance(entry, _Leases):
                entry.purge(now)
                state.count = len(entry.members)
        else:
            window = counter.window_ms
            state.window = math.floor(now / window)
            if isinstance(entry, _Windows):
                if entry.window == state.window:
                    state.current, state.previous = entry.current, entry.previous
                elif entry.window == state.window - 1:
                    state.previous = entry.current
        return state

    def _commit(self, pending: dict[str, _Pending], now: float) -> None:
        if len(self._entries) + len(pending) > self._max_entries:  # perhaps: count exactly
            new = sum(1 for key in pending if key not in self._entries)
            if len(self._entries) + new > self._max_entries:
                self._sweep(now, None)
                if len(self._entries) + new > self._max_entries:
                    raise StoreError("memory quota store is full")
        for key, state in pending.items():
            counter = state.counter
            entry = state.entry
            algorithm = counter.algorithm
            if algorithm is Algorithm.GCRA:
                if state.tat <= now:
                    continue  # a full bucket is the same as no entry
                if not isinstance(entry, _Gcra):
                    entry = _Gcra(key, state.tat)
                entry.tat = entry.expires = state.tat
            elif algorithm is Algorithm.CONCURRENCY:
                if not state.added:
                    continue
                if not isinstance(entry, _Leases):
                    entry = _Leases(key)
                for member, end in state.added.items():
                    entry.hold(member, end)
                entry.expires = entry.last_end()
            else:
                if not isinstance(entry, _Windows):
                    entry = _Windows(key)
                entry.window, entry.current = state.window, state.current
                # A sliding window's count still weighs on the next window.
                span = 2 if algorithm is Algorithm.SLIDING_WINDOW else 1
                entry.previous = state.previous if span == 2 else 0
                entry.expires = float((state.window + span) * counter.window_ms)
            if self._entries.get(key) is not entry:
                self._entries[key] = entry
                heapq.heappush(self._expiries, (entry.expires, next(self._sequence), entry))

    def _sweep(self, now: float, budget: int | None) -> None:
        """Reclaim expired entries, oldest first, at most `budget` heap items (None: all)."""
        heap = self._expiries
        entries = self._entries
        done = 0
        while heap and heap[0][0] <= now and (budget is None or done < budget):
            _, _, entry = heapq.heappop(heap)
            done += 1
            if entries.get(entry.key) is not entry:
                continue  # deleted or replaced since it was pushed
            if entry.expires <= now:
                del entries[entry.key]
            else:
                heapq.heappush(heap, (entry.expires, next(self._sequence), entry))
        # Items of deleted entries linger until their time; rebuild if they dominate.
        if len(heap) > 2 * len(entries) + 1024:
            self._expiries = [(e.expires, next(self._sequence), e) for e in entries.values()]
            heapq.heapify(self._expiries)


def _check_take(take: Take) -> None:
    counter = take.counter
    if counter.limit < 1 or counter.window_ms < 1 or take.amount < 0:
        raise ValueError("a counter needs limit >= 1 and window_ms >= 1, a take amount >= 0")
    if take.up_to and counter.algorithm is Algorithm.CONCURRENCY:
        raise ValueError("up_to is for window algorithms, not concurrency")


def _gcra(state: _Pending, counter: Counter, n: int, now: float) -> Verdict:
    interval = counter.window_ms / counter.limit
    tolerance = (counter.burst or counter.limit) * interval
    base = max(state.tat, now)
    diff = base + n * interval - now
    if diff <= tolerance + EPS_MS:
        state.tat = base + n * interval
        remaining = math.floor((tolerance - diff + EPS_MS) / interval)
        return Verdict(True, counter.limit, remaining, math.ceil(diff - EPS_MS), 0)
    remaining = max(0, math.floor((tolerance - (base - now) + EPS_MS) / interval))
    reset = max(0, math.ceil(base - now - EPS_MS))
    retry = max(1, math.ceil(diff - tolerance - EPS_MS))
    return Verdict(False, counter.limit, remaining, reset, retry)


def _sliding(state: _Pending, counter: Counter, n: int, now: float) -> Verdict:
    window, limit = counter.window_ms, counter.limit
    elapsed = now - state.window * window
    estimate = state.previous * (1 - elapsed / window) + state.current
    reset = math.ceil(window - elapsed)
    if estimate + n <= limit + EPS_COUNT:
        state.current += n
        remaining = max(0, math.floor(limit - estimate - n + EPS_COUNT))
        return Verdict(True, limit, remaining, reset, 0)
    remaining = max(0, math.floor(limit - estimate + EPS_COUNT))
    if state.current + n > limit:
        retry = reset  # the current window alone is too full: at least until it ends
    else:
        # previous * (1 - (elapsed + t) / window) <= room, solved for t
        room = limit - state.current - n
        retry = math.ceil(window * (1 - room / state.previous) - elapsed)
    return Verdict(False, limit, remaining, reset, max(1, retry))


def _fixed(state: _Pending, counter: Counter, n: int, now: float) -> Verdict:
    limit = counter.limit
    reset = math.ceil((state.window + 1) * counter.window_ms - now)
    if state.current + n <= limit:
        state.current += n
        return Verdict(True, limit, limit - state.current, reset, 0)
    return Verdict(False, limit, max(0, limit - state.current), reset, max(1, reset))


_WINDOW_TAKES = {
    Algorithm.GCRA: _gcra,
    Algorithm.SLIDING_WINDOW: _sliding,
    Algorithm.FIXED_WINDOW: _fixed,
}


def _leases(state: _Pending, counter: Counter, n: int, request_id: str, now: float) -> Verdict:
    limit = counter.limit
    entry = state.entry
    held = entry.members if isinstance(entry, _Leases) else {}
    members = [f"{request_id}#{slot}" for slot in range(n)]
    # A request id taking again re-uses (and refreshes) the slots it already holds.
    existing = sum(1 for m in members if m in state.added or m in held)
    after = state.count + n - existing
    if after <= limit:
        end = now + counter.window_ms
        for member in members:
            state.added[member] = end
        state.count = after
        return Verdict(True, limit, limit - after, 0, 0)
    # Until enough of the leases held now end, if nobody releases earlier.
    nth = entry.nth_end(after - limit) if isinstance(entry, _Leases) else None
    retry = counter.window_ms if nth is None else math.ceil(nth - now)
    return Verdict(False, limit, max(0, limit - state.count), 0, max(1, retry))


def _adjust_gcra(entry: _Gcra, counter: Counter, delta: int, now: float) -> None:
    entry.tat = max(entry.tat + delta * counter.window_ms / counter.limit, now)
    entry.expires = entry.tat


def _adjust_windows(entry: _Windows, counter: Counter, ref: str, delta: int, now: float) -> None:
    window = counter.window_ms
    current = math.floor(now / window)
    sliding = counter.algorithm is Algorithm.SLIDING_WINDOW
    if entry.window != current:  # roll forward first, as a take would
        entry.previous = entry.current if sliding and entry.window == current - 1 else 0
        entry.current = 0
        entry.window = current
    target = int(ref)
    if target == current:
        entry.current = max(0, entry.current + delta)
    elif sliding and target == current - 1:
        entry.previous = max(0, entry.previous + delta)
    else:
        return  # that window has gone
    entry.expires = float((current + (2 if sliding else 1)) * window)


def _adjust_leases(
    entry: _Leases, counter: Counter, request_id: str, delta: int, now: float
) -> None:
    """Slots are numbered from 0 and held contiguously: release from the top, add on top. What
    the request holds now counts, not the receipt's amount, so repeated adjustments add up."""
    entry.purge(now)
    members = entry.members
    held = 0
    while f"{request_id}#{held}" in members:
        held += 1
    if delta < 0:
        for slot in range(max(0, held + delta), held):
            del members[f"{request_id}#{slot}"]
    elif held:  # nothing to extend once its lease has ended or it was released
        end = now + counter.window_ms
        for slot in range(held, held + delta):
            entry.hold(f"{request_id}#{slot}", end)
    if members:
        entry.expires = entry.last_end()
