"""Which version of a model serves a request: pinned, canary, or the stable default.

- A version is pinned by a token claim (`routing.pin_claim`, which wins) or a request header
  (`routing.pin_header`). A pinned version must exist and be visible to the caller's tenant,
  and it is then authorized like any other: pinning never widens access.
- Unpinned callers are spread over canary versions by weight, stickily: a hash of the model
  and the caller's principal (or tenant) picks a bucket in [0, 10000), and the canaries take
  consecutive ranges of buckets in policy order. The same caller keeps its version as long as
  the weights stay; raising a weight only moves callers onto the canary.
- Everyone else gets the default (stable) version. Moving `default: true` is a blue-green
  switch, applied by a policy reload.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass

from extproc.authn.base import Identity

BUCKETS = 10_000
MAX_PIN_CHARS = 64


@dataclass(frozen=True, slots=True)
class VersionSpec:
    name: str
    cluster: str
    weight: int = 0  # percent of unpinned callers (canaries only)
    fallback: str | None = None
    timeout_seconds: float = 120.0
    retries: int = 0
    tenants: frozenset[str] | None = None  # a dedicated version: only these tenants see it

    def visible_to(self, identity: Identity) -> bool:
        return self.tenants is None or identity.tenant in self.tenants


@dataclass(frozen=True, slots=True)
class Shadow:
    version: str
    percent: float


@dataclass(frozen=True, slots=True)
class VersionPlan:
    model: str
    default: str
    versions: Mapping[str, VersionSpec]
    sticky_by: str = "principal"
    pin_header: str | None = "x-model-version"
    pin_claim: str | None = None
    shadow: Shadow | None = None

    @property
    def canaries(self) -> tuple[VersionSpec, ...]:
        return tuple(v for v in self.versions.values() if v.weight)

    def pinned(self, identity: Identity, headers: Mapping[str, str]) -> str | None:
        """The version the caller names, if any (it may not exist: the caller checks)."""
        if self.pin_claim is not None:
            claimed = identity.claims.get(self.pin_claim)
            if isinstance(claimed, str) and claimed:
                return claimed[:MAX_PIN_CHARS]
        if self.pin_header is not None:
            value = headers.get(self.pin_header)
            if value:
                return value[:MAX_PIN_CHARS]
        return None

    def canary_for(self, identity: Identity) -> VersionSpec | None:
        """The canary this caller is assigned to, or None for the default version."""
        canaries = self.canaries
        if not canaries:
            return None
        key = identity.principal
        if self.sticky_by == "tenant" and identity.tenant:
            key = identity.tenant
        bucket = sticky_bucket(self.model, key)
        edge = 0
        for canary in canaries:
            edge += canary.weight * BUCKETS // 100
            if bucket < edge:
                return canary
        return None

    def shadow_for(self, decision_id: str) -> str | None:
        """The version a copy of this request goes to, or None."""
        shadow = self.shadow
        if shadow is None:
            return None
        if shadow.percent >= 100 or sticky_bucket("shadow", decision_id) < shadow.percent * 100:
            return shadow.version
        return None


def sticky_bucket(salt: str, key: str) -> int:
    """A stable bucket in [0, BUCKETS) for the key: the same on every worker and replica."""
    digest = hashlib.blake2b(f"{salt}\x00{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % BUCKETS
