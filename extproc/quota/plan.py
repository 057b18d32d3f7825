"""The runtime form of a policy's quotas: built once per load, read on every request."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from dataclasses import dataclass, field

from extproc.authn.base import Identity
from extproc.quota.cost import (
    REQUEST_VARIABLES,
    USAGE_VARIABLES,
    CostExpression,
    CostExpressionError,
    compile_cost,
)
from extproc.quota.overload import AdaptiveConfig, ClassShares, OverloadGuard
from extproc.quota.schema import QuotaRule, Quotas, duration_ms
from extproc.quota.store import Algorithm, Counter

KEY_PREFIX = "gq"


@dataclass(frozen=True, slots=True)
class CompiledQuota:
    name: str
    kind: str  # requests | concurrency | cost
    key_parts: tuple[str, ...]
    algorithm: Algorithm
    limit: int
    window_ms: int  # the lease for concurrency
    burst: int  # gcra; 0 = limit
    classes: Mapping[str, int]
    limit_from: str | None
    estimate: CostExpression | None
    actual: CostExpression | None
    versions: frozenset[str] | None
    lease_units: int = 0
    lease_ms: int = 0

    def applies(self, identity: Identity, version: str) -> bool:
        if self.versions is not None and version not in self.versions:
            return False
        return "api_key" not in self.key_parts or identity.method == "api_key"

    def limit_for(self, identity: Identity, user_class: str) -> int:
        """The class's limit, lowered (never raised) by a per-caller limit in the identity."""
        ceiling = self.classes.get(user_class, self.limit)
        if self.limit_from is None:
            return ceiling
        own = identity.claims.get(self.limit_from)
        if isinstance(own, bool) or not isinstance(own, int) or own <= 0:
            return ceiling
        return min(own, ceiling)

    def counter(self, model: str, identity: Identity, version: str, user_class: str) -> Counter:
        parts = {
            "principal": identity.principal,
            "tenant": identity.tenant or "",
            "api_key": identity.credential_id,
            "model": model,
            "version": version,
            "class": user_class,
        }
        # Hashed: bounded key size whatever a principal looks like, and no identities in the
        # store. The model is the Cluster hash tag, so one request's keys share a slot.
        raw = "\x00".join(parts[p] for p in self.key_parts).encode()
        digest = hashlib.blake2b(raw, digest_size=12).hexdigest()
        limit = self.limit_for(identity, user_class)
        burst = self.burst
        if burst and limit < self.limit:  # a lowered limit lowers the burst with it
            burst = max(1, burst * limit // self.limit)
        return Counter(
            key=f"{KEY_PREFIX}:{{{model}}}:{self.name}:{digest}",
            algorithm=self.algorithm,
            limit=limit,
            window_ms=self.window_ms,
            burst=burst,
            lease_units=min(self.lease_units, limit),
            lease_ms=self.lease_ms,
        )


@dataclass(frozen=True, slots=True)
class QuotaPlan:
    model: str
    rules: tuple[CompiledQuota, ...]
    class_claim: str
    default_class: str
    fail_closed: bool
    local_fraction: float
    overload: OverloadGuard | None

    # Derived once here, read on every request.
    needs_body: bool = field(init=False)  # cost is estimated from the body: admission waits
    settles: bool = field(init=False)  # some cost quota settles to the response's usage
    active: bool = field(init=False)
    # Something is learnt from the response or given back at its end (slots, cost, an overload
    # seat). Request quotas alone need neither: their RateLimit fields reach the response
    # through Envoy's route config, without a response message to us.
    watches_response: bool = field(init=False)

    def __post_init__(self) -> None:
        kinds = {r.kind for r in self.rules}
        derived = {
            "needs_body": "cost" in kinds,
            "settles": any(r.actual is not None for r in self.rules),
            "active": bool(self.rules) or self.overload is not None,
            "watches_response": self.overload is not None or bool(kinds - {"requests"}),
        }
        for name, value in derived.items():
            object.__setattr__(self, name, value)

    def user_class(self, identity: Identity) -> str:
        value = identity.claims.get(self.class_claim)
        return value if isinstance(value, str) and value else self.default_class

    def local_counter(self, counter: Counter) -> Counter:
        """The same counter scaled for one replica counting alone (store down, `local`)."""
        limit = max(1, math.ceil(counter.limit * self.local_fraction))
        burst = max(1, math.ceil(counter.burst * self.local_fraction)) if counter.burst else 0
        return Counter(counter.key, counter.algorithm, limit, counter.window_ms, burst)


NO_QUOTAS = QuotaPlan("", (), "tier", "default", True, 1.0, None)


class QuotaCompileError(ValueError):
    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


def _rule(rule: QuotaRule, where: str) -> CompiledQuota:
    estimate = actual = None
    if rule.cost is not None:
        where = f"{where}.cost"
        try:
            estimate = compile_cost(rule.cost.estimate, REQUEST_VARIABLES)
        except CostExpressionError as exc:
            raise QuotaCompileError(f"{where}.estimate", str(exc)) from exc
        if rule.cost.actual is not None:
            try:
                actual = compile_cost(rule.cost.actual, USAGE_VARIABLES)
            except CostExpressionError as exc:
                raise QuotaCompileError(f"{where}.actual", str(exc)) from exc
    if rule.kind == "concurrency":
        algorithm, window_ms = Algorithm.CONCURRENCY, duration_ms(rule.lease)
    else:
        algorithm, window_ms = Algorithm(rule.algorithm), duration_ms(rule.window or "1s")
    return CompiledQuota(
        name=rule.name,
        kind=rule.kind,
        key_parts=tuple(rule.key),
        algorithm=algorithm,
        limit=rule.limit,
        window_ms=window_ms,
        burst=rule.burst or 0,
        classes=dict(rule.classes or {}),
        limit_from=rule.limit_from,
        estimate=estimate,
        actual=actual,
        versions=frozenset(rule.versions) if rule.versions is not None else None,
        lease_units=rule.local_lease.units if rule.local_lease else 0,
        lease_ms=duration_ms(rule.local_lease.ttl) if rule.local_lease else 0,
    )


def compile_quotas(model: str, quotas: Quotas, field_prefix: str = "quotas.rules") -> QuotaPlan:
    overload = None
    if quotas.overload is not None:
        spec = quotas.overload
        adaptive = None
        if spec.adaptive is not None:
            adaptive = AdaptiveConfig(
                target_latency_s=spec.adaptive.target_latency_ms / 1000,
                min_cap=spec.adaptive.min_in_flight,
            )
        overload = OverloadGuard(
            max_in_flight=spec.max_in_flight,
            shares=ClassShares(dict(spec.class_shares), default_share=spec.default_share),
            adaptive=adaptive,
        )
    return QuotaPlan(
        model=model,
        rules=tuple(_rule(r, f"{field_prefix}.{i}") for i, r in enumerate(quotas.rules)),
        class_claim=quotas.class_claim,
        default_class=quotas.default_class,
        fail_closed=quotas.on_store_failure == "fail_closed",
        local_fraction=quotas.local_fraction,
        overload=overload,
    )
