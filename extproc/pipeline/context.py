"""The request as the decision core sees it: transport-independent, built by the adapters."""

from __future__ import annotations

import os
import random
from collections.abc import Mapping
from dataclasses import dataclass, field

# Seeded from the OS per process (so workers differ); one getrandom syscall per request was
# measurable on the hot path. Decision ids correlate records; they authorise nothing.
_ids = random.Random(os.urandom(32))


def new_decision_id() -> str:
    """128 random bits as 32 hex digits: unique across workers and restarts."""
    return f"{_ids.getrandbits(128):032x}"


@dataclass(slots=True)
class RequestContext:
    """One request. Header names are lower-case; duplicates arrive joined by commas (Envoy)."""

    method: str
    path: str  # normalised by Envoy, without the query string
    host: str
    headers: Mapping[str, str]
    query: str = ""
    source_address: str = ""
    scheme: str = "https"
    decision_id: str = field(default_factory=new_decision_id)
    body: bytes | None = None

    @staticmethod
    def split_path(raw_path: str) -> tuple[str, str]:
        """(path, query) from a `:path` value."""
        path, _, query = raw_path.partition("?")
        return path, query
