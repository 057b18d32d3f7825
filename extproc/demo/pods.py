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

The parts live in small modules: :mod:`extproc.demo.pod_server` (HTTP plumbing, recording,
routing), :mod:`extproc.demo.chat_pod` and :mod:`extproc.demo.oip_pod`. This module picks the app
for a kind, runs the CLI and re-exports the public names. Tunables such as RECORDED_REQUESTS
are read where they are defined: patch them there, not here.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from collections.abc import Sequence
from types import FrameType

from extproc.demo.chat_pod import ChatApp, count_tokens
from extproc.demo.oip_pod import OipApp, Tensor, iris_probabilities, parse_tensor
from extproc.demo.pod_server import (
    POD_KINDS,
    App,
    HttpError,
    PodKind,
    ReceivedRequest,
    Request,
    Response,
    RunningPod,
    serve_app,
)

__all__ = [
    "POD_KINDS",
    "App",
    "ChatApp",
    "HttpError",
    "OipApp",
    "PodKind",
    "ReceivedRequest",
    "Request",
    "Response",
    "RunningPod",
    "Tensor",
    "count_tokens",
    "iris_probabilities",
    "main",
    "make_app",
    "parse_tensor",
    "start_pod",
]


def make_app(kind: PodKind, name: str, version: str) -> App:
    if kind == "chat":
        return ChatApp(name, version)
    if kind == "oip":
        return OipApp(name, version)
    raise ValueError(f"unknown pod kind {kind!r}, expected one of {POD_KINDS}")


def start_pod(
    kind: PodKind, *, host: str = "127.0.0.1", port: int = 0, name: str, version: str
) -> RunningPod:
    """Start a demo pod in a background thread; ``port=0`` picks a free port."""
    return serve_app(make_app(kind, name, version), host=host, port=port)


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
