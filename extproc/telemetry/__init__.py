"""Telemetry: Prometheus metrics (scraped on a metrics port, pushed over OTLP) and OpenTelemetry
traces that continue Envoy's trace context. Off unless configured; see observe.py."""
