"""mTLS client identity: reading the peer certificate from Envoy's messages (adapters/peer.py)
and turning it into an identity (authn/mtls.py).

The constructed messages mirror what Envoy 1.40 sent in an experiment; the last test checks
the same against a running Envoy."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import ipaddress
import json
import shutil
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import grpc
import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from envoy.config.core.v3.address_pb2 import Address, SocketAddress
from envoy.service.auth.v3 import attribute_context_pb2 as attr_pb
from envoy.service.auth.v3 import external_auth_pb2 as authz_pb
from envoy.service.auth.v3 import external_auth_pb2_grpc as authz_grpc
from envoy.service.ext_proc.v3 import external_processor_pb2 as proc_pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as proc_grpc
from google.rpc import code_pb2, status_pb2

from extproc.adapters.peer import (
    DNS_SAN,
    EXT_PROC_ATTRIBUTES_KEY,
    EXT_PROC_PEER_ATTRIBUTES,
    SUBJECT,
    URI_SAN,
    envoy_subject,
    peer_from_ext_authz,
    peer_from_ext_proc,
    peer_from_pem,
)
from extproc.authn.base import AuthnFailure, Identity, PeerCertificate
from extproc.authn.mtls import MtlsAuthenticator, parse_spiffe_id

# ---------------------------------------------------------------------------------------------
# Certificates


@dataclass(frozen=True)
class Issued:
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    @property
    def pem(self) -> str:
        return self.cert.public_bytes(serialization.Encoding.PEM).decode()

    def key_pem(self) -> bytes:
        return self.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )


def _name(*attributes: tuple[x509.ObjectIdentifier, str]) -> x509.Name:
    return x509.Name([x509.NameAttribute(oid, value) for oid, value in attributes])


def make_ca(common_name: str = "test CA") -> Issued:
    key = ec.generate_private_key(ec.SECP256R1())
    name = _name((NameOID.COMMON_NAME, common_name))
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(key, hashes.SHA256())
    )
    return Issued(cert, key)


def make_leaf(
    ca: Issued,
    subject: x509.Name,
    sans: Sequence[x509.GeneralName] = (),
    eku: x509.ObjectIdentifier = ExtendedKeyUsageOID.CLIENT_AUTH,
) -> Issued:
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([eku]), critical=False)
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
    return Issued(builder.sign(ca.key, hashes.SHA256()), key)


# The subjects of the experiment, each with the string Envoy printed for it.
ACME_SUBJECT = _name(
    (NameOID.COUNTRY_NAME, "DE"),
    (NameOID.ORGANIZATION_NAME, "Acme, Inc."),
    (NameOID.ORGANIZATIONAL_UNIT_NAME, "ml+ops"),
    (NameOID.COMMON_NAME, 'svc "x" = y'),
)
ACME_AS_ENVOY_PRINTS_IT = 'CN=svc \\"x\\" = y,OU=ml\\+ops,O=Acme\\, Inc.,C=DE'
FANCY_SUBJECT = _name(
    (NameOID.DOMAIN_COMPONENT, "example"),
    (NameOID.USER_ID, "u1"),
    (NameOID.STREET_ADDRESS, "Main St 1"),
    (NameOID.SERIAL_NUMBER, "42"),
    (NameOID.EMAIL_ADDRESS, "a@b.example"),
    (NameOID.TITLE, "boss"),
    (NameOID.COMMON_NAME, "Jürgen #1; <x>"),
)
FANCY_AS_ENVOY_PRINTS_IT = (
    "CN=J\\C3\\BCrgen #1\\; \\<x\\>,title=boss,emailAddress=a@b.example,serialNumber=42,"
    "street=Main St 1,UID=u1,DC=example"
)
SPIFFE_ID = "spiffe://corp.example/tenant/acme/svc/x"
SPIFFE_SANS: tuple[x509.GeneralName, ...] = (
    x509.UniformResourceIdentifier(SPIFFE_ID),
    x509.UniformResourceIdentifier("https://second.example/id"),
    x509.DNSName("svc-x.corp.example"),
    x509.DNSName("alt.corp.example"),
)


@pytest.fixture(scope="module")
def ca() -> Issued:
    return make_ca()


@pytest.fixture(scope="module")
def acme(ca: Issued) -> Issued:
    return make_leaf(ca, ACME_SUBJECT, SPIFFE_SANS)


def envoy_url_encoded(pem: str) -> str:
    """As Envoy sends `source.certificate`: every byte but letters, digits and -._~ escaped."""
    return quote(pem, safe="")


# ---------------------------------------------------------------------------------------------
# Messages as Envoy builds them


def check_request(principal: str = "", certificate: str = "") -> authz_pb.CheckRequest:
    address = Address(socket_address=SocketAddress(address="127.0.0.1", port_value=35964))
    source = attr_pb.AttributeContext.Peer(
        address=address, principal=principal, certificate=certificate
    )
    return authz_pb.CheckRequest(attributes=attr_pb.AttributeContext(source=source))


def headers_message(attributes: dict[str, Any] | None) -> proc_pb.ProcessingRequest:
    request = proc_pb.ProcessingRequest(request_headers=proc_pb.HttpHeaders())
    if attributes is not None:
        request.attributes[EXT_PROC_ATTRIBUTES_KEY].update(attributes)
    return request


# Recorded from Envoy for the certificate with SPIFFE_SANS (PEM and digest left out).
RECORDED_SPIFFE = {
    "connection.dns_san_peer_certificate": "svc-x.corp.example",
    "connection.mtls": True,
    "request.path": "/spiffe",
    "source.address": "127.0.0.1:35964",
    "connection.uri_san_peer_certificate": SPIFFE_ID,
    "connection.requested_server_name": "",
    "connection.tls_version": "TLSv1.3",
    "connection.subject_peer_certificate": ACME_AS_ENVOY_PRINTS_IT,
}
RECORDED_NO_CERT = {
    "connection.mtls": False,
    "connection.requested_server_name": "",
    "connection.subject_peer_certificate": "",
    "connection.tls_version": "TLSv1.3",
    "request.path": "/none",
    "source.address": "127.0.0.1:35976",
}


# ---------------------------------------------------------------------------------------------
# peer_from_ext_authz


def test_ext_authz_certificate_gives_every_san(acme: Issued) -> None:
    request = check_request(principal=SPIFFE_ID, certificate=envoy_url_encoded(acme.pem))
    assert peer_from_ext_authz(request) == PeerCertificate(
        subject=ACME_AS_ENVOY_PRINTS_IT,
        uri_sans=(SPIFFE_ID, "https://second.example/id"),
        dns_sans=("svc-x.corp.example", "alt.corp.example"),
    )


@pytest.mark.parametrize(
    ("principal", "expected"),
    [
        (SPIFFE_ID, PeerCertificate(uri_sans=(SPIFFE_ID,))),
        ("https://first.example/id", PeerCertificate(uri_sans=("https://first.example/id",))),
        ("only.example", PeerCertificate(dns_sans=("only.example",))),
        ("CN=client-a,O=Acme", PeerCertificate(subject="CN=client-a,O=Acme")),
        ("CN=a:b,O=x://y", PeerCertificate(subject="CN=a:b,O=x://y")),
        ("2.5.4.3=x", PeerCertificate(subject="2.5.4.3=x")),
    ],
)
def test_ext_authz_principal_alone(principal: str, expected: PeerCertificate) -> None:
    # Without include_peer_certificate Envoy sends only the first URI SAN, DNS SAN or subject.
    assert peer_from_ext_authz(check_request(principal=principal)) == expected


def test_ext_authz_without_client_certificate() -> None:
    assert peer_from_ext_authz(check_request()) is None
    assert peer_from_ext_authz(authz_pb.CheckRequest()) is None


def test_ext_authz_unreadable_certificate_falls_back_to_the_principal(
    caplog: pytest.LogCaptureFixture,
) -> None:
    request = check_request(principal=SPIFFE_ID, certificate="-----BEGIN%20CERTIFICATE-----%0Ax")
    assert peer_from_ext_authz(request) == PeerCertificate(uri_sans=(SPIFFE_ID,))
    assert "could not be parsed" in caplog.text


# ---------------------------------------------------------------------------------------------
# peer_from_ext_proc


def test_ext_proc_peer_certificate_attribute_gives_every_san(acme: Issued) -> None:
    # Envoy 1.40 sends connection.peer_certificate as plain PEM; URL-encoded works too.
    for encoded in (acme.pem, envoy_url_encoded(acme.pem)):
        request = headers_message({**RECORDED_SPIFFE, "connection.peer_certificate": encoded})
        assert peer_from_ext_proc(request) == PeerCertificate(
            subject=ACME_AS_ENVOY_PRINTS_IT,
            uri_sans=(SPIFFE_ID, "https://second.example/id"),
            dns_sans=("svc-x.corp.example", "alt.corp.example"),
        )


def test_ext_proc_string_attributes_give_the_first_sans() -> None:
    assert peer_from_ext_proc(headers_message(RECORDED_SPIFFE)) == PeerCertificate(
        subject=ACME_AS_ENVOY_PRINTS_IT,
        uri_sans=(SPIFFE_ID,),
        dns_sans=("svc-x.corp.example",),
    )
    subject_only = {"connection.mtls": True, "connection.subject_peer_certificate": "CN=a,O=b"}
    assert peer_from_ext_proc(headers_message(subject_only)) == PeerCertificate(subject="CN=a,O=b")


def test_ext_proc_without_client_certificate() -> None:
    assert peer_from_ext_proc(headers_message(RECORDED_NO_CERT)) is None
    assert peer_from_ext_proc(headers_message(None)) is None
    # Attributes travel only on the request-headers message.
    body = proc_pb.ProcessingRequest(request_body=proc_pb.HttpBody(body=b"{}"))
    assert peer_from_ext_proc(body) is None


def test_ext_proc_mtls_false_wins_over_anything_else() -> None:
    contradictory = {**RECORDED_SPIFFE, "connection.mtls": False}
    assert peer_from_ext_proc(headers_message(contradictory)) is None


def test_ext_proc_values_of_the_wrong_kind_are_ignored() -> None:
    odd = {"connection.uri_san_peer_certificate": 5, "connection.subject_peer_certificate": True}
    assert peer_from_ext_proc(headers_message(odd)) is None


def test_ext_proc_reading_does_not_change_the_message() -> None:
    request = headers_message(None)
    peer_from_ext_proc(request)
    assert EXT_PROC_ATTRIBUTES_KEY not in request.attributes


# ---------------------------------------------------------------------------------------------
# Subjects printed as Envoy prints them


@pytest.mark.parametrize(
    ("subject", "printed"),
    [
        (ACME_SUBJECT, ACME_AS_ENVOY_PRINTS_IT),
        (FANCY_SUBJECT, FANCY_AS_ENVOY_PRINTS_IT),
        (_name((NameOID.ORGANIZATION_NAME, "Acme"), (NameOID.COMMON_NAME, "client-a")),
         "CN=client-a,O=Acme"),
        (x509.Name([]), ""),
    ],
)  # fmt: skip
def test_subject_matches_envoy(subject: x509.Name, printed: str) -> None:
    assert envoy_subject(subject) == printed


def test_pem_without_sans(ca: Issued) -> None:
    leaf = make_leaf(ca, FANCY_SUBJECT)
    assert peer_from_pem(leaf.pem) == PeerCertificate(subject=FANCY_AS_ENVOY_PRINTS_IT)


# ---------------------------------------------------------------------------------------------
# SPIFFE IDs


@pytest.mark.parametrize(
    "uri",
    [
        "spiffe://corp.example/ns/b",
        "spiffe://corp.example",
        "spiffe://a-b_c.0/x.y/Z-9_",
    ],
)
def test_valid_spiffe_ids(uri: str) -> None:
    parsed = parse_spiffe_id(uri)
    assert parsed is not None and str(parsed) == uri


@pytest.mark.parametrize(
    "uri",
    [
        "spiffe://Corp.example/ns/b",  # upper-case trust domain
        "SPIFFE://corp.example/ns/b",
        "spiffe://corp.example:443/ns/b",
        "spiffe://user@corp.example/ns/b",
        "spiffe://corp.example/ns/b?x=1",
        "spiffe://corp.example/ns/b#f",
        "spiffe://corp.example/ns/b/",
        "spiffe://corp.example//b",
        "spiffe://corp.example/ns/../admin",
        "spiffe://corp.example/./b",
        "spiffe://corp.example/ns%2Fb",
        "spiffe:///ns/b",
        "https://corp.example/ns/b",
        "spiffe://corp.example/" + "a" * 2048,
    ],
)
def test_invalid_spiffe_ids(uri: str) -> None:
    assert parse_spiffe_id(uri) is None


# ---------------------------------------------------------------------------------------------
# MtlsAuthenticator


async def authenticate(
    authenticator: MtlsAuthenticator,
    peer: PeerCertificate | None,
    headers: dict[str, str] | None = None,
) -> Identity | AuthnFailure | None:
    return await authenticator.authenticate(headers or {}, peer)


async def test_spiffe_identity_with_tenant_from_the_path() -> None:
    mtls = MtlsAuthenticator(trust_domains=["corp.example"], tenant_from_path_segment="tenant")
    identity = await authenticate(mtls, PeerCertificate(subject="CN=x", uri_sans=(SPIFFE_ID,)))
    assert isinstance(identity, Identity)
    assert identity.principal == SPIFFE_ID
    assert identity.method == "mtls"
    assert identity.tenant == "acme"
    assert identity.credential_id == "spiffe://corp.example"
    assert identity.claims["trust_domain"] == "corp.example"
    assert identity.claims["spiffe_path"] == "/tenant/acme/svc/x"
    assert identity.expires_at is None


async def test_istio_namespace_as_tenant() -> None:
    mtls = MtlsAuthenticator(trust_domains=["cluster.local"], tenant_from_path_segment="ns")
    peer = PeerCertificate(uri_sans=("spiffe://cluster.local/ns/team-a/sa/client",))
    identity = await authenticate(mtls, peer)
    assert isinstance(identity, Identity) and identity.tenant == "team-a"


@pytest.mark.parametrize(
    ("path", "tenant", "reason"),
    [
        ("/svc/x", None, None),
        ("/tenant", None, "ambiguous_tenant"),
        ("/svc/tenant", None, "ambiguous_tenant"),
        ("/tenant/a/tenant/b", None, "ambiguous_tenant"),
        ("/x/tenant/acme", "acme", None),
    ],
)
async def test_tenant_segment_edge_cases(path: str, tenant: str | None, reason: str | None) -> None:
    mtls = MtlsAuthenticator(trust_domains=["corp.example"], tenant_from_path_segment="tenant")
    outcome = await authenticate(mtls, PeerCertificate(uri_sans=(f"spiffe://corp.example{path}",)))
    if reason is None:
        assert isinstance(outcome, Identity) and outcome.tenant == tenant
    else:
        assert isinstance(outcome, AuthnFailure) and outcome.reason == reason


async def test_no_certificate_is_no_credential_whatever_the_headers_say() -> None:
    mtls = MtlsAuthenticator(trust_domains=["corp.example"], subjects=["CN=a"])
    forged = {"x-forwarded-client-cert": f"URI={SPIFFE_ID}", "x-client-subject": "CN=a"}
    assert await authenticate(mtls, None, forged) is None


async def test_other_trust_domain_is_refused() -> None:
    mtls = MtlsAuthenticator(trust_domains=["corp.example"])
    peer = PeerCertificate(subject="CN=x", uri_sans=("spiffe://evil.example/tenant/acme",))
    outcome = await authenticate(mtls, peer)
    assert isinstance(outcome, AuthnFailure)
    assert outcome.reason == "certificate_not_accepted" and not outcome.unavailable


async def test_spiffe_needs_exactly_one_uri_san() -> None:
    mtls = MtlsAuthenticator(trust_domains=["corp.example"], subjects=["CN=two"])
    two = PeerCertificate(subject="CN=two", uri_sans=(SPIFFE_ID, "https://second.example/id"))
    identity = await authenticate(mtls, two)
    # Not an X.509-SVID: only the subject can name the caller, and it is allowed here.
    assert isinstance(identity, Identity) and identity.principal == "CN=two"
    assert identity.credential_id == "x509-subject"
    strict = MtlsAuthenticator(trust_domains=["corp.example"])
    assert isinstance(await authenticate(strict, two), AuthnFailure)


async def test_subject_exact_and_pattern() -> None:
    mtls = MtlsAuthenticator(
        subjects=[ACME_AS_ENVOY_PRINTS_IT], subject_patterns=[r"CN=batch-[0-9]+,O=Acme"]
    )
    for subject in (ACME_AS_ENVOY_PRINTS_IT, "CN=batch-7,O=Acme"):
        identity = await authenticate(mtls, PeerCertificate(subject=subject))
        assert isinstance(identity, Identity) and identity.principal == subject
        assert identity.tenant is None
    for subject in ("CN=batch-7,O=Acme,O=Evil", "CN=batch-x,O=Acme", "", "CN=svc"):
        outcome = await authenticate(mtls, PeerCertificate(subject=subject))
        assert isinstance(outcome, AuthnFailure)


async def test_a_spiffe_id_in_an_accepted_domain_wins_over_the_subject() -> None:
    mtls = MtlsAuthenticator(trust_domains=["corp.example"], subjects=["CN=x"])
    identity = await authenticate(mtls, PeerCertificate(subject="CN=x", uri_sans=(SPIFFE_ID,)))
    assert isinstance(identity, Identity) and identity.principal == SPIFFE_ID


async def test_end_to_end_from_an_ext_proc_message(acme: Issued) -> None:
    request = headers_message({**RECORDED_SPIFFE, "connection.peer_certificate": acme.pem})
    mtls = MtlsAuthenticator(trust_domains=["corp.example"], subjects=[ACME_AS_ENVOY_PRINTS_IT])
    identity = await authenticate(mtls, peer_from_ext_proc(request))
    # Two URI SANs: not an SVID, so the (allowed) subject names the caller.
    assert isinstance(identity, Identity) and identity.principal == ACME_AS_ENVOY_PRINTS_IT


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"trust_domains": "corp.example"},
        {"trust_domains": ["spiffe://corp.example"]},
        {"trust_domains": ["Corp.example"]},
        {"subjects": [""]},
        {"subject_patterns": ["CN=("]},
        {"trust_domains": ["corp.example"], "tenant_from_path_segment": "a/b"},
        {"trust_domains": ["corp.example"], "tenant_from_path_segment": ""},
    ],
)
def test_constructor_validates(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        MtlsAuthenticator(**kwargs)


# ---------------------------------------------------------------------------------------------
# Against a running Envoy: what it sends is what the constructed messages above assume


class Recorder(authz_grpc.AuthorizationServicer, proc_grpc.ExternalProcessorServicer):  # type: ignore[misc]
    """Keeps every Check request and every ext_proc request-headers message; allows all."""

    def __init__(self) -> None:
        self.checks: list[authz_pb.CheckRequest] = []
        self.headers: list[proc_pb.ProcessingRequest] = []

    async def Check(self, request: authz_pb.CheckRequest, context: Any) -> authz_pb.CheckResponse:
        self.checks.append(request)
        return authz_pb.CheckResponse(status=status_pb2.Status(code=code_pb2.OK))

    async def Process(
        self, requests: AsyncIterator[proc_pb.ProcessingRequest], context: Any
    ) -> AsyncIterator[proc_pb.ProcessingResponse]:
        async for request in requests:
            if request.HasField("request_headers"):
                self.headers.append(request)
                yield proc_pb.ProcessingResponse(request_headers=proc_pb.HeadersResponse())


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _sds(name: str, sds_dir: Path) -> dict[str, Any]:
    source = {"path": f"{sds_dir}/{name}.yaml", "watched_directory": {"path": str(sds_dir)}}
    return {
        "name": name,
        "sds_config": {"resource_api_version": "V3", "path_config_source": source},
    }


def _typed(type_name: str, **config: Any) -> dict[str, Any]:
    return {"@type": f"type.googleapis.com/envoy.{type_name}", **config}


def _envoy_config(tmp: Path, listen: int, admin: int, grpc_port: int) -> dict[str, Any]:
    """The listener's TLS settings are the ones proposed for envoy/ext_proc.yaml and
    envoy/ext_authz.yaml: a client certificate is requested, not required, and checked against
    the client CA from a file-based SDS secret."""
    tls = _typed(
        "extensions.transport_sockets.tls.v3.DownstreamTlsContext",
        require_client_certificate=False,
        common_tls_context={
            "alpn_protocols": ["h2", "http/1.1"],
            "tls_certificate_sds_secret_configs": [_sds("listener_cert", tmp / "sds")],
            "validation_context_sds_secret_config": _sds("client_ca", tmp / "sds"),
        },
    )
    recorder = {"envoy_grpc": {"cluster_name": "recorder"}}
    filters = [
        {
            "name": "envoy.filters.http.ext_authz",
            "typed_config": _typed(
                "extensions.filters.http.ext_authz.v3.ExtAuthz",
                transport_api_version="V3",
                grpc_service={**recorder, "timeout": "5s"},
                include_peer_certificate=True,
            ),
        },
        {
            "name": "envoy.filters.http.ext_proc",
            "typed_config": _typed(
                "extensions.filters.http.ext_proc.v3.ExternalProcessor",
                grpc_service=recorder,
                message_timeout="5s",
                processing_mode={"request_header_mode": "SEND", "response_header_mode": "SKIP"},
                # The recommended attributes, plus the string ones peer.py falls back to.
                request_attributes=[*EXT_PROC_PEER_ATTRIBUTES, URI_SAN, DNS_SAN, SUBJECT],
            ),
        },
        {
            "name": "envoy.filters.http.router",
            "typed_config": _typed("extensions.filters.http.router.v3.Router"),
        },
    ]
    manager = _typed(
        "extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        stat_prefix="test",
        route_config={
            "virtual_hosts": [
                {
                    "name": "all",
                    "domains": ["*"],
                    "routes": [{"match": {"prefix": "/"}, "direct_response": {"status": 200}}],
                }
            ]
        },
        http_filters=filters,
    )
    h2 = _typed(
        "extensions.upstreams.http.v3.HttpProtocolOptions",
        explicit_http_config={"http2_protocol_options": {}},
    )
    return {
        "node": {"id": "test", "cluster": "test"},
        "admin": {"address": _address(admin)},
        "static_resources": {
            "listeners": [
                {
                    "name": "https",
                    "address": _address(listen),
                    "filter_chains": [
                        {
                            "transport_socket": {
                                "name": "envoy.transport_sockets.tls",
                                "typed_config": tls,
                            },
                            "filters": [
                                {
                                    "name": "envoy.filters.network.http_connection_manager",
                                    "typed_config": manager,
                                }
                            ],
                        }
                    ],
                }
            ],
            "clusters": [
                {
                    "name": "recorder",
                    "type": "STATIC",
                    "connect_timeout": "1s",
                    "typed_extension_protocol_options": {
                        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": h2
                    },
                    "load_assignment": {
                        "cluster_name": "recorder",
                        "endpoints": [
                            {"lb_endpoints": [{"endpoint": {"address": _address(grpc_port)}}]}
                        ],
                    },
                }
            ],
        },
    }


def _address(port: int) -> dict[str, Any]:
    return {"socket_address": {"address": "127.0.0.1", "port_value": port}}


def _write_sds(tmp: Path, ca: Issued, server: Issued) -> None:
    sds = tmp / "sds"
    sds.mkdir()
    (tmp / "server.crt").write_text(server.pem)
    (tmp / "server.key").write_bytes(server.key_pem())
    (tmp / "client-ca.crt").write_text(ca.pem)
    secret = '"@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret'
    (sds / "listener_cert.yaml").write_text(
        f"resources:\n- {secret}\n  name: listener_cert\n  tls_certificate:\n"
        f"    certificate_chain: {{ filename: {tmp}/server.crt }}\n"
        f"    private_key: {{ filename: {tmp}/server.key }}\n"
    )
    (sds / "client_ca.yaml").write_text(
        f"resources:\n- {secret}\n  name: client_ca\n  validation_context:\n"
        f"    trusted_ca: {{ filename: {tmp}/client-ca.crt }}\n"
    )


@dataclass
class EnvoyUnderTest:
    url: str
    ca: Issued
    recorder: Recorder


@contextlib.contextmanager
def _envoy_process(config: Path, log: Path, admin: int) -> Iterator[None]:
    binary = shutil.which("envoy", path=str(Path(sys.executable).parent))
    if binary is None:
        pytest.fail("envoy binary not found next to the Python interpreter")
    with log.open("wb") as log_file:
        proc = subprocess.Popen(
            [binary, "-c", str(config), "--concurrency", "1", "--use-dynamic-base-id"],
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
        try:
            _wait_live(proc, admin, log)
            yield
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)


def _wait_live(proc: subprocess.Popen[bytes], admin: int, log: Path) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"envoy exited with {proc.returncode}:\n{log.read_text()}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"http://127.0.0.1:{admin}/ready", timeout=1).text.strip() == "LIVE":
                return
        time.sleep(0.1)
    pytest.fail(f"envoy not LIVE:\n{log.read_text()}")


@pytest.fixture
async def envoy(tmp_path: Path) -> AsyncIterator[EnvoyUnderTest]:
    ca = make_ca("client CA")
    server = make_leaf(
        ca,
        _name((NameOID.COMMON_NAME, "localhost")),
        [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))],
        ExtendedKeyUsageOID.SERVER_AUTH,
    )
    _write_sds(tmp_path, ca, server)
    recorder = Recorder()
    grpc_server = grpc.aio.server()
    authz_grpc.add_AuthorizationServicer_to_server(recorder, grpc_server)
    proc_grpc.add_ExternalProcessorServicer_to_server(recorder, grpc_server)
    grpc_port = grpc_server.add_insecure_port("127.0.0.1:0")
    await grpc_server.start()
    listen, admin = _free_port(), _free_port()
    config = tmp_path / "envoy.json"
    config.write_text(json.dumps(_envoy_config(tmp_path, listen, admin, grpc_port)))
    try:
        with _envoy_process(config, tmp_path / "envoy.log", admin):
            yield EnvoyUnderTest(f"https://127.0.0.1:{listen}", ca, recorder)
    finally:
        await grpc_server.stop(grace=None)


def _client_tls(ca: Issued, tmp: Path, client: Issued | None) -> ssl.SSLContext:
    context = ssl.create_default_context(cadata=ca.pem)
    if client is not None:
        (tmp / "client.crt").write_text(client.pem)
        (tmp / "client.key").write_bytes(client.key_pem())
        context.load_cert_chain(tmp / "client.crt", tmp / "client.key")
    return context


# Attribute names where OpenSSL and cryptography differ, plus characters OpenSSL escapes.
NAMES_SUBJECT = _name(
    (NameOID.GIVEN_NAME, "Ada"),
    (NameOID.SURNAME, "Lovelace"),
    (NameOID.INITIALS, "AL"),
    (NameOID.PSEUDONYM, "countess"),
    (NameOID.GENERATION_QUALIFIER, "I"),
    (NameOID.DN_QUALIFIER, "q"),
    (NameOID.POSTAL_CODE, "12345"),
    (NameOID.BUSINESS_CATEGORY, "Private Organization"),
    (NameOID.UNSTRUCTURED_NAME, "box"),
    (NameOID.COMMON_NAME, " tab\there, del\x7f and 漢 "),
)


@pytest.mark.envoy
async def test_envoy_reports_the_client_certificate_as_assumed(
    envoy: EnvoyUnderTest, tmp_path: Path
) -> None:
    spiffe = make_leaf(envoy.ca, ACME_SUBJECT, SPIFFE_SANS)
    fancy = make_leaf(envoy.ca, FANCY_SUBJECT)
    names = make_leaf(envoy.ca, NAMES_SUBJECT, [x509.DNSName("only.example")])
    expected = {
        "spiffe": PeerCertificate(
            subject=ACME_AS_ENVOY_PRINTS_IT,
            uri_sans=(SPIFFE_ID, "https://second.example/id"),
            dns_sans=("svc-x.corp.example", "alt.corp.example"),
        ),
        "fancy": PeerCertificate(subject=FANCY_AS_ENVOY_PRINTS_IT),
        "names": PeerCertificate(subject=envoy_subject(NAMES_SUBJECT), dns_sans=("only.example",)),
        "none": None,
    }
    clients = {"spiffe": spiffe, "fancy": fancy, "names": names, "none": None}
    for name, client in clients.items():
        tls = _client_tls(envoy.ca, tmp_path, client)
        async with httpx.AsyncClient(verify=tls, http2=True) as http:
            assert (await http.get(f"{envoy.url}/{name}")).status_code == 200
        check, headers = envoy.recorder.checks[-1], envoy.recorder.headers[-1]
        assert peer_from_ext_authz(check) == expected[name], name
        assert peer_from_ext_proc(headers) == expected[name], name
        # Without the PEM, the string attributes agree on the subject and the first SANs.
        fields = headers.attributes[EXT_PROC_ATTRIBUTES_KEY].fields
        if "connection.peer_certificate" in fields:
            del fields["connection.peer_certificate"]
        peer = expected[name]
        first = (
            None
            if peer is None
            else PeerCertificate(peer.subject, peer.uri_sans[:1], peer.dns_sans[:1])
        )
        assert peer_from_ext_proc(headers) == first, name
        # ... and so does the principal ext_authz sends without the certificate.
        check.attributes.source.certificate = ""
        principal = peer_from_ext_authz(check)
        if peer is None:
            assert principal is None
        elif peer.uri_sans:
            assert principal == PeerCertificate(uri_sans=peer.uri_sans[:1])
        elif peer.dns_sans:
            assert principal == PeerCertificate(dns_sans=peer.dns_sans[:1])
        else:
            assert principal == PeerCertificate(subject=peer.subject)


@pytest.mark.envoy
async def test_envoy_refuses_a_certificate_from_another_ca(
    envoy: EnvoyUnderTest, tmp_path: Path
) -> None:
    stranger = make_leaf(make_ca("other CA"), _name((NameOID.COMMON_NAME, "evil")))
    tls = _client_tls(envoy.ca, tmp_path, stranger)
    async with httpx.AsyncClient(verify=tls) as http:
        with pytest.raises(httpx.HTTPError):
            await http.get(f"{envoy.url}/stranger")
    await asyncio.sleep(0)
    assert envoy.recorder.checks == []
