"""One decision's audit record: what was decided, for whom, why, and what it cost.

Built when the exchange ends (or the client goes away), from the request's Trail. Holds no
credential, token, raw PII or body: identities by principal and credential id, redactions as
counts by type, inspection as scores and counts. A request body appears only when the policy
asks for it (audit.record_requests), masked (extproc/pipeline/snapshot.py).
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

from extproc.pipeline.context import RequestContext
from extproc.pipeline.decision import Allow, Deny


def _time(ns: int) -> str:
    return datetime.fromtimestamp(ns / 1e9, UTC).isoformat(timespec="milliseconds")


def outcome_of(decision: Allow | Deny | None) -> str:
    if decision is None:
        return "cancelled"
    if isinstance(decision, Allow):
        return "allow"
    return "error" if decision.phase == "internal" else "deny"


def upstream_error_record(fields: dict[str, Any], transport: str) -> dict[str, Any]:
    """An upstream 5xx, beside the decision record of the request it answered (same
    decision_id); `body_head` is the start of the upstream's body, PII masked."""
    return {
        "time": _time(time.time_ns()),
        "event": "upstream_error",
        "transport": transport,
        **fields,
    }


def decision_record(
    ctx: RequestContext,
    decision: Allow | Deny | None,
    revision: str,
    transport: str,
    trace_id: str = "",
) -> dict[str, Any]:
    trail = ctx.trail
    record: dict[str, Any] = {
        "time": _time(trail.timeline.wall_start_ns),
        "event": "decision",
        "decision_id": ctx.decision_id,
        "outcome": outcome_of(decision),
        "transport": transport,
        "policy_revision": revision,
        "request": {
            "method": ctx.method,
            "host": ctx.host,
            "path": ctx.path,
            "source": ctx.source_address,
        },
        "phases_us": trail.timeline.durations_us(),
    }
    if trace_id:
        record["trace_id"] = trace_id
    identity = decision.identity if isinstance(decision, Allow) else trail.identity
    if identity is not None:
        record["principal"] = identity.principal
        record["tenant"] = identity.tenant
        record["auth_method"] = identity.method
        record["credential_id"] = identity.credential_id
    if trail.model:
        record["model"] = trail.model
    if isinstance(decision, Deny):
        record["status"] = decision.status
        record["denial"] = {
            "phase": decision.phase,
            "code": decision.code,
            "reason": decision.reason,
        }
    elif isinstance(decision, Allow):
        record["version"] = decision.version
        record["cluster"] = decision.cluster
        if decision.fallback_cluster:
            record["fallback_cluster"] = decision.fallback_cluster
        if decision.mirror_cluster:
            record["mirror_cluster"] = decision.mirror_cluster
        if decision.flags:
            record["flags"] = list(decision.flags)
        admission = decision.admission
        if admission is not None and admission.held:
            quota: dict[str, Any] = {"held": admission.held_summary()}
            if admission.settlements:
                quota["settled"] = [
                    {"rule": rule, "held": held, "final": final}
                    for rule, held, final in admission.settlements
                ]
            record["quota"] = quota
        if trail.response_status is not None:
            record["status"] = trail.response_status
    else:
        # Gone before a decision: the last phase reached says where.
        marks = trail.timeline.marks
        record["reached"] = marks[-1].phase if marks else "start"
    inspect = trail.events.get("inspect")
    redactions: dict[str, Any] = {}
    if isinstance(inspect, dict) and inspect.get("pii"):
        redactions["request"] = inspect["pii"]
    if trail.response_redactions:
        redactions["response"] = dict(trail.response_redactions)
    if redactions:
        record["redactions"] = redactions
    findings = {k: v for k, v in trail.events.items() if k != "inspect"}
    if isinstance(inspect, dict):
        findings.update({k: v for k, v in inspect.items() if k != "pii"})
    if findings:
        record["findings"] = findings
    if trail.would_deny:
        record["dry_run"] = trail.would_deny
    if trail.request is not None:
        record["recorded_request"] = trail.request
    return record
