"""Demo model pods: small real HTTP servers that stand behind Envoy in `make run` and the tests.

Two kinds:

* ``chat``: OpenAI-compatible chat completions that echo the last user message, plain or as
  server-sent events.
* ``oip``: Open Inference Protocol v2 (KServe) with a deterministic iris classifier that checks
  its input tensors for real.

Every pod records what reached it (``GET /_demo/received``), so tests can prove that a denied
request never arrived and that stripped headers are gone. The pods use the standard library only
and share no code with the gateway: a stand-in built on the code under test would prove nothing.

Run one with ``python -m extproc.demo.pods --kind chat --port 18001 --name demo-chat --version v1``
or in-process with :func:`start_pod`.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import copy
import http.server
import json
import logging
import math
import re
import signal
import socket
import socketserver
import struct
import sys
import threading
import time
import urllib.parse
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import FrameType, TracebackType
from typing import Literal, TypedDict, cast

log = logging.getLogger(__name__)

PodKind = Literal["chat", "oip"]
POD_KINDS: tuple[PodKind, ...] = ("chat", "oip")

MAX_BODY_BYTES = 8 * 1024 * 1024
RECORDED_BODY_BYTES = 64 * 1024
RECORDED_REQUESTS = 1000
# Small on purpose: a value in the echo (a secret, a name) then spans several SSE events, which is
# exactly what a streaming response scanner has to cope with.
STREAM_CHUNK_CHARS = 4
CONTROL_PREFIX = "/_demo/"

_MAX_LINE = 65536
_MAX_TRAILER_LINES = 100
# How often serve_forever checks for shutdown; bounds how long stop() waits.
_POLL_INTERVAL_S = 0.05


# --------------------------------------------------------------------------- plumbing types


class ReceivedRequest(TypedDict):
    """One request as the pod saw it; ``body`` is the first 64 KiB decoded as UTF-8."""

    method: str
    path: str
    headers: list[list[str]]
    body_size: int
    body: str


@dataclass(frozen=True, slots=True)
class Request:
    method: str
    path: str  # percent-encoded, without the query string
    body: bytes


@dataclass(frozen=True, slots=True)
class Response:
    status: int
    body: bytes = b""
    content_type: str = "application/json"
    headers: tuple[tuple[str, str], ...] = ()
    # When set, sent with chunked transfer encoding, one HTTP chunk per item. Built up front so a
    # bug cannot surface halfway through a response whose status line is already on the wire.
    stream: tuple[bytes, ...] | None = None


class HttpError(Exception):
    """A client-facing failure; the message goes into the pod's error body, never a traceback."""

    def __init__(self, status: int, message: str, *, allow: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.allow = allow


def _json_bytes(value: object) -> bytes:
    return json.dumps(value, separators=(",", ":"), allow_nan=False).encode()


def _reject_constant(name: str) -> object:
    raise ValueError(f"{name} is not valid JSON")


def _parse_json(body: bytes) -> object:
    try:
        # NaN and Infinity are Python extensions, not JSON; a real server would refuse them.
        return json.loads(body, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:
        raise HttpError(400, f"request body is not valid JSON: {exc}") from None


def _brief(value: object, limit: int = 60) -> str:
    """repr() short enough to put a client-supplied value into an error message."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _json_object(body: bytes) -> dict[str, object]:
    doc = _parse_json(body)
    if not isinstance(doc, dict):
        raise HttpError(400, "request body must be a JSON object")
    return cast(dict[str, object], doc)


# --------------------------------------------------------------------------- recording


class _Recorder:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._items: collections.deque[ReceivedRequest] = collections.deque(
            maxlen=RECORDED_REQUESTS
        )

    def add(self, item: ReceivedRequest) -> None:
        with self._lock:
            self._items.append(item)

    def snapshot(self) -> list[ReceivedRequest]:
        with self._lock:
            # Deep copy: callers may mutate what they get without rewriting history.
            return copy.deepcopy(list(self._items))

    def clear(self) -> int:
        with self._lock:
            count = len(self._items)
            self._items.clear()
            return count


# --------------------------------------------------------------------------- apps

Handler = Callable[[Request, re.Match[str]], Response]


class _App:
    """Routes for one pod kind: request in, response out, no sockets, so the logic stays plain."""

    kind: PodKind

    def __init__(self, name: str, version: str) -> None:
        self.name = name
        self.version = version
        self.recorder = _Recorder()
        self._routes: list[tuple[str, re.Pattern[str], Handler]] = [
            ("GET", re.compile(r"/_demo/health"), self._health),
            ("GET", re.compile(r"/_demo/received"), self._received),
            ("DELETE", re.compile(r"/_demo/received"), self._clear),
        ]

    def route(self, method: str, pattern: str, handler: Handler) -> None:
        self._routes.append((method, re.compile(pattern), handler))

    def handle(self, request: Request) -> Response:
        allowed: list[str] = []
        for method, pattern, handler in self._routes:
            match = pattern.fullmatch(request.path)
            if match is None:
                continue
            if method == request.method:
                return handler(request, match)
            allowed.append(method)
        if allowed:
            raise HttpError(
                405, f"{request.method} not allowed on {request.path}", allow=", ".join(allowed)
            )
        raise HttpError(404, f"no route for {request.method} {request.path}")

    def error(self, err: HttpError) -> Response:
        headers = (("Allow", err.allow),) if err.allow else ()
        return Response(err.status, self.error_body(err), headers=headers)

    def error_body(self, err: HttpError) -> bytes:
        return _json_bytes({"error": err.message})

    def ok(self, doc: object) -> Response:
        return Response(200, _json_bytes(doc))

    def _health(self, _req: Request, _m: re.Match[str]) -> Response:
        return self.ok(
            {"status": "ok", "kind": self.kind, "name": self.name, "version": self.version}
        )

    def _received(self, _req: Request, _m: re.Match[str]) -> Response:
        return self.ok(self.recorder.snapshot())

    def _clear(self, _req: Request, _m: re.Match[str]) -> Response:
        return self.ok({"cleared": self.recorder.clear()})


# --------------------------------------------------------------------------- chat pod


def count_tokens(text: str) -> int:
    """Deterministic token estimate: whitespace-separated words."""
    return len(text.split())


@dataclass(frozen=True, slots=True)
class _ChatRequest:
    model: str
    messages: tuple[tuple[str, str], ...]  # (role, text)
    stream: bool
    include_usage: bool
    max_tokens: int | None


def _message_text(index: int, message: object) -> tuple[str, str]:
    where = f"messages[{index}]"
    if not isinstance(message, dict):
        raise HttpError(400, f"{where} must be an object")
    role = message.get("role")
    if not isinstance(role, str) or not role:
        raise HttpError(400, f"{where}.role must be a non-empty string")
    content = message.get("content")
    if content is None:  # assistant turns that only carry tool calls
        return role, ""
    if isinstance(content, str):
        return role, content
    if isinstance(content, list):
        return role, _parts_text(where, content)
    raise HttpError(400, f"{where}.content must be a string or a list of content parts")


def _parts_text(where: str, parts: list[object]) -> str:
    texts: list[str] = []
    for index, part in enumerate(parts):
        if not isinstance(part, dict) or not isinstance(part.get("type"), str):
            raise HttpError(400, f"{where}.content[{index}] must be an object with a type")
        if part["type"] != "text":
            continue  # images, audio: nothing to echo
        text = part.get("text")
        if not isinstance(text, str):
            raise HttpError(400, f"{where}.content[{index}].text must be a string")
        texts.append(text)
    return " ".join(texts)


def _optional_bool(doc: dict[str, object], key: str) -> bool:
    value = doc.get(key, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise HttpError(400, f"{key} must be a boolean")
    return value


def _max_tokens(doc: dict[str, object]) -> int | None:
    # Newer clients send max_completion_tokens; both mean the same here.
    for key in ("max_completion_tokens", "max_tokens"):
        value = doc.get(key)
        if value is None:
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise HttpError(400, f"{key} must be a positive integer")
        return value
    return None


def _parse_chat(doc: dict[str, object], default_model: str) -> _ChatRequest:
    model = doc.get("model", default_model)
    if not isinstance(model, str) or not model:
        raise HttpError(400, "model must be a non-empty string")
    messages = doc.get("messages")
    if not isinstance(messages, list) or not messages:
        raise HttpError(400, "messages must be a non-empty list")
    options = doc.get("stream_options") or {}
    if not isinstance(options, dict):
        raise HttpError(400, "stream_options must be an object")
    return _ChatRequest(
        model=model,
        messages=tuple(_message_text(i, m) for i, m in enumerate(messages)),
        stream=_optional_bool(doc, "stream"),
        include_usage=_optional_bool(cast(dict[str, object], options), "include_usage"),
        max_tokens=_max_tokens(doc),
    )


def _echo(chat: _ChatRequest) -> tuple[str, str]:
    """The answer and its finish_reason: the last user message, cut to max_tokens words."""
    user_texts = [text for role, text in chat.messages if role == "user"]
    text = user_texts[-1] if user_texts else ""
    words = text.split()
    if chat.max_tokens is None or len(words) <= chat.max_tokens:
        return text, "stop"
    return " ".join(words[: chat.max_tokens]), "length"


def _sse(payload: object) -> bytes:
    return b"data: " + _json_bytes(payload) + b"\n\n"


class ChatApp(_App):
    kind: PodKind = "chat"

    def __init__(self, name: str, version: str) -> None:
        super().__init__(name, version)
        self.created = int(time.time())
        self.route("POST", r"/v1/chat/completions", self._completions)
        self.route("GET", r"/v1/models", self._models)

    def error_body(self, err: HttpError) -> bytes:
        # OpenAI's error shape, so SDK clients surface the message.
        kind = "server_error" if err.status >= 500 else "invalid_request_error"
        return _json_bytes(
            {"error": {"message": err.message, "type": kind, "param": None, "code": None}}
        )

    def _models(self, _req: Request, _m: re.Match[str]) -> Response:
        model = {
            "id": self.name,
            "object": "model",
            "created": self.created,
            "owned_by": "extproc-demo",
        }
        return self.ok({"object": "list", "data": [model]})

    def _completions(self, req: Request, _m: re.Match[str]) -> Response:
        chat = _parse_chat(_json_object(req.body), self.name)
        echo, finish = _echo(chat)
        prompt = sum(count_tokens(text) for _, text in chat.messages)
        completion = count_tokens(echo)
        usage = {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        }
        head: dict[str, object] = {
            "id": f"chatcmpl-{uuid.uuid4().hex[:24]}",
            "object": "chat.completion",  # _events overrides it in place, keeping key order
            "created": int(time.time()),
            "model": chat.model,
            "system_fingerprint": f"{self.name}-{self.version}",
        }
        if chat.stream:
            events = self._events(head, echo, finish, usage if chat.include_usage else None)
            return Response(200, content_type="text/event-stream", stream=events)
        choice = {
            "index": 0,
            "message": {"role": "assistant", "content": echo},
            "finish_reason": finish,
        }
        return self.ok({**head, "choices": [choice], "usage": usage})

    @staticmethod
    def _events(
        head: dict[str, object], echo: str, finish: str, usage: dict[str, int] | None
    ) -> tuple[bytes, ...]:
        """Chunk events as OpenAI sends them; ``usage`` is None unless the client asked."""
        base = {**head, "object": "chat.completion.chunk"}
        if usage is not None:
            base["usage"] = None  # OpenAI marks every content chunk this way under include_usage

        def event(delta: dict[str, str], finish_reason: str | None) -> bytes:
            choice = {"index": 0, "delta": delta, "finish_reason": finish_reason}
            return _sse({**base, "choices": [choice]})

        events = [event({"role": "assistant", "content": ""}, None)]
        events += [
            event({"content": echo[i : i + STREAM_CHUNK_CHARS]}, None)
            for i in range(0, len(echo), STREAM_CHUNK_CHARS)
        ]
        events.append(event({}, finish))
        if usage is not None:
            events.append(_sse({**base, "choices": [], "usage": usage}))
        events.append(b"data: [DONE]\n\n")
        return tuple(events)


# --------------------------------------------------------------------------- OIP pod

_INT_RANGES: dict[str, tuple[int, int]] = {
    **{f"UINT{bits}": (0, 2**bits - 1) for bits in (8, 16, 32, 64)},
    **{f"INT{bits}": (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) for bits in (8, 16, 32, 64)},
}
_FLOAT_MAX: dict[str, float] = {
    "FP16": 65504.0,
    "FP32": 3.4028234663852886e38,
    "FP64": sys.float_info.max,
}
DATATYPES: frozenset[str] = frozenset({"BOOL", "BYTES", *_INT_RANGES, *_FLOAT_MAX})


@dataclass(frozen=True, slots=True)
class Tensor:
    name: str
    datatype: str
    shape: tuple[int, ...]
    data: list[object]  # flattened, row-major


def _element_check(datatype: str) -> Callable[[object], bool]:
    """A predicate for one element of ``datatype`` as JSON carries it."""
    if datatype == "BOOL":
        return lambda v: isinstance(v, bool)
    if datatype == "BYTES":
        return lambda v: isinstance(v, str)
    if datatype in _INT_RANGES:
        low, high = _INT_RANGES[datatype]
        # bool is an int subclass in Python but not an integer in JSON.
        return lambda v: isinstance(v, int) and not isinstance(v, bool) and low <= v <= high
    limit = _FLOAT_MAX[datatype]
    # 1e400 parses to inf, which the range check also refuses.
    return lambda v: isinstance(v, int | float) and not isinstance(v, bool) and abs(v) <= limit


def _flatten(data: object, label: str) -> list[object]:
    """Row-major flattening of nested lists; iterative, so deep nesting cannot blow the stack."""
    if not isinstance(data, list):
        raise HttpError(400, f"{label}: data must be a list")
    flat: list[object] = []
    stack = [iter(data)]
    while stack:
        for item in stack[-1]:
            if isinstance(item, list):
                stack.append(iter(item))
                break
            flat.append(item)
        else:
            stack.pop()
    return flat


def _parse_shape(shape: object, label: str) -> tuple[int, ...]:
    if not isinstance(shape, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
    ):
        raise HttpError(
            400, f"{label}: shape must be a list of non-negative integers, got {_brief(shape)}"
        )
    return tuple(shape)


def parse_tensor(where: str, doc: object) -> Tensor:
    """Validate one request tensor: datatype known, element count and types match the shape."""
    if not isinstance(doc, dict):
        raise HttpError(400, f"{where} must be an object")
    name = doc.get("name")
    if not isinstance(name, str) or not name:
        raise HttpError(400, f"{where}: name must be a non-empty string")
    label = f"input {name!r}"
    datatype = doc.get("datatype")
    if not isinstance(datatype, str) or datatype not in DATATYPES:
        raise HttpError(
            400,
            f"{label}: unknown datatype {_brief(datatype)}, expected one of "
            f"{', '.join(sorted(DATATYPES))}",
        )
    shape = _parse_shape(doc.get("shape"), label)
    if "data" not in doc:
        raise HttpError(400, f"{label}: data is required")
    data = _flatten(doc["data"], label)
    expected = math.prod(shape)
    if len(data) != expected:
        raise HttpError(
            400, f"{label}: shape {list(shape)} needs {expected} elements, data has {len(data)}"
        )
    check = _element_check(datatype)
    for index, value in enumerate(data):
        if not check(value):
            raise HttpError(
                400, f"{label}: element {index} ({_brief(value)}) is not a valid {datatype}"
            )
    return Tensor(name, datatype, shape, data)


# Per-class feature means of Fisher's iris data (sepal length, sepal width, petal length,
# petal width, in cm). Scores are negative squared distances to each mean, so the softmax
# is a nearest-centroid classifier: deterministic, dependency-free and sensible on real rows.
IRIS_CLASSES = ("setosa", "versicolor", "virginica")
_IRIS_CENTROIDS = (
    (5.006, 3.428, 1.462, 0.246),
    (5.936, 2.770, 4.260, 1.326),
    (6.588, 2.974, 5.552, 2.026),
)
IRIS_INPUT = "input-0"


def _fp32(value: float) -> float:
    """Round to float32 precision: the output tensor claims FP32, so its values are FP32."""
    return float(struct.unpack("<f", struct.pack("<f", value))[0])


def iris_probabilities(row: Sequence[float]) -> list[float]:
    logits = [
        -sum((x - c) ** 2 for x, c in zip(row, centroid, strict=True))
        for centroid in _IRIS_CENTROIDS
    ]
    top = max(logits)  # shift before exp so large inputs cannot overflow
    weights = [math.exp(logit - top) for logit in logits]
    total = sum(weights)
    return [_fp32(w / total) for w in weights]


def _iris_rows(model: str, inputs: list[Tensor]) -> list[list[float]]:
    names = [t.name for t in inputs]
    if names != [IRIS_INPUT]:
        raise HttpError(
            400, f"model {model!r} takes exactly one input {IRIS_INPUT!r}, got {_brief(names)}"
        )
    tensor = inputs[0]
    if tensor.datatype != "FP32":
        raise HttpError(400, f"input {IRIS_INPUT!r}: datatype must be FP32, got {tensor.datatype}")
    if len(tensor.shape) != 2 or tensor.shape[1] != 4:
        raise HttpError(
            400, f"input {IRIS_INPUT!r}: shape must be [N, 4], got {list(tensor.shape)}"
        )
    values = [float(cast(float, v)) for v in tensor.data]
    return [values[i : i + 4] for i in range(0, len(values), 4)]


def _requested_outputs(doc: dict[str, object], available: Sequence[str]) -> list[str]:
    requested = doc.get("outputs")
    if requested is None:
        return list(available)
    if not isinstance(requested, list):
        raise HttpError(400, "outputs must be a list")
    names: list[str] = []
    for index, item in enumerate(requested):
        name = item.get("name") if isinstance(item, dict) else None
        if not isinstance(name, str) or name not in available:
            raise HttpError(
                400,
                f"outputs[{index}]: unknown output {_brief(name)}, expected one "
                f"of {', '.join(available)}",
            )
        names.append(name)
    return names


class OipApp(_App):
    kind: PodKind = "oip"

    _MODEL = r"/v2/models/(?P<model>[^/]+)(?:/versions/(?P<version>[^/]+))?"

    def __init__(self, name: str, version: str) -> None:
        super().__init__(name, version)
        self.route("GET", r"/v2", self._server_metadata)
        self.route("GET", r"/v2/health/ready", lambda _r, _m: self.ok({"ready": True}))
        self.route("GET", r"/v2/health/live", lambda _r, _m: self.ok({"live": True}))
        self.route("GET", self._MODEL, self._metadata)
        self.route("GET", self._MODEL + r"/ready", self._model_ready)
        self.route("POST", self._MODEL + r"/infer", self._infer)

    def _check_model(self, match: re.Match[str]) -> None:
        model = urllib.parse.unquote(match["model"])
        if model != self.name:
            raise HttpError(404, f"unknown model {model!r}")
        version = match["version"]
        if version is not None and urllib.parse.unquote(version) != self.version:
            raise HttpError(404, f"model {model!r} has no version {version!r}")

    def _server_metadata(self, _req: Request, _m: re.Match[str]) -> Response:
        return self.ok({"name": "extproc-demo-oip", "version": self.version, "extensions": []})

    def _metadata(self, _req: Request, match: re.Match[str]) -> Response:
        self._check_model(match)
        return self.ok(
            {
                "name": self.name,
                "versions": [self.version],
                "platform": "extproc-demo",
                "inputs": [{"name": IRIS_INPUT, "datatype": "FP32", "shape": [-1, 4]}],
                "outputs": [
                    {"name": "probabilities", "datatype": "FP32", "shape": [-1, 3]},
                    {"name": "label", "datatype": "INT64", "shape": [-1]},
                ],
            }
        )

    def _model_ready(self, _req: Request, match: re.Match[str]) -> Response:
        self._check_model(match)
        return self.ok({"name": self.name, "ready": True})

    def _infer(self, req: Request, match: re.Match[str]) -> Response:
        self._check_model(match)
        doc = _json_object(req.body)
        request_id = doc.get("id", uuid.uuid4().hex)
        if not isinstance(request_id, str):
            raise HttpError(400, "id must be a string")
        inputs = doc.get("inputs")
        if not isinstance(inputs, list) or not inputs:
            raise HttpError(400, "inputs must be a non-empty list of tensors")
        tensors = [parse_tensor(f"inputs[{i}]", t) for i, t in enumerate(inputs)]
        rows = _iris_rows(self.name, tensors)
        probabilities = [iris_probabilities(row) for row in rows]
        outputs = {
            "probabilities": {
                "name": "probabilities",
                "datatype": "FP32",
                "shape": [len(rows), 3],
                "data": [p for row in probabilities for p in row],
            },
            "label": {
                "name": "label",
                "datatype": "INT64",
                "shape": [len(rows)],
                "data": [row.index(max(row)) for row in probabilities],
            },
        }
        wanted = _requested_outputs(doc, list(outputs))
        return self.ok(
            {
                "model_name": self.name,
                "model_version": self.version,
                "id": request_id,
                "outputs": [outputs[n] for n in wanted],
            }
        )


def make_app(kind: PodKind, name: str, version: str) -> _App:
    if kind == "chat":
        return ChatApp(name, version)
    if kind == "oip":
        return OipApp(name, version)
    raise ValueError(f"unknown pod kind {kind!r}, expected one of {POD_KINDS}")


# --------------------------------------------------------------------------- HTTP server


class _PodServer(http.server.ThreadingHTTPServer):
    def __init__(self, address: tuple[str, int], app: _App) -> None:
        self.app = app
        self._lock = threading.Lock()
        self._connections: set[socket.socket] = set()
        self._closing = False
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, _PodHandler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind does a reverse DNS lookup (getfqdn) we have no use for.
        socketserver.TCPServer.server_bind(self)
        self.server_name = str(self.server_address[0])
        self.server_port = int(self.server_address[1])

    def track(self, conn: socket.socket) -> None:
        with self._lock:
            self._connections.add(conn)
            closing = self._closing
        if closing:
            _hang_up(conn)

    def untrack(self, conn: socket.socket) -> None:
        with self._lock:
            self._connections.discard(conn)

    def hang_up_all(self) -> None:
        """End idle keep-alive connections, whose threads server_close() would otherwise await."""
        with self._lock:
            self._closing = True
            connections = list(self._connections)
        for conn in connections:
            _hang_up(conn)

    def handle_error(self, request: object, client_address: object) -> None:
        # Clients hanging up mid-response is routine here; keep stderr free of tracebacks.
        log.debug("connection from %s failed", client_address, exc_info=True)


def _hang_up(conn: socket.socket) -> None:
    with contextlib.suppress(OSError):  # already gone
        conn.shutdown(socket.SHUT_RDWR)


class _PodHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "extproc-demo-pod/1"
    # Headers and body leave in separate writes; with Nagle on, the client's delayed ACK would
    # add ~40 ms to every response.
    disable_nagle_algorithm = True

    @property
    def pod(self) -> _PodServer:
        return cast(_PodServer, self.server)

    def setup(self) -> None:
        super().setup()
        self.pod.track(self.connection)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.pod.untrack(self.connection)

    def version_string(self) -> str:
        return self.server_version  # no Python version in the Server header

    def log_message(self, format: str, *args: object) -> None:
        log.debug("%s %s", self.address_string(), format % args)

    def do_GET(self) -> None:
        self._dispatch()

    do_POST = do_PUT = do_PATCH = do_DELETE = do_GET

    def _dispatch(self) -> None:
        app = self.pod.app
        path = urllib.parse.urlsplit(self.path).path
        record = not path.startswith(CONTROL_PREFIX)
        try:
            body = self._read_body()
        except HttpError as err:
            # The body is unread or its framing is broken: the connection cannot carry another
            # request, so say so and drop it after answering.
            self.close_connection = True
            if record:
                self._record(b"", self._declared_length())
            self._send(app.error(err))
            return
        if record:
            self._record(body, len(body))
        self._send(self._respond(app, Request(self.command, path, body)))

    def _respond(self, app: _App, request: Request) -> Response:
        try:
            return app.handle(request)
        except HttpError as err:
            return app.error(err)
        except Exception:
            log.exception("demo pod %s failed on %s %s", app.name, request.method, request.path)
            return app.error(HttpError(500, "internal error"))

    def _record(self, body: bytes, size: int) -> None:
        self.pod.app.recorder.add(
            ReceivedRequest(
                method=self.command,
                path=self.path,
                headers=[[name, value] for name, value in self.headers.items()],
                body_size=size,
                body=body[:RECORDED_BODY_BYTES].decode("utf-8", errors="replace"),
            )
        )

    def _declared_length(self) -> int:
        value = self.headers.get("Content-Length", "")
        return int(value) if re.fullmatch(r"[0-9]{1,20}", value.strip()) else 0

    # -- request bodies

    def _read_body(self) -> bytes:
        codings = self.headers.get_all("Transfer-Encoding") or []
        lengths = self.headers.get_all("Content-Length") or []
        if codings:
            if lengths:
                # Both present is the classic request-smuggling setup; refuse rather than guess.
                raise HttpError(400, "both Transfer-Encoding and Content-Length present")
            names = [c.strip().lower() for value in codings for c in value.split(",")]
            if names != ["chunked"]:
                raise HttpError(501, f"unsupported Transfer-Encoding {', '.join(names)}")
            return self._read_chunked()
        if not lengths:
            return b""
        distinct = {value.strip() for value in lengths}
        text = distinct.pop()
        if distinct or not re.fullmatch(r"[0-9]{1,20}", text):
            raise HttpError(400, "invalid Content-Length")
        length = int(text)
        if length > MAX_BODY_BYTES:
            raise HttpError(413, f"body of {length} bytes exceeds the {MAX_BODY_BYTES} byte limit")
        body = self.rfile.read(length)
        if len(body) != length:
            raise HttpError(400, "body shorter than Content-Length")
        return body

    def _read_chunked(self) -> bytes:
        parts: list[bytes] = []
        total = 0
        while size := self._chunk_size():
            total += size
            if total > MAX_BODY_BYTES:
                raise HttpError(413, f"chunked body exceeds the {MAX_BODY_BYTES} byte limit")
            data = self.rfile.read(size)
            if len(data) != size or self.rfile.readline(_MAX_LINE) not in (b"\r\n", b"\n"):
                raise HttpError(400, "malformed chunked body")
            parts.append(data)
        self._skip_trailers()
        return b"".join(parts)

    def _chunk_size(self) -> int:
        line = self.rfile.readline(_MAX_LINE)
        digits = line.split(b";", 1)[0].strip()  # drop chunk extensions
        if not re.fullmatch(rb"[0-9A-Fa-f]{1,16}", digits):
            raise HttpError(400, "malformed chunk size line")
        return int(digits, 16)

    def _skip_trailers(self) -> None:
        for _ in range(_MAX_TRAILER_LINES):
            if self.rfile.readline(_MAX_LINE) in (b"\r\n", b"\n", b""):
                return
        raise HttpError(400, "too many trailer lines")

    # -- responses

    def _send(self, response: Response) -> None:
        app = self.pod.app
        self.send_response(response.status)
        self.send_header("Content-Type", response.content_type)
        self.send_header("x-demo-pod", app.name)
        self.send_header("x-demo-version", app.version)
        for name, value in response.headers:
            self.send_header(name, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        if response.stream is None:
            self.send_header("Content-Length", str(len(response.body)))
            self.end_headers()
            self.wfile.write(response.body)
            return
        self.send_header("Transfer-Encoding", "chunked")
        self.send_header("Cache-Control", "no-cache")
        self.end_headers()
        # wfile is unbuffered, so every event leaves as its own chunk, as a real model's would.
        for piece in response.stream:
            if piece:  # an empty chunk would end the body early
                self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
        self.wfile.write(b"0\r\n\r\n")


# --------------------------------------------------------------------------- public API


class RunningPod:
    """A pod serving in a background thread. Use as a context manager or call stop()."""

    def __init__(self, server: _PodServer, thread: threading.Thread) -> None:
        self._server = server
        self._thread = thread
        self._stopped = False
        self._stop_lock = threading.Lock()

    @property
    def kind(self) -> PodKind:
        return self._server.app.kind

    @property
    def name(self) -> str:
        return self._server.app.name

    @property
    def version(self) -> str:
        return self._server.app.version

    @property
    def host(self) -> str:
        return self._server.server_name

    @property
    def port(self) -> int:
        return self._server.server_port

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def received(self) -> list[ReceivedRequest]:
        """What reached the pod, oldest first (control paths excluded)."""
        return self._server.app.recorder.snapshot()

    def clear_received(self) -> None:
        self._server.app.recorder.clear()

    def stop(self) -> None:
        """Stop serving, drop open connections and close the listening socket. Idempotent."""
        with self._stop_lock:
            if self._stopped:
                return
            self._stopped = True
        self._server.shutdown()
        self._server.hang_up_all()
        self._server.server_close()  # joins the connection threads
        self._thread.join()

    def __enter__(self) -> RunningPod:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def start_pod(
    kind: PodKind, *, host: str = "127.0.0.1", port: int = 0, name: str, version: str
) -> RunningPod:
    """Start a demo pod in a background thread; ``port=0`` picks a free port."""
    server = _PodServer((host, port), make_app(kind, name, version))
    thread = threading.Thread(
        target=server.serve_forever,
        args=(_POLL_INTERVAL_S,),
        name=f"demo-pod-{name}-{version}",
        daemon=True,
    )
    thread.start()
    return RunningPod(server, thread)


# --------------------------------------------------------------------------- CLI


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m extproc.demo.pods",
        description="Serve one demo model pod until SIGINT/SIGTERM.",
    )
    parser.add_argument("--kind", choices=POD_KINDS, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--name", required=True, help="model name the pod serves")
    parser.add_argument("--version", required=True, help="model version, e.g. v1")
    parser.add_argument("--verbose", action="store_true", help="log every request to stderr")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    stop = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        pod = start_pod(
            args.kind, host=args.host, port=args.port, name=args.name, version=args.version
        )
    except OSError as exc:
        print(f"cannot listen on {args.host}:{args.port}: {exc}", file=sys.stderr)
        return 1
    # One line on stdout, so a launcher using --port 0 learns the address.
    print(f"demo pod {pod.name} ({pod.kind} {pod.version}) listening on {pod.url}", flush=True)
    with pod:
        stop.wait()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
