"""Audit records, traces and metrics from a running gateway (real Envoy, two workers sharing a
real Valkey, a real OTLP/HTTP receiver), and dry run through it."""

from __future__ import annotations

import json
import secrets
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from extproc.audit.chain import rotated_files
from extproc.demo.stack import listening_children
from extproc.testing.gateway import Gateway, make_stack, running
from extproc.testing.otlp_receiver import OtlpReceiver

IRIS = "/v2/models/iris/infer"
IRIS_BODY = {"inputs": [{"name": "input-0", "datatype": "FP32", "shape": [1, 4],
                         "data": [5.1, 3.5, 1.4, 0.2]}]}  # fmt: skip
CHAT = "/v1/chat/completions"


AUDIT_MAX_BYTES = 8192


def chains(gw: Gateway) -> list[list[Path]]:
    """Each worker's audit chain: its rotated files oldest first, then the active one."""
    active = sorted(gw.stack.run_dir.glob("audit.w[0-9].jsonl"))
    return [[*rotated_files(path), path] for path in active]


def verify_cli(*paths: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "extproc", "audit", "verify", *map(str, paths)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


@pytest.fixture(scope="module")
def otlp() -> Iterator[OtlpReceiver]:
    receiver = OtlpReceiver()
    try:
        yield receiver
    finally:
        receiver.close()


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory, otlp: OtlpReceiver) -> Iterator[Gateway]:
    env = {
        "EXTPROC_OTLP_ENDPOINT": otlp.url,
        "EXTPROC_OTLP_METRICS_SECONDS": "0.5",
        # Records are about 750 bytes: each worker's file rotates every dozen or so.
        "EXTPROC_AUDIT_MAX_BYTES": str(AUDIT_MAX_BYTES),
    }
    # INFO: a failed reload test then shows each worker's reloads in the server log's tail.
    stack = make_stack(
        tmp_path_factory.mktemp("observed"), workers=2, valkey_port=0, env=env, log_level="INFO"
    )
    with running(stack) as gateway:
        yield gateway


def test_every_decision_has_an_audit_record(gw: Gateway) -> None:
    iris = {"authorization": f"Bearer {gw.iris_key}"}
    chat = {"authorization": f"Bearer {gw.chat_key}", "content-type": "application/json"}
    responses = {
        "allow": gw.client.post(IRIS, json=IRIS_BODY, headers=iris),
        "unauthenticated": gw.client.post(IRIS, json=IRIS_BODY),
        "other_tenant": gw.client.post(
            IRIS, json=IRIS_BODY, headers={"authorization": f"Bearer {gw.other_tenant_key}"}
        ),
        "too_large": gw.client.post(CHAT, content=b"x" * 70_000, headers=chat),
    }
    statuses = {k: r.status_code for k, r in responses.items()}
    assert statuses == {"allow": 200, "unauthenticated": 401, "other_tenant": 403,
                        "too_large": 413}  # fmt: skip
    ids = {k: r.headers["x-gateway-decision-id"] for k, r in responses.items()}
    found = gw.await_audit(set(ids.values()))
    revision = gw.policy_revision().revision
    allow = found[ids["allow"]]
    assert allow["outcome"] == "allow" and allow["status"] == 200
    assert (allow["principal"], allow["tenant"], allow["model"]) == ("ivan", "demo", "iris")
    assert allow["version"] == "v1" and allow["policy_revision"] == revision
    assert {"route", "authenticate", "authorize"} <= set(allow["phases_us"])
    denied = found[ids["unauthenticated"]]
    assert denied["outcome"] == "deny" and denied["status"] == 401
    assert denied["denial"]["phase"] == "authenticate"
    assert found[ids["other_tenant"]]["denial"]["phase"] == "authorize"
    assert found[ids["too_large"]]["denial"]["phase"] == "inspect"
    raw = json.dumps(list(found.values()))
    assert gw.iris_key not in raw and gw.other_tenant_key not in raw


def test_a_cancelled_request_is_recorded(gw: Gateway) -> None:
    """The client goes away while its body is awaited: the record says cancelled."""
    marker = "/v1/chat/completions"
    sent = threading.Event()

    class Gone(Exception):
        pass

    def body() -> Iterator[bytes]:
        yield b'{"model": "demo-chat", "messages": ['
        sent.set()
        time.sleep(0.5)
        raise Gone

    before = {r["decision_id"] for r in gw.audit_records()}
    with (
        httpx.Client(base_url=gw.stack.gateway_url, verify=gw.tls, timeout=10) as client,
        pytest.raises(Gone),
    ):
        client.post(marker, content=body(), headers={
                "authorization": f"Bearer {gw.chat_key}", "content-type": "application/json",
            })  # fmt: skip
    assert sent.is_set()
    deadline = time.monotonic() + 15
    cancelled: list[dict[str, Any]] = []
    while time.monotonic() < deadline and not cancelled:
        cancelled = [
            r for r in gw.audit_records()
            if r["decision_id"] not in before and r.get("outcome") == "cancelled"
        ]  # fmt: skip
        time.sleep(0.1)
    assert len(cancelled) == 1, cancelled
    record = cancelled[0]
    assert record["request"]["path"] == marker and record["principal"] == "alice"
    # Authenticated; the model is named in the body, which never came.
    assert record["reached"] == "authenticate"


def test_the_chain_verifies_and_catches_a_deleted_and_an_edited_line(
    gw: Gateway, tmp_path: Path
) -> None:
    headers = {"authorization": f"Bearer {gw.iris_key}"}
    ids = {gw.client.post(IRIS, json=IRIS_BODY, headers=headers).headers["x-gateway-decision-id"]
           for _ in range(6)}  # fmt: skip
    gw.await_audit(ids)
    logs = [chain[0] for chain in chains(gw)]  # each worker's oldest file: it starts the chain
    assert len(logs) == 2
    for log in logs:
        done = verify_cli(log)
        assert done.returncode == 0, done.stderr
    longest = max(logs, key=lambda p: len(p.read_text().splitlines()))
    lines = [line for line in longest.read_text().splitlines() if line.endswith("}")]
    assert len(lines) >= 4
    deleted = tmp_path / "deleted.jsonl"
    deleted.write_text("\n".join(lines[:2] + lines[3:]) + "\n")
    done = verify_cli(deleted)
    assert done.returncode == 1 and "line 3: chain broken" in done.stderr
    edited = tmp_path / "edited.jsonl"
    changed = json.loads(lines[1])
    changed["outcome"] = "deny" if changed.get("outcome") == "allow" else "allow"
    edited.write_text("\n".join([lines[0], json.dumps(changed), *lines[2:]]) + "\n")
    done = verify_cli(edited)
    assert done.returncode == 1 and "line 3: chain broken" in done.stderr


def test_audit_files_rotate_and_each_workers_chain_verifies_across_them(gw: Gateway) -> None:
    headers = {"authorization": f"Bearer {gw.iris_key}"}
    # Bounded: enough answers for a worker to rotate twice (sequential requests share one
    # connection, so mostly one worker answers them).
    for _ in range(10):
        if max(len(chain) for chain in chains(gw)) >= 3:
            break
        answers = [gw.client.post(IRIS, json=IRIS_BODY, headers=headers) for _ in range(10)]
        gw.await_audit({r.headers["x-gateway-decision-id"] for r in answers})
    worker_chains = chains(gw)
    assert len(worker_chains) == 2 and max(len(chain) for chain in worker_chains) >= 3
    for chain in worker_chains:
        for rotated in chain[:-1]:
            size = rotated.stat().st_size
            assert AUDIT_MAX_BYTES <= size < AUDIT_MAX_BYTES + 4096, (rotated.name, size)
        done = verify_cli(*chain)
        assert done.returncode == 0, done.stderr
        assert done.stdout.count(": ok: ") == len(chain)
        # A rotated file taken out of the middle shows at the next file's first line.
        if len(chain) >= 3:
            done = verify_cli(chain[0], *chain[2:])
            assert done.returncode == 1 and "line 1: chain broken" in done.stderr


def test_the_trace_continues_the_incoming_traceparent(gw: Gateway, otlp: OtlpReceiver) -> None:
    trace_id, parent_id = secrets.token_hex(16), secrets.token_hex(8)
    headers = {
        "authorization": f"Bearer {gw.iris_key}",
        "traceparent": f"00-{trace_id}-{parent_id}-01",
    }
    response = gw.client.post(IRIS, json=IRIS_BODY, headers=headers)
    assert response.status_code == 200
    decision_id = response.headers["x-gateway-decision-id"]
    deadline = time.monotonic() + 20
    ours: list[Any] = []
    while time.monotonic() < deadline:
        ours = [s for s in list(otlp.spans) if s.trace_id.hex() == trace_id]
        if any(s.name == "extproc.decision" for s in ours) and len(ours) >= 4:
            break
        time.sleep(0.2)
    root = [s for s in ours if s.name == "extproc.decision"]
    assert len(root) == 1, [s.name for s in ours]
    assert root[0].parent_span_id.hex() == parent_id
    attributes = {a.key: a.value.string_value for a in root[0].attributes}
    assert attributes["extproc.decision_id"] == decision_id
    children = {s.name for s in ours if s.parent_span_id == root[0].span_id}
    assert {"extproc.route", "extproc.authenticate", "extproc.authorize"} <= children
    assert gw.await_audit({decision_id})[decision_id]["trace_id"] == trace_id


def scrape(gw: Gateway) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = httpx.get(gw.stack.metrics_url, timeout=5).text
    out: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            key = (sample.name, tuple(sorted(sample.labels.items())))
            out[key] = out.get(key, 0.0) + sample.value
    return out


def total(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str,
          **labels: str) -> float:  # fmt: skip
    return sum(
        v for (n, ls), v in samples.items()
        if n == name and all(dict(ls).get(k) == want for k, want in labels.items())
    )  # fmt: skip


def test_prometheus_metrics_scraped_under_traffic(gw: Gateway, otlp: OtlpReceiver) -> None:
    headers = {"authorization": f"Bearer {gw.iris_key}"}
    allows = {"name": "extproc_decisions_total", "outcome": "allow", "model": "iris"}
    before = scrape(gw)
    scrapes: list[int] = []
    stop = threading.Event()

    def scraper() -> None:
        while not stop.is_set() and len(scrapes) < 100:
            scrapes.append(len(scrape(gw)))
            time.sleep(0.05)

    def burst(_: int) -> list[int]:
        with httpx.Client(base_url=gw.stack.gateway_url, verify=gw.tls, timeout=10) as client:
            return [client.post(IRIS, json=IRIS_BODY, headers=headers).status_code
                    for _ in range(10)]  # fmt: skip

    watcher = threading.Thread(target=scraper)
    watcher.start()
    try:
        with ThreadPoolExecutor(max_workers=4) as pool:
            statuses = [s for batch in pool.map(burst, range(4)) for s in batch]
    finally:
        stop.set()
        watcher.join(10)
    assert statuses == [200] * 40
    assert scrapes and min(scrapes) > 0  # the endpoint answered all along
    name = allows.pop("name")
    after = scrape(gw)
    # The supervisor sums both workers: exactly the requests sent.
    assert total(after, name, **allows) - total(before, name, **allows) == 40
    hist = "extproc_decision_duration_seconds_count"
    assert (
        total(after, hist, transport="ext_proc") - total(before, hist, transport="ext_proc") >= 40
    )
    revision = gw.policy_revision().revision
    assert total(after, "extproc_policy_revision_info", revision=revision) == 2  # per worker
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not any(
        m.name == "extproc_decisions" for m in list(otlp.metrics)
    ):
        time.sleep(0.2)
    pushed = [m for m in list(otlp.metrics) if m.name == "extproc_decisions"]
    assert pushed and pushed[-1].sum.is_monotonic


def test_a_dry_run_rule_through_the_gateway(gw: Gateway) -> None:
    """A rule nobody passes, in dry run: requests still succeed; the record and a metric say
    what it would have denied; the reload shows in the revision metric."""
    policy = gw.stack.config.policy_dir / "iris.yaml"
    original = policy.read_text()
    old_revision = gw.policy_revision().revision
    reloads = "extproc_policy_reloads_total"
    applied_before = total(scrape(gw), reloads, result="applied")
    server = gw.stack.procs["decision-server"]
    workers = listening_children(server.popen.pid, gw.stack.decision_port)
    assert len(workers) == 2
    trial = "    - {name: only-nobody, principals: [nobody], dry_run: true}\n"
    assert "  rules:\n" in original
    policy.write_text(original.replace("  rules:\n", "  rules:\n" + trial, 1))
    try:
        # Each worker polls and compiles on its own (a second or two each, more on a busy
        # machine), and each admin call reaches either: wait until the metric, which the
        # supervisor sums over workers, shows both serving the new revision.
        deadline = time.monotonic() + 45
        new_revision, serving = old_revision, 0.0
        while time.monotonic() < deadline and serving < 2:
            time.sleep(0.2)
            answer = gw.policy_revision()
            if answer.revision != old_revision:
                assert answer.worker_pid in workers, (answer.worker_pid, workers)
                new_revision = answer.revision
                serving = total(scrape(gw), "extproc_policy_revision_info", revision=new_revision)
        if serving < 2:  # a worker did not reload: show what each one does
            server.dump_stacks(gw.stack.decision_port)
            time.sleep(2)  # each worker's loop answers at its next turn
            pytest.fail(f"{serving} of 2 workers reloaded in 45 s:\n{server.tail(400)}")
        response = gw.client.post(
            IRIS, json=IRIS_BODY, headers={"authorization": f"Bearer {gw.iris_key}"}
        )
        assert response.status_code == 200
        decision_id = response.headers["x-gateway-decision-id"]
        record = gw.await_audit({decision_id})[decision_id]
        assert record["dry_run"] == [
            {
                "phase": "authorize",
                "status": 403,
                "reason": "rule 'only-nobody' failed on principals",
            }
        ]
        samples = scrape(gw)
        assert total(samples, "extproc_dry_run_denials_total", model="iris") >= 1
        assert total(samples, "extproc_policy_revision_info", revision=new_revision) == 2
        assert total(samples, "extproc_policy_revision_info", revision=old_revision) == 0
        assert total(samples, reloads, result="applied") >= applied_before + 2
    finally:
        policy.write_text(original)
