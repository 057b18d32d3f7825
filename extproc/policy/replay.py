"""Deciding written requests through the real decision core: the one path `extproc policy
test`, `explain` and `diff` share.

Each request is decided by a DecisionCore over the policy directory's PolicyStore, with a fresh
in-memory QuotaEngine: quota counters start empty, so requests do not affect each other, unless
one request is repeated (then the repetitions share counters, each exchange ending before the
next begins). What is reported is read from the decision, its trail and its audit record
(decision_record), never worked out again here.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from extproc.audit.record import decision_record
from extproc.authn.apikey import ApiKeyError, ApiKeyStore
from extproc.pipeline.context import RequestContext
from extproc.pipeline.decision import Allow, Decision, Deny
from extproc.pipeline.run import DecisionCore
from extproc.policy.cases import RequestSpec
from extproc.policy.compiled import CompiledPolicy, PolicySet
from extproc.policy.load import PolicyLoadError
from extproc.policy.store import PolicyStore
from extproc.quota.admit import QuotaEngine
from extproc.quota.memory import MemoryStore


class BadInput(Exception):
    """A policy directory, key store or request file the tools cannot use (exit 2)."""


def load_store(directory: Path, api_keys: Path | None) -> PolicyStore:
    """The directory's policies as the server would load them (without a key store, no API
    key is accepted)."""
    try:
        keys = ApiKeyStore.load(api_keys) if api_keys is not None else ApiKeyStore(os.devnull)
        return PolicyStore(directory, keys, os.environ)
    except (PolicyLoadError, ApiKeyError) as exc:
        raise BadInput(str(exc)) from None


@dataclass(frozen=True, slots=True)
class Decided:
    """One request decided: the context with its trail, the decision, its audit record."""

    ctx: RequestContext
    decision: Decision
    record: dict[str, Any]
    policy: CompiledPolicy | None  # the model's policy, when the request got that far

    @property
    def deny(self) -> Deny | None:
        return self.decision if isinstance(self.decision, Deny) else None

    @property
    def allow(self) -> Allow | None:
        return self.decision if isinstance(self.decision, Allow) else None

    @property
    def redactions(self) -> dict[str, int]:
        """Values masked in the request, by type."""
        found: dict[str, int] = self.record.get("redactions", {}).get("request", {})
        return found

    @property
    def dry_run_phases(self) -> list[str]:
        return [str(entry["phase"]) for entry in self.ctx.trail.would_deny]

    def summary(self) -> dict[str, Any]:
        """The decision as the tools print and compare it."""
        out: dict[str, Any] = {"outcome": self.record["outcome"]}
        deny, allow = self.deny, self.allow
        if deny is not None:
            out.update(status=deny.status, code=deny.code, message=deny.message,
                       phase=deny.phase, reason=deny.reason)  # fmt: skip
            if deny.field:
                out["field"] = deny.field
        elif allow is not None:
            out.update(version=allow.version, cluster=allow.cluster)
            if allow.fallback_cluster:
                out["fallback_cluster"] = allow.fallback_cluster
            if allow.mirror_cluster:
                out["mirror_cluster"] = allow.mirror_cluster
            out["flags"] = list(allow.flags)
        out["redactions"] = self.redactions
        out["dry_run"] = list(self.ctx.trail.would_deny)
        return out

    def brief(self) -> str:
        """One line: `allow v1 (cluster demo-oip-v1)` or `deny 403 forbidden (authorize: ...)`."""
        deny, allow = self.deny, self.allow
        if deny is not None:
            outcome = self.record["outcome"]
            return f"{outcome} {deny.status} {deny.code} ({deny.phase}: {deny.reason})"
        assert allow is not None
        return f"allow {allow.version} (cluster {allow.cluster})"


class Replayer:
    """Decides request specs against one loaded policy directory."""

    def __init__(self, store: PolicyStore) -> None:
        self.store = store
        self.current: PolicySet = store.current
        self._by_model = {p.model: p for p in self.current.policies}

    def core(self) -> DecisionCore:
        # A fresh quota engine: counters from other requests never decide this one.
        return DecisionCore(self.store, QuotaEngine(MemoryStore()))

    async def decide(
        self, spec: RequestSpec, *, repeat: int = 1, decision_id: str | None = None
    ) -> Decided:
        core = self.core()
        ctx = spec.context(decision_id)
        decision: Decision = await core.decide(ctx)
        for _ in range(repeat - 1):
            await _end_exchange(decision)
            ctx = spec.context(decision_id)
            decision = await core.decide(ctx)
        await _end_exchange(decision)
        record = decision_record(ctx, decision, ctx.trail.revision, spec.transport)
        return Decided(ctx, decision, record, self._by_model.get(ctx.trail.model))


async def _end_exchange(decision: Decision) -> None:
    """The upstream answered 200 and the exchange ended: concurrency slots are freed, cost
    reservations stand at their estimate (no usage is reported)."""
    admission = decision.admission if isinstance(decision, Allow) else None
    if admission is not None:
        admission.on_response(200)
        await admission.finish()
