"""What every quota store does: atomic, all-or-nothing takes against counters, and adjustments.

Two stores implement this with the same semantics: `memory.MemoryStore` (embedded, one replica)
and `valkey.ValkeyStore` (Redis/Valkey, single server or Cluster, shared by replicas). One
conformance suite (extproc/testing/quota_conformance.py) runs against both, so the semantics
below are what a test checks, not what a comment hopes.

Semantics, per counter (`Counter.algorithm`):

- GCRA (`gcra`): a smoothed rate of `limit` units per `window_ms`, with up to `burst` units at
  once (the bucket size). Emission interval T = window_ms / limit; tolerance = burst * T. State
  is the theoretical arrival time (TAT). A take of n fits when max(TAT, now) + n*T - now <=
  tolerance. remaining = floor((tolerance - (TAT' - now)) / T); reset_ms = TAT' - now (time until
  the bucket is full again); retry_after_ms (denied) = max(TAT, now) + n*T - tolerance - now.
- Sliding window (`sliding_window`): counts in fixed windows of window_ms; the current estimate
  is previous * (1 - elapsed/window_ms) + current. A take of n fits when estimate + n <= limit.
  remaining = floor(limit - estimate'); reset_ms = time until the current window ends;
  retry_after_ms = the time until enough of the previous window has slid out for n to fit, or
  the current window's end when the current window alone is too full (never 0 when denied).
- Fixed window (`fixed_window`): counts in windows aligned to multiples of window_ms since the
  epoch; up to 2x limit can pass around a window edge (documented to policy authors).
  reset_ms = retry_after_ms = time until the window ends.
- Concurrency (`concurrency`): at most `limit` holders at once; a take of n holds n slots for
  the request id until released, or until `window_ms` passes (a lease, so a crashed replica's
  slots come back on their own). remaining = free slots after the take; reset_ms = 0.

A take may ask for more than it needs (`Take.up_to`, window algorithms only): when `amount`
fits, the store also grants as many further units as fit, up to `up_to` in all, and the
receipt's amount says how many it granted. `lease.LeasingStore` uses this to take a batch of
units in the same round trip as a request's own take.

Every take in one call is checked first and applied only if all fit ("all or nothing"): a
request denied by its tenant's quota does not consume its principal's. Counters in one call
share a Cluster hash tag (`Counter.key` carries it). Every key the store writes has a TTL.
Time comes from the store (Valkey's TIME; the process's monotonic clock for the embedded one),
never from each replica's clock.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol


class Algorithm(StrEnum):
    GCRA = "gcra"
    SLIDING_WINDOW = "sliding_window"
    FIXED_WINDOW = "fixed_window"
    CONCURRENCY = "concurrency"


@dataclass(frozen=True, slots=True)
class Counter:
    """One limit on one key. `key` is the full store key, hash tag included."""

    key: str
    algorithm: Algorithm
    limit: int  # units per window; for CONCURRENCY, slots
    window_ms: int  # the window; for CONCURRENCY, the lease time of a slot
    burst: int = 0  # GCRA only: units allowed at once (0 means `limit`)
    # How a replica may lease this counter (lease.LeasingStore; the stores ignore both): units
    # taken at once from the shared store, and how long unspent ones are kept. 0: no leases.
    lease_units: int = 0
    lease_ms: int = 0


@dataclass(frozen=True, slots=True)
class Take:
    counter: Counter
    amount: int  # 1 for a request or a slot, the estimated cost for cost quotas
    up_to: int = 0  # window algorithms: also grant what fits beyond `amount`, up to this in all


@dataclass(frozen=True, slots=True)
class Verdict:
    """The outcome of one take. When a call is denied, the takes that did fit are reported
    allowed=True but were not applied (all or nothing)."""

    allowed: bool
    limit: int
    remaining: int
    reset_ms: int
    retry_after_ms: int  # 0 when allowed


@dataclass(frozen=True, slots=True)
class Receipt:
    """What undoing or settling an applied take needs. `ref` is store-defined (the window a
    window take landed in, the request id holding a slot)."""

    counter: Counter
    amount: int  # what was granted (more than asked when the take had `up_to`)
    ref: str


@dataclass(frozen=True, slots=True)
class Outcome:
    admitted: bool
    verdicts: tuple[Verdict, ...]  # one per take, in order
    receipts: tuple[Receipt, ...]  # one per take when admitted, empty otherwise


class StoreError(Exception):
    """The store could not answer (down, slow, refused). Callers apply the policy's failure
    mode; the message is for logs and never holds a key's identity."""


class QuotaStore(Protocol):
    async def take(self, takes: Sequence[Take], request_id: str) -> Outcome:
        """Apply every take, or none. One round trip for the Valkey store."""
        ...

    async def adjust(self, adjustments: Sequence[tuple[Receipt, int]]) -> None:
        """Change what applied takes consumed, by a signed delta each, in one round trip.

        For cost settlement (delta = actual - reserved, may be positive), refunds (delta =
        -amount) and releases of concurrency slots (delta = -amount frees the request's slots).
        A negative delta never drives a counter below empty; an adjustment whose window has
        already gone is a no-op. Best effort across calls, atomic within one key.
        """
        ...

    async def close(self) -> None: ...
