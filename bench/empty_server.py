"""Empty decision server: the "Envoy with an empty decision server" baseline for `make bench`.

Serves envoy.service.ext_proc.v3.ExternalProcessor (every ProcessingRequest gets the matching
empty response, i.e. "continue unchanged") and envoy.service.auth.v3.Authorization (every
Check is allowed) on plaintext gRPC, with grpc.aio on uvloop when available. No logic at all,
so it measures the framework floor.

    python bench/empty_server.py --port N [--host 127.0.0.1] [--workers K]

With K > 1 the process supervises K worker processes that share the port (SO_REUSEPORT);
process_tree() in bench/loadgen.py finds them for CPU accounting. Each serving process prints
one line ``{"ready": true, "pid": P, "port": N}`` on stdout once it listens. SIGTERM or
SIGINT stops everything cleanly.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Sequence

import grpc
from envoy.service.auth.v3 import external_auth_pb2 as auth_pb2
from envoy.service.auth.v3 import external_auth_pb2_grpc as auth_grpc
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ep_grpc
from google.rpc import status_pb2

# Built once; protobuf messages are only read when serialized, so sharing them is safe.
_RESPONSES: dict[str, ep_pb2.ProcessingResponse] = {
    "request_headers": ep_pb2.ProcessingResponse(request_headers=ep_pb2.HeadersResponse()),
    "response_headers": ep_pb2.ProcessingResponse(response_headers=ep_pb2.HeadersResponse()),
    "request_body": ep_pb2.ProcessingResponse(request_body=ep_pb2.BodyResponse()),
    "response_body": ep_pb2.ProcessingResponse(response_body=ep_pb2.BodyResponse()),
    "request_trailers": ep_pb2.ProcessingResponse(request_trailers=ep_pb2.TrailersResponse()),
    "response_trailers": ep_pb2.ProcessingResponse(response_trailers=ep_pb2.TrailersResponse()),
}
_CHECK_OK = auth_pb2.CheckResponse(
    status=status_pb2.Status(code=0), ok_response=auth_pb2.OkHttpResponse()
)


class EmptyProcessor(ep_grpc.ExternalProcessorServicer):  # type: ignore[misc]
    async def Process(  # gRPC method name
        self,
        request_iterator: AsyncIterator[ep_pb2.ProcessingRequest],
        context: grpc.aio.ServicerContext[ep_pb2.ProcessingRequest, ep_pb2.ProcessingResponse],
    ) -> AsyncIterator[ep_pb2.ProcessingResponse]:
        async for request in request_iterator:
            kind = request.WhichOneof("request")
            if kind is not None:
                yield _RESPONSES[kind]


class AllowAll(auth_grpc.AuthorizationServicer):  # type: ignore[misc]
    async def Check(  # gRPC method name
        self,
        request: auth_pb2.CheckRequest,
        context: grpc.aio.ServicerContext[auth_pb2.CheckRequest, auth_pb2.CheckResponse],
    ) -> auth_pb2.CheckResponse:
        return _CHECK_OK


async def serve(host: str, port: int) -> None:
    server = grpc.aio.server(
        options=[
            ("grpc.so_reuseport", 1),
            ("grpc.max_concurrent_streams", 1000),
        ]
    )
    ep_grpc.add_ExternalProcessorServicer_to_server(EmptyProcessor(), server)
    auth_grpc.add_AuthorizationServicer_to_server(AllowAll(), server)
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise SystemExit(f"empty_server: cannot bind {host}:{port}")
    await server.start()
    print(json.dumps({"ready": True, "pid": os.getpid(), "port": bound}), flush=True)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(grace=0.5)


def _die_with_parent() -> None:
    """Linux: have the kernel send SIGTERM to this worker when its supervisor dies."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGTERM)


def _run_one(host: str, port: int) -> None:
    try:
        import uvloop
    except ImportError:
        asyncio.run(serve(host, port))
    else:
        uvloop.run(serve(host, port))


def _supervise(host: str, port: int, workers: int) -> int:
    if port == 0:
        raise SystemExit("empty_server: --workers > 1 needs a fixed --port")
    me = os.path.abspath(__file__)
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                me,
                "--host",
                host,
                "--port",
                str(port),
                "--worker-of",
                str(os.getpid()),
            ]
        )
        for _ in range(workers)
    ]

    def forward(signum: int, _frame: object) -> None:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    rc = 0
    for p in procs:
        while True:
            try:
                code = p.wait()
                break
            except KeyboardInterrupt:
                continue
        if code not in (0, -signal.SIGTERM):
            rc = 1
            forward(signal.SIGTERM, None)  # one worker died: stop the others
    return rc


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--workers", type=int, default=1, help="processes sharing the port")
    parser.add_argument("--worker-of", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker_of:
        _die_with_parent()
        if os.getppid() != args.worker_of:  # supervisor already gone
            return 0
    if args.workers > 1:
        return _supervise(args.host, args.port, args.workers)
    _run_one(args.host, args.port)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
