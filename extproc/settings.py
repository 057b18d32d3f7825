"""Process settings: environment variables (EXTPROC_*), overridden by command-line flags."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from extproc.audit.chain import rotation_problem

QUOTA_STORE_SCHEMES = frozenset(
    f"{base}{suffix}"
    for base in ("redis", "rediss", "valkey", "valkeys")
    for suffix in ("", "+cluster")
) | {"unix"}


@dataclass(frozen=True, slots=True)
class Settings:
    listen: str = "127.0.0.1:9001"
    policy_dir: Path = Path("policies")
    api_keys_file: Path = Path(".run/api-keys.json")
    workers: int = 1
    # mTLS towards Envoy: all three, or `insecure` set explicitly (benchmarks, local debugging).
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None
    insecure: bool = False
    grace_seconds: float = 10.0
    log_level: str = "INFO"
    # Where quota counters live: "memory" (in this process: one replica, one worker) or a
    # Redis/Valkey URL shared by replicas: valkey:// or redis:// (valkeys://, rediss:// with
    # TLS), valkey+cluster:// or redis+cluster:// for a Cluster, unix:// for a local socket.
    quota_store: str = "memory"
    # Budget for one quota decision against the store; past it the policy's failure mode applies.
    quota_timeout_ms: int = 250
    # How often the policy directory is checked for changes (0: only on SIGHUP).
    policy_watch_seconds: float = 1.0
    # Where decision records go (JSON lines, hash-chained); empty: none are written. With
    # several workers each writes its own chain: audit.jsonl -> audit.w0.jsonl, audit.w1.jsonl.
    audit_log: Path | None = None
    # A secret for the chain (HMAC-SHA256 instead of SHA-256), from a file: then an edited log
    # cannot be re-chained by whoever can write it, only by whoever holds the key.
    audit_key_file: Path | None = None
    # Rotate each audit file when it reaches this many bytes (0: never). Rotated files keep
    # the chain going (extproc audit verify takes them oldest first) and are not deleted.
    audit_max_bytes: int = 0
    # Prometheus scrape endpoint (HTTP GET /metrics) as HOST:PORT; empty: off.
    metrics_listen: str = ""
    # OTLP/HTTP collector base URL (e.g. http://127.0.0.1:4318) for traces and metrics; empty:
    # off. Traces continue the traceparent Envoy sends.
    otlp_endpoint: str = ""
    # Of requests without a parent trace, the share traced; a parent's sampling decision is
    # followed either way. A traced decision costs about 150 us of CPU (six spans, exported):
    # tracing every request would cost more than the decision itself.
    trace_sample_ratio: float = 0.05
    # How often metrics are pushed over OTLP.
    otlp_metrics_seconds: float = 10.0

    def validate(self) -> list[str]:
        problems = []
        tls = (self.tls_cert, self.tls_key, self.tls_client_ca)
        if any(tls) and not all(tls):
            problems.append("tls_cert, tls_key and tls_client_ca go together")
        if not any(tls) and not self.insecure:
            problems.append(
                "no TLS configured: set EXTPROC_TLS_CERT, EXTPROC_TLS_KEY and "
                "EXTPROC_TLS_CLIENT_CA (mTLS with Envoy), or EXTPROC_INSECURE=1 explicitly"
            )
        if all(tls) and self.insecure:
            problems.append("insecure cannot be combined with TLS settings")
        for path in tls:
            if path is not None and not path.is_file():
                problems.append(f"{path}: not a file")
        if not 1 <= self.workers <= 64:
            problems.append("workers must be between 1 and 64")
        host, _, port = self.listen.rpartition(":")
        if not host or not port.isdigit():
            problems.append(f"listen must be HOST:PORT, got {self.listen!r}")
        elif self.workers > 1 and int(port) == 0:
            problems.append("several workers share one port: give a fixed port, not 0")
        scheme = self.quota_store.partition("://")[0]
        if self.quota_store != "memory" and scheme not in QUOTA_STORE_SCHEMES:
            problems.append(
                "quota_store must be memory or a valkey://, redis://, valkey+cluster://, "
                "redis+cluster:// (valkeys, rediss for TLS) or unix:// URL"
            )
        if self.quota_store == "memory" and self.workers > 1:
            problems.append(
                "the memory quota store counts per process: with several workers, share a "
                "Redis/Valkey store (EXTPROC_QUOTA_STORE=redis://...)"
            )
        if not 5 <= self.quota_timeout_ms <= 5000:
            problems.append("quota_timeout_ms must be between 5 and 5000")
        if self.grace_seconds < 0:
            problems.append("grace_seconds must be >= 0")
        if not 0 <= self.policy_watch_seconds <= 3600:
            problems.append("policy_watch_seconds must be between 0 (off) and 3600")
        if self.metrics_listen:
            host, _, port = self.metrics_listen.rpartition(":")
            if not host or not port.isdigit():
                problems.append(f"metrics_listen must be HOST:PORT, got {self.metrics_listen!r}")
            elif self.workers > 1 and int(port) == 0:
                problems.append("with several workers, give metrics_listen a fixed port")
        if self.otlp_endpoint and not self.otlp_endpoint.startswith(("http://", "https://")):
            problems.append("otlp_endpoint must be an http:// or https:// URL")
        if not 0.1 <= self.otlp_metrics_seconds <= 3600:
            problems.append("otlp_metrics_seconds must be between 0.1 and 3600")
        if not 0.0 <= self.trace_sample_ratio <= 1.0:
            problems.append("trace_sample_ratio must be between 0 and 1")
        if self.audit_key_file is not None and not self.audit_key_file.is_file():
            problems.append(f"{self.audit_key_file}: not a file")
        if self.audit_key_file is not None and self.audit_log is None:
            problems.append("audit_key_file needs audit_log")
        if self.audit_max_bytes and self.audit_log is None:
            problems.append("audit_max_bytes needs audit_log")
        if (rotation := rotation_problem(self.audit_max_bytes)) is not None:
            problems.append(rotation)
        return problems

    @property
    def port(self) -> int:
        return int(self.listen.rpartition(":")[2])


def _convert(kind: Any, raw: str) -> Any:
    text = str(kind)
    if "bool" in text:
        return raw.strip().lower() in ("1", "true", "yes", "on")
    if "int" in text:
        return int(raw)
    if "float" in text:
        return float(raw)
    if "Path" in text:
        return Path(raw) if raw else None
    return raw


def from_env(environ: Mapping[str, str] = os.environ, **overrides: Any) -> Settings:
    """Settings from EXTPROC_<FIELD> variables, then non-None keyword overrides."""
    values: dict[str, Any] = {}
    for f in fields(Settings):
        raw = environ.get(f"EXTPROC_{f.name.upper()}")
        if raw is not None:
            try:
                values[f.name] = _convert(f.type, raw)
            except ValueError:
                raise ValueError(f"EXTPROC_{f.name.upper()}: cannot parse {raw!r}") from None
    values.update({k: v for k, v in overrides.items() if v is not None})
    return replace(Settings(), **values)
