"""Where metrics leave the process: the Prometheus scrape endpoint and the OTLP push.

One process owns them: the only worker, or with several workers the supervisor, which reads
what every worker wrote to the shared multiprocess directory (see metrics.py)."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from typing import TYPE_CHECKING
from wsgiref.simple_server import WSGIServer

from prometheus_client import REGISTRY, CollectorRegistry, start_http_server
from prometheus_client import multiprocess as prom_multiprocess

from extproc.settings import Settings
from extproc.telemetry import otel_protos

if TYPE_CHECKING:
    from extproc.telemetry.otlp_metrics import OtlpMetricPusher

log = logging.getLogger(__name__)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


def metrics_wanted(settings: Settings) -> bool:
    return bool(settings.metrics_listen or settings.otlp_endpoint)


class MetricsExport:
    def __init__(self, settings: Settings, registry: CollectorRegistry = REGISTRY) -> None:
        self._server: WSGIServer | None = None
        self._pusher: OtlpMetricPusher | None = None
        self.port = 0
        if settings.metrics_listen:
            host, _, port = settings.metrics_listen.rpartition(":")
            self._server, _thread = start_http_server(int(port), host, registry)
            self.port = self._server.server_port
            log.info("metrics on http://%s:%d/metrics", host, self.port)
        if settings.otlp_endpoint:
            otel_protos.require_intact()
            from extproc.telemetry.otlp_metrics import OtlpMetricPusher

            self._pusher = OtlpMetricPusher(
                settings.otlp_endpoint, registry, settings.otlp_metrics_seconds
            )

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._pusher is not None:
            self._pusher.close()


class SharedMetrics:
    """The supervisor's side of multiprocess metrics: the directory the workers write to (set
    in the environment they inherit) and the export that reads it."""

    def __init__(self, settings: Settings) -> None:
        self.directory = tempfile.mkdtemp(prefix="extproc-metrics-")
        os.environ[MULTIPROC_ENV] = self.directory
        registry = CollectorRegistry()
        prom_multiprocess.MultiProcessCollector(registry, path=self.directory)  # type: ignore[no-untyped-call]
        self.export = MetricsExport(settings, registry)

    def worker_gone(self, pid: int) -> None:
        prom_multiprocess.mark_process_dead(pid, self.directory)  # type: ignore[no-untyped-call]

    def close(self) -> None:
        self.export.close()
        os.environ.pop(MULTIPROC_ENV, None)
        shutil.rmtree(self.directory, ignore_errors=True)
