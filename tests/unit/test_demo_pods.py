"""The demo model pods, over real sockets: what the gateway's integration tests stand on."""

from __future__ import annotations

import json
import math
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from extproc.demo import pod_server, pods
from extproc.demo.pods import RunningPod, start_pod

IRIS_ROWS = [[5.1, 3.5, 1.4, 0.2], [6.3, 2.8, 4.9, 1.5], [6.7, 3.0, 5.2, 2.3]]


@pytest.fixture
def chat_pod() -> Iterator[RunningPod]:
    pod = start_pod("chat", name="demo-chat", version="v1")
    try:
        yield pod
    finally:
        pod.stop()


@pytest.fixture
def oip_pod() -> Iterator[RunningPod]:
    pod = start_pod("oip", name="iris", version="v2")
    try:
        yield pod
    finally:
        pod.stop()


@pytest.fixture
def chat(chat_pod: RunningPod) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=chat_pod.url, timeout=5) as client:
        yield client


@pytest.fixture
def oip(oip_pod: RunningPod) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=oip_pod.url, timeout=5) as client:
        yield client


def user(content: Any, **extra: Any) -> dict[str, Any]:
    return {"model": "gpt-demo", "messages": [{"role": "user", "content": content}], **extra}


def iris_request(data: Any, shape: list[int] | None = None, **tensor: Any) -> dict[str, Any]:
    fields = {"name": "input-0", "datatype": "FP32", "shape": shape or [3, 4], "data": data}
    return {"inputs": [{**fields, **tensor}]}


def raw_exchange(pod: RunningPod, request: bytes) -> bytes:
    """Send bytes as-is and read until the pod closes: for framing httpx will not produce."""
    with socket.create_connection(("127.0.0.1", pod.port), timeout=5) as sock:
        sock.sendall(request)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def sse_events(response: httpx.Response) -> list[str]:
    return [line[len("data: ") :] for line in response.iter_lines() if line.startswith("data: ")]


# --------------------------------------------------------------------------- both kinds


@pytest.mark.parametrize("kind", ["chat", "oip"])
def test_health_and_identity_headers(kind: pods.PodKind) -> None:
    with start_pod(kind, name="m", version="v7") as pod:
        assert pod.url == f"http://127.0.0.1:{pod.port}"
        response = httpx.get(f"{pod.url}/_demo/health")
        assert response.status_code == 200
        assert response.json() == {"status": "ok", "kind": kind, "name": "m", "version": "v7"}
        assert response.headers["x-demo-pod"] == "m"
        assert response.headers["x-demo-version"] == "v7"
        assert pod.received() == []  # control paths are not recorded


def test_unknown_path_is_404_and_wrong_method_405(chat: httpx.Client) -> None:
    assert chat.get("/nope").status_code == 404
    response = chat.get("/v1/chat/completions")
    assert response.status_code == 405
    assert response.headers["allow"] == "POST"
    assert response.json()["error"]["message"]


def test_keep_alive_serves_many_requests_on_one_connection(chat: httpx.Client) -> None:
    client_ports = set()
    for text in ("one", "two", "three", "four"):
        response = chat.post("/v1/chat/completions", json=user(text))
        assert response.json()["choices"][0]["message"]["content"] == text
        assert "connection" not in response.headers
        stream = response.extensions["network_stream"]
        client_ports.add(stream.get_extra_info("client_addr")[1])
    assert len(client_ports) == 1


def test_stop_closes_idle_connections_and_the_listener(chat_pod: RunningPod) -> None:
    with httpx.Client(base_url=chat_pod.url, timeout=5) as client:
        assert client.get("/v1/models").status_code == 200  # leaves an idle keep-alive connection
        started = time.monotonic()
        chat_pod.stop()
        assert time.monotonic() - started < 2
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", chat_pod.port), timeout=1).close()
    chat_pod.stop()  # idempotent


def test_internal_errors_do_not_leak_tracebacks(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*_args: object) -> pods.Response:
        raise RuntimeError("secret internals")

    monkeypatch.setattr(pods.ChatApp, "_models", boom)
    with start_pod("chat", name="demo-chat", version="v1") as pod:
        response = httpx.get(f"{pod.url}/v1/models")
    assert response.status_code == 500
    assert response.json()["error"]["message"] == "internal error"
    assert "secret" not in response.text and "Traceback" not in response.text


# --------------------------------------------------------------------------- recording


def test_records_requests_with_header_case_and_body(
    chat: httpx.Client, chat_pod: RunningPod
) -> None:
    body = json.dumps(user("hi")).encode()
    chat.post(
        "/v1/chat/completions?trace=1",
        content=body,
        headers={"Content-Type": "application/json", "X-Tenant-ID": "acme"},
    )
    chat.get("/_demo/health")
    (seen,) = chat.get("/_demo/received").json()
    assert seen["method"] == "POST"
    assert seen["path"] == "/v1/chat/completions?trace=1"
    assert ["X-Tenant-ID", "acme"] in seen["headers"]
    assert seen["body_size"] == len(body)
    assert seen["body"] == body.decode()
    assert chat_pod.received() == [seen]


def test_clearing_received(chat: httpx.Client, chat_pod: RunningPod) -> None:
    chat.get("/v1/models")
    chat.get("/v1/models")
    assert chat.delete("/_demo/received").json() == {"cleared": 2}
    assert chat.get("/_demo/received").json() == []
    chat.get("/v1/models")
    chat_pod.clear_received()
    assert chat_pod.received() == []


def test_recorded_body_is_capped_but_size_is_not(chat: httpx.Client) -> None:
    big = "x" * 100_000
    chat.post("/v1/chat/completions", json=user(big))
    (seen,) = chat.get("/_demo/received").json()
    assert seen["body_size"] > 100_000
    assert len(seen["body"]) == 64 * 1024


def test_recording_keeps_only_the_latest(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pod_server, "RECORDED_REQUESTS", 3)
    with (
        start_pod("chat", name="demo-chat", version="v1") as pod,
        httpx.Client(base_url=pod.url) as client,
    ):
        for index in range(5):
            client.get(f"/v1/models?n={index}")
        assert [r["path"] for r in pod.received()] == [f"/v1/models?n={i}" for i in (2, 3, 4)]


# --------------------------------------------------------------------------- request framing


def test_chunked_request_body_is_read(chat: httpx.Client, chat_pod: RunningPod) -> None:
    payload = json.dumps(user("chunked hello")).encode()

    def pieces() -> Iterator[bytes]:
        yield payload[:10]
        yield payload[10:]

    response = chat.post("/v1/chat/completions", content=pieces())
    assert response.status_code == 200
    assert response.json()["choices"][0]["message"]["content"] == "chunked hello"
    (seen,) = chat_pod.received()
    assert ["Transfer-Encoding", "chunked"] in seen["headers"]
    assert seen["body_size"] == len(payload)


def test_oversized_content_length_is_413_and_recorded(chat_pod: RunningPod) -> None:
    head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 9000000\r\n\r\n"
    raw = raw_exchange(chat_pod, head)
    assert raw.startswith(b"HTTP/1.1 413 ")
    assert b"Connection: close" in raw
    assert b"Traceback" not in raw
    (seen,) = chat_pod.received()
    assert (seen["body_size"], seen["body"]) == (9_000_000, "")


def test_oversized_chunk_is_413(chat_pod: RunningPod) -> None:
    head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    assert raw_exchange(chat_pod, head + b"900000\r\n").startswith(b"HTTP/1.1 413 ")


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        (b"Transfer-Encoding: chunked\r\nContent-Length: 5\r\n", b"400"),
        (b"Transfer-Encoding: gzip\r\n", b"501"),
        (b"Content-Length: -1\r\n", b"400"),
        (b"Content-Length: 1\r\nContent-Length: 2\r\n", b"400"),
    ],
)
def test_bad_framing_is_refused(chat_pod: RunningPod, headers: bytes, status: bytes) -> None:
    request = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n" + headers + b"\r\n"
    raw = raw_exchange(chat_pod, request)
    assert raw.startswith(b"HTTP/1.1 " + status + b" ")
    assert b"Connection: close" in raw


# --------------------------------------------------------------------------- chat pod


def test_chat_completion_echoes_last_user_message(chat: httpx.Client) -> None:
    request = {
        "model": "gpt-demo",
        "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "first question"},
            {"role": "assistant", "content": "ok"},
            {"role": "user", "content": "what is the answer"},
        ],
    }
    response = chat.post("/v1/chat/completions", json=request)
    assert response.status_code == 200
    assert response.headers["x-demo-pod"] == "demo-chat"
    body = response.json()
    assert body["id"].startswith("chatcmpl-")
    assert body["object"] == "chat.completion"
    assert isinstance(body["created"], int)
    assert body["model"] == "gpt-demo"
    assert body["system_fingerprint"] == "demo-chat-v1"
    assert body["choices"] == [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "what is the answer"},
            "finish_reason": "stop",
        }
    ]
    # Tokens are whitespace-separated words: 2 + 2 + 1 + 4 in, 4 out.
    assert body["usage"] == {"prompt_tokens": 9, "completion_tokens": 4, "total_tokens": 13}


def test_chat_content_parts_are_joined(chat: httpx.Client) -> None:
    parts = [
        {"type": "text", "text": "look at"},
        {"type": "image_url", "image_url": {"url": "data:,"}},
        {"type": "text", "text": "this"},
    ]
    response = chat.post("/v1/chat/completions", json=user(parts))
    assert response.json()["choices"][0]["message"]["content"] == "look at this"


def test_chat_max_tokens_truncates(chat: httpx.Client) -> None:
    response = chat.post("/v1/chat/completions", json=user("a b c d e", max_tokens=2))
    choice = response.json()["choices"][0]
    assert (choice["message"]["content"], choice["finish_reason"]) == ("a b", "length")
    assert response.json()["usage"]["completion_tokens"] == 2


def test_chat_stream_splits_echo_across_events(chat: httpx.Client) -> None:
    echo = "my card is 4111-1111-1111-1111 ok"
    request = user(echo, stream=True, stream_options={"include_usage": True})
    with chat.stream("POST", "/v1/chat/completions", json=request) as response:
        assert response.status_code == 200
        assert response.headers["content-type"] == "text/event-stream"
        assert response.headers["transfer-encoding"] == "chunked"
        assert response.headers["x-demo-version"] == "v1"
        events = sse_events(response)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(event) for event in events[:-1]]
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    *content_chunks, final, usage_chunk = chunks
    pieces = [c["choices"][0]["delta"].get("content", "") for c in content_chunks]
    assert "".join(pieces) == echo
    assert len(pieces) > 5
    assert not any("4111-1111" in piece for piece in pieces)  # a value spans events
    assert final["choices"][0] == {"index": 0, "delta": {}, "finish_reason": "stop"}
    assert usage_chunk["choices"] == []
    assert usage_chunk["usage"] == {"prompt_tokens": 5, "completion_tokens": 5, "total_tokens": 10}


def test_chat_stream_without_usage(chat: httpx.Client) -> None:
    with chat.stream("POST", "/v1/chat/completions", json=user("hi", stream=True)) as response:
        events = sse_events(response)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(event) for event in events[:-1]]
    assert all(c["choices"] and "usage" not in c for c in chunks)


def test_chat_stream_sends_one_http_chunk_per_event(chat_pod: RunningPod) -> None:
    body = json.dumps(user("abcdefghij", stream=True)).encode()
    raw = raw_exchange(
        chat_pod,
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(body), body),
    )
    _, payload = raw.split(b"\r\n\r\n", 1)
    sizes = []
    while True:
        size_line, payload = payload.split(b"\r\n", 1)
        size = int(size_line, 16)
        if size == 0:
            break
        chunk, payload = payload[:size], payload[size + 2 :]
        assert chunk.startswith(b"data: ") and chunk.endswith(b"\n\n")
        sizes.append(size)
    # role chunk, 3 content chunks of <= 4 chars, finish chunk, [DONE]
    assert len(sizes) == 6


def test_chat_models_lists_the_model(chat: httpx.Client) -> None:
    body = chat.get("/v1/models").json()
    assert body["object"] == "list"
    assert [m["id"] for m in body["data"]] == ["demo-chat"]


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        (b"{not json", "not valid JSON"),
        (b"[]", "JSON object"),
        (b'{"model": "m"}', "messages"),
        (b'{"model": "m", "messages": []}', "messages"),
        (b'{"model": "m", "messages": [{"role": "user", "content": 5}]}', "content"),
        (
            b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "stream": "y"}',
            "stream",
        ),
        (b'{"model": "m", "messages": [{"role": "user", "content": NaN}]}', "NaN"),
    ],
)
def test_chat_bad_requests_are_400(chat: httpx.Client, content: bytes, needle: str) -> None:
    response = chat.post("/v1/chat/completions", content=content)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert needle in error["message"]


# --------------------------------------------------------------------------- OIP pod


def test_oip_health_and_metadata(oip: httpx.Client) -> None:
    assert oip.get("/v2/health/ready").json() == {"ready": True}
    assert oip.get("/v2/health/live").json() == {"live": True}
    assert oip.get("/v2/models/iris/ready").json() == {"name": "iris", "ready": True}
    meta = oip.get("/v2/models/iris").json()
    assert meta["name"] == "iris"
    assert meta["versions"] == ["v2"]
    assert meta["platform"]
    assert meta["inputs"] == [{"name": "input-0", "datatype": "FP32", "shape": [-1, 4]}]
    assert [o["name"] for o in meta["outputs"]] == ["probabilities", "label"]
    assert oip.get("/v2/models/iris/versions/v2").json() == meta


@pytest.mark.parametrize(
    "path",
    ["/v2/models/other", "/v2/models/other/infer", "/v2/models/iris/versions/v1/infer"],
)
def test_oip_unknown_model_or_version_is_404(oip: httpx.Client, path: str) -> None:
    method = "POST" if path.endswith("/infer") else "GET"
    response = oip.request(method, path, json=iris_request(IRIS_ROWS))
    assert response.status_code == 404
    assert "error" in response.json()


@pytest.mark.parametrize("path", ["/v2/models/iris/infer", "/v2/models/iris/versions/v2/infer"])
def test_oip_infer_classifies_iris(oip: httpx.Client, path: str) -> None:
    response = oip.post(path, json={"id": "req-1", **iris_request(IRIS_ROWS)})
    assert response.status_code == 200
    body = response.json()
    assert (body["model_name"], body["model_version"], body["id"]) == ("iris", "v2", "req-1")
    probabilities, label = body["outputs"]
    assert probabilities["name"] == "probabilities"
    assert probabilities["datatype"] == "FP32"
    assert probabilities["shape"] == [3, 3]
    rows = [probabilities["data"][i : i + 3] for i in range(0, 9, 3)]
    assert all(math.isclose(sum(row), 1.0, rel_tol=1e-5) for row in rows)
    assert label == {"name": "label", "datatype": "INT64", "shape": [3], "data": [0, 1, 2]}


def test_oip_infer_is_deterministic_and_accepts_flat_data(oip: httpx.Client) -> None:
    flat = [value for row in IRIS_ROWS for value in row]
    first = oip.post("/v2/models/iris/infer", json=iris_request(IRIS_ROWS)).json()
    second = oip.post("/v2/models/iris/infer", json=iris_request(flat)).json()
    assert first["outputs"] == second["outputs"]
    assert first["id"] and first["id"] != second["id"]  # generated when the client sent none


def test_oip_requested_outputs(oip: httpx.Client) -> None:
    request = {**iris_request(IRIS_ROWS), "outputs": [{"name": "label"}]}
    body = oip.post("/v2/models/iris/infer", json=request).json()
    assert [o["name"] for o in body["outputs"]] == ["label"]
    request["outputs"] = [{"name": "logits"}]
    assert oip.post("/v2/models/iris/infer", json=request).status_code == 400


@pytest.mark.parametrize(
    ("request_body", "needle"),
    [
        (iris_request(IRIS_ROWS[:2]), "shape [3, 4] needs 12 elements, data has 8"),
        (iris_request(IRIS_ROWS, datatype="FP128"), "unknown datatype 'FP128'"),
        (iris_request([[5, 3, 1, 0]] * 3, datatype="INT32"), "datatype must be FP32"),
        (iris_request([[1, 2, 3]] * 3, shape=[3, 3]), "shape must be [N, 4]"),
        (iris_request(IRIS_ROWS, shape=[3, -4]), "non-negative integers"),
        (iris_request([[1, 2, 3, "x"]] * 3), "element 3 ('x') is not a valid FP32"),
        (iris_request([[1, 2, 3, True]] * 3), "element 3 (True) is not a valid FP32"),
        (iris_request([[1, 2, 3, 1e39]] * 3), "not a valid FP32"),
        (iris_request(IRIS_ROWS, name="input-1"), "exactly one input 'input-0'"),
        (iris_request(42), "data must be a list"),
        ({"inputs": []}, "inputs must be a non-empty list"),
        ({"inputs": [{"datatype": "FP32", "shape": [1], "data": [1]}]}, "name must be"),
    ],
)
def test_oip_invalid_tensors_are_400(
    oip: httpx.Client, request_body: dict[str, Any], needle: str
) -> None:
    response = oip.post("/v2/models/iris/infer", json=request_body)
    assert response.status_code == 400
    assert needle in response.json()["error"]


@pytest.mark.parametrize(
    ("datatype", "value", "valid"),
    [
        ("UINT8", 255, True),
        ("UINT8", 256, False),
        ("INT8", -128, True),
        ("INT64", 2**63, False),
        ("BOOL", True, True),
        ("BOOL", 1, False),
        ("BYTES", "abc", True),
        ("FP16", 70000.0, False),
    ],
)
def test_tensor_element_types(datatype: str, value: object, valid: bool) -> None:
    tensor = {"name": "t", "datatype": datatype, "shape": [1, 1], "data": [[value]]}
    if valid:
        assert pods.parse_tensor("inputs[0]", tensor).data == [value]
    else:
        with pytest.raises(pods.HttpError, match="not a valid"):
            pods.parse_tensor("inputs[0]", tensor)


# --------------------------------------------------------------------------- CLI


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_cli_serves_until_signalled(signum: signal.Signals) -> None:
    command = [sys.executable, "-m", "extproc.demo.pods", "--kind", "oip", "--port", "0",
               "--name", "iris", "--version", "v1"]  # fmt: skip
    with subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    ) as process:
        try:
            assert process.stdout is not None
            url = process.stdout.readline().rsplit(" ", 1)[-1].strip()
            assert httpx.get(f"{url}/v2/health/ready", timeout=5).json() == {"ready": True}
            process.send_signal(signum)
            _, stderr = process.communicate(timeout=5)
        finally:
            process.kill()
    assert process.returncode == 0
    assert stderr == ""
