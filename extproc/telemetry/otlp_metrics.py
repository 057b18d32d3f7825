"""Metrics pushed over OTLP/HTTP: the same prometheus-client registry the scrape endpoint
serves, converted to OTLP's data model (counters -> monotonic cumulative sums, gauges -> gauges,
histograms -> explicit-bucket histograms) and posted every interval by a background thread."""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass, field

import httpx
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.metrics.v1 import metrics_pb2 as otlp
from opentelemetry.proto.resource.v1.resource_pb2 import Resource
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample

log = logging.getLogger(__name__)

PUSH_TIMEOUT_SECONDS = 5.0


def _attributes(labels: dict[str, str]) -> list[KeyValue]:
    return [KeyValue(key=k, value=AnyValue(string_value=v)) for k, v in sorted(labels.items())]


@dataclass
class _Series:
    buckets: list[tuple[float, float]] = field(default_factory=list)  # (le, cumulative count)
    count: float = 0.0
    total: float = 0.0


def _histogram_points(
    samples: list[Sample], base: str, start_ns: int, now_ns: int
) -> list[otlp.HistogramDataPoint]:
    series: dict[tuple[tuple[str, str], ...], _Series] = {}
    for s in samples:
        labels = tuple(sorted((k, v) for k, v in s.labels.items() if k != "le"))
        point = series.setdefault(labels, _Series())
        if s.name == base + "_bucket":
            point.buckets.append((float(s.labels["le"]), s.value))
        elif s.name == base + "_count":
            point.count = s.value
        elif s.name == base + "_sum":
            point.total = s.value
    points = []
    for key, point in series.items():
        buckets = sorted(point.buckets)
        cumulative = [count for _, count in buckets]
        # OTLP counts per bucket; Prometheus counts everything up to each bound.
        counts = [int(c - p) for c, p in zip(cumulative, [0.0, *cumulative[:-1]], strict=True)]
        points.append(
            otlp.HistogramDataPoint(
                attributes=_attributes(dict(key)),
                start_time_unix_nano=start_ns,
                time_unix_nano=now_ns,
                count=int(point.count),
                sum=point.total,
                bucket_counts=counts,
                explicit_bounds=[le for le, _ in buckets if le != float("inf")],
            )
        )
    return points


def to_otlp(collector: Collector, start_ns: int, now_ns: int) -> ExportMetricsServiceRequest:
    metrics: list[otlp.Metric] = []
    for family in collector.collect():
        if family.type == "counter":
            points = [
                otlp.NumberDataPoint(
                    attributes=_attributes(s.labels),
                    start_time_unix_nano=start_ns,
                    time_unix_nano=now_ns,
                    as_double=s.value,
                )
                for s in family.samples
                if s.name.endswith("_total")
            ]
            metrics.append(otlp.Metric(name=family.name, description=family.documentation,
                sum=otlp.Sum(data_points=points, is_monotonic=True,
                    aggregation_temporality=otlp.AGGREGATION_TEMPORALITY_CUMULATIVE)))  # fmt: skip
        elif family.type == "gauge":
            points = [
                otlp.NumberDataPoint(
                    attributes=_attributes(s.labels), time_unix_nano=now_ns, as_double=s.value
                )
                for s in family.samples
            ]
            metrics.append(otlp.Metric(name=family.name, description=family.documentation,
                                       gauge=otlp.Gauge(data_points=points)))  # fmt: skip
        elif family.type == "histogram":
            points_h = _histogram_points(list(family.samples), family.name, start_ns, now_ns)
            metrics.append(otlp.Metric(name=family.name, description=family.documentation,
                unit="s" if family.name.endswith("_seconds") else "",
                histogram=otlp.Histogram(data_points=points_h,
                    aggregation_temporality=otlp.AGGREGATION_TEMPORALITY_CUMULATIVE)))  # fmt: skip
    return ExportMetricsServiceRequest(
        resource_metrics=[
            otlp.ResourceMetrics(
                resource=_resource(),
                scope_metrics=[otlp.ScopeMetrics(metrics=metrics)],
            )
        ]
    )


def _resource() -> Resource:
    return Resource(
        attributes=_attributes({"service.name": "extproc", "process.pid": str(os.getpid())})
    )


class OtlpMetricPusher:
    def __init__(self, endpoint: str, collector: Collector, interval_seconds: float = 10.0):
        self._url = f"{endpoint.rstrip('/')}/v1/metrics"
        self._collector = collector
        self._interval = interval_seconds
        self._start_ns = time.time_ns()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="otlp-metrics", daemon=True)
        self._thread.start()

    def push(self) -> bool:
        body = to_otlp(self._collector, self._start_ns, time.time_ns()).SerializeToString()
        try:
            response = httpx.post(
                self._url, content=body, timeout=PUSH_TIMEOUT_SECONDS,
                headers={"content-type": "application/x-protobuf"},
            )  # fmt: skip
        except httpx.HTTPError as exc:
            log.warning("OTLP metrics push to %s failed: %s", self._url, exc)
            return False
        if response.status_code >= 300:
            log.warning("OTLP metrics push to %s: HTTP %d", self._url, response.status_code)
            return False
        return True

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self.push()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(PUSH_TIMEOUT_SECONDS + 1)
        self.push()  # what changed since the last interval
