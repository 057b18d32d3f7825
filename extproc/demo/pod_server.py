"""The plumbing every demo pod shares: an HTTP/1.1 server, request recording and routing.

An app (:class:`App`) maps a :class:`Request` to a :class:`Response` without touching sockets;
:func:`serve_app` puts one behind a threading HTTP server that reads bodies strictly (chunked or
Content-Length, never both), records what arrived and sends the response, streamed when asked.
Standard library only, like the pods themselves.
"""

from __future__ import annotations

import collections
import contextlib
import copy
import dataclasses
import gzip
import http.server
import json
import logging
import re
import socket
import socketserver
import threading
import time
import traceback
import urllib.parse
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Literal, TypedDict, cast

log = logging.getLogger(__name__)

PodKind = Literal["chat", "oip"]
POD_KINDS: tuple[PodKind, ...] = ("chat", "oip")

MAX_BODY_BYTES = 8 * 1024 * 1024
RECORDED_BODY_BYTES = 64 * 1024
RECORDED_REQUESTS = 1000
CONTROL_PREFIX = "/_demo/"
# What Envoy's active health check asks (GET, 200 while the pod serves). Like the control paths
# it is not recorded, so health checks never show up among the requests a test inspects.
HEALTH_PATH = "/healthz"
# Demo knobs any pod honours: answer 500 with a Python traceback (a server in debug mode), or
# gzip the answer whatever the request's Accept-Encoding said.
DEMO_TRACEBACK_HEADER = "x-demo-traceback"
DEMO_GZIP_HEADER = "x-demo-gzip"
# Pause this long before answering at all (a model slower than the gateway's timeout).
DEMO_WAIT_HEADER = "x-demo-wait-ms"
MAX_DEMO_WAIT_MS = 10_000
# Comma-separated versions ("v2" or "v1,v2"): the x-demo-* knobs then apply only on pods of those
# versions and are ignored elsewhere, so a retry or a mirrored copy of the same request can find a
# healthy pod. The request is still recorded with every header it carried.
DEMO_TARGET_HEADER = "x-demo-target"

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
    headers: Mapping[str, str] = field(default_factory=dict)  # names lower-case


@dataclass(frozen=True, slots=True)
class Response:
    status: int
    body: bytes = b""
    content_type: str = "application/json"
    headers: tuple[tuple[str, str], ...] = ()
    # When set, sent with chunked transfer encoding, one HTTP chunk per item. Built up front so a
    # bug cannot surface halfway through a response whose status line is already on the wire.
    stream: tuple[bytes, ...] | None = None
    # Pause before each streamed chunk after the first (a slow model, for tests and demos).
    chunk_delay_s: float = 0.0


class HttpError(Exception):
    """A client-facing failure; the message goes into the pod's error body, never a traceback."""

    def __init__(self, status: int, message: str, *, allow: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.allow = allow


def gzipped(response: Response) -> Response:
    """The response gzip-encoded; a stream stays a stream, each piece flushed as it goes."""
    headers = (*response.headers, ("Content-Encoding", "gzip"))
    if response.stream is None:
        body = gzip.compress(response.body, mtime=0)
        return dataclasses.replace(response, body=body, headers=headers)
    deflater = zlib.compressobj(wbits=16 + zlib.MAX_WBITS)
    pieces = [
        deflater.compress(piece) + deflater.flush(zlib.Z_SYNC_FLUSH) for piece in response.stream
    ]
    pieces.append(deflater.flush())
    return dataclasses.replace(response, stream=tuple(pieces), headers=headers)


def json_bytes(value: object) -> bytes:
    return json.dumps(value, separators=(",", ":"), allow_nan=False).encode()


def _reject_constant(name: str) -> object:
    raise ValueError(f"{name} is not valid JSON")


def _parse_json(body: bytes) -> object:
    try:
        # NaN and Infinity are Python extensions, not JSON; a real server would refuse them.
        return json.loads(body, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:
        raise HttpError(400, f"request body is not valid JSON: {exc}") from None


def brief(value: object, limit: int = 60) -> str:
    """repr() short enough to put a client-supplied value into an error message."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def json_object(body: bytes) -> dict[str, object]:
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


class App:
    """Routes for one pod kind: request in, response out, no sockets, so the logic stays plain."""

    kind: PodKind

    def __init__(self, name: str, version: str) -> None:
        self.name = name
        self.version = version
        self.recorder = _Recorder()
        self._routes: list[tuple[str, re.Pattern[str], Handler]] = [
            ("GET", re.compile(r"/_demo/health"), self._health),
            ("GET", re.compile(re.escape(HEALTH_PATH)), self._health),
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
        return json_bytes({"error": err.message})

    def ok(self, doc: object) -> Response:
        return Response(200, json_bytes(doc))

    def _health(self, _req: Request, _m: re.Match[str]) -> Response:
        return self.ok(
            {"status": "ok", "kind": self.kind, "name": self.name, "version": self.version}
        )

    def _received(self, _req: Request, _m: re.Match[str]) -> Response:
        return self.ok(self.recorder.snapshot())

    def _clear(self, _req: Request, _m: re.Match[str]) -> Response:
        return self.ok({"cleared": self.recorder.clear()})


# --------------------------------------------------------------------------- HTTP server


class _PodServer(http.server.ThreadingHTTPServer):
    def __init__(self, address: tuple[str, int], app: App) -> None:
        self.app = app
        self._lock = threading.Lock()
        self._connections: set[socket.socket] = set()
        self._closing = False
        # Set when the pod stops: cuts short a demo wait (x-demo-wait-ms) in a handler thread.
        self.stopping = threading.Event()
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
        self.stopping.set()
        with self._lock:
            self._closing = True
            connections = list(self._connections)
        for conn in connections:
            _hang_up(conn)

    def handle_error(self, request: object, client_address: object) -> None:
        # Clients hanging up mid-response is routine here; keep stderr free of tracebacks.
        log.debug("connection from %s failed", client_address, exc_info=True)


def _knobs_for(app: App, headers: dict[str, str]) -> dict[str, str]:
    """``headers`` without the x-demo-* knobs when x-demo-target names other versions."""
    target = headers.get(DEMO_TARGET_HEADER)
    if target is None or app.version in {v.strip() for v in target.split(",")}:
        return headers
    return {k: v for k, v in headers.items() if not k.startswith("x-demo-")}


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
        record = not path.startswith(CONTROL_PREFIX) and path != HEALTH_PATH
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
        headers = _knobs_for(app, {k.lower(): v for k, v in self.headers.items()})
        wait = headers.get(DEMO_WAIT_HEADER, "")
        if wait.isdigit():
            self.pod.stopping.wait(min(int(wait), MAX_DEMO_WAIT_MS) / 1000)
        self._send(self._respond(app, Request(self.command, path, body, headers)))

    def _respond(self, app: App, request: Request) -> Response:
        leak = request.headers.get(DEMO_TRACEBACK_HEADER) == "1"
        try:
            if leak:
                raise RuntimeError(f"demo failure in {app.name}; page oncall@demo.example")
            response = app.handle(request)
        except HttpError as err:
            response = app.error(err)
        except Exception:
            if leak:
                # A server left in debug mode sends its traceback: what the gateway must hide.
                trace = traceback.format_exc().encode()
                debug = (("x-powered-by", "demo-pod (Python debug server)"),
                         ("set-cookie", "debug_session=demo; Path=/"))  # fmt: skip
                return Response(500, trace, content_type="text/plain; charset=utf-8", headers=debug)
            log.exception("demo pod %s failed on %s %s", app.name, request.method, request.path)
            response = app.error(HttpError(500, "internal error"))
        if request.headers.get(DEMO_GZIP_HEADER) == "1":
            return gzipped(response)
        return response

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
        for i, piece in enumerate(response.stream):
            if i and response.chunk_delay_s:
                time.sleep(response.chunk_delay_s)
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


def serve_app(app: App, *, host: str = "127.0.0.1", port: int = 0) -> RunningPod:
    """Serve ``app`` in a background thread; ``port=0`` picks a free port."""
    server = _PodServer((host, port), app)
    thread = threading.Thread(
        target=server.serve_forever,
        args=(_POLL_INTERVAL_S,),
        name=f"demo-pod-{app.name}-{app.version}",
        daemon=True,
    )
    thread.start()
    return RunningPod(server, thread)
