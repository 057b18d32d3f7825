"""Local leases: a replica takes a batch of a counter's units from the shared store at once and
spends them itself, so most requests on a busy key cost no store round trip.

`LeasingStore` wraps the shared store (a QuotaStore itself) and acts only on counters with
`lease_units` (policy: `local_lease`) and window algorithms; every other take goes through as
it is. For a leased counter:

- A take that the units held locally cover is answered at once: no store call.
- Otherwise the take goes to the store with `up_to`, so the same round trip that admits the
  request also brings back a batch (what fits, up to `lease_units`). A denial is the store's.
- When what is held falls below half a batch, one refill runs in the background, so a steady
  stream of requests rarely waits for the store at all.
- Units not spent within `lease_ms` go back to the store (one adjust call, in the background).

The bound, documented to policy authors: units are counted by the store when a replica takes
them, so the store still admits at most the limit per window; but units held when a window ends
are spent in the next one. A replica never holds more than `lease_units` (units held plus units
asked for never exceed it), so in any window of a fixed or sliding window, and in any span of
time for GCRA, at most `replicas x lease_units` units pass beyond what the store alone admits.
The other way round, units held by one replica are not available to another until spent or
given back, so a caller may be denied early by up to `replicas x lease_units` units for at
most `lease_ms`.

Settlements and refunds of a request's units go straight to the store (with the receipt of the
batch they came from, so they land in the same window), not back into the local lease.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Coroutine, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from extproc.quota.store import (
    Algorithm,
    Counter,
    Outcome,
    QuotaStore,
    Receipt,
    StoreError,
    Take,
    Verdict,
)

__all__ = ["LeaseStats", "LeasingStore"]

log = logging.getLogger(__name__)

DEFAULT_MAX_LEASES = 10_000
REFILL_REQUEST_ID = "lease-refill"


@dataclass(slots=True)
class LeaseStats:
    """Counts since start, for metrics and tests."""

    local: int = 0  # takes answered from units held
    batches: int = 0  # store grants that brought units beyond the request's own
    refills: int = 0  # background refills that brought units
    returned: int = 0  # units given back unspent


@dataclass(slots=True, eq=False)
class _Batch:
    receipt: Receipt  # the store take that granted these units: its window, for adjustments
    left: int
    verdict: Verdict  # the store's answer when it granted them
    at: float  # clock seconds
    expires: float = math.inf  # set when kept


@dataclass(slots=True)
class _Lease:
    counter: Counter
    batches: deque[_Batch] = field(default_factory=deque)
    pending: int = 0  # units asked for beyond requests' own, by store calls in flight
    refilling: bool = False

    @property
    def left(self) -> int:
        return sum(b.left for b in self.batches)


class LeasingStore:
    """QuotaStore wrapper; see the module docstring. `clock` returns seconds (monotonic)."""

    def __init__(
        self,
        store: QuotaStore,
        *,
        max_leases: int = DEFAULT_MAX_LEASES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_leases < 1:
            raise ValueError("max_leases must be at least 1")
        self._store = store
        self._max_leases = max_leases
        self._clock = clock
        self._leases: OrderedDict[str, _Lease] = OrderedDict()
        self._tasks: set[asyncio.Task[None]] = set()
        self.stats = LeaseStats()

    @property
    def held(self) -> int:
        """Units held unspent, over every counter (for tests and metrics)."""
        return sum(lease.left for lease in self._leases.values())

    async def take(self, takes: Sequence[Take], request_id: str) -> Outcome:
        now = self._clock()
        returns: list[_Batch] = []
        local: dict[int, tuple[_Lease, _Batch]] = {}  # take index -> the batch it spends
        remote: list[tuple[int, Take, _Lease | None]] = []
        for index, take in enumerate(takes):
            counter = take.counter
            if not _leasable(take):
                remote.append((index, take, None))
                continue
            lease = self._lease(counter, returns)
            batch = _reserve(lease, take.amount, now)
            if batch is not None:
                local[index] = (lease, batch)
                continue
            # Ask for a batch in the same round trip; never hold more than lease_units.
            want = max(take.amount, counter.lease_units - lease.left - lease.pending)
            lease.pending += want - take.amount
            remote.append((index, Take(counter, take.amount, want), lease))
        self._give_back(returns)
        verdicts: dict[int, Verdict] = {}
        receipts: dict[int, Receipt] = {}
        if remote:
            try:
                outcome = await self._store.take([t for _, t, _ in remote], request_id)
            except BaseException:
                self._unspend(takes, local)
                raise
            finally:
                for _, asked, leased in remote:
                    if leased is not None:
                        leased.pending -= asked.up_to - asked.amount
            now = self._clock()
            if not outcome.admitted:
                for index, (lease, batch) in local.items():
                    verdicts[index] = _local_verdict(lease, batch, now)
                self._unspend(takes, local)
                for (index, _, _), verdict in zip(remote, outcome.verdicts, strict=True):
                    verdicts[index] = verdict
                return Outcome(False, tuple(verdicts[i] for i in range(len(takes))), ())
            for (index, _, leased), verdict, receipt in zip(
                remote, outcome.verdicts, outcome.receipts, strict=True
            ):
                own = takes[index].amount
                receipts[index] = Receipt(receipt.counter, own, receipt.ref)
                if leased is not None and receipt.amount > own:
                    self.stats.batches += 1
                    self._keep(leased, _Batch(receipt, receipt.amount - own, verdict, now))
                    verdict = _with_held(verdict, leased.left)
                verdicts[index] = verdict
        for index, (lease, batch) in local.items():
            verdicts[index] = _local_verdict(lease, batch, now)
            receipts[index] = Receipt(takes[index].counter, takes[index].amount, batch.receipt.ref)
        self.stats.local += len(local)
        self._refill(lease for lease, _ in local.values())
        order = range(len(takes))
        return Outcome(True, tuple(verdicts[i] for i in order), tuple(receipts[i] for i in order))

    async def adjust(self, adjustments: Sequence[tuple[Receipt, int]]) -> None:
        await self._store.adjust(adjustments)

    def expire(self) -> None:
        """Give back every batch whose time is up (timers do this on their own; tests on a
        fake clock call it)."""
        now = self._clock()
        for lease in self._leases.values():
            self._give_back(_expired(lease, now))

    async def close(self) -> None:
        """Give back every unspent unit (best effort), then close the store."""
        # Refills and give-backs in flight finish first (the store bounds each call's time);
        # cancelling a give-back would lose its units until their window ends.
        await asyncio.gather(*self._tasks, return_exceptions=True)
        batches: list[_Batch] = []
        for lease in self._leases.values():
            batches.extend(lease.batches)
            lease.batches.clear()
        self._leases.clear()
        try:
            await self._store.adjust(_returns(batches))
        except StoreError as exc:
            log.info("unspent quota leases not given back (%s); they expire with their window", exc)
        await self._store.close()

    # -- internals ------------------------------------------------------------------------------

    def _unspend(self, takes: Sequence[Take], local: dict[int, tuple[_Lease, _Batch]]) -> None:
        """The call was denied or failed: what it reserved locally was not spent after all."""
        for index, (lease, batch) in local.items():
            batch.left += takes[index].amount
            if batch not in lease.batches:  # emptied and dropped meanwhile
                self._give_back([batch])

    def _lease(self, counter: Counter, returns: list[_Batch]) -> _Lease:
        lease = self._leases.get(counter.key)
        if lease is not None and lease.counter == counter:
            self._leases.move_to_end(counter.key)
            return lease
        if lease is not None:  # the same key with another limit (a new policy, another class)
            returns.extend(lease.batches)
        lease = self._leases[counter.key] = _Lease(counter)
        self._leases.move_to_end(counter.key)
        while len(self._leases) > self._max_leases:
            _, evicted = self._leases.popitem(last=False)
            returns.extend(evicted.batches)
        return lease

    def _keep(self, lease: _Lease, batch: _Batch) -> None:
        if self._leases.get(lease.counter.key) is not lease:  # evicted or replaced meanwhile
            self._give_back([batch])
            return
        lease.batches.append(batch)
        ttl = lease.counter.lease_ms / 1000
        batch.expires = batch.at + ttl
        asyncio.get_running_loop().call_later(ttl, self._expire_one, lease, batch)

    def _expire_one(self, lease: _Lease, batch: _Batch) -> None:
        if batch not in lease.batches:
            return  # spent and dropped, or given back already
        early = batch.expires - self._clock()
        if early > 0:  # the loop's timer clock runs a little behind ours (uvloop caches it)
            asyncio.get_running_loop().call_later(early + 0.001, self._expire_one, lease, batch)
            return
        lease.batches.remove(batch)
        self._give_back([batch])

    def _refill(self, leases: Iterable[_Lease]) -> None:
        for lease in leases:
            counter = lease.counter
            want = counter.lease_units - lease.left - lease.pending
            if lease.refilling or lease.left * 2 >= counter.lease_units or want < 1:
                continue
            lease.refilling = True
            lease.pending += want
            self._spawn(self._refill_one(lease, want))

    async def _refill_one(self, lease: _Lease, want: int) -> None:
        try:
            outcome = await self._store.take([Take(lease.counter, 1, want)], REFILL_REQUEST_ID)
        except StoreError as exc:
            log.debug("quota lease refill failed (%s)", exc)
            return
        finally:
            lease.pending -= want
            lease.refilling = False
        if outcome.admitted:
            self.stats.refills += 1
            receipt = outcome.receipts[0]
            self._keep(lease, _Batch(receipt, receipt.amount, outcome.verdicts[0], self._clock()))

    def _give_back(self, batches: list[_Batch]) -> None:
        adjustments = _returns(batches)
        for batch in batches:
            batch.left = 0
        if adjustments:
            self.stats.returned += sum(-delta for _, delta in adjustments)
            self._spawn(self._adjust_quietly(adjustments))

    async def _adjust_quietly(self, adjustments: list[tuple[Receipt, int]]) -> None:
        try:
            await self._store.adjust(adjustments)
        except StoreError as exc:
            log.debug("unspent quota lease not given back (%s)", exc)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


def _leasable(take: Take) -> bool:
    counter = take.counter
    return counter.lease_units > take.amount and counter.algorithm is not Algorithm.CONCURRENCY


def _reserve(lease: _Lease, amount: int, now: float) -> _Batch | None:
    """Spend `amount` from the oldest live batch that covers it."""
    batches = lease.batches
    while batches and batches[0].left == 0:
        batches.popleft()
    for batch in batches:
        if batch.left >= amount and batch.expires > now:
            batch.left -= amount
            return batch
    return None


def _expired(lease: _Lease, now: float) -> list[_Batch]:
    gone = [b for b in lease.batches if b.expires <= now]
    for batch in gone:
        lease.batches.remove(batch)
    return gone


def _with_held(verdict: Verdict, held: int) -> Verdict:
    return Verdict(verdict.allowed, verdict.limit, verdict.remaining + held, verdict.reset_ms, 0)


def _local_verdict(lease: _Lease, batch: _Batch, now: float) -> Verdict:
    """What the caller is told: the store's answer when the batch came, aged, plus what this
    replica still holds (stale by what other replicas took since, by at most lease_ms)."""
    store = batch.verdict
    reset = max(0, store.reset_ms - math.floor((now - batch.at) * 1000))
    return Verdict(True, store.limit, store.remaining + lease.left, reset, 0)


def _returns(batches: list[_Batch]) -> list[tuple[Receipt, int]]:
    return [(b.receipt, -b.left) for b in batches if b.left > 0]
