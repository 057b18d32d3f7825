"""The `quotas:` section of a policy file: what model owners write about how much callers may use.

Validated strictly like the rest of the policy (unknown fields are errors). `compile.py` turns it
into counters, cost programs and an overload guard once per load.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

Name = Annotated[str, StringConstraints(pattern=r"^[a-z0-9][a-z0-9._-]{0,62}$")]
ClaimName = Annotated[str, StringConstraints(min_length=1, max_length=128)]
Duration = Annotated[
    str,
    StringConstraints(pattern=r"^[1-9][0-9]{0,5}(ms|s|m|h|d)$", strip_whitespace=True),
]
KeyPart = Literal["principal", "tenant", "api_key", "model", "version", "class"]
CelSource = Annotated[str, StringConstraints(min_length=1, max_length=1000)]

_UNIT_MS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}
MIN_WINDOW_MS = 1000
MAX_WINDOW_MS = 86_400_000
MAX_LIMIT = 10**12


def duration_ms(text: str) -> int:
    match = re.fullmatch(r"(\d+)([a-z]+)", text)
    if match is None or match[2] not in _UNIT_MS:
        raise ValueError(f"not a duration: {text!r}")
    return int(match[1]) * _UNIT_MS[match[2]]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, str_strip_whitespace=True)


class CostSpec(Strict):
    """How much one request costs, in the quota's unit (tokens, pixels, elements...)."""

    estimate: CelSource = Field(
        description="CEL over the request, reserved at admission: prompt_chars, prompt_tokens "
        "(estimated as characters / 4), messages, max_tokens, n, stream, image_count, "
        "image_bytes, tensor_elements, body_bytes, model."
    )
    actual: CelSource | None = Field(
        default=None,
        description="CEL over the response's usage (prompt_tokens, completion_tokens, "
        "total_tokens); the reservation is settled to this. Without it the estimate stands.",
    )


class LocalLease(Strict):
    """Each replica takes `units` at once from the shared store and spends them on its own, so
    most requests cost no store round trip. Units are counted by the store when taken, so the
    limit still holds within a window; what replicas hold when a window ends is spent in the
    next, so in any window (any span of time for gcra) at most limit + replicas x units pass.
    Unspent units go back to the store after `ttl`."""

    units: int = Field(ge=2, le=100_000, description="Units one replica takes at once.")
    ttl: Duration = Field(
        default="1s", description="Unspent units go back to the store after this (100ms to 1m)."
    )


class QuotaRule(Strict):
    """One limit. Requests and cost count per window; concurrency counts requests in flight."""

    name: Name = Field(description="Shown to the caller in 429 bodies and RateLimit headers.")
    kind: Literal["requests", "concurrency", "cost"] = Field(
        default="requests",
        description="requests: each request counts 1 per window; concurrency: requests in "
        "flight at once, each freed when its response ends; cost: the request's cost (see "
        "`cost`) per window. Over the limit: 429 rate_limited with Retry-After.",
    )
    key: list[KeyPart] = Field(
        default_factory=lambda: list[KeyPart](["principal"]),
        min_length=1,
        description="What is counted separately: a combination of principal, tenant, api_key "
        "(API-key callers only; the rule does not apply to others), model, version, class.",
    )
    limit: int = Field(
        ge=1,
        le=MAX_LIMIT,
        description="Units per window (requests, cost) or requests in flight (concurrency); "
        "also the maximum when the limit comes from the caller (limit_from) or a class.",
    )
    window: Duration | None = Field(
        default=None, description="1s to 1d, e.g. 30s, 1m, 1h, 1d. Not for concurrency."
    )
    algorithm: Literal["gcra", "sliding_window", "fixed_window"] = Field(
        default="gcra",
        description="gcra: smooth rate with `burst` at once. sliding_window: weighted two "
        "windows. fixed_window: up to 2x the limit can pass around a window edge.",
    )
    burst: int | None = Field(
        default=None, ge=1, le=MAX_LIMIT, description="gcra only: units at once (default limit)."
    )
    classes: dict[Name, Annotated[int, Field(ge=0, le=MAX_LIMIT)]] | None = Field(
        default=None,
        description="Limit per user class (see quotas.class_claim); others get `limit`. "
        "A class limit may not exceed `limit`; 0 shuts a class out.",
    )
    limit_from: ClaimName | None = Field(
        default=None,
        description="Identity claim (JWT claim or API-key metadata) holding this caller's "
        "limit; capped at the rule's limit for the caller's class. Ignored when absent or "
        "not a positive integer.",
    )
    cost: CostSpec | None = Field(default=None, description="kind: cost only.")
    lease: Duration = Field(
        default="10m",
        description="concurrency only: a slot held longer than this (a replica that died "
        "mid-request) is freed on its own.",
    )
    versions: list[Name] | None = Field(
        default=None, description="Apply only when one of these versions is served."
    )
    local_lease: LocalLease | None = Field(
        default=None,
        description="requests and cost, with a shared store: take units in batches per "
        "replica (fewer store round trips, a bounded over-admission; see LocalLease).",
    )

    @model_validator(mode="after")
    def _kind_fields(self) -> QuotaRule:
        if len(set(self.key)) != len(self.key):
            raise ValueError(f"quota {self.name!r}: key lists a part twice")
        if self.kind == "concurrency":
            if self.window is not None:
                raise ValueError(f"quota {self.name!r}: concurrency has no window (see lease)")
            if self.burst is not None or self.algorithm != "gcra":
                raise ValueError(f"quota {self.name!r}: concurrency takes no algorithm or burst")
        else:
            if self.window is None:
                raise ValueError(f"quota {self.name!r}: window is required for {self.kind}")
            ms = duration_ms(self.window)
            if not MIN_WINDOW_MS <= ms <= MAX_WINDOW_MS:
                raise ValueError(f"quota {self.name!r}: window must be between 1s and 1d")
            if self.burst is not None and self.algorithm != "gcra":
                raise ValueError(f"quota {self.name!r}: burst is only for algorithm gcra")
        if (self.kind == "cost") != (self.cost is not None):
            raise ValueError(
                f"quota {self.name!r}: `cost` is required for, and only for, kind cost"
            )
        lease_ms = duration_ms(self.lease)
        if not MIN_WINDOW_MS <= lease_ms <= MAX_WINDOW_MS:
            raise ValueError(f"quota {self.name!r}: lease must be between 1s and 1d")
        if self.local_lease is not None:
            if self.kind == "concurrency":
                raise ValueError(f"quota {self.name!r}: concurrency slots cannot be leased")
            if self.local_lease.units > self.limit:
                raise ValueError(
                    f"quota {self.name!r}: local_lease.units exceeds limit {self.limit}"
                )
            if not 100 <= duration_ms(self.local_lease.ttl) <= 60_000:
                raise ValueError(f"quota {self.name!r}: local_lease.ttl must be 100ms to 1m")
        for cls, limit in (self.classes or {}).items():
            if limit > self.limit:
                raise ValueError(
                    f"quota {self.name!r}: class {cls!r} limit {limit} exceeds limit {self.limit}"
                )
        return self


class Adaptive(Strict):
    target_latency_ms: int = Field(
        ge=1, le=600_000, description="Shrink the in-flight cap while latency stays above this."
    )
    min_in_flight: int = Field(default=1, ge=1, description="The cap never goes below this.")


class Overload(Strict):
    """Per replica: a cap on requests in flight to this model, shedding lower classes first."""

    max_in_flight: int = Field(
        ge=1,
        le=1_000_000,
        description="Requests in flight to this model on one replica, at most (the cap, or its "
        "ceiling with adaptive); beyond it: 503 overloaded with Retry-After.",
    )
    class_shares: dict[Name, Annotated[float, Field(gt=0, le=1)]] = Field(
        default_factory=dict,
        description="Share of the cap each class may fill, e.g. {free: 0.5, pro: 0.8, "
        "enterprise: 1.0}: under overload free callers are shed first (503 + Retry-After).",
    )
    default_share: float = Field(
        default=1.0, gt=0, le=1, description="Share of the cap for classes not in class_shares."
    )
    adaptive: Adaptive | None = Field(
        default=None,
        description="Lower the cap while latency (to the response headers) stays above a "
        "target, and raise it back as latency falls. Without it the cap stays at max_in_flight.",
    )

    @model_validator(mode="after")
    def _min_below_max(self) -> Overload:
        if self.adaptive and self.adaptive.min_in_flight > self.max_in_flight:
            raise ValueError("adaptive.min_in_flight exceeds max_in_flight")
        return self


class Quotas(Strict):
    """How much callers may use this model."""

    rules: list[QuotaRule] = Field(
        default_factory=list,
        description="The limits; a request must fit every rule that applies to it, or is "
        "refused with 429. The platform's quotas.defaults are added, unless a rule here has "
        "the same name.",
    )
    class_claim: ClaimName = Field(
        default="tier",
        description="Identity claim (JWT claim or API-key metadata) naming the caller's user "
        "class, e.g. free / pro / enterprise.",
    )
    default_class: Name = Field(default="default", description="Class of callers without one.")
    on_store_failure: Literal["fail_closed", "local"] = Field(
        default="fail_closed",
        description="When the shared store is down or slow: fail_closed answers 503; local "
        "counts on each replica alone, with each limit scaled by local_fraction.",
    )
    local_fraction: float = Field(
        default=0.5,
        gt=0,
        le=1,
        description="With on_store_failure: local, the share of each limit one replica admits "
        "on its own (e.g. 1 / number of replicas).",
    )
    overload: Overload | None = Field(
        default=None,
        description="A cap on requests in flight per replica, shedding lower classes first "
        "(503 + Retry-After); no cap when absent.",
    )

    @model_validator(mode="after")
    def _unique(self) -> Quotas:
        names = [r.name for r in self.rules]
        if len(set(names)) != len(names):
            raise ValueError("quota rule names must be unique")
        return self


class PlatformQuotas(Strict):
    """The platform team's quota defaults (policies/_platform.yaml), for every model."""

    defaults: list[QuotaRule] = Field(
        default_factory=list,
        description="Rules every model gets, unless its own policy has a rule of the same name "
        "(which then replaces it). Per-class limits (`classes`) give each tenant class, e.g. "
        "free / pro / enterprise, its default.",
    )
    class_claim: ClaimName | None = Field(
        default=None, description="Used by models whose policy does not set quotas.class_claim."
    )
    default_class: Name | None = Field(
        default=None,
        description="Used by models whose policy does not set quotas.default_class.",
    )

    @model_validator(mode="after")
    def _unique_and_model_free(self) -> PlatformQuotas:
        names = [r.name for r in self.defaults]
        if len(set(names)) != len(names):
            raise ValueError("default rule names must be unique")
        for rule in self.defaults:
            if rule.versions is not None:
                raise ValueError(f"default {rule.name!r}: versions belong in a model's policy")
        return self

    def apply(self, quotas: Quotas) -> Quotas:
        """A model's quotas with these defaults filled in."""
        own = {r.name for r in quotas.rules}
        update: dict[str, object] = {
            "rules": [*quotas.rules, *(r for r in self.defaults if r.name not in own)]
        }
        if self.class_claim is not None and "class_claim" not in quotas.model_fields_set:
            update["class_claim"] = self.class_claim
        if self.default_class is not None and "default_class" not in quotas.model_fields_set:
            update["default_class"] = self.default_class
        return quotas.model_copy(update=update)
