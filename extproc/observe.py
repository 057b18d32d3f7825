"""What happens once per decision besides the answer: the audit record, the metrics, the trace.

Called by the adapters when an exchange ends, however it ends (answered, refused, or abandoned
by the client). A request that holds quota is recorded once its settlement is known. With
everything off this is one attribute test per request.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from extproc.audit.chain import AuditLog
from extproc.audit.record import decision_record, outcome_of, upstream_error_record
from extproc.pipeline.context import RequestContext
from extproc.pipeline.decision import Allow, Deny
from extproc.telemetry import metrics

if TYPE_CHECKING:  # imported only when tracing is configured (server.py)
    from extproc.telemetry.tracing import Tracing


class Observer:
    def __init__(
        self,
        audit: AuditLog | None = None,
        tracing: Tracing | None = None,
        count: bool = False,
    ) -> None:
        self.audit = audit
        self.tracing = tracing
        self.count = count
        self.enabled = audit is not None or tracing is not None or count

    def finished(self, ctx: RequestContext, decision: Allow | Deny | None, transport: str) -> None:
        if not self.enabled:
            return
        admission = decision.admission if isinstance(decision, Allow) else None
        if admission is not None:
            admission.when_closed(lambda: self._emit(ctx, decision, transport))
        else:
            self._emit(ctx, decision, transport)

    def upstream_error(self, fields: dict[str, Any], transport: str) -> None:
        """An upstream 5xx answer (ext_proc_errors.py): audited and counted."""
        if self.count:
            metrics.UPSTREAM_ERRORS.labels(
                fields.get("model", ""), str(fields.get("status", 0)), str(fields["sanitised"])
            ).inc()
        if self.audit is not None:
            self.audit.write(upstream_error_record(fields, transport))

    def close(self) -> None:
        if self.audit is not None:
            self.audit.close()
        if self.tracing is not None:
            self.tracing.close()

    def _emit(self, ctx: RequestContext, decision: Allow | Deny | None, transport: str) -> None:
        outcome = outcome_of(decision)
        trace_id = ""
        if self.tracing is not None:
            trace_id = self.tracing.record(ctx, decision, transport, outcome)
        if self.count:
            _count(ctx, decision, outcome, transport)
        if self.audit is not None:
            record = decision_record(ctx, decision, ctx.trail.revision, transport, trace_id)
            self.audit.write(record)


def _count(
    ctx: RequestContext, decision: Allow | Deny | None, outcome: str, transport: str
) -> None:
    trail = ctx.trail
    model = trail.model
    phase, reason = ("", "") if not isinstance(decision, Deny) else (decision.phase, decision.code)
    metrics.DECISIONS.labels(outcome, model, phase, reason, transport).inc()
    # One histogram per decision, not per phase (2 us per observation here): time per phase
    # is in the audit record and the trace.
    spent = sum(m.end_ns - m.start_ns for m in trail.timeline.marks)
    metrics.DECISION_SECONDS.labels(transport, outcome).observe(spent / 1e9)
    for entry in trail.would_deny:
        metrics.DRY_RUN_DENIALS.labels(model, entry["phase"]).inc()
    inspect = trail.events.get("inspect")
    if isinstance(inspect, dict):
        if "injection" in inspect:
            metrics.DETECTOR_HITS.labels(model, "injection").inc()
        for kind, count in (inspect.get("pii") or {}).items():
            metrics.DETECTOR_HITS.labels(model, f"pii:{kind}").inc()
            metrics.REDACTIONS.labels("request", kind).inc(count)
    for kind, count in trail.response_redactions.items():
        metrics.REDACTIONS.labels("response", kind).inc(count)
    admission = decision.admission if isinstance(decision, Allow) else None
    if admission is not None:
        final = {rule: used for rule, _, used in admission.settlements}
        for rule, receipt in admission.held:
            used = final.get(rule.name, receipt.amount)
            metrics.QUOTA_USED.labels(model, rule.name, rule.kind).inc(used)
