"""The quota store a server uses, from its settings."""

from __future__ import annotations

import logging

from extproc.quota.guarded import GuardedStore
from extproc.quota.lease import LeasingStore
from extproc.quota.memory import MemoryStore
from extproc.quota.store import QuotaStore, StoreError
from extproc.quota.valkey import ValkeyStore
from extproc.settings import Settings

log = logging.getLogger(__name__)


async def open_quota_store(settings: Settings) -> QuotaStore:
    """`memory` needs no guard (it cannot be down). A shared store is guarded: bounded time
    per decision, bounded calls in flight, a local cache of counters already over their limit,
    and a circuit breaker, so a dead store costs nothing per request until it is back. It is
    connected (and its scripts loaded) now, so the first requests do not pay for that; a store
    that is down at startup is no reason not to serve: the policies' failure modes apply.
    Rules with `local_lease` are served from units leased by this replica (lease.py)."""
    if settings.quota_store == "memory":
        return MemoryStore()
    timeout = settings.quota_timeout_ms / 1000
    store = ValkeyStore.from_url(settings.quota_store, timeout=timeout)
    try:
        await store.connect()
    except StoreError as exc:
        log.warning("quota store not reachable at startup (%s); will retry per request", exc)
    return LeasingStore(GuardedStore(store, timeout=timeout))
