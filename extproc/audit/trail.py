"""What one request gathers for its audit record while it is decided and answered."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from extproc.authn.base import Identity
from extproc.pipeline.timeline import Timeline


@dataclass(slots=True)
class Trail:
    timeline: Timeline = field(default_factory=Timeline)
    # Who asked and for which model, as far as the decision got (a denial carries neither).
    identity: Identity | None = None
    model: str = ""
    # The policy revision that decided (a reload may land before the record is written).
    revision: str = ""
    # Findings by kind (inspect: injection score, PII counts; upstream_error; response_blocked).
    events: dict[str, Any] = field(default_factory=dict)
    # What a dry-run policy or rule would have refused: phase, status, reason.
    would_deny: list[dict[str, Any]] = field(default_factory=list)
    # Values masked in the answer, by type (request-side masking is in events["inspect"]).
    response_redactions: Counter[str] = field(default_factory=Counter)
    # The upstream's status, when the response was seen.
    response_status: int | None = None
    # The request as the policy asked to keep it (audit.record_requests), already redacted.
    request: dict[str, Any] | None = None

    def event(self, kind: str, fields: dict[str, Any]) -> None:
        self.events[kind] = fields

    def dry_run(self, phase: str, status: int, reason: str) -> None:
        entry = {"phase": phase, "status": status, "reason": reason}
        if entry in self.would_deny:
            return  # a constraint checked again once the body is read
        self.would_deny.append(entry)
        self.timeline.note(phase, "would_deny", reason)
