"""A bounded, expiring cache of authentication outcomes, keyed by a token's digest.

Shared by the token methods (JWT, introspection): a verified token or a recent rejection is
answered without verifying or asking again.
"""

from __future__ import annotations

from extproc.authn.base import AuthnFailure, Identity


class OutcomeCache:
    """Bounded map from token digest to outcome, each entry with its own expiry.

    Insertion-ordered dict: when full, the oldest entry goes. No LRU bookkeeping, so a hit
    is one dict lookup and one comparison.
    """

    __slots__ = ("_capacity", "_entries")

    def __init__(self, capacity: int) -> None:
        self._capacity = capacity
        self._entries: dict[bytes, tuple[float, Identity | AuthnFailure]] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: bytes, now: float) -> Identity | AuthnFailure | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        if now >= entry[0]:
            del self._entries[key]
            return None
        return entry[1]

    def put(self, key: bytes, outcome: Identity | AuthnFailure, until: float, now: float) -> None:
        if until <= now or self._capacity <= 0:
            return
        entries = self._entries
        if key in entries:
            del entries[key]
        elif len(entries) >= self._capacity:
            del entries[next(iter(entries))]
        entries[key] = (until, outcome)
