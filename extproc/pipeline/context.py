"""The request as the decision core sees it: transport-independent, built by the adapters."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field


def new_decision_id() -> str:
    """128 random bits, hex: unguessable, so it can be shown to clients and joined to audit."""
    return os.urandom(16).hex()


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
