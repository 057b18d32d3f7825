"""The `extproc` command as a user runs it: clear errors, never a traceback."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from extproc.demo.issuer import ensure_demo_issuer

REPO = Path(__file__).resolve().parents[2]


def run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EXTPROC_")}
    return subprocess.run(
        [sys.executable, "-m", "extproc", *args],
        capture_output=True, text=True, timeout=60, cwd=cwd, env=env,
    )  # fmt: skip


@pytest.fixture
def demo_policies(tmp_path: Path) -> Path:
    shutil.copytree(REPO / "policies", tmp_path / "policies")
    ensure_demo_issuer(tmp_path / ".run" / "demo")
    return tmp_path / "policies"


def test_policy_check_accepts_the_shipped_demo_policies(demo_policies: Path) -> None:
    result = run("policy", "check", str(demo_policies))
    assert result.returncode == 0, result.stderr
    assert "demo-chat.yaml: ok (demo-chat, versions v1, v2)" in result.stdout
    assert "iris.yaml: ok (iris, versions v1)" in result.stdout
    assert "revision " in result.stdout


def test_serve_refuses_an_invalid_policy_naming_file_and_field(demo_policies: Path) -> None:
    bad = demo_policies / "iris.yaml"
    bad.write_text(bad.read_text().replace("roles_any: [classify, admin]", "role_any: [x]"))
    result = run("serve", "--insecure", "--listen", "127.0.0.1:0", "--policies", str(demo_policies))
    assert result.returncode == 2
    assert f"{bad}: authorization.rules[1].role_any: Extra inputs are not permitted" in (
        result.stderr
    )
    assert "Traceback" not in result.stderr


def test_serve_refuses_to_run_without_tls_unless_told(demo_policies: Path) -> None:
    result = run("serve", "--listen", "127.0.0.1:0", "--policies", str(demo_policies))
    assert result.returncode == 2
    assert "no TLS configured" in result.stderr
    result = run("serve", "--insecure", "--workers", "2", "--listen", "127.0.0.1:0",
                 "--policies", str(demo_policies))  # fmt: skip
    assert result.returncode == 2 and "give a fixed port" in result.stderr


def test_bad_setting_from_environment(demo_policies: Path) -> None:
    env = {**os.environ, "EXTPROC_WORKERS": "many"}
    result = subprocess.run(
        [sys.executable, "-m", "extproc", "serve", "--insecure", "--policies", str(demo_policies)],
        capture_output=True, text=True, timeout=60, env=env,
    )  # fmt: skip
    assert result.returncode == 2
    assert "EXTPROC_WORKERS: cannot parse 'many'" in result.stderr


@pytest.mark.parametrize(
    ("overrides", "problem"),
    [
        ({"workers": 2}, "the memory quota store counts per process"),
        ({"quota_store": "http://cache:6379"}, "quota_store must be memory or a valkey://"),
        ({"quota_timeout_ms": 1}, "quota_timeout_ms must be between 5 and 5000"),
    ],
)
def test_quota_store_settings_are_checked(overrides: dict[str, object], problem: str) -> None:
    from extproc.settings import from_env

    settings = from_env({"EXTPROC_INSECURE": "1"}, **overrides)
    assert any(problem in p for p in settings.validate()), settings.validate()


@pytest.mark.parametrize(
    "url", ["valkey://h:6379/0", "rediss://h:6380", "valkey+cluster://h:7000", "unix:///s"]
)
def test_shared_quota_stores_allow_several_workers(url: str) -> None:
    from extproc.settings import from_env

    settings = from_env({"EXTPROC_INSECURE": "1"}, quota_store=url, workers=2)
    assert settings.validate() == []


def test_policy_check_compares_a_rendered_envoy_config_with_the_policies(
    demo_policies: Path, tmp_path: Path
) -> None:
    from extproc.envoyconf import EnvoyValues, policy_upstreams, render

    values = EnvoyValues(
        listen_address="127.0.0.1", listen_port=1, admin_port=2, decision_host="127.0.0.1",
        decision_port=3, sds_dir=tmp_path, access_log_path=tmp_path / "access.log",
        chat_v1_port=4, chat_v2_port=5, oip_v1_port=6,
        upstreams=policy_upstreams(demo_policies),
    )  # fmt: skip
    config = tmp_path / "envoy.yaml"
    config.write_text(render("ext_proc", values))
    result = run("policy", "check", str(demo_policies), "--envoy-config", str(config))
    assert result.returncode == 0, result.stderr
    assert "routes and clusters fit the policies" in result.stdout
    # A policy change Envoy was not re-rendered for: v2 loses its timeout agreement.
    chat = demo_policies / "demo-chat.yaml"
    chat.write_text(chat.read_text().replace("    fallback: v1", "    timeout_seconds: 30"))
    result = run("policy", "check", str(demo_policies), "--envoy-config", str(config))
    assert result.returncode == 1
    assert "demo-chat-v2" in result.stderr and "Traceback" not in result.stderr
