"""`extproc health`: ask the local decision server's gRPC health service, for container probes.

Kubernetes' built-in `grpc:` probe cannot speak TLS, and the server accepts only mutual TLS
(unless EXTPROC_INSECURE is set), so an exec probe runs this command inside the container: it
dials the server's own port with a client certificate, calls grpc.health.v1.Health/Check and
exits 0 when the answer is SERVING, 1 otherwise (NOT_SERVING while starting or draining, an
unknown service name, a refused connection, a failed handshake or no answer within 2 s).

The address and plaintext mode come from the same EXTPROC_* variables as `extproc serve`, so
a probe in the server's container needs only the client certificate flags.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

# Kubernetes runs the probe as a fresh process each period: the check itself stays well
# inside a probe's timeoutSeconds, interpreter start-up included.
PROBE_TIMEOUT_SECONDS = 2.0
EXIT_OK = 0
EXIT_FAILED = 1

# Addresses a server binds to mean "every interface"; a client reaches them on loopback.
_WILDCARDS = {"0.0.0.0": "127.0.0.1", "[::]": "[::1]", "::": "[::1]"}  # noqa: S104


def local_target(listen: str) -> str:
    """The address to dial for a server bound to `listen` (HOST:PORT): a wildcard host is
    reached over loopback, which every container of the pod shares."""
    host, _, port = listen.rpartition(":")
    return f"{_WILDCARDS.get(host, host)}:{port}"


@dataclass(frozen=True)
class ProbeConfig:
    target: str  # HOST:PORT
    insecure: bool = False
    cert: Path | None = None  # the probe's client certificate (chains to the client CA)
    key: Path | None = None
    ca: Path | None = None  # the CA the server's certificate chains to
    server_name: str | None = None  # name to verify in the server's certificate
    service: str = ""  # "" is the whole server
    live: bool = False  # any answer passes: the process is up, even if not SERVING


def check(config: ProbeConfig, timeout: float = PROBE_TIMEOUT_SECONDS) -> tuple[int, str]:
    """One health check: (exit status, a line saying what was found)."""
    # Imported here so `extproc --help` and the other commands do not pay for gRPC.
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    # A pod's HTTP(S)_PROXY must not send a loopback health check elsewhere.
    options: list[tuple[str, str | int]] = [("grpc.enable_http_proxy", 0)]
    if config.insecure:
        channel = grpc.insecure_channel(config.target, options=options)
    else:
        if config.cert is None or config.key is None or config.ca is None:
            return EXIT_FAILED, "the server uses mTLS: give --cert, --key and --ca"
        try:
            credentials = grpc.ssl_channel_credentials(
                root_certificates=config.ca.read_bytes(),
                private_key=config.key.read_bytes(),
                certificate_chain=config.cert.read_bytes(),
            )
        except OSError as exc:
            return EXIT_FAILED, f"cannot read TLS files: {exc}"
        if config.server_name:
            options.append(("grpc.ssl_target_name_override", config.server_name))
        channel = grpc.secure_channel(config.target, credentials, options=options)
    request = health_pb2.HealthCheckRequest(service=config.service)
    asked = f"{config.target} service {config.service!r}"
    with channel:
        try:
            # Without wait_for_ready a refused connection or failed handshake fails at once;
            # the deadline bounds a peer that accepts and then says nothing.
            reply = health_pb2_grpc.HealthStub(channel).Check(request, timeout=timeout)
        except grpc.RpcError as exc:
            code = exc.code() if isinstance(exc, grpc.Call) else None
            details = exc.details() if isinstance(exc, grpc.Call) else str(exc)
            name = code.name if code is not None else "ERROR"
            return EXIT_FAILED, f"{asked}: {name} {details}".rstrip()
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    what = f"{asked}: {status}"
    if reply.status == health_pb2.HealthCheckResponse.SERVING or config.live:
        return EXIT_OK, what
    return EXIT_FAILED, what


def config_from_args(
    args: argparse.Namespace, environ: Mapping[str, str] = os.environ
) -> ProbeConfig:
    """The probe's settings: flags first, then the server's own EXTPROC_* variables."""
    from extproc.settings import from_env

    settings = from_env(environ)
    return ProbeConfig(
        target=args.address or local_target(settings.listen),
        insecure=settings.insecure,
        cert=args.cert,
        key=args.key,
        ca=args.ca,
        server_name=args.server_name,
        service=args.service,
        live=args.live,
    )


def run(args: argparse.Namespace) -> int:
    try:
        config = config_from_args(args)
    except ValueError as exc:  # an EXTPROC_* variable that does not parse
        print(f"extproc health: {exc}", file=sys.stderr)
        return EXIT_FAILED
    status, message = check(config)
    print(message, file=sys.stdout if status == EXIT_OK else sys.stderr)
    return status


def add_health_command(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register `health` on the top-level subparsers; it sets `func(args) -> exit status`."""
    health = commands.add_parser(
        "health",
        help="gRPC health check of the local server (exit 0 when SERVING), for exec probes",
    )
    health.add_argument(
        "--address", help="HOST:PORT to dial (default: EXTPROC_LISTEN, a wildcard as loopback)"
    )
    health.add_argument(
        "--service", default="", help="a service name the server registers ('' = whole server)"
    )
    health.add_argument("--cert", type=Path, help="the probe's client certificate (PEM)")
    health.add_argument("--key", type=Path, help="its private key (PEM)")
    health.add_argument("--ca", type=Path, help="CA the server's certificate chains to (PEM)")
    health.add_argument(
        "--server-name", help="name to verify in the server's certificate (default: the host)"
    )
    health.add_argument(
        "--live",
        action="store_true",
        help="pass on any answer, NOT_SERVING included (liveness: the process responds)",
    )
    health.set_defaults(func=run)
