"""Dev PKI: what it creates, when it reuses, how it renews, and what Envoy's SDS files say."""

from __future__ import annotations

import datetime as dt
import ipaddress
import stat
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from extproc.tls import (
    DECISION_SERVER_SPIFFE_ID,
    ENVOY_CLIENT_SPIFFE_ID,
    DevPki,
    ensure_dev_pki,
    load_server_credentials,
    renew_certs,
    server_credentials_version,
)


@pytest.fixture
def pki(tmp_path: Path) -> DevPki:
    return ensure_dev_pki(tmp_path / "pki")


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _leaves(pki: DevPki) -> list[tuple[Path, Path]]:
    return [
        (pki.listener_cert, pki.listener_key),
        (pki.server_cert, pki.server_key),
        (pki.envoy_client_cert, pki.envoy_client_key),
    ]


def _serials(pki: DevPki) -> dict[str, int]:
    return {cert.name: _cert(cert).serial_number for cert, _ in _leaves(pki)}


def _sds(pki: DevPki, name: str) -> dict[str, Any]:
    doc = yaml.safe_load((pki.sds_dir / f"{name}.yaml").read_text())
    (resource,) = doc["resources"]
    assert isinstance(resource, dict)
    return resource


def test_creates_ca_and_leaves(pki: DevPki) -> None:
    ca = _cert(pki.ca_cert)
    bc = ca.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca and bc.value.path_length == 0
    assert ca.extensions.get_extension_for_class(x509.KeyUsage).value.key_cert_sign
    assert isinstance(ca.public_key(), ec.EllipticCurvePublicKey)
    assert ca.public_key().curve.name == "secp256r1"  # type: ignore[union-attr]
    lifetime = ca.not_valid_after_utc - ca.not_valid_before_utc
    assert dt.timedelta(days=360) < lifetime < dt.timedelta(days=370)
    for cert_path, _ in _leaves(pki):
        assert cert_path.is_file()


def test_private_keys_are_0600_and_nothing_is_world_writable(pki: DevPki) -> None:
    keys = [pki.ca_key, *(key for _, key in _leaves(pki)), *pki.sds_dir.glob("*.key")]
    assert len(keys) >= 6
    for key in keys:
        assert stat.S_IMODE(key.stat().st_mode) == 0o600, key
    for path in pki.directory.rglob("*"):
        assert not path.stat().st_mode & stat.S_IWOTH, path
    # No temp files left behind by the atomic writes.
    assert not list(pki.directory.rglob("*.tmp"))


@pytest.mark.parametrize(
    ("attr", "eku", "dns", "ips", "uris"),
    [
        (
            "listener_cert",
            ExtendedKeyUsageOID.SERVER_AUTH,
            ["localhost"],
            ["127.0.0.1", "::1"],
            [],
        ),
        (
            "server_cert",
            ExtendedKeyUsageOID.SERVER_AUTH,
            ["localhost"],
            ["127.0.0.1", "::1"],
            [DECISION_SERVER_SPIFFE_ID],
        ),
        ("envoy_client_cert", ExtendedKeyUsageOID.CLIENT_AUTH, [], [], [ENVOY_CLIENT_SPIFFE_ID]),
    ],
)
def test_leaf_chain_ekus_and_sans(
    pki: DevPki,
    attr: str,
    eku: x509.ObjectIdentifier,
    dns: list[str],
    ips: list[str],
    uris: list[str],
) -> None:
    ca = _cert(pki.ca_cert)
    leaf = _cert(getattr(pki, attr))
    leaf.verify_directly_issued_by(ca)  # raises if not signed by the dev CA
    assert leaf.issuer == ca.subject
    assert not leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert list(leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [eku]
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == dns
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address(i) for i in ips]
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == uris
    assert leaf.not_valid_after_utc <= ca.not_valid_after_utc


def test_keys_match_certificates(pki: DevPki) -> None:
    for cert_path, key_path in _leaves(pki):
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        assert _cert(cert_path).public_key() == key.public_key()


def test_reuses_valid_pki(tmp_path: Path, pki: DevPki) -> None:
    before = {p: p.read_bytes() for p in pki.directory.rglob("*") if p.is_file()}
    again = ensure_dev_pki(tmp_path / "pki")
    assert again == pki
    after = {p: p.read_bytes() for p in pki.directory.rglob("*") if p.is_file()}
    assert after == before


def test_regenerates_missing_leaf_from_same_ca(tmp_path: Path, pki: DevPki) -> None:
    ca_serial = _cert(pki.ca_cert).serial_number
    pki.server_key.unlink()
    ensure_dev_pki(tmp_path / "pki")
    assert _cert(pki.ca_cert).serial_number == ca_serial
    assert load_server_credentials(pki).key_pem == pki.server_key.read_bytes()


def test_regenerates_everything_when_ca_is_broken(tmp_path: Path, pki: DevPki) -> None:
    ca_serial = _cert(pki.ca_cert).serial_number
    pki.ca_key.write_bytes(b"not a key")
    ensure_dev_pki(tmp_path / "pki")
    assert _cert(pki.ca_cert).serial_number != ca_serial
    for cert_path, _ in _leaves(pki):
        _cert(cert_path).verify_directly_issued_by(_cert(pki.ca_cert))


def test_renew_issues_new_serials_from_same_ca(pki: DevPki) -> None:
    ca_before = pki.ca_cert.read_bytes()
    serials_before = _serials(pki)
    version_before = server_credentials_version(pki)
    renew_certs(pki)
    assert pki.ca_cert.read_bytes() == ca_before
    serials_after = _serials(pki)
    for name, serial in serials_before.items():
        assert serials_after[name] != serial, name
    for cert_path, _ in _leaves(pki):
        _cert(cert_path).verify_directly_issued_by(_cert(pki.ca_cert))
    # The decision server's change signal moved, and what it reads is a matching pair.
    assert server_credentials_version(pki) != version_before
    creds = load_server_credentials(pki)
    assert _cert_from_pem(creds.cert_pem).serial_number == serials_after["server.crt"]
    assert creds.ca_pem == ca_before


def _cert_from_pem(pem: bytes) -> x509.Certificate:
    return x509.load_pem_x509_certificate(pem)


def test_sds_files_parse_and_point_at_current_files(pki: DevPki) -> None:
    _assert_sds_current(pki)
    renew_certs(pki)
    _assert_sds_current(pki)


def _assert_sds_current(pki: DevPki) -> None:
    secret_type = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"
    for name, cert_path, key_path in (
        ("listener_cert", pki.listener_cert, pki.listener_key),
        ("upstream_client_cert", pki.envoy_client_cert, pki.envoy_client_key),
    ):
        res = _sds(pki, name)
        assert res["@type"] == secret_type
        assert res["name"] == name
        chain = Path(res["tls_certificate"]["certificate_chain"]["filename"])
        key = Path(res["tls_certificate"]["private_key"]["filename"])
        # Absolute (Envoy resolves relative paths against its cwd), inside the watched dir.
        assert chain.is_absolute() and chain.parent == pki.sds_dir
        assert key.parent == pki.sds_dir
        # The SDS file names the current generation: same bytes as the stable copies.
        assert chain.read_bytes() == cert_path.read_bytes()
        assert key.read_bytes() == key_path.read_bytes()
        assert stat.S_IMODE(key.stat().st_mode) == 0o600
    ca = _sds(pki, "upstream_ca")
    assert ca["@type"] == secret_type
    trusted = Path(ca["validation_context"]["trusted_ca"]["filename"])
    assert trusted.parent == pki.sds_dir
    assert trusted.read_bytes() == pki.ca_cert.read_bytes()
    # Envoy must check the decision server's identity, not just "signed by the dev CA".
    assert ca["validation_context"]["match_typed_subject_alt_names"] == [
        {"san_type": "URI", "matcher": {"exact": DECISION_SERVER_SPIFFE_ID}}
    ]


def test_renewal_prunes_old_generations_but_keeps_previous(pki: DevPki) -> None:
    def listener_files() -> set[str]:
        return {p.name for p in pki.sds_dir.glob("listener.*.crt")}

    first = listener_files()
    renew_certs(pki)
    second = listener_files()
    assert first < second and len(second) == 2  # previous generation kept
    renew_certs(pki)
    third = listener_files()
    assert len(third) == 2 and not (first & third)  # the oldest one is gone


def test_renew_without_ca_refuses(tmp_path: Path) -> None:
    pki = ensure_dev_pki(tmp_path / "pki")
    pki.ca_cert.unlink()
    with pytest.raises(RuntimeError, match="ensure_dev_pki"):
        renew_certs(pki)
