"""The request as the decision core sees it: transport-independent, built by the adapters."""

from __future__ import annotations

import itertools
import os
from collections.abc import Mapping
from dataclasses import dataclass, field

from extproc.audit.trail import Trail
from extproc.authn.base import Identity, PeerCertificate

# 64 random bits per process, then a counter: unique across workers and restarts without a
# syscall per request (measurable on the hot path). Ids correlate records; they grant nothing.
_PROCESS_PREFIX = os.urandom(8).hex()
_counter = itertools.count(int.from_bytes(os.urandom(4), "big"))


def new_decision_id() -> str:
    """32 hex digits: this process's random prefix and a per-process sequence number."""
    return f"{_PROCESS_PREFIX}{next(_counter) & 0xFFFFFFFFFFFFFFFF:016x}"


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
    # The transport can replace the request body (ext_proc can, ext_authz cannot): where it
    # cannot, a body that would have to be rewritten (masked PII) is refused instead.
    rewrites_body: bool = True
    # The client certificate Envoy verified on the connection (mTLS), from Envoy only.
    peer: PeerCertificate | None = None
    # Timings, verdicts and findings for the audit record (written when the exchange ends).
    trail: Trail = field(default_factory=Trail)
    # For the policy tools only (`extproc policy test/explain/diff`): decide for this identity
    # instead of authenticating. The Envoy adapters never set it.
    given_identity: Identity | None = None

    @staticmethod
    def split_path(raw_path: str) -> tuple[str, str]:
        """(path, query) from a `:path` value."""
        path, _, query = raw_path.partition("?")
        return path, query
