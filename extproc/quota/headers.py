"""RateLimit-Policy and RateLimit response fields (draft-ietf-httpapi-ratelimit-headers), in
their structured-field form: a list of quota policies, each a string item with parameters.

    RateLimit-Policy: "per-key";q=100;w=60, "tokens";q=50000;w=3600
    RateLimit: "per-key";r=42;t=17, "tokens";r=48000;t=3600

q = quota units, w = window seconds, qu = quota unit (only registered units are sent),
r = remaining units, t = seconds until the quota is restored.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

POLICY_HEADER = "ratelimit-policy"
STATE_HEADER = "ratelimit"
RETRY_AFTER = "retry-after"


@dataclass(frozen=True, slots=True)
class QuotaState:
    name: str  # a policy rule name: [a-z0-9._-], so a valid sf-string without escaping
    kind: str
    limit: int
    window_ms: int
    remaining: int
    reset_ms: int


def _seconds(ms: int) -> int:
    return max(0, math.ceil(ms / 1000))


def ratelimit_headers(states: Sequence[QuotaState]) -> tuple[tuple[str, str], ...]:
    if not states:
        return ()
    policies = []
    current = []
    for s in states:
        if s.kind == "concurrency":
            policies.append(f'"{s.name}";q={s.limit};qu="concurrent-requests"')
        else:
            policies.append(f'"{s.name}";q={s.limit};w={_seconds(s.window_ms)}')
        current.append(f'"{s.name}";r={max(0, s.remaining)};t={_seconds(s.reset_ms)}')
    return ((POLICY_HEADER, ", ".join(policies)), (STATE_HEADER, ", ".join(current)))


def retry_after_seconds(ms: int) -> int:
    """Whole seconds, at least 1: a 0 would invite an immediate retry that fails again."""
    return max(1, math.ceil(ms / 1000))
