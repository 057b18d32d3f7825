"""Fixtures the quota store wrappers' tests share (GuardedStore, LeasingStore)."""

from __future__ import annotations

import pytest

from extproc.testing.clock import FakeClock
from extproc.testing.instrumented import Instrumented
from extproc.testing.quota_conformance import quota_clock


@pytest.fixture
def clock() -> FakeClock:
    return quota_clock()


@pytest.fixture
def inner(clock: FakeClock) -> Instrumented:
    return Instrumented(clock)
