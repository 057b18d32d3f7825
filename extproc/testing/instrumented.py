"""A real MemoryStore behind switches, for tests of the store wrappers (guard, leases)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from extproc.quota.memory import MemoryStore
from extproc.quota.store import Outcome, Receipt, StoreError, Take
from extproc.testing.clock import FakeClock


class Instrumented:
    """A real MemoryStore behind switches that make it slow or failing, counting its calls."""

    def __init__(self, clock: FakeClock, inner: MemoryStore | None = None) -> None:
        self.inner = inner if inner is not None else MemoryStore(clock=clock)
        self.calls = 0
        self.takes = 0
        self.delay = 0.0
        self.failing = False
        self.gate: asyncio.Event | None = None

    async def _enter(self) -> None:
        self.calls += 1
        if self.gate is not None:
            await self.gate.wait()
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.failing:
            raise StoreError("down")

    async def take(self, takes: Sequence[Take], request_id: str) -> Outcome:
        await self._enter()
        self.takes += 1
        return await self.inner.take(takes, request_id)

    async def adjust(self, adjustments: Sequence[tuple[Receipt, int]]) -> None:
        await self._enter()
        await self.inner.adjust(adjustments)

    async def close(self) -> None:
        await self.inner.close()
