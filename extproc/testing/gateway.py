"""A running gateway for tests: the stack plus clients, demo credentials and pod records."""

from __future__ import annotations

import shutil
import ssl
import time
from pathlib import Path
from typing import Any

import httpx

from extproc.demo.stack import Stack, StackConfig

REPO = Path(__file__).resolve().parents[2]


def make_stack(root: Path, **config: Any) -> Stack:
    """The shipped demo policies, copied so their `../.run/demo` paths resolve under `root`."""
    shutil.copytree(REPO / "policies", root / "policies")
    return Stack(StackConfig(run_dir=root / ".run", policy_dir=root / "policies", **config))


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

    def clear(self) -> None:
        for pod in self.stack.pod_ports:
            self.pods.delete(f"{self.stack.pod_url(pod)}/_demo/received")

    def close(self) -> None:
        for client in (self.client, self.h2, self.pods):
            client.close()
