"""Where a decision's time went, phase by phase, and each phase's verdict.

Marks cost a clock read and an append (well under a microsecond), so every request keeps one:
the audit record's time per phase, the trace's spans (made after the fact, from these marks,
only when tracing is on) and `extproc policy explain` all read the same marks.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Literal

Verdict = Literal["pass", "deny", "would_deny", "error"]


@dataclass(frozen=True, slots=True)
class PhaseMark:
    phase: str  # route, authenticate, authorize, inspect, admit, respond
    verdict: Verdict
    reason: str  # why, in words safe for audit records (never a value from the request)
    start_ns: int  # perf_counter_ns
    end_ns: int


class Timeline:
    __slots__ = ("_last", "_origin", "marks", "wall_start_ns")

    def __init__(self) -> None:
        self.wall_start_ns = time.time_ns()
        self._origin = self._last = time.perf_counter_ns()
        self.marks: list[PhaseMark] = []

    def resume(self) -> None:
        """A phase starts now: the time spent waiting for Envoy's next message is no phase's."""
        self._last = time.perf_counter_ns()

    def mark(self, phase: str, verdict: Verdict = "pass", reason: str = "") -> None:
        """The phase that began at the previous mark (or resume) ends now."""
        now = time.perf_counter_ns()
        self.marks.append(PhaseMark(phase, verdict, reason, self._last, now))
        self._last = now

    def note(self, phase: str, verdict: Verdict, reason: str) -> None:
        """A verdict that took no time of its own (a dry-run rule's would-deny)."""
        now = time.perf_counter_ns()
        self.marks.append(PhaseMark(phase, verdict, reason, now, now))

    def durations_us(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for m in self.marks:
            out[m.phase] = out.get(m.phase, 0) + (m.end_ns - m.start_ns) // 1000
        return out

    def wall_ns(self, perf_ns: int) -> int:
        """A mark's time on the wall clock (spans need epoch times)."""
        return self.wall_start_ns + (perf_ns - self._origin)
