"""A clock for tests: seconds, moved only when the test says so."""

from __future__ import annotations


class FakeClock:
    """Pass it where code takes a `clock: Callable[[], float]` (monotonic seconds)."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds

    def advance_ms(self, ms: float) -> None:
        self.now += ms / 1000
