"""A real OTLP/HTTP receiver for tests: keeps what the server exports (traces, metrics)."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.metrics.v1.metrics_pb2 import Metric
from opentelemetry.proto.trace.v1.trace_pb2 import Span

MAX_BODY = 16 * 1024 * 1024


class OtlpReceiver:
    def __init__(self) -> None:
        self.spans: list[Span] = []
        self.metrics: list[Metric] = []
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("content-length", "0"))
                if not 0 < length <= MAX_BODY:
                    self.send_response(400)
                    self.end_headers()
                    return
                body = self.rfile.read(length)
                if self.path == "/v1/traces":
                    traces = ExportTraceServiceRequest.FromString(body)
                    found: list[Any] = [
                        span
                        for rs in traces.resource_spans
                        for ss in rs.scope_spans
                        for span in ss.spans
                    ]
                    with receiver._lock:
                        receiver.spans.extend(found)
                elif self.path == "/v1/metrics":
                    pushed = ExportMetricsServiceRequest.FromString(body)
                    found = [
                        m for rm in pushed.resource_metrics for sm in rm.scope_metrics
                        for m in sm.metrics
                    ]  # fmt: skip
                    with receiver._lock:
                        receiver.metrics.extend(found)
                else:
                    self.send_response(404)
                    self.end_headers()
                    return
                self.send_response(200)
                self.send_header("content-type", "application/x-protobuf")
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_port}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
