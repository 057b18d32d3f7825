"""docker-compose.yml describes exactly what `make run` starts: same commands, ports, files."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import yaml

from extproc.demo.run import demo_config
from extproc.demo.stack import PODS, Stack

REPO = Path(__file__).resolve().parents[2]
APP = Path("/app")  # the compose services' working directory


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    return doc["services"]


@pytest.fixture(scope="module")
def stack() -> Stack:
    cwd = os.getcwd()
    os.chdir(REPO)  # demo_config uses paths relative to the repository, as compose does
    try:
        return Stack(demo_config(Path()))
    finally:
        os.chdir(cwd)


def _python(argv: list[str]) -> list[str]:
    return ["python", *argv[1:]]


def test_every_service_uses_the_host_network_and_app_dir(compose: dict[str, Any]) -> None:
    for name, service in compose.items():
        assert service["network_mode"] == "host", name
    for name in ("prepare", "decision-server", "chat-v1", "chat-v2", "oip-v1"):
        assert compose[name]["working_dir"] == str(APP)
        assert "./policies:/app/policies:ro" in compose[name]["volumes"]


def test_pods_match(compose: dict[str, Any], stack: Stack) -> None:
    for kind, model, version in PODS:
        service = compose[f"{kind}-{version}"]
        assert service["command"] == _python(stack.pod_argv(kind, model, version))


def test_decision_server_matches(compose: dict[str, Any], stack: Stack) -> None:
    assert compose["decision-server"]["command"] == _python(stack.decision_server_argv())
    assert stack.config.workers == 2


def test_envoy_matches(compose: dict[str, Any], stack: Stack) -> None:
    argv = stack.envoy_argv()
    command = compose["envoy"]["command"]
    config_index = argv.index("-c") + 1
    expected = [
        "envoy",
        *argv[1:config_index],
        str(APP / stack.envoy_config),
        *argv[config_index + 1 :],
    ]
    assert command == expected
    assert compose["envoy"]["image"].startswith("envoyproxy/envoy:v1.40")


def test_prepare_writes_what_the_others_read(compose: dict[str, Any], stack: Stack) -> None:
    assert compose["prepare"]["command"] == ["python", "-m", "extproc.demo.run", "--prepare-only"]
    for name in ("decision-server", "envoy"):
        assert compose[name]["depends_on"]["prepare"]["condition"] == (
            "service_completed_successfully"
        )
    assert "run:/app/.run" in compose["decision-server"]["volumes"]
    assert "run:/app/.run:ro" in compose["envoy"]["volumes"]


def test_ports_are_the_make_run_ports(stack: Stack) -> None:
    assert stack.listen_port == 8443
    assert stack.admin_port == 9901
    assert stack.decision_port == 9001
    assert stack.pod_ports == {"chat-v1": 18001, "chat-v2": 18002, "oip-v1": 18003}


def test_valkey_is_loopback_only(compose: dict[str, Any]) -> None:
    command = compose["valkey"]["command"]
    assert command[command.index("--bind") + 1] == "127.0.0.1"


def test_valkey_matches_and_is_the_quota_store(compose: dict[str, Any], stack: Stack) -> None:
    assert compose["valkey"]["command"] == stack.valkey_argv()
    assert stack.quota_store == "redis://127.0.0.1:6379/0"
    assert "valkey" in compose["decision-server"]["depends_on"]
