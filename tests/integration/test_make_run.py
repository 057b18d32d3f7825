"""`make run` as a newcomer uses it: ready banner, pasteable curl, demo.env, Ctrl-C stops all."""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

import httpx

from extproc.demo.stack import free_port

REPO = Path(__file__).resolve().parents[2]


def _read_env(path: Path) -> dict[str, str]:
    values = {}
    for line in path.read_text().splitlines():
        name, _, value = line.partition("=")
        values[name] = shlex.split(value)[0]
    return values


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_make_run_serves_the_demo_and_stops_on_ctrl_c(tmp_path: Path) -> None:
    shutil.copytree(REPO / "policies", tmp_path / "policies")
    names = ("GATEWAY_PORT", "ENVOY_ADMIN_PORT", "DECISION_PORT", "CHAT_V1_PORT", "CHAT_V2_PORT",
             "OIP_V1_PORT", "VALKEY_PORT")  # fmt: skip
    ports = {name: free_port() for name in names}
    env = {**os.environ, **{k: str(v) for k, v in ports.items()}}
    proc = subprocess.Popen(
        [sys.executable, "-m", "extproc.demo.run"], cwd=tmp_path, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        lines: list[str] = []
        deadline = time.monotonic() + 60
        assert proc.stdout is not None
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if "Ctrl-C" in line:
                break
        output = "".join(lines)
        assert f"Gateway ready at https://127.0.0.1:{ports['GATEWAY_PORT']}" in output, output
        curl = output[output.index("curl ") : output.index("GATEWAY_URL, CA_CERT")].strip()
        demo = _read_env(tmp_path / ".run" / "demo.env")
        assert set(demo) == {"GATEWAY_URL", "CA_CERT", "DEMO_API_KEY", "DEMO_JWT",
                             "DEMO_CHAT_MODEL"}  # fmt: skip
        assert demo["DEMO_API_KEY"] in curl and demo["CA_CERT"] in curl
        if shutil.which("curl"):  # the printed command, exactly as a user pastes it
            pasted = subprocess.run(
                ["bash", "-c", curl.replace("\\\n", " ")],
                capture_output=True, text=True, timeout=30,
            )  # fmt: skip
            assert pasted.returncode == 0 and '"content":"Hello!"' in pasted.stdout, pasted
        tls = ssl.create_default_context(cafile=demo["CA_CERT"])
        with httpx.Client(base_url=demo["GATEWAY_URL"], verify=tls, timeout=10) as client:
            chat = client.post(
                "/v1/chat/completions",
                json={"model": demo["DEMO_CHAT_MODEL"],
                      "messages": [{"role": "user", "content": "hi"}]},
                headers={"authorization": f"Bearer {demo['DEMO_API_KEY']}"},
            )  # fmt: skip
            assert chat.status_code == 200, chat.text
            # The demo key's request quota is small and announced on every answer.
            assert chat.headers["ratelimit-policy"].startswith('"requests-per-caller";q=300;w=60')
            iris = client.post(
                "/v2/models/iris/infer",
                json={"inputs": [{"name": "input-0", "datatype": "FP32", "shape": [1, 4],
                                  "data": [6.5, 3.0, 5.5, 1.8]}]},
                headers={"authorization": f"Bearer {demo['DEMO_JWT']}"},
            )  # fmt: skip
            assert iris.status_code == 200, iris.text
            assert iris.json()["outputs"][1]["data"] == [2]
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0
        for port in ports.values():
            assert not _listening(port), f"port {port} still open after Ctrl-C"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        if proc.stdout is not None:
            proc.stdout.close()
