"""The server's metrics, on prometheus-client (about 2 us per update here, against 10 us for
the OpenTelemetry SDK's instruments: DESIGN.md's budget is ~150 us per decision).

Several workers share one scrape endpoint through prometheus-client's multiprocess mode: the
supervisor sets PROMETHEUS_MULTIPROC_DIR before the workers start (and before this module is
imported in them), each worker writes its values to files there, and the supervisor serves the
sum. Per-decision metrics are recorded only when metrics are on (Observer); the rare ones
(reloads, store errors) always, which costs nothing measurable.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

# Server time per decision, from the first message to the verdict: most are well under 1 ms.
DURATION_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
)  # fmt: skip

DECISIONS = Counter(
    "extproc_decisions",
    "Decisions by outcome (allow, deny, error, cancelled), model, denying phase and reason code.",
    ["outcome", "model", "phase", "reason", "transport"],
)
DECISION_SECONDS = Histogram(
    "extproc_decision_duration_seconds",
    "Time the decision server spent deciding a request (all phases, without waits for Envoy).",
    ["transport", "outcome"],
    buckets=DURATION_BUCKETS,
)
DRY_RUN_DENIALS = Counter(
    "extproc_dry_run_denials",
    "What dry-run policies and rules would have denied, by model and phase.",
    ["model", "phase"],
)
QUOTA_USED = Counter(
    "extproc_quota_used",
    "Quota taken by admitted requests (requests, cost units, concurrency slots), by rule.",
    ["model", "rule", "kind"],
)
REDACTIONS = Counter(
    "extproc_redactions",
    "Values masked, by direction (request, response) and type.",
    ["direction", "type"],
)
DETECTOR_HITS = Counter(
    "extproc_detector_hits",
    "Inspection findings: injection (flagged or blocked) and PII types found in requests.",
    ["model", "detector"],
)
STORE_ERRORS = Counter(
    "extproc_store_errors",
    "Quota store calls that failed (the policy's on_store_failure then applied).",
    ["store"],
)
POLICY_RELOADS = Counter(
    "extproc_policy_reloads",
    "Policy reloads by result: applied, or rejected (the last good set kept serving).",
    ["result"],
)
POLICY_REVISION = Gauge(
    "extproc_policy_revision_info",
    "1 for the policy revision each worker serves (0 for one it served before).",
    ["revision"],
    multiprocess_mode="liveall",
)
UPSTREAM_ERRORS = Counter(
    "extproc_upstream_errors",
    "Upstream 5xx answers by model and status, and whether their body was sanitised.",
    ["model", "status", "sanitised"],
)
AUDIT_DROPPED = Counter(
    "extproc_audit_records_dropped",
    "Audit records dropped because the writer fell behind (the log records each gap).",
)


def policy_revision(new: str, old: str | None = None) -> None:
    if old is not None and old != new:
        POLICY_REVISION.labels(old).set(0)
    POLICY_REVISION.labels(new).set(1)
