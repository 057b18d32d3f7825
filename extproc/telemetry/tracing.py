"""Traces: one span per decision, continuing the `traceparent` Envoy forwards, with a child span
per phase. Spans are made after the fact from the request's timeline (start and end times are
given), so the request path pays nothing for them until the decision is made, and nothing at all
when tracing is off. Exported in batches over OTLP/HTTP by the SDK's background thread."""

from __future__ import annotations

import os
import time

from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from extproc.pipeline.context import RequestContext
from extproc.pipeline.decision import Allow, Deny

EXPORT_TIMEOUT_SECONDS = 5


class Tracing:
    def __init__(self, endpoint: str, sample_ratio: float) -> None:
        resource = Resource.create({"service.name": "extproc", "process.pid": os.getpid()})
        self._provider = TracerProvider(
            sampler=ParentBased(TraceIdRatioBased(sample_ratio)), resource=resource
        )
        exporter = OTLPSpanExporter(
            endpoint=f"{endpoint.rstrip('/')}/v1/traces", timeout=EXPORT_TIMEOUT_SECONDS
        )
        # A queue for a few seconds of a busy worker: the default (2048 spans) drops spans
        # at a few hundred traced requests per second.
        self._provider.add_span_processor(
            BatchSpanProcessor(
                exporter,
                max_queue_size=32768,
                schedule_delay_millis=1000,
                max_export_batch_size=4096,
            )
        )
        self._tracer = self._provider.get_tracer("extproc")
        self._propagator = TraceContextTextMapPropagator()

    def record(
        self, ctx: RequestContext, decision: Allow | Deny | None, transport: str, outcome: str
    ) -> str:
        """Emit the decision's spans; the trace id (hex), or "" when there is none."""
        parent = self._propagator.extract(ctx.headers)
        timeline = ctx.trail.timeline
        marks = timeline.marks
        end = timeline.wall_ns(marks[-1].end_ns) if marks else time.time_ns()
        root = self._tracer.start_span(
            "extproc.decision",
            context=parent,
            kind=SpanKind.SERVER,
            start_time=timeline.wall_start_ns,
            attributes={
                "extproc.decision_id": ctx.decision_id,
                "extproc.outcome": outcome,
                "extproc.transport": transport,
                "extproc.model": ctx.trail.model,
            },
        )
        if root.is_recording():
            if isinstance(decision, Allow):
                root.set_attribute("extproc.version", decision.version)
            elif isinstance(decision, Deny):
                root.set_attribute("extproc.denial.phase", decision.phase)
                root.set_attribute("extproc.denial.code", decision.code)
                root.set_attribute("http.response.status_code", decision.status)
                if decision.phase == "internal":
                    root.set_status(Status(StatusCode.ERROR, decision.reason))
            inside = trace.set_span_in_context(root)
            for mark in marks:
                span = self._tracer.start_span(
                    f"extproc.{mark.phase}",
                    context=inside,
                    start_time=timeline.wall_ns(mark.start_ns),
                    attributes={"extproc.verdict": mark.verdict, "extproc.reason": mark.reason},
                )
                span.end(end_time=timeline.wall_ns(mark.end_ns))
        root.end(end_time=end)
        context = root.get_span_context()
        return format(context.trace_id, "032x") if context.trace_id else ""

    def close(self) -> None:
        self._provider.shutdown()
