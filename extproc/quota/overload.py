"""Per-model overload protection: priority classes under an adaptive in-flight cap.

Pure (no I/O, no timers): time comes from an injected clock and everything advances lazily on
the next call. One `OverloadGuard` per model per process; it is not thread-safe, the server
calls it from one event loop.

Admission. The guard counts requests in flight against an effective cap. Each user class has a
share in (0, 1] (`ClassShares`; unlisted classes get `default_share`). A request of class c is
admitted while in_flight < limit(c) = floor(cap * share[c]), but at least 1 when share[c] > 0:
lower classes are refused first as load rises, and every class still gets in when nothing is in
flight. (So at caps below 1/share the order degenerates for that class: keep `min_cap` at least
1/smallest share for strict ordering.) A refusal is a `Shed` value, never an exception.

Release. `try_enter` returns a `Ticket`; `Ticket.release(latency_s)` frees its slot exactly once
(a second release is a no-op, so a stream that ends twice cannot free two slots). latency_s is
one sample for the latency EWMA; None (an aborted request) frees the slot without a sample.
Report the latency that overload inflates (time to first token for streams), not one that
grows with the output length.

Adaptive cap (`AdaptiveConfig`; without it the cap stays at max_in_flight). Each sample moves
the EWMA by `ewma_alpha`. The clock is cut into intervals of `interval_s`; at the end of an
interval that had samples, the cap is adjusted once:

- EWMA > target_latency_s                 -> cap = max(min_cap, floor(cap * decrease_factor))
- EWMA < target_latency_s * low_watermark -> cap = min(max_in_flight, cap + increase_step)
- otherwise (the hysteresis band)         -> unchanged, so latency near the target cannot flap it

An interval with no samples and nothing in flight is idle: it counts as a sample of 0 s (the
EWMA decays by 1 - ewma_alpha), then the same increase rule applies, so the cap recovers after
load has passed even when no request arrives at all. An interval with no samples while requests
are in flight changes nothing: nothing finished, which is no evidence the load has passed (a
hung upstream must not reopen the cap, and latencies longer than an interval must not decay the
EWMA between completions). Many intervals skipped at once are applied in closed form, so every
call is O(1) however long the guard sat unused.

Shed.retry_after_s is ceil(EWMA) clamped to [1, 30] seconds: about one request's latency.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Literal

RETRY_AFTER_MIN_S = 1
RETRY_AFTER_MAX_S = 30
DEFAULT_EWMA_ALPHA = 0.2
# Without an AdaptiveConfig there is no cap to adjust, but the EWMA behind retry_after_s still
# has to decay when idle; this is its interval then.
_DEFAULT_INTERVAL_S = 1.0

ShedReason = Literal["at_capacity", "class_share"]


def _exact(x: float) -> Fraction:
    # The decimal the operator wrote (0.29, not 0.28999...), so floor(100 * 0.29) is 29.
    return Fraction(repr(x))


@dataclass(frozen=True, slots=True)
class ClassShares:
    """The fraction of the cap each user class may fill; higher shares are shed later."""

    shares: Mapping[str, float]
    default_share: float
    _exact_shares: dict[str, Fraction] = field(init=False, repr=False, compare=False)
    _exact_default: Fraction = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        for name, share in self.shares.items():
            if not 0 < share <= 1:
                raise ValueError(f"share of class {name!r} must be in (0, 1], got {share!r}")
        # 0 is allowed here only: it means unlisted classes are always refused.
        if not 0 <= self.default_share <= 1:
            raise ValueError(f"default_share must be in [0, 1], got {self.default_share!r}")
        # A private copy: a caller mutating its dict later must not change admission.
        object.__setattr__(self, "shares", dict(self.shares))
        object.__setattr__(self, "_exact_shares", {c: _exact(s) for c, s in self.shares.items()})
        object.__setattr__(self, "_exact_default", _exact(self.default_share))

    def share(self, user_class: str) -> float:
        return self.shares.get(user_class, self.default_share)

    def limit(self, cap: int, user_class: str) -> int:
        """How many may be in flight when a request of this class is still admitted."""
        share = self._exact_shares.get(user_class, self._exact_default)
        if share == 0:
            return 0
        return max(1, math.floor(cap * share))


@dataclass(frozen=True, slots=True)
class AdaptiveConfig:
    target_latency_s: float
    min_cap: int
    decrease_factor: float = 0.9
    increase_step: int = 1
    interval_s: float = 1.0
    low_watermark: float = 0.8
    # The weight of each new sample; an idle interval decays the EWMA by 1 - ewma_alpha.
    ewma_alpha: float = DEFAULT_EWMA_ALPHA

    def __post_init__(self) -> None:
        if not (math.isfinite(self.target_latency_s) and self.target_latency_s > 0):
            raise ValueError(f"target_latency_s must be > 0, got {self.target_latency_s!r}")
        if self.min_cap < 1:
            raise ValueError(f"min_cap must be >= 1, got {self.min_cap!r}")
        if not 0 < self.decrease_factor < 1:
            raise ValueError(f"decrease_factor must be in (0, 1), got {self.decrease_factor!r}")
        if self.increase_step < 1:
            raise ValueError(f"increase_step must be >= 1, got {self.increase_step!r}")
        if not (math.isfinite(self.interval_s) and self.interval_s > 0):
            raise ValueError(f"interval_s must be > 0, got {self.interval_s!r}")
        if not 0 < self.low_watermark <= 1:
            raise ValueError(f"low_watermark must be in (0, 1], got {self.low_watermark!r}")
        if not 0 < self.ewma_alpha <= 1:
            raise ValueError(f"ewma_alpha must be in (0, 1], got {self.ewma_alpha!r}")


@dataclass(frozen=True, slots=True)
class Shed:
    """A refusal: answer 503 with Retry-After. The rest is for logs and metrics."""

    retry_after_s: int
    user_class: str
    reason: ShedReason  # at_capacity: the cap itself is full; class_share: only this class's
    in_flight: int
    limit: int  # the class's limit at the time (cap * share)


class Ticket:
    """One admitted request's slot. Release it exactly once, in a finally."""

    __slots__ = ("_guard", "_released", "user_class")

    def __init__(self, guard: OverloadGuard, user_class: str) -> None:
        self._guard = guard
        self._released = False
        self.user_class = user_class

    @property
    def released(self) -> bool:
        return self._released

    def release(self, latency_s: float | None = None) -> None:
        """Free the slot; latency_s (seconds) feeds the EWMA. Later calls do nothing."""
        if self._released:
            return
        self._released = True
        self._guard._release(latency_s)


class OverloadGuard:
    """Admission for one model in one process; see the module docstring for the rules."""

    def __init__(
        self,
        max_in_flight: int,
        shares: ClassShares,
        adaptive: AdaptiveConfig | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_in_flight < 1:
            raise ValueError(f"max_in_flight must be >= 1, got {max_in_flight!r}")
        if adaptive is not None and adaptive.min_cap > max_in_flight:
            raise ValueError(f"min_cap {adaptive.min_cap} exceeds max_in_flight {max_in_flight}")
        self._max = max_in_flight
        self._shares = shares
        self._adaptive = adaptive
        self._clock = clock
        self._interval = adaptive.interval_s if adaptive else _DEFAULT_INTERVAL_S
        self._alpha = adaptive.ewma_alpha if adaptive else DEFAULT_EWMA_ALPHA
        self._decrease = _exact(adaptive.decrease_factor) if adaptive else Fraction(1)
        self._cap = max_in_flight
        self._in_flight = 0
        self._ewma: float | None = None  # None until the first sample
        self._sampled = False  # a sample arrived in the current interval
        self._interval_start = clock()

    @property
    def in_flight(self) -> int:
        return self._in_flight

    @property
    def cap(self) -> int:
        """The effective cap as of now (reading it applies intervals that have elapsed)."""
        self._advance()
        return self._cap

    @property
    def latency_ewma_s(self) -> float | None:
        """The smoothed latency as of the last call, None before any sample."""
        return self._ewma

    def try_enter(self, user_class: str) -> Ticket | Shed:
        self._advance()
        limit = self._shares.limit(self._cap, user_class)
        if self._in_flight < limit:
            self._in_flight += 1
            return Ticket(self, user_class)
        reason: ShedReason = "at_capacity" if self._in_flight >= self._cap else "class_share"
        return Shed(self._retry_after(), user_class, reason, self._in_flight, limit)

    def _release(self, latency_s: float | None) -> None:
        # Advance first, so the sample lands in the interval it happened in.
        self._advance()
        self._in_flight -= 1
        # A bogus sample (negative, NaN, inf) must not poison the EWMA nor raise in a finally.
        if latency_s is None or not math.isfinite(latency_s) or latency_s < 0:
            return
        if self._ewma is None:
            self._ewma = latency_s
        else:
            self._ewma += self._alpha * (latency_s - self._ewma)
        self._sampled = True

    def _retry_after(self) -> int:
        seconds = math.ceil(self._ewma) if self._ewma is not None else RETRY_AFTER_MIN_S
        return min(RETRY_AFTER_MAX_S, max(RETRY_AFTER_MIN_S, seconds))

    def _advance(self) -> None:
        now = self._clock()
        elapsed = now - self._interval_start
        if elapsed < self._interval:  # also a clock that went backwards: wait for it
            return
        intervals = math.floor(elapsed / self._interval)
        self._interval_start += intervals * self._interval
        if self._sampled:
            # Every call advances first, so the samples all fell in the first elapsed interval.
            self._sampled = False
            self._adjust()
            intervals -= 1
        # in_flight has not changed since the last call: if it is 0, all the rest were idle.
        if intervals > 0 and self._in_flight == 0:
            self._idle(intervals)

    def _adjust(self) -> None:
        cfg = self._adaptive
        if cfg is None or self._ewma is None:
            return
        if self._ewma > cfg.target_latency_s:
            self._cap = max(cfg.min_cap, math.floor(self._cap * self._decrease))
        elif self._ewma < cfg.target_latency_s * cfg.low_watermark:
            self._cap = min(self._max, self._cap + cfg.increase_step)

    def _idle(self, n: int) -> None:
        """n idle intervals at once: each decays the EWMA, then may raise the cap."""
        if self._ewma is None:
            return  # never a sample, so never a decrease: the cap is already at max
        decay = 1 - self._alpha
        ewma = self._ewma
        self._ewma = ewma * decay**n  # underflows to 0.0 after long idle, which is right
        cfg = self._adaptive
        if cfg is None:
            return
        # After k idle intervals the EWMA is ewma * decay**k; the cap rises in every interval
        # from the first k where that is below the low watermark.
        low = cfg.target_latency_s * cfg.low_watermark
        first = 1 if decay == 0 else _first_below(ewma, decay, low)
        rises = max(0, n - first + 1)
        self._cap = min(self._max, self._cap + rises * cfg.increase_step)


def _first_below(value: float, decay: float, threshold: float) -> int:
    """The smallest k >= 1 with value * decay**k < threshold (0 < decay < 1, threshold > 0)."""
    if value * decay < threshold:
        return 1
    k = math.floor(math.log(value / threshold) / -math.log(decay)) + 1
    # The logarithm can round across an exact boundary; settle it on the product itself.
    while k > 1 and value * decay ** (k - 1) < threshold:
        k -= 1
    while value * decay**k >= threshold:
        k += 1
    return k
