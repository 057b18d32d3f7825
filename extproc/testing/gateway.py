"""A running gateway for tests: the stack plus clients, demo credentials and pod records."""

from __future__ import annotations

import contextlib
import json
import shutil
import ssl
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import grpc
import httpx

from extproc._proto.extproc.admin.v1 import admin_pb2, admin_pb2_grpc
from extproc.demo.stack import Stack, StackConfig
from extproc.envoy_routes import VersionUpstream

REPO = Path(__file__).resolve().parents[2]


class PolicyStack(Stack):
    """A stack whose Envoy routes come from its policies' versions (or the upstreams given)."""

    def __init__(
        self, config: StackConfig, upstreams: Sequence[VersionUpstream] | None = None
    ) -> None:
        super().__init__(config)
        self.upstreams = None if upstreams is None else tuple(upstreams)

    def model_upstreams(self) -> tuple[VersionUpstream, ...]:
        return super().model_upstreams() if self.upstreams is None else self.upstreams


def make_stack(
    root: Path, *, upstreams: Sequence[VersionUpstream] | None = None, **config: Any
) -> PolicyStack:
    """The shipped demo policies, copied so their `../.run/demo` paths resolve under `root`.

    Envoy's routes and fallback clusters are generated from `upstreams`, by default from the
    versions of the policies in `root / "policies"` (extproc.envoyconf.policy_upstreams)."""
    shutil.copytree(REPO / "policies", root / "policies")
    stack_config = StackConfig(run_dir=root / ".run", policy_dir=root / "policies", **config)
    return PolicyStack(stack_config, upstreams)


class Gateway:
    """A stack plus what tests need from it: clients, credentials, the pods' records."""

    def __init__(self, stack: Stack) -> None:
        self.stack = stack
        stack.prepare()  # keys and issuer exist before the server starts
        self.chat_key = stack.create_api_key("alice", "demo", ["chat"])
        self.beta_key = stack.create_api_key("bea", "demo", ["chat", "beta"])
        self.iris_key = stack.create_api_key("ivan", "demo", ["classify"])
        self.other_tenant_key = stack.create_api_key("mallory", "evil", ["chat", "classify"])
        self.tls = ssl.create_default_context(cafile=str(stack.ca_cert))
        self.client = httpx.Client(base_url=stack.gateway_url, verify=self.tls, timeout=10)
        self.h2 = httpx.Client(base_url=stack.gateway_url, verify=self.tls, timeout=10, http2=True)
        self.pods = httpx.Client(timeout=5)

    def admin_channel(self, client_cert: bool = True) -> grpc.Channel:
        """A channel to the decision server as Envoy has it: with Envoy's client certificate."""
        pki = self.stack.pki
        assert pki is not None
        creds = grpc.ssl_channel_credentials(
            root_certificates=pki.ca_cert.read_bytes(),
            private_key=pki.envoy_client_key.read_bytes() if client_cert else None,
            certificate_chain=pki.envoy_client_cert.read_bytes() if client_cert else None,
        )
        return grpc.secure_channel(
            f"127.0.0.1:{self.stack.decision_port}",
            creds,
            options=[("grpc.ssl_target_name_override", "localhost")],
        )

    def audit_records(self) -> list[dict[str, Any]]:
        """Every complete audit record so far, from every worker's chain."""
        out = []
        for path in sorted(self.stack.run_dir.glob("audit*.jsonl")):
            for line in path.read_text().splitlines():
                if line.endswith("}"):  # a line being written right now is left for next time
                    out.append(json.loads(line))
        return out

    def await_audit(
        self, decision_ids: set[str], event: str | None = None, within: float = 15
    ) -> dict[str, dict[str, Any]]:
        """The record of each decision (its `event` record, if given), once written."""
        deadline = time.monotonic() + within
        found: dict[str, dict[str, Any]] = {}
        while time.monotonic() < deadline:
            found = {
                r["decision_id"]: r
                for r in self.audit_records()
                if r.get("decision_id") in decision_ids and event in (None, r.get("event"))
            }
            if set(found) == decision_ids:
                return found
            time.sleep(0.1)
        missing = sorted(decision_ids - set(found))
        raise AssertionError(f"no {event or 'audit'} record for {missing}")

    def policy_revision(self) -> admin_pb2.GetPolicyRevisionResponse:
        """The decision server's active policy revision (admin API)."""
        with self.admin_channel() as channel:
            stub = admin_pb2_grpc.AdminStub(channel)
            response: admin_pb2.GetPolicyRevisionResponse = stub.GetPolicyRevision(
                admin_pb2.GetPolicyRevisionRequest(), timeout=5
            )
            return response

    def jwt(self, **claims: Any) -> str:
        assert self.stack.issuer is not None
        base: dict[str, Any] = {"sub": "bob", "tenant": "demo", "roles": ["chat"]}
        base.update(claims)
        return self.stack.issuer.mint(base)

    def await_status(
        self, path: str, body: Any, headers: dict[str, str], status: int, within: float = 10.0
    ) -> None:
        """Repeat the POST until it answers `status` (keys reload, servers restart, certs
        rotate); fail after `within` seconds with the last status seen."""
        deadline = time.monotonic() + within
        last = None
        while time.monotonic() < deadline:
            last = self.client.post(path, json=body, headers=headers).status_code
            if last == status:
                return
            time.sleep(0.2)
        raise AssertionError(f"{path} still answered {last}, not {status}, after {within} s")

    def received(self, pod: str) -> list[dict[str, Any]]:
        records: list[dict[str, Any]] = self.pods.get(
            f"{self.stack.pod_url(pod)}/_demo/received"
        ).json()
        return records

    def received_total(self) -> int:
        return sum(len(self.received(pod)) for pod in self.stack.pod_ports)

    def stop_pod(self, pod: str) -> None:
        """Stop a demo pod ("chat-v2"): its port is closed until start_pod."""
        self.stack.procs.pop(f"pod-{pod}").stop()

    def start_pod(self, pod: str) -> None:
        kind, version = pod.split("-", 1)
        model = {"chat": "demo-chat", "oip": "iris"}[kind]
        self.stack._spawn(f"pod-{pod}", self.stack.pod_argv(kind, model, version))
        self.stack._wait_port(self.stack.pod_ports[pod], f"pod-{pod}")

    def clear(self) -> None:
        for pod in self.stack.pod_ports:
            self.pods.delete(f"{self.stack.pod_url(pod)}/_demo/received")

    def close(self) -> None:
        for client in (self.client, self.h2, self.pods):
            client.close()


@contextlib.contextmanager
def running(stack: Stack) -> Iterator[Gateway]:
    """The stack started with a Gateway on it; stopped and closed however the block ends."""
    gw = Gateway(stack)
    try:
        with stack:
            yield gw
    finally:
        gw.close()
