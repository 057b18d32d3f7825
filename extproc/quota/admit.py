"""The admit phase: take every applicable quota in one store call, and give back what a request
did not use once its response is known.

One request's life: `QuotaEngine.admit` (429 / 503, or an `Admission`) -> `Admission.settle`
with the response's usage (cost quotas) -> `Admission.finish` when the exchange ends, which frees
concurrency slots and refunds the reservation when the upstream failed. A client that goes away
before the response is still charged its reservation: the model may have done the work, and a
refund would make cancelling a way around the quota.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from extproc.authn.base import Identity
from extproc.pipeline.decision import Deny
from extproc.quota.cost import CostExpressionError, usage_facts
from extproc.quota.headers import (
    RETRY_AFTER,
    QuotaState,
    ratelimit_headers,
    retry_after_seconds,
)
from extproc.quota.memory import MemoryStore
from extproc.quota.overload import Shed, Ticket
from extproc.quota.plan import CompiledQuota, QuotaPlan
from extproc.quota.store import QuotaStore, Receipt, StoreError, Take
from extproc.telemetry.metrics import STORE_ERRORS

log = logging.getLogger(__name__)

# Background settlements still running: kept referenced so none is garbage-collected mid-way.
_PENDING: set[asyncio.Task[None]] = set()


@dataclass(slots=True)
class Admission:
    """What one admitted request holds until its exchange ends."""

    store: QuotaStore
    held: tuple[tuple[CompiledQuota, Receipt], ...]
    ticket: Ticket | None
    headers: tuple[tuple[str, str], ...]
    started: float = field(default_factory=time.monotonic)
    status: int | None = None
    responded_at: float | None = None
    # The gateway asked the upstream for streamed usage: remove that event from the stream.
    strip_usage: bool = False
    # What the exchange's end did to what was held, for the audit record: (rule, held, final).
    settlements: list[tuple[str, int, int]] = field(default_factory=list)
    _settled: bool = False
    _finished: bool = False
    _closing: bool = False
    _closed: bool = False
    _on_closed: list[Callable[[], None]] = field(default_factory=list)

    def held_summary(self) -> list[dict[str, object]]:
        return [{"rule": r.name, "kind": r.kind, "amount": t.amount} for r, t in self.held]

    def when_closed(self, callback: Callable[[], None]) -> None:
        """Call `callback` once settling and freeing are done (at once if they are)."""
        if self._closed:
            callback()
        else:
            self._on_closed.append(callback)

    def _done(self) -> None:
        self._closed = True
        callbacks, self._on_closed = self._on_closed, []
        for callback in callbacks:
            try:
                callback()
            except Exception:
                log.exception("after-close callback failed")

    @property
    def wants_usage(self) -> bool:
        """A cost quota settles to the response's usage."""
        return any(rule.actual is not None for rule, _ in self.held)

    @property
    def needs_end(self) -> bool:
        """Something is held that only the exchange's end gives back (slots, overload seats):
        a transport that never sees the end cannot enforce these."""
        return self.ticket is not None or any(r.kind == "concurrency" for r, _ in self.held)

    @property
    def wants_end(self) -> bool:
        """Something is held until the exchange ends (slots, a reservation, an overload seat),
        so the response must be watched. RateLimit fields alone do not count: they travel with
        the request's decision."""
        return self.ticket is not None or any(r.kind != "requests" for r, _ in self.held)

    def on_response(self, status: int) -> None:
        self.status = status
        # The overload guard's latency: to the response headers, not the end of a long stream
        # (whose length says more about the answer than about how busy the model is).
        self.responded_at = time.monotonic()

    async def settle(self, usage: Mapping[str, object]) -> None:
        """Set each cost reservation to what the response says was used (once)."""
        if self._settled or self._finished:
            return
        facts = usage_facts(usage)
        if not any(facts.values()):
            return  # usage in a shape we do not read (all zero): the reservation stands
        self._settled = True
        adjustments: list[tuple[Receipt, int]] = []
        for rule, receipt in self.held:
            if rule.actual is None:
                continue
            try:
                used = rule.actual.evaluate(facts)
            except CostExpressionError as exc:
                log.warning(
                    "quota %s: cannot evaluate actual cost (%s); keeping estimate", rule.name, exc
                )
                continue
            if used != receipt.amount:
                adjustments.append((receipt, used - receipt.amount))
            self.settlements.append((rule.name, receipt.amount, used))
        await self._adjust(adjustments)

    async def finish(self) -> None:
        """The exchange is over: free slots; refund cost when the upstream failed (once)."""
        if self._finished:
            return
        self._finished = True
        failed = self.status is not None and self.status >= 500
        adjustments: list[tuple[Receipt, int]] = []
        for rule, receipt in self.held:
            if rule.kind == "concurrency" or (rule.kind == "cost" and failed and not self._settled):
                adjustments.append((receipt, -receipt.amount))
                if rule.kind == "cost":
                    self.settlements.append((rule.name, receipt.amount, 0))  # refunded
        if self.ticket is not None:
            ok = self.status is not None and self.status < 500 and self.responded_at is not None
            latency = (self.responded_at or self.started) - self.started
            self.ticket.release(latency if ok else None)
        await self._adjust(adjustments)

    def close_soon(self, usage: Mapping[str, object] | None = None) -> None:
        """Settle (when usage is known) and finish, without making the caller wait: from the
        last response chunk, a cancelled stream or a finally block. Only the first call acts."""
        if self._closing:
            return
        self._closing = True
        if usage is None and not self.wants_end:
            self._finished = True  # nothing held: spare the task
            self._done()
            return
        task = asyncio.get_running_loop().create_task(self._close(usage))
        _PENDING.add(task)
        task.add_done_callback(_PENDING.discard)

    async def _close(self, usage: Mapping[str, object] | None) -> None:
        try:
            if usage is not None:
                await self.settle(usage)
            await self.finish()
        finally:
            self._done()

    async def _adjust(self, adjustments: Sequence[tuple[Receipt, int]]) -> None:
        if not adjustments:
            return
        try:
            await self.store.adjust(adjustments)
        except StoreError as exc:
            STORE_ERRORS.labels("quota").inc()
            # Slots still expire with their lease and windows with their TTL: nothing leaks.
            log.warning(
                "quota adjustment failed (%s); counters recover when their keys expire", exc
            )


def rate_limited(
    rule: str, retry_ms: int, headers: tuple[tuple[str, str], ...] = (), too_large: bool = False
) -> Deny:
    retry = retry_after_seconds(retry_ms)
    message = f"quota {rule!r} is used up; retry after {retry} s"
    if too_large:  # could never fit, however long the caller waits
        message = f"this request's cost exceeds quota {rule!r} as a whole"
    return Deny(
        status=429,
        code="rate_limited",
        message=message,
        phase="admit",
        reason=f"quota:{rule}:too_large" if too_large else f"quota:{rule}",
        headers=((RETRY_AFTER, str(retry)), *headers),
    )


def overloaded(retry_s: int, reason: str) -> Deny:
    return Deny(
        status=503,
        code="overloaded",
        message="the model is busy; retry later",
        phase="admit",
        reason=reason,
        headers=((RETRY_AFTER, str(max(1, retry_s))),),
    )


def store_unavailable() -> Deny:
    return Deny(
        status=503,
        code="unavailable",
        message="quotas cannot be checked right now; retry later",
        phase="admit",
        reason="quota_store_unavailable",
        headers=((RETRY_AFTER, "1"),),
    )


class QuotaEngine:
    """Admits requests against the shared store, or against a per-replica store when the shared
    one fails and the policy says `on_store_failure: local`."""

    def __init__(self, shared: QuotaStore, local: QuotaStore | None = None) -> None:
        self.shared = shared
        self.local: QuotaStore = local if local is not None else MemoryStore()

    async def close(self) -> None:
        await self.shared.close()
        await self.local.close()

    async def admit(
        self,
        plan: QuotaPlan,
        identity: Identity,
        version: str,
        facts: Mapping[str, int | float | str | bool] | None,
        request_id: str,
    ) -> Admission | Deny:
        user_class = plan.user_class(identity)
        ticket: Ticket | None = None
        if plan.overload is not None:
            entered = plan.overload.try_enter(user_class)
            if isinstance(entered, Shed):
                return overloaded(entered.retry_after_s, f"overload:{user_class}")
            ticket = entered
        outcome = await self._take(plan, identity, version, user_class, facts, request_id)
        if isinstance(outcome, Deny) and ticket is not None:
            ticket.release(None)
        if isinstance(outcome, Admission):
            outcome.ticket = ticket
        return outcome

    async def _take(
        self,
        plan: QuotaPlan,
        identity: Identity,
        version: str,
        user_class: str,
        facts: Mapping[str, int | float | str | bool] | None,
        request_id: str,
    ) -> Admission | Deny:
        rules: list[CompiledQuota] = []
        takes: list[Take] = []
        for rule in plan.rules:
            if not rule.applies(identity, version):
                continue
            counter = rule.counter(plan.model, identity, version, user_class)
            if counter.limit <= 0:
                return rate_limited(rule.name, counter.window_ms)
            amount = 1
            if rule.estimate is not None:
                if facts is None:
                    raise ValueError(f"quota {rule.name}: cost needs the request body")
                amount = rule.estimate.evaluate(facts)
            if amount > counter.limit:
                return rate_limited(rule.name, counter.window_ms, too_large=True)
            rules.append(rule)
            takes.append(Take(counter, amount))
        if not takes:
            return Admission(self.shared, (), None, ())
        store = self.shared
        try:
            outcome = await store.take(takes, request_id)
        except StoreError as exc:
            STORE_ERRORS.labels("quota").inc()
            if plan.fail_closed:
                log.warning("quota store unavailable for %s (%s); failing closed", plan.model, exc)
                return store_unavailable()
            store = self.local
            takes = [Take(plan.local_counter(t.counter), t.amount) for t in takes]
            outcome = await store.take(takes, request_id)
        states = [
            QuotaState(
                name=rule.name,
                kind=rule.kind,
                limit=take.counter.limit,
                window_ms=take.counter.window_ms,
                remaining=verdict.remaining,
                reset_ms=verdict.reset_ms,
            )
            for rule, take, verdict in zip(rules, takes, outcome.verdicts, strict=True)
        ]
        headers = ratelimit_headers(states)
        if not outcome.admitted:
            denied = [
                (rule, verdict)
                for rule, verdict in zip(rules, outcome.verdicts, strict=True)
                if not verdict.allowed
            ]
            rule, verdict = max(denied, key=lambda d: d[1].retry_after_ms)
            return rate_limited(rule.name, verdict.retry_after_ms, headers)
        held = tuple(zip(rules, outcome.receipts, strict=True))
        return Admission(store, held, None, headers)
