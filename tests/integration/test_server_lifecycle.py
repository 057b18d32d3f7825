"""The decision server's life around Envoy: down means refused, workers share load, drains."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import httpx
import pytest
from cryptography import x509
from grpc_health.v1 import health_pb2, health_pb2_grpc

from extproc._proto.extproc.admin.v1 import admin_pb2, admin_pb2_grpc
from extproc.demo.issuer import ensure_demo_issuer
from extproc.demo.stack import child_pids, free_port
from extproc.testing.gateway import REPO, Gateway, make_stack, running
from extproc.tls import renew_certs

IRIS = "/v2/models/iris/infer"
IRIS_BODY = {"inputs": [{"name": "input-0", "datatype": "FP32", "shape": [1, 4],
                         "data": [5.1, 3.5, 1.4, 0.2]}]}  # fmt: skip


@pytest.fixture(scope="module")
def two_workers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    # Several workers share their quota counters (the demo policies have quotas) in valkey.
    stack = make_stack(tmp_path_factory.mktemp("workers"), workers=2, valkey_port=0)
    with running(stack) as gw:
        yield gw


def _access_log(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_workers_on_one_port_share_the_load(two_workers: Gateway) -> None:
    gw = two_workers
    headers = {"authorization": f"Bearer {gw.iris_key}"}

    def burst(_: int) -> list[int]:
        with httpx.Client(base_url=gw.stack.gateway_url, verify=gw.tls, timeout=10) as client:
            return [client.post(IRIS, json=IRIS_BODY, headers=headers).status_code
                    for _ in range(8)]  # fmt: skip

    with ThreadPoolExecutor(max_workers=32) as pool:
        statuses = [s for batch in pool.map(burst, range(64)) for s in batch]
    assert statuses.count(200) == 512
    deadline = time.monotonic() + 5
    workers: set[object] = set()
    while time.monotonic() < deadline and len(workers) < 2:
        time.sleep(0.2)
        workers = {
            entry["decision"]["worker"]  # type: ignore[index]
            for entry in _access_log(gw.stack.access_log)
            if isinstance(entry.get("decision"), dict)
        }
    assert len(workers) == 2, workers


def test_decision_server_down_means_refused_never_forwarded(two_workers: Gateway) -> None:
    gw = two_workers
    gw.clear()
    headers = {"authorization": f"Bearer {gw.iris_key}"}
    assert gw.client.post(IRIS, json=IRIS_BODY, headers=headers).status_code == 200
    gw.clear()
    assert gw.stack.stop_decision_server() == 0  # clean exit on SIGTERM
    try:
        for client in (gw.client, gw.h2):
            for _ in range(5):
                r = client.post(IRIS, json=IRIS_BODY, headers=headers)
                assert r.status_code >= 500, r.text
        assert gw.received_total() == 0
    finally:
        gw.stack.start_decision_server()
    gw.await_status(IRIS, IRIS_BODY, headers, 200, within=15)  # recovers by itself


def test_shutdown_lets_in_flight_streams_finish(two_workers: Gateway) -> None:
    """SIGTERM while a chat request's ext_proc stream waits for the body: it still completes."""
    gw = two_workers
    gw.clear()
    body = json.dumps(
        {"model": "demo-chat", "messages": [{"role": "user", "content": "still here"}]}
    ).encode()
    body_started = threading.Event()

    def slow_body() -> Iterator[bytes]:
        yield body[:10]
        body_started.set()
        time.sleep(1.5)
        yield body[10:]

    result: dict[str, httpx.Response] = {}

    def send() -> None:
        with httpx.Client(base_url=gw.stack.gateway_url, verify=gw.tls, timeout=20) as client:
            result["r"] = client.post(
                "/v1/chat/completions",
                content=slow_body(),
                headers={"authorization": f"Bearer {gw.chat_key}",
                         "content-type": "application/json"},
            )  # fmt: skip

    sender = threading.Thread(target=send)
    sender.start()
    assert body_started.wait(10)
    time.sleep(0.3)  # the headers message has been answered; the stream is open
    server = gw.stack.procs["decision-server"]
    server.popen.send_signal(signal.SIGTERM)
    sender.join(20)
    try:
        assert result["r"].status_code == 200, result["r"].text
        assert result["r"].json()["choices"][0]["message"]["content"] == "still here"
        assert server.popen.wait(15) == 0
    finally:
        gw.stack.stop_decision_server()
        gw.stack.start_decision_server()


def _catches(pid: int, signum: int) -> bool:
    """Whether the process has its own handler for `signum` (Linux: SigCgt in /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) >> (signum - 1) & 1)
    return False


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc")
def test_sigterm_while_workers_start_is_a_clean_exit(two_workers: Gateway) -> None:
    """SIGTERM as soon as the supervisor handles it, while its workers are still importing:
    they must not die of the default action (the supervisor then exits 1); they start, see the
    stop, and exit 0."""
    stack = two_workers.stack
    stack.stop_decision_server()
    try:
        proc = stack._spawn("decision-server", stack.decision_server_argv(), stack.config.env)
        deadline = time.monotonic() + 20
        while not _catches(proc.popen.pid, signal.SIGTERM):
            assert proc.popen.poll() is None, proc.tail()
            assert time.monotonic() < deadline, "the supervisor never installed its handler"
            time.sleep(0.005)
        proc.popen.send_signal(signal.SIGTERM)
        assert proc.popen.wait(30) == 0, proc.tail()
    finally:
        stack.stop_decision_server()
        stack.start_decision_server()
    two_workers.await_status(
        IRIS, IRIS_BODY, {"authorization": f"Bearer {two_workers.iris_key}"}, 200, within=15
    )


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc")
def test_each_worker_dumps_its_stacks_on_request(two_workers: Gateway) -> None:
    """SIGUSR1 and SIGUSR2: every thread's and every asyncio task's stack to the log, from each
    worker; the workers serve on."""
    server = two_workers.stack.procs["decision-server"]
    log = ""
    # A worker restarted by an earlier test may listen before its watchers run: ask again.
    for _ in range(5):  # bounded well inside the test timeout
        start, log = server.log_path.stat().st_size, ""
        assert server.dump_stacks(two_workers.stack.decision_port) == 2
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and log.count("asyncio tasks ---") < 2:
            time.sleep(0.2)
            log = server.log_path.read_bytes()[start:].decode(errors="replace")
        if log.count("policy-watch: <coroutine object PolicyStore.watch") == 2:
            break
        time.sleep(1)
    assert log.count("asyncio tasks ---") == 2, log
    assert log.count("policy-watch: <coroutine object PolicyStore.watch") == 2, log
    assert log.count("Current thread 0x") == 2, log  # faulthandler, one per worker
    assert "exited with" not in log, log  # neither signal ends a worker
    two_workers.await_status(
        IRIS, IRIS_BODY, {"authorization": f"Bearer {two_workers.iris_key}"}, 200, within=15
    )


def _decision_server_serial(gw: Gateway) -> int:

    pki = gw.stack.pki
    assert pki is not None
    context = ssl.create_default_context(cafile=str(pki.ca_cert))
    context.load_cert_chain(str(pki.envoy_client_cert), str(pki.envoy_client_key))
    context.set_alpn_protocols(["h2"])
    with (
        socket.create_connection(("127.0.0.1", gw.stack.decision_port), timeout=5) as raw,
        context.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


def test_renewed_certificates_are_used_without_restart(two_workers: Gateway) -> None:
    gw = two_workers
    pid_before = gw.stack.procs["decision-server"].popen.pid
    before = _decision_server_serial(gw)
    assert gw.stack.pki is not None
    renew_certs(gw.stack.pki)
    deadline = time.monotonic() + 10
    serials = {before}
    # Two workers each reload on their next handshake: poll until both report the new serial.
    while time.monotonic() < deadline:
        seen = {_decision_server_serial(gw) for _ in range(8)}
        if before not in seen:
            serials |= seen
            break
        time.sleep(0.2)
    else:
        raise AssertionError("the decision server kept serving the old certificate")
    assert len(serials) == 2
    assert gw.stack.procs["decision-server"].popen.pid == pid_before  # no restart
    # Envoy's pooled connections keep working or reconnect with the new certificate.
    gw.await_status(IRIS, IRIS_BODY, {"authorization": f"Bearer {gw.iris_key}"}, 200)


def test_admin_api_and_health_over_mtls(two_workers: Gateway) -> None:
    gw = two_workers
    with gw.admin_channel() as channel:
        health = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="envoy.service.ext_proc.v3.ExternalProcessor"),
            timeout=5,
        )
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        admin = admin_pb2_grpc.AdminStub(channel)
        revision = admin.GetPolicyRevision(admin_pb2.GetPolicyRevisionRequest(), timeout=5)
        assert len(revision.revision) == 16
        assert {p.name for p in revision.policies} == {"demo-chat", "iris"}
        assert revision.worker_pid in _workers_of(gw.stack.procs["decision-server"].popen.pid)
        explained = admin.Explain(
            admin_pb2.ExplainRequest(
                method="POST",
                path="/v2/models/iris/infer",
                headers={"authorization": f"Bearer {gw.chat_key}"},
            ),
            timeout=5,
        )
        assert (explained.allowed, explained.status, explained.code) == (False, 403, "forbidden")
        assert [(p.phase, p.verdict) for p in explained.phases] == [
            ("route", "pass"), ("authenticate", "pass"), ("authorize", "deny")
        ]  # fmt: skip
        assert "classifier callers" in explained.phases[-1].reason
        allowed = admin.Explain(
            admin_pb2.ExplainRequest(
                method="POST",
                path="/v1/chat/completions",
                headers={"authorization": f"Bearer {gw.beta_key}", "x-model-version": "v2"},
                body=b'{"model": "demo-chat-latest", '
                b'"messages": [{"role": "user", "content": "hi"}]}',
            ),
            timeout=5,
        )
        assert allowed.allowed and (allowed.model, allowed.version, allowed.cluster) == (
            "demo-chat", "v2", "demo-chat-v2"
        )  # fmt: skip
    # Without a client certificate the server refuses the connection.
    with gw.admin_channel(client_cert=False) as anonymous:
        with pytest.raises(grpc.RpcError) as info:
            admin_pb2_grpc.AdminStub(anonymous).GetPolicyRevision(
                admin_pb2.GetPolicyRevisionRequest(), timeout=5
            )
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE


def _workers_of(pid: int) -> list[int]:
    """Worker processes of a supervisor (multiprocessing may add a resource tracker too)."""
    found = []
    for child in child_pids(pid):
        cmdline = Path(f"/proc/{child}/cmdline").read_bytes()
        if b"spawn_main" in cmdline and b"resource_tracker" not in cmdline:
            found.append(child)
    return found


def test_killed_supervisor_leaves_no_worker(tmp_path: Path) -> None:
    """SIGKILL cannot be forwarded: workers must still go, or they keep serving stale policy."""
    shutil.copytree(REPO / "policies", tmp_path / "policies")
    ensure_demo_issuer(tmp_path / ".run" / "demo")
    port = free_port()
    supervisor = subprocess.Popen(
        [sys.executable, "-m", "extproc", "serve", "--insecure", "--workers", "2",
         "--listen", f"127.0.0.1:{port}", "--policies", str(tmp_path / "policies"),
         "--api-keys", str(tmp_path / "keys.json"),
         # Workers need a shared quota store; none runs here, which the server tolerates.
         "--quota-store", "valkey://127.0.0.1:1/0"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 20
        workers: list[int] = []
        while time.monotonic() < deadline and len(workers) < 2:
            time.sleep(0.2)
            workers = _workers_of(supervisor.pid)
        assert len(workers) == 2
        supervisor.kill()
        supervisor.wait(10)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(Path(f"/proc/{w}").exists() for w in workers):
            time.sleep(0.1)
        alive = [w for w in workers if Path(f"/proc/{w}").exists()]
        for w in alive:
            os.kill(w, signal.SIGKILL)
        assert alive == []
    finally:
        if supervisor.poll() is None:
            supervisor.kill()
            supervisor.wait(10)


def test_sighup_reloads_policies_in_every_worker(tmp_path: Path) -> None:
    """A changed rule applies after SIGHUP; a broken file leaves the last good set serving."""
    stack = make_stack(tmp_path, workers=2, valkey_port=0)
    gw = Gateway(stack)
    try:
        with stack:
            headers = {"authorization": f"Bearer {gw.chat_key}"}  # alice: role chat only
            assert gw.client.post(IRIS, json=IRIS_BODY, headers=headers).status_code == 403
            iris = stack.config.policy_dir / "iris.yaml"
            original = iris.read_text()
            iris.write_text(original.replace("roles_any: [classify, admin]", "roles_any: [chat]"))
            supervisor = stack.procs["decision-server"].popen
            supervisor.send_signal(signal.SIGHUP)
            _expect_all(gw, headers, 200)
            iris.write_text("model: [broken\n")
            supervisor.send_signal(signal.SIGHUP)
            time.sleep(1.0)
            _expect_all(gw, headers, 200)  # still the last good set
            assert supervisor.poll() is None
            log = (stack.run_dir / "logs" / "decision-server.log").read_text()
            assert "policy reload rejected" in log and "iris.yaml" in log
    finally:
        gw.close()


def _expect_all(gw: Gateway, headers: dict[str, str], status: int) -> None:
    """Every worker answers `status`: 16 concurrent clients make Envoy use several gRPC
    connections (4 streams each), so both workers are asked; retried for up to 10 s."""

    def four(_: int) -> list[int]:
        with httpx.Client(base_url=gw.stack.gateway_url, verify=gw.tls, timeout=10) as c:
            return [c.post(IRIS, json=IRIS_BODY, headers=headers).status_code for _ in range(4)]

    deadline = time.monotonic() + 10
    statuses: set[int] = set()
    while time.monotonic() < deadline:
        with ThreadPoolExecutor(max_workers=16) as pool:
            statuses = {s for batch in pool.map(four, range(16)) for s in batch}
        if statuses == {status}:
            return
        time.sleep(0.2)
    raise AssertionError(f"expected only {status}, saw {statuses}")
