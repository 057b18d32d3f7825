"""OverloadGuard: class shares, ticket release, the adaptive cap; a fake clock, no sleeping."""

from __future__ import annotations

import math
import random
from typing import Any

import pytest

from extproc.quota.overload import (
    RETRY_AFTER_MAX_S,
    AdaptiveConfig,
    ClassShares,
    OverloadGuard,
    Shed,
    Ticket,
)
from extproc.testing.clock import FakeClock

SHARES = ClassShares({"free": 0.5, "pro": 0.8, "enterprise": 1.0}, default_share=0.3)
TARGET = 1.0  # seconds; the band is [0.8, 1.0] with the default low_watermark


def make_guard(
    clock: FakeClock, max_in_flight: int = 20, min_cap: int = 2, **adaptive: Any
) -> OverloadGuard:
    config = AdaptiveConfig(target_latency_s=TARGET, min_cap=min_cap, **adaptive)
    return OverloadGuard(max_in_flight, SHARES, config, clock=clock)


def enter(guard: OverloadGuard, user_class: str = "enterprise") -> Ticket:
    result = guard.try_enter(user_class)
    assert isinstance(result, Ticket), result
    return result


def shed(guard: OverloadGuard, user_class: str) -> Shed:
    result = guard.try_enter(user_class)
    assert isinstance(result, Shed), result
    return result


def fill(guard: OverloadGuard, user_class: str) -> list[Ticket]:
    """Admit requests of one class until it is shed."""
    tickets = []
    while isinstance(ticket := guard.try_enter(user_class), Ticket):
        tickets.append(ticket)
    return tickets


def interval(guard: OverloadGuard, clock: FakeClock, *latencies: float) -> int:
    """One interval in which requests complete with these latencies; the cap after it."""
    for latency in latencies:
        enter(guard).release(latency)
    clock.advance(1.0)
    return guard.cap


# --- class shares --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cap", "user_class", "limit"),
    [
        (10, "free", 5),
        (10, "pro", 8),
        (10, "enterprise", 10),
        (10, "unlisted", 3),
        (7, "free", 3),  # floor(3.5)
        (7, "pro", 5),  # floor(5.6)
        (3, "unlisted", 1),  # floor(0.9) is 0, but a share > 0 still admits one
        (1, "free", 1),
        (1, "enterprise", 1),
    ],
)
def test_class_limit_is_floor_of_cap_times_share_and_at_least_one(
    cap: int, user_class: str, limit: int
) -> None:
    assert SHARES.limit(cap, user_class) == limit


def test_class_limit_uses_the_decimal_share_not_its_binary_rounding() -> None:
    # 100 * 0.29 is 28.999999999999996 in binary floating point.
    assert ClassShares({"x": 0.29}, default_share=1.0).limit(100, "x") == 29


def test_default_share_zero_refuses_unlisted_classes() -> None:
    shares = ClassShares({"pro": 1.0}, default_share=0.0)
    guard = OverloadGuard(5, shares, None, clock=FakeClock())
    assert shed(guard, "anonymous").limit == 0
    assert guard.in_flight == 0
    enter(guard, "pro")


def test_class_shares_copy_the_mapping() -> None:
    given = {"free": 0.5}
    shares = ClassShares(given, default_share=1.0)
    given["free"] = 0.1
    assert shares.limit(10, "free") == 5
    assert shares.share("free") == 0.5


@pytest.mark.parametrize(
    ("shares", "default"),
    [({"free": 0.0}, 1.0), ({"free": 1.5}, 1.0), ({"free": math.nan}, 1.0), ({}, -0.1), ({}, 2)],
)
def test_class_shares_rejects_out_of_range(shares: dict[str, float], default: float) -> None:
    with pytest.raises(ValueError, match="share"):
        ClassShares(shares, default_share=default)


# --- admission -----------------------------------------------------------------------------


def test_exact_admission_counts_and_lower_classes_shed_first() -> None:
    guard = OverloadGuard(10, SHARES, None, clock=FakeClock())
    assert len(fill(guard, "free")) == 5
    assert len(fill(guard, "unlisted")) == 0
    assert len(fill(guard, "pro")) == 3
    assert guard.in_flight == 8
    refused = shed(guard, "free")
    assert (refused.reason, refused.user_class, refused.in_flight, refused.limit) == (
        "class_share",
        "free",
        8,
        5,
    )
    assert len(fill(guard, "enterprise")) == 2
    assert guard.in_flight == 10
    assert shed(guard, "enterprise").reason == "at_capacity"
    assert shed(guard, "free").reason == "at_capacity"


def test_higher_class_is_admitted_while_the_lower_is_being_shed() -> None:
    guard = OverloadGuard(4, SHARES, None, clock=FakeClock())
    fill(guard, "free")  # 2 of 4
    for _ in range(2):
        shed(guard, "free")
        enter(guard, "enterprise")
    shed(guard, "enterprise")


def test_tiny_cap_still_admits_the_top_class() -> None:
    guard = OverloadGuard(1, SHARES, None, clock=FakeClock())
    ticket = enter(guard, "enterprise")
    shed(guard, "enterprise")
    ticket.release(0.1)
    enter(guard, "enterprise")


def test_release_frees_one_slot_and_a_second_release_is_a_noop() -> None:
    guard = OverloadGuard(2, SHARES, None, clock=FakeClock())
    first, _second = enter(guard), enter(guard)
    shed(guard, "enterprise")
    first.release(0.5)
    first.release(0.5)
    first.release(None)
    assert first.released
    assert guard.in_flight == 1
    enter(guard)
    assert guard.in_flight == 2
    shed(guard, "enterprise")


@pytest.mark.parametrize("latency", [None, math.nan, math.inf, -1.0])
def test_release_without_a_usable_latency_frees_the_slot_but_adds_no_sample(
    latency: float | None,
) -> None:
    guard = OverloadGuard(2, SHARES, None, clock=FakeClock())
    enter(guard).release(latency)
    assert guard.in_flight == 0
    assert guard.latency_ewma_s is None


# --- adaptive cap --------------------------------------------------------------------------


def test_without_adaptive_config_the_cap_stays_at_max() -> None:
    clock = FakeClock()
    guard = OverloadGuard(10, SHARES, None, clock=clock)
    for _ in range(20):
        interval(guard, clock, 30.0)
    assert guard.cap == 10


def test_cap_decreases_under_high_latency_down_to_min_cap() -> None:
    clock = FakeClock()
    guard = make_guard(clock, max_in_flight=20, min_cap=3)
    caps = [interval(guard, clock, 3.0) for _ in range(20)]
    # floor(cap * 0.9) each interval, then held at min_cap.
    assert caps[:12] == [18, 16, 14, 12, 10, 9, 8, 7, 6, 5, 4, 3]
    assert set(caps[12:]) == {3}


def test_cap_adjusts_at_most_once_per_interval() -> None:
    clock = FakeClock()
    guard = make_guard(clock)
    for _ in range(10):
        enter(guard).release(5.0)
        clock.advance(0.09)
        assert guard.cap == 20  # still inside the first interval
    clock.advance(0.1)
    assert guard.cap == 18  # one decrease, however many samples


def test_fewer_admitted_after_the_cap_decreases() -> None:
    clock = FakeClock()
    guard = make_guard(clock, max_in_flight=10)
    interval(guard, clock, 5.0)
    assert guard.cap == 9
    assert len(fill(guard, "free")) == 4  # floor(9 * 0.5)
    assert len(fill(guard, "enterprise")) == 5


def test_latency_oscillating_inside_the_band_does_not_flap_the_cap() -> None:
    clock = FakeClock()
    guard = make_guard(clock)
    for _ in range(3):
        interval(guard, clock, 3.0)
    for _ in range(10):  # let the EWMA come down into the band
        interval(guard, clock, 0.82, 0.98)
    settled = guard.cap
    assert 2 < settled < 20
    for i in range(200):
        latencies = (0.82, 0.98) if i % 2 else (0.98, 0.82, 0.85)
        assert interval(guard, clock, *latencies) == settled
        assert guard.latency_ewma_s is not None
        assert TARGET * 0.8 <= guard.latency_ewma_s <= TARGET


def test_cap_recovers_under_low_latency_and_never_exceeds_max() -> None:
    clock = FakeClock()
    guard = make_guard(clock, max_in_flight=10, increase_step=2)
    for _ in range(10):
        interval(guard, clock, 3.0)
    assert guard.cap == 2
    caps = [interval(guard, clock, 0.1) for _ in range(30)]
    assert caps == sorted(caps)
    assert caps[-1] == 10
    assert max(caps) == 10


def test_cap_recovers_when_no_requests_come_at_all() -> None:
    clock = FakeClock()
    guard = make_guard(clock, max_in_flight=10)
    for _ in range(10):
        interval(guard, clock, 3.0)
    assert (guard.cap, guard.latency_ewma_s) == (2, 3.0)
    # Idle intervals decay the EWMA by 0.8: 3.0 * 0.8**k < 0.8 first at k = 6; the interval
    # just ended had samples, so the first idle one ends a second from now.
    clock.advance(5.0)
    assert guard.cap == 2
    assert guard.latency_ewma_s == pytest.approx(3.0 * 0.8**5)
    clock.advance(1.0)
    assert guard.cap == 3
    clock.advance(3.0)
    assert guard.cap == 6
    clock.advance(3600.0)
    assert guard.cap == 10
    assert guard.latency_ewma_s == 0.0


def test_a_long_idle_gap_in_one_step_equals_many_small_steps() -> None:
    stepped_clock, jumped_clock = FakeClock(), FakeClock()
    stepped, jumped = make_guard(stepped_clock), make_guard(jumped_clock)
    for guard, clock in ((stepped, stepped_clock), (jumped, jumped_clock)):
        for _ in range(8):
            interval(guard, clock, 4.0)
    for gap in (1, 7, 10, 19):
        for _ in range(gap):
            stepped_clock.advance(1.0)
            _ = stepped.cap
        jumped_clock.advance(gap)
        assert jumped.cap == stepped.cap
        assert jumped.latency_ewma_s == pytest.approx(stepped.latency_ewma_s)


def test_no_recovery_while_requests_are_stuck_in_flight() -> None:
    clock = FakeClock()
    guard = make_guard(clock, max_in_flight=10)
    for _ in range(10):
        interval(guard, clock, 3.0)
    stuck = fill(guard, "enterprise")
    assert len(stuck) == 2
    clock.advance(600.0)
    # Nothing finished: no evidence the load passed, so neither the cap nor the EWMA moves.
    assert (guard.cap, guard.latency_ewma_s) == (2, 3.0)
    for ticket in stuck:
        ticket.release(None)
    clock.advance(600.0)
    assert guard.cap == 10


def test_cap_stays_within_min_cap_and_max_under_random_load() -> None:
    rng = random.Random(7)
    clock = FakeClock()
    guard = make_guard(clock, max_in_flight=12, min_cap=3, interval_s=0.5)
    held: list[Ticket] = []
    for _ in range(5000):
        action = rng.random()
        if action < 0.4:
            result = guard.try_enter(rng.choice(["free", "pro", "enterprise", "other"]))
            if isinstance(result, Ticket):
                held.append(result)
        elif action < 0.8 and held:
            held.pop(rng.randrange(len(held))).release(rng.choice([0.1, 0.9, 2.5, 20.0, None]))
        else:
            clock.advance(rng.choice([0.01, 0.3, 2.0, 50.0]))
        assert 3 <= guard.cap <= 12
        assert guard.in_flight == len(held) >= 0


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"target_latency_s": 0}, "target_latency_s"),
        ({"min_cap": 0}, "min_cap"),
        ({"decrease_factor": 1.0}, "decrease_factor"),
        ({"decrease_factor": 0.0}, "decrease_factor"),
        ({"increase_step": 0}, "increase_step"),
        ({"interval_s": 0}, "interval_s"),
        ({"low_watermark": 0}, "low_watermark"),
        ({"low_watermark": 1.1}, "low_watermark"),
        ({"ewma_alpha": 0}, "ewma_alpha"),
    ],
)
def test_adaptive_config_rejects_out_of_range(change: dict[str, float], field: str) -> None:
    arguments: dict[str, Any] = {"target_latency_s": 1.0, "min_cap": 1, **change}
    with pytest.raises(ValueError, match=field):
        AdaptiveConfig(**arguments)


def test_guard_rejects_min_cap_above_max_and_an_empty_cap() -> None:
    with pytest.raises(ValueError, match="min_cap"):
        make_guard(FakeClock(), max_in_flight=4, min_cap=5)
    with pytest.raises(ValueError, match="max_in_flight"):
        OverloadGuard(0, SHARES, None, clock=FakeClock())


def test_a_clock_going_backwards_changes_nothing() -> None:
    clock = FakeClock()
    guard = make_guard(clock)
    enter(guard).release(5.0)
    clock.advance(-100.0)
    assert guard.cap == 20
    clock.advance(101.0)
    assert guard.cap == 18


# --- retry after ---------------------------------------------------------------------------


def shed_after(latencies: list[float]) -> Shed:
    guard = OverloadGuard(1, SHARES, None, clock=FakeClock())
    for latency in latencies:
        enter(guard).release(latency)
    enter(guard)
    return shed(guard, "enterprise")


@pytest.mark.parametrize(
    ("latencies", "retry_after"),
    [
        ([], 1),  # no sample yet
        ([0.0], 1),
        ([0.2], 1),
        ([1.0], 1),
        ([2.3], 3),
        ([2.0, 7.0], 3),  # EWMA 2.0 + 0.2 * 5.0 = 3.0
        ([29.5], 30),
        ([500.0], RETRY_AFTER_MAX_S),
    ],
)
def test_retry_after_is_ceil_of_the_latency_ewma_within_bounds(
    latencies: list[float], retry_after: int
) -> None:
    assert shed_after(latencies).retry_after_s == retry_after


def test_retry_after_falls_as_the_ewma_decays_when_idle() -> None:
    clock = FakeClock()
    guard = OverloadGuard(1, SHARES, None, clock=clock)
    enter(guard).release(10.0)
    clock.advance(1.0)  # the interval with the sample
    clock.advance(10.0)  # ten idle ones: 10 * 0.8**10 = 1.07
    ticket = enter(guard)
    assert shed(guard, "enterprise").retry_after_s == 2
    ticket.release(None)
