"""The decision server process: gRPC services on grpc.aio, workers, TLS, graceful shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import multiprocessing
import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from multiprocessing.synchronize import Event as ProcessEvent
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer

from extproc._proto.extproc.admin.v1 import admin_pb2_grpc
from extproc.adapters import ext_authz, ext_proc, ext_proc_errors
from extproc.adapters.admin import AdminService
from extproc.adapters.ext_authz import AuthorizationService
from extproc.adapters.ext_proc import ExternalProcessorService
from extproc.audit.chain import AuditLog, worker_path
from extproc.authn.apikey import ApiKeyStore
from extproc.observe import Observer
from extproc.parent_death import die_with_parent
from extproc.pipeline.run import DecisionCore
from extproc.policy.store import PolicyStore
from extproc.quota.admit import QuotaEngine
from extproc.quota.factory import open_quota_store
from extproc.settings import Settings
from extproc.stack_dump import install_task_dump, install_thread_dump
from extproc.telemetry import metrics, otel_protos
from extproc.telemetry.export import MetricsExport, SharedMetrics, metrics_wanted

log = logging.getLogger(__name__)

SERVICES = (
    "envoy.service.ext_proc.v3.ExternalProcessor",
    "envoy.service.auth.v3.Authorization",
    "extproc.admin.v1.Admin",
)
KEY_WARM_TIMEOUT_SECONDS = 5.0


class _EarlySignals:
    """Stop and reload signals that arrive while a worker starts, before its event loop
    handles them: a SIGTERM then must end the worker cleanly, not kill it mid-import."""

    stop = False
    reload = False

    @classmethod
    def install(cls) -> None:
        signal.signal(signal.SIGTERM, cls._on_stop)
        signal.signal(signal.SIGINT, cls._on_stop)
        signal.signal(signal.SIGHUP, cls._on_reload)

    @classmethod
    def _on_stop(cls, _signum: int, _frame: object) -> None:
        cls.stop = True

    @classmethod
    def _on_reload(cls, _signum: int, _frame: object) -> None:
        cls.reload = True


def _read(path: Path) -> bytes:
    return path.read_bytes()


class ReloadingServerCredentials:
    """mTLS credentials that pick up renewed certificate files without a restart.

    gRPC asks the fetcher on every new handshake; it re-reads the files only when their
    modification times changed, so the cost per connection is three stat calls.
    """

    def __init__(self, cert: Path, key: Path, client_ca: Path) -> None:
        self._paths = (cert, key, client_ca)
        self._stamp = self._mtimes()
        self.credentials = grpc.dynamic_ssl_server_credentials(
            self._config(),
            self._fetch,  # type: ignore[arg-type]  # gRPC documents None as "unchanged"
            require_client_authentication=True,
        )

    def _mtimes(self) -> tuple[int, ...]:
        return tuple(p.stat().st_mtime_ns for p in self._paths)

    def _config(self) -> grpc.ServerCertificateConfiguration:
        cert, key, ca = (_read(p) for p in self._paths)
        # Files are replaced one by one: a new certificate beside the old key is not a pair yet.
        public = x509.load_pem_x509_certificate(cert).public_key()
        private = serialization.load_pem_private_key(key, password=None)
        if public.public_numbers() != private.public_key().public_numbers():  # type: ignore[union-attr]
            raise ValueError("certificate and key do not match (yet)")
        return grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=ca)

    def _fetch(self) -> grpc.ServerCertificateConfiguration | None:
        try:
            stamp = self._mtimes()
            if stamp == self._stamp:
                return None
            config = self._config()
        except (OSError, ValueError) as exc:
            log.warning("TLS files changed but cannot be used yet (%s); keeping the current", exc)
            return None
        self._stamp = stamp
        log.info("TLS certificate files changed; new handshakes use them")
        return config


def build_server(
    settings: Settings, core: DecisionCore, store: PolicyStore
) -> tuple[grpc.aio.Server, HealthServicer, int]:
    options = [
        ("grpc.so_reuseport", 1 if settings.workers > 1 else 0),
        # Envoy multiplexes many streams per connection; do not cap them below its own limit.
        ("grpc.max_concurrent_streams", 1024),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ]
    server = grpc.aio.server(options=options)
    ext_proc.add_to_server(ExternalProcessorService(core), server)
    ext_authz.add_to_server(AuthorizationService(core), server)
    admin_pb2_grpc.add_AdminServicer_to_server(AdminService(core, store), server)
    health_servicer = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    if settings.insecure:
        port = server.add_insecure_port(settings.listen)
    else:
        assert settings.tls_cert and settings.tls_key and settings.tls_client_ca
        creds = ReloadingServerCredentials(
            settings.tls_cert, settings.tls_key, settings.tls_client_ca
        )
        port = server.add_secure_port(settings.listen, creds.credentials)
    return server, health_servicer, port


async def _set_health(servicer: HealthServicer, serving: bool) -> None:
    status = (
        health_pb2.HealthCheckResponse.SERVING
        if serving
        else health_pb2.HealthCheckResponse.NOT_SERVING
    )
    for name in ("", *SERVICES):
        await servicer.set(name, status)


async def _warm_key_sources(store: PolicyStore) -> None:
    warmers = [source.warm() for source in store.resources.key_sources.values()]
    if not warmers:
        return
    try:
        await asyncio.wait_for(asyncio.gather(*warmers), KEY_WARM_TIMEOUT_SECONDS)
    except TimeoutError:
        log.warning("JWKS prefetch did not finish in %.0f s; continuing", KEY_WARM_TIMEOUT_SECONDS)


def _observer(settings: Settings) -> Observer:
    audit = None
    if settings.audit_log is not None:
        key = settings.audit_key_file.read_bytes().strip() if settings.audit_key_file else None
        audit = AuditLog(
            settings.audit_log,
            key,
            on_drop=metrics.AUDIT_DROPPED.inc,
            max_bytes=settings.audit_max_bytes,
        )
    tracing = None
    if settings.otlp_endpoint:
        otel_protos.require_intact()
        from extproc.telemetry.tracing import Tracing  # the OTel SDK only when it is used

        tracing = Tracing(settings.otlp_endpoint, settings.trace_sample_ratio)
    return Observer(audit, tracing, count=metrics_wanted(settings))


async def serve(
    settings: Settings,
    on_ready: Callable[[int], None] | None = None,
    export_metrics: bool = True,
) -> None:
    """Run one worker until SIGTERM/SIGINT, then drain in-flight streams for grace_seconds.
    `export_metrics`: this process serves its own metrics (False under a supervisor)."""
    install_task_dump(asyncio.get_running_loop())  # before the port opens: see dump_stacks()
    api_keys = ApiKeyStore.load(settings.api_keys_file)
    store = PolicyStore(settings.policy_dir, api_keys, os.environ)
    observer = _observer(settings)
    export = MetricsExport(settings) if export_metrics and metrics_wanted(settings) else None
    core = DecisionCore(store, QuotaEngine(await open_quota_store(settings)), observer)
    server, health_servicer, port = build_server(settings, core, store)
    # grpc's health servicer starts with "" SERVING; not before the keys are warm.
    await _set_health(health_servicer, False)
    await server.start()
    await _warm_key_sources(store)
    ext_proc_errors.warm()
    # What startup built (policies, protobuf descriptors, TLS, the store client) lives as long
    # as the process: out of the collector's sight, every full collection stays short.
    gc.collect()
    gc.freeze()
    await _set_health(health_servicer, True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    reloads: set[asyncio.Task[bool]] = set()

    def reload_now() -> None:
        task = asyncio.create_task(store.reload_async())
        reloads.add(task)  # keep a reference until it is done
        task.add_done_callback(reloads.discard)

    loop.add_signal_handler(signal.SIGHUP, reload_now)
    if _EarlySignals.stop:
        stop.set()
    if _EarlySignals.reload:
        reload_now()
    watchers = [asyncio.create_task(api_keys.watch(), name="api-key-watch")]
    if settings.policy_watch_seconds > 0:
        watch = store.watch(settings.policy_watch_seconds)
        watchers.append(asyncio.create_task(watch, name="policy-watch"))
    log.info(
        "serving on %s (pid %d, policy revision %s, %d policies)",
        settings.listen.rpartition(":")[0] + f":{port}",
        os.getpid(),
        store.current.revision,
        len(store.current.policies),
    )
    if on_ready is not None:
        on_ready(port)
    await stop.wait()
    # Tell health checkers first, so Envoy stops sending new streams, then drain.
    await _set_health(health_servicer, False)
    log.info("shutting down; draining for up to %.1f s", settings.grace_seconds)
    await server.stop(settings.grace_seconds)
    for watcher in watchers:
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
    for source in store.resources.key_sources.values():
        await source.aclose()
    for introspector in store.resources.introspectors.values():
        await introspector.aclose()
    await core.quotas.close()
    await asyncio.sleep(0)  # let settlements that finished the last exchanges record them
    observer.close()
    if export is not None:
        export.close()


def run_worker(settings: Settings, export_metrics: bool = True) -> None:
    _EarlySignals.install()
    install_thread_dump()
    configure_logging(settings.log_level)
    try:
        import uvloop  # optional: 10 to 20 % faster here (DESIGN.md)
    except ImportError:
        asyncio.run(serve(settings, export_metrics=export_metrics))
    else:
        uvloop.run(serve(settings, export_metrics=export_metrics))


def configure_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s [%(process)d] %(message)s",
    )


def run(settings: Settings) -> int:
    """Serve with `settings.workers` processes sharing one port (SO_REUSEPORT)."""
    if settings.workers == 1:
        run_worker(settings)
        return 0
    return _supervise(settings)


def _run_supervised_worker(
    settings: Settings, supervisor_pid: int, handles_signals: ProcessEvent
) -> None:
    die_with_parent(supervisor_pid)  # a killed supervisor must not leave workers serving on
    _EarlySignals.install()
    handles_signals.set()
    run_worker(settings, export_metrics=False)


@dataclass
class _Worker:
    process: multiprocessing.process.BaseProcess
    # Set by the worker once its own handlers are in place. Until then a forwarded SIGTERM
    # would kill it with the default action (exit -15), so signals wait in `pending`.
    handles_signals: ProcessEvent
    pending: list[int] = field(default_factory=list)
    stop_sent: bool = False

    def request_stop(self) -> None:
        if not self.stop_sent:
            self.stop_sent = True
            self.pending.append(signal.SIGTERM)

    def deliver(self) -> None:
        if not self.pending or not self.handles_signals.is_set():
            return
        pid = self.process.pid
        if pid is not None and self.process.is_alive():
            for signum in self.pending:
                os.kill(pid, signum)
        self.pending.clear()


def _supervise(settings: Settings) -> int:
    """Start the workers, restart one that dies (bounded), forward SIGTERM/SIGINT to all."""
    configure_logging(settings.log_level)
    # Before any worker starts: they find the shared metrics directory in their environment.
    shared = SharedMetrics(settings) if metrics_wanted(settings) else None
    try:
        return _supervise_workers(settings, shared)
    finally:
        if shared is not None:
            shared.close()


def _supervise_workers(settings: Settings, shared: SharedMetrics | None) -> int:
    ctx = multiprocessing.get_context("spawn")
    stopping = False

    def spawn(index: int) -> _Worker:
        ready = ctx.Event()
        own = settings
        if settings.audit_log is not None:  # one hash chain per worker
            own = replace(settings, audit_log=worker_path(settings.audit_log, index))
        process = ctx.Process(target=_run_supervised_worker, args=(own, os.getpid(), ready))
        process.start()
        return _Worker(process, ready)

    workers: list[_Worker] = []

    def _forward(signum: int, _frame: object) -> None:
        for w in workers:
            w.pending.append(signum)
            w.deliver()

    def _stop(_signum: int, _frame: object) -> None:
        # The loop below asks every worker to stop, also one spawned while this ran.
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    # SIGHUP reloads policies in every worker (and must not end the supervisor).
    signal.signal(signal.SIGHUP, _forward)
    workers.extend(spawn(i) for i in range(settings.workers))
    restarts: list[float] = []
    while True:
        for i, w in enumerate(workers):
            if stopping:
                w.request_stop()
            w.deliver()
            w.process.join(timeout=0.2)
            if w.process.is_alive() or stopping:
                continue
            now = time.monotonic()
            restarts = [t for t in restarts if now - t < 60] + [now]
            if len(restarts) > 5:
                log.error("workers keep dying (%d restarts in 60 s); giving up", len(restarts))
                _stop(signal.SIGTERM, None)
                break
            log.error("worker %d exited with %s; restarting it", w.process.pid, w.process.exitcode)
            if shared is not None and w.process.pid is not None:
                shared.worker_gone(w.process.pid)
            workers[i] = spawn(i)
        if stopping and all(not w.process.is_alive() for w in workers):
            return 0 if all(w.process.exitcode == 0 for w in workers) else 1
