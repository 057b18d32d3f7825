"""A quota store wrapped so that a slow or failing store costs little and a decision is quick.

`GuardedStore` is itself a QuotaStore. Around the wrapped one it adds:

1. an over-limit cache: a counter the store denied is denied locally, for takes at least as
   large, until the denial's retry_after has passed (no store call). Concurrency denials are not
   cached, since a release can free a slot at any moment. Units given back through this
   store (a refund, a settlement below the estimate, unspent leased units) end the counter's
   cached denial; what other replicas give back does not, until retry_after;
2. a time budget per call, so a decision is made in bounded time;
3. a bound on calls in flight: beyond it a call fails at once instead of queueing;
4. a circuit breaker: after `failure_threshold` consecutive failures the store is not called for
   `cooldown` seconds, then one probe call decides whether it closes again.

Failures raise StoreError. Whether a request then passes or not is the caller's decision (the
policy's failure mode), not this wrapper's.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

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

__all__ = ["GuardStats", "GuardedStore"]

T = TypeVar("T")


@dataclass(slots=True)
class GuardStats:
    """Counts since start, for metrics."""

    calls: int = 0  # calls that reached the wrapped store
    failures: int = 0  # of those, the ones that failed (timeouts included)
    timeouts: int = 0  # of those, the ones that ran out of budget
    short_circuited: int = 0  # refused while the breaker was open
    overloaded: int = 0  # refused because too many calls were in flight
    local_denials: int = 0  # takes answered by the over-limit cache
    breaker_opened: int = 0  # times the breaker opened


@dataclass(slots=True)
class _Denial:
    amount: int  # the amount denied; larger takes are denied too
    until: float  # clock seconds; the denial holds until then
    verdict: Verdict
    at: float  # when the store answered


class GuardedStore:
    """QuotaStore wrapper; see the module docstring. `clock` returns seconds (monotonic)."""

    def __init__(
        self,
        store: QuotaStore,
        *,
        timeout: float = 0.1,
        max_in_flight: int = 256,
        failure_threshold: int = 5,
        cooldown: float = 1.0,
        denied_cache_size: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if timeout <= 0 or max_in_flight < 1 or failure_threshold < 1 or cooldown < 0:
            raise ValueError("timeout, max_in_flight and failure_threshold must be positive")
        self._store = store
        self._timeout = timeout
        self._max_in_flight = max_in_flight
        self._failure_threshold = failure_threshold
        self._cooldown = cooldown
        self._denied_cache_size = denied_cache_size
        self._clock = clock
        self._denied: OrderedDict[Counter, _Denial] = OrderedDict()
        self._in_flight = 0
        self._consecutive_failures = 0
        self._open_until: float | None = None  # set while the breaker is open or half open
        self._probing = False
        self.stats = GuardStats()

    @property
    def healthy(self) -> bool:
        """False while the breaker is open (or waiting for its probe)."""
        return self._open_until is None

    @property
    def in_flight(self) -> int:
        return self._in_flight

    @property
    def consecutive_failures(self) -> int:
        return self._consecutive_failures

    async def take(self, takes: Sequence[Take], request_id: str) -> Outcome:
        local = self._denied_locally(takes)
        if local is not None:
            return local
        outcome = await self._call(lambda: self._store.take(takes, request_id))
        if not outcome.admitted:
            self._remember_denials(takes, outcome.verdicts)
        return outcome

    async def adjust(self, adjustments: Sequence[tuple[Receipt, int]]) -> None:
        for receipt, delta in adjustments:
            if delta < 0:  # room again: let the store decide
                self._denied.pop(receipt.counter, None)
        await self._call(lambda: self._store.adjust(adjustments))

    async def close(self) -> None:
        self._denied.clear()
        await self._store.close()

    # -- over-limit cache -----------------------------------------------------------------------

    def _denied_locally(self, takes: Sequence[Take]) -> Outcome | None:
        if not self._denied:
            return None
        now = self._clock()
        hit = False
        verdicts: list[Verdict] = []
        for take in takes:
            denial = self._denied.get(take.counter)
            if denial is not None and now >= denial.until:
                del self._denied[take.counter]
                denial = None
            if denial is None or take.amount < denial.amount:
                # Not checked: reported as fitting, which a denied call does not apply anyway.
                limit = take.counter.limit
                verdicts.append(Verdict(True, limit, limit, 0, 0))
                continue
            hit = True
            self._denied.move_to_end(take.counter)
            elapsed_ms = (now - denial.at) * 1000
            cached = denial.verdict
            verdicts.append(
                Verdict(
                    False,
                    cached.limit,
                    cached.remaining,
                    max(0, math.ceil(cached.reset_ms - elapsed_ms)),
                    max(1, math.ceil((denial.until - now) * 1000)),
                )
            )
        if not hit:
            return None
        self.stats.local_denials += 1
        return Outcome(False, tuple(verdicts), ())

    def _remember_denials(self, takes: Sequence[Take], verdicts: Sequence[Verdict]) -> None:
        now = self._clock()
        for take, verdict in zip(takes, verdicts, strict=True):
            if verdict.allowed or take.counter.algorithm is Algorithm.CONCURRENCY:
                continue
            until = now + verdict.retry_after_ms / 1000
            self._denied[take.counter] = _Denial(take.amount, until, verdict, now)
            self._denied.move_to_end(take.counter)
            if len(self._denied) > self._denied_cache_size:
                self._denied.popitem(last=False)

    # -- budget, in-flight bound, breaker -------------------------------------------------------

    async def _call(self, call: Callable[[], Awaitable[T]]) -> T:
        probe = False
        if self._open_until is not None:
            if self._probing or self._clock() < self._open_until:
                self.stats.short_circuited += 1
                raise StoreError("quota store circuit open")
            probe = True  # half open: this call decides
        if self._in_flight >= self._max_in_flight:
            self.stats.overloaded += 1
            raise StoreError("too many quota store calls in flight")
        self._probing = self._probing or probe
        self._in_flight += 1
        self.stats.calls += 1
        try:
            async with asyncio.timeout(self._timeout):
                result = await call()
        except (StoreError, TimeoutError) as exc:
            self._failed(probe)
            if isinstance(exc, StoreError):
                raise
            self.stats.timeouts += 1
            budget_ms = self._timeout * 1000
            raise StoreError(f"quota store: no answer within {budget_ms:.0f} ms") from None
        except BaseException:
            # Cancelled, or a caller's mistake: says nothing about the store's health.
            if probe:
                self._probing = False
            raise
        finally:
            self._in_flight -= 1
        # The store answered: closed, whichever call it was.
        self._consecutive_failures = 0
        self._open_until = None
        self._probing = False
        return result

    def _failed(self, probe: bool) -> None:
        self.stats.failures += 1
        self._consecutive_failures += 1
        if probe:
            self._probing = False
        if probe or (
            self._open_until is None and self._consecutive_failures >= self._failure_threshold
        ):
            self._open_until = self._clock() + self._cooldown
            self.stats.breaker_opened += 1
