"""Development PKI: a private CA, Envoy's listener certificate and the mTLS pair between Envoy
and the decision server, plus the Envoy SDS files that point at them.

Everything is generated on the machine that uses it and lives under one directory (the launcher
uses ``.run/pki``, which is gitignored): no private key is ever committed.

Layout of ``directory``::

    ca.crt ca.key                    dev CA (EC P-256, CA:true, pathlen 0, ~1 year)
    listener.crt listener.key        Envoy's HTTPS listener (localhost, 127.0.0.1, ::1)
    server.crt server.key            the decision server's gRPC listener (server auth)
    envoy-client.crt envoy-client.key  Envoy's client cert towards the decision server
    sds/                             watched by Envoy (SDS ``watched_directory``)
      listener_cert.yaml upstream_client_cert.yaml upstream_ca.yaml
      <name>.<serial>.crt|key        the generation of each file the SDS yaml currently names

Why the SDS files name *versioned* copies instead of the stable files: Envoy reloads a
file-based SDS secret when something is moved into its ``watched_directory``. If the stable
certificate and key were replaced one after the other, a reload could fire between the two
renames and read a new certificate with the old key. Writing a complete new generation under
new names first, then atomically renaming the SDS yaml that names it, makes the switch a
single rename: Envoy sees either the old pair or the new pair, never a mix.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import ipaddress
import os
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

TRUST_DOMAIN = "extproc.local"
# The decision server should accept only this client identity (URI SAN) on its mTLS port.
ENVOY_CLIENT_SPIFFE_ID = f"spiffe://{TRUST_DOMAIN}/envoy"
# Envoy checks this URI SAN on the decision server's certificate (upstream_ca.yaml), so a
# certificate from the same CA issued for another purpose (the listener's) cannot stand in
# for the decision server.
DECISION_SERVER_SPIFFE_ID = f"spiffe://{TRUST_DOMAIN}/decision-server"

# SDS secret names; the Envoy templates reference these exact names.
LISTENER_SDS_NAME = "listener_cert"
UPSTREAM_CLIENT_SDS_NAME = "upstream_client_cert"
UPSTREAM_CA_SDS_NAME = "upstream_ca"
# Client certificates for the mTLS authentication method come from their own CA: the dev CA
# also signs Envoy's and the decision server's certificates, which must never pass as callers.
CLIENT_CA_SDS_NAME = "client_ca"
CLIENT_TRUST_DOMAIN = "clients.extproc.local"
DEMO_CLIENT_SPIFFE_ID = f"spiffe://{CLIENT_TRUST_DOMAIN}/tenant/demo/svc/demo-client"

_SDS_RESOURCE_TYPE = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"
_CA_LIFETIME = dt.timedelta(days=365)
_LEAF_LIFETIME = dt.timedelta(days=90)
# Reuse the PKI only while every certificate stays valid for at least this long.
_MIN_REMAINING = dt.timedelta(days=1)
# Tolerate small clock differences between processes and machines.
_BACKDATE = dt.timedelta(minutes=5)


@dataclass(frozen=True)
class DevPki:
    """Paths of the dev PKI. The paths are stable across :func:`renew_certs`."""

    ca_cert: Path
    listener_cert: Path
    listener_key: Path
    server_cert: Path
    server_key: Path
    envoy_client_cert: Path
    envoy_client_key: Path
    sds_dir: Path
    client_ca_cert: Path  # the CA callers' certificates chain to (mTLS method)
    demo_client_cert: Path  # a caller certificate for demos and tests
    demo_client_key: Path

    @property
    def ca_key(self) -> Path:
        return self.ca_cert.with_name("ca.key")

    @property
    def directory(self) -> Path:
        return self.ca_cert.parent


@dataclass(frozen=True)
class ServerCredentials:
    """PEM material for the decision server's gRPC listener, read as a consistent pair.

    ``version`` identifies the server certificate file: poll :func:`server_credentials_version`
    and reload when it differs.
    """

    cert_pem: bytes
    key_pem: bytes
    ca_pem: bytes
    version: tuple[int, int]


def pki_paths(directory: Path) -> DevPki:
    """Where the files of a PKI in `directory` live (relative stays relative; nothing created)."""
    d = directory
    return DevPki(
        ca_cert=d / "ca.crt",
        listener_cert=d / "listener.crt",
        listener_key=d / "listener.key",
        server_cert=d / "server.crt",
        server_key=d / "server.key",
        envoy_client_cert=d / "envoy-client.crt",
        envoy_client_key=d / "envoy-client.key",
        sds_dir=d / "sds",
        client_ca_cert=d / "client-ca.crt",
        demo_client_cert=d / "demo-client.crt",
        demo_client_key=d / "demo-client.key",
    )


# ---------------------------------------------------------------------------------------------
# public API


def ensure_dev_pki(directory: Path) -> DevPki:
    """Create the dev PKI under ``directory``, or reuse it when it is present, consistent and
    valid for more than a day. Leaves close to expiry are renewed from the same CA; a CA close to
    expiry (or anything unreadable) regenerates everything."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    pki = pki_paths(directory.resolve())
    pki.sds_dir.mkdir(mode=0o700, exist_ok=True)
    with _locked(pki):
        ca = _load_ca(pki)
        if ca is None:
            ca = _create_ca(pki)
            _issue_leaves(pki, ca)
        elif not _leaves_usable(pki, ca[0]) or not _sds_usable(pki):
            _issue_leaves(pki, ca)
        _ensure_client_pki(pki)
    return pki


def renew_certs(pki: DevPki) -> None:
    """Issue fresh leaf certificates (new keys, new serials) from the same CA and swap them in.

    Envoy picks up the listener and client certificates without restart (its SDS watches
    ``sds_dir`` for renames); the decision server notices the new server certificate by its
    mtime (:func:`server_credentials_version`).
    """
    with _locked(pki):
        ca = _load_ca(pki)
        if ca is None:
            raise RuntimeError(
                f"dev CA under {pki.directory} is missing or expiring; "
                "call ensure_dev_pki() instead"
            )
        _issue_leaves(pki, ca)


def server_credentials_version(pki: DevPki) -> tuple[int, int]:
    """Cheap change check for the decision server: (inode, mtime in ns) of the server
    certificate. Every renewal renames a new file over it, so the inode changes even when two
    renewals fall within one mtime tick.

    The certificate is always replaced after its key, so a changed version means both are new."""
    st = pki.server_cert.stat()
    return (st.st_ino, st.st_mtime_ns)


def load_server_credentials(pki: DevPki, *, attempts: int = 20) -> ServerCredentials:
    """Read the decision server's certificate, key and the CA (for verifying Envoy's client
    certificate) as a matching pair, retrying briefly if a renewal is half-way through."""
    for _ in range(attempts):
        version = server_credentials_version(pki)
        key_pem = pki.server_key.read_bytes()
        cert_pem = pki.server_cert.read_bytes()
        if server_credentials_version(pki) == version and _key_matches(cert_pem, key_pem):
            return ServerCredentials(cert_pem, key_pem, pki.ca_cert.read_bytes(), version)
        time.sleep(0.05)
    raise RuntimeError(f"{pki.server_cert} and {pki.server_key} do not match")


# ---------------------------------------------------------------------------------------------
# CA and leaves


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _create_ca(
    pki: DevPki, cert_path: Path | None = None, common_name: str = "extproc dev CA"
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    cert_path = cert_path or pki.ca_cert
    key = _new_key()
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "extproc dev"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )
    now = _now()
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(now + _CA_LIFETIME)
        # pathlen 0: the CA signs leaves only, never another CA.
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .sign(key, hashes.SHA256())
    )
    _write_private(cert_path.with_suffix(".key"), _key_pem(key))
    _write_public(cert_path, cert.public_bytes(serialization.Encoding.PEM))
    return cert, key


def _issue(
    ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey],
    common_name: str,
    sans: Sequence[x509.GeneralName],
    eku: x509.ObjectIdentifier,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    ca_cert, ca_key = ca
    key = _new_key()
    now = _now()
    not_after = min(now + _LEAF_LIFETIME, ca_cert.not_valid_after_utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(
            x509.Name(
                [
                    x509.NameAttribute(NameOID.ORGANIZATION_NAME, "extproc dev"),
                    x509.NameAttribute(NameOID.COMMON_NAME, common_name),
                ]
            )
        )
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([eku]), critical=False)
        .add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    return cert, key


def _issue_leaves(pki: DevPki, ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey]) -> None:
    localhost = x509.DNSName("localhost")
    v4 = x509.IPAddress(ipaddress.IPv4Address("127.0.0.1"))
    v6 = x509.IPAddress(ipaddress.IPv6Address("::1"))
    listener = _issue(ca, "localhost", [localhost, v4, v6], ExtendedKeyUsageOID.SERVER_AUTH)
    server = _issue(
        ca,
        "extproc decision server",
        [localhost, v4, v6, x509.UniformResourceIdentifier(DECISION_SERVER_SPIFFE_ID)],
        ExtendedKeyUsageOID.SERVER_AUTH,
    )
    client = _issue(
        ca,
        "envoy",
        [x509.UniformResourceIdentifier(ENVOY_CLIENT_SPIFFE_ID)],
        ExtendedKeyUsageOID.CLIENT_AUTH,
    )
    ca_pem = ca[0].public_bytes(serialization.Encoding.PEM)

    # 1. The complete new generation for Envoy, under names nobody references yet.
    sds = pki.sds_dir
    listener_files = _write_generation(sds, "listener", listener)
    client_files = _write_generation(sds, "envoy-client", client)
    ca_file = sds / f"ca.{ca[0].serial_number:x}.crt"
    if not ca_file.exists():
        _write_public(ca_file, ca_pem)

    # 2. The stable copies. Key before certificate: the certificate's mtime is the change
    #    signal for the decision server, so when it moves the key is already in place.
    for (cert, key), cert_path, key_path in (
        (listener, pki.listener_cert, pki.listener_key),
        (client, pki.envoy_client_cert, pki.envoy_client_key),
        (server, pki.server_cert, pki.server_key),
    ):
        _write_private(key_path, _key_pem(key))
        _write_public(cert_path, cert.public_bytes(serialization.Encoding.PEM))

    # 3. The switch: one rename per SDS file, each naming a complete, consistent generation.
    _write_sds(
        sds / f"{UPSTREAM_CA_SDS_NAME}.yaml",
        {
            "name": UPSTREAM_CA_SDS_NAME,
            "validation_context": {
                "trusted_ca": {"filename": str(ca_file)},
                "match_typed_subject_alt_names": [
                    {"san_type": "URI", "matcher": {"exact": DECISION_SERVER_SPIFFE_ID}},
                ],
            },
        },
    )
    _write_sds(
        sds / f"{LISTENER_SDS_NAME}.yaml", _tls_certificate(LISTENER_SDS_NAME, *listener_files)
    )
    _write_sds(
        sds / f"{UPSTREAM_CLIENT_SDS_NAME}.yaml",
        _tls_certificate(UPSTREAM_CLIENT_SDS_NAME, *client_files),
    )

    # 4. Prune generations older than the previous one. The previous one stays so a reader
    #    that loaded the yaml just before the switch can still open the files it names.
    current = {p.name for p in (*listener_files, *client_files, ca_file)}
    keep = current | _generation_names(sds)
    for path in sds.iterdir():
        if path.suffix in (".crt", ".key") and path.name not in keep:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
    _write_public(sds / _GENERATION_FILE, "\n".join(sorted(current)).encode())


def _ensure_client_pki(pki: DevPki) -> None:
    """The client CA, a demo caller certificate it signs, and the listener's SDS file naming
    the CA; reused while valid."""
    ca = _load_ca(pki, pki.client_ca_cert)
    fresh = ca is None
    if ca is None:
        ca = _create_ca(pki, pki.client_ca_cert, "extproc dev client CA")
    if fresh or not _pair_usable(pki.demo_client_cert, pki.demo_client_key, ca[0]):
        cert, key = _issue(
            ca,
            "demo-client",
            [x509.UniformResourceIdentifier(DEMO_CLIENT_SPIFFE_ID)],
            ExtendedKeyUsageOID.CLIENT_AUTH,
        )
        _write_private(pki.demo_client_key, _key_pem(key))
        _write_public(pki.demo_client_cert, cert.public_bytes(serialization.Encoding.PEM))
    sds_file = pki.sds_dir / f"{CLIENT_CA_SDS_NAME}.yaml"
    if fresh or not sds_file.is_file():
        ca_file = pki.sds_dir / f"client-ca.{ca[0].serial_number:x}.crt"
        _write_public(ca_file, ca[0].public_bytes(serialization.Encoding.PEM))
        _write_sds(
            sds_file,
            {
                "name": CLIENT_CA_SDS_NAME,
                "validation_context": {"trusted_ca": {"filename": str(ca_file)}},
            },
        )


_GENERATION_FILE = ".generation"


def _generation_names(sds: Path) -> set[str]:
    """Names of the files of the generation written last time (now the previous one)."""
    try:
        return set((sds / _GENERATION_FILE).read_text().split())
    except FileNotFoundError:
        return set()


def _write_generation(
    sds: Path, stem: str, pair: tuple[x509.Certificate, ec.EllipticCurvePrivateKey]
) -> tuple[Path, Path]:
    cert, key = pair
    serial = f"{cert.serial_number:x}"
    cert_path = sds / f"{stem}.{serial}.crt"
    key_path = sds / f"{stem}.{serial}.key"
    _write_private(key_path, _key_pem(key))
    _write_public(cert_path, cert.public_bytes(serialization.Encoding.PEM))
    return cert_path, key_path


def _tls_certificate(name: str, cert: Path, key: Path) -> dict[str, Any]:
    return {
        "name": name,
        "tls_certificate": {
            "certificate_chain": {"filename": str(cert)},
            "private_key": {"filename": str(key)},
        },
    }


def _write_sds(path: Path, secret: dict[str, Any]) -> None:
    doc = {"resources": [{"@type": _SDS_RESOURCE_TYPE, **secret}]}
    header = b"# Generated by extproc.tls; replaced atomically on renewal. Do not edit.\n"
    _write_public(path, header + yaml.safe_dump(doc, sort_keys=False).encode())


# ---------------------------------------------------------------------------------------------
# reuse checks


def _load_ca(
    pki: DevPki, cert_path: Path | None = None
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None:
    """The CA if it is readable, a CA, matches its key and stays valid long enough."""
    cert_path = cert_path or pki.ca_cert
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        key = serialization.load_pem_private_key(
            cert_path.with_suffix(".key").read_bytes(), password=None
        )
    except (OSError, ValueError):
        return None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        return None
    if cert.public_key() != key.public_key() or not _valid_long_enough(cert):
        return None
    try:
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        return None
    return (cert, key) if bc.ca else None


def _valid_long_enough(cert: x509.Certificate) -> bool:
    return cert.not_valid_after_utc - _now() > _MIN_REMAINING


def _leaves_usable(pki: DevPki, ca: x509.Certificate) -> bool:
    pairs = (
        (pki.listener_cert, pki.listener_key),
        (pki.server_cert, pki.server_key),
        (pki.envoy_client_cert, pki.envoy_client_key),
    )
    return all(_pair_usable(cert_path, key_path, ca) for cert_path, key_path in pairs)


def _pair_usable(cert_path: Path, key_path: Path, ca: x509.Certificate) -> bool:
    try:
        cert_pem, key_pem = cert_path.read_bytes(), key_path.read_bytes()
        cert = x509.load_pem_x509_certificate(cert_pem)
        cert.verify_directly_issued_by(ca)
    except (OSError, ValueError, TypeError, InvalidSignature):
        return False
    return _valid_long_enough(cert) and _key_matches(cert_pem, key_pem)


def _sds_usable(pki: DevPki) -> bool:
    """Every SDS file parses and every file it names exists."""
    for name in (LISTENER_SDS_NAME, UPSTREAM_CLIENT_SDS_NAME, UPSTREAM_CA_SDS_NAME):
        try:
            doc = yaml.safe_load((pki.sds_dir / f"{name}.yaml").read_text())
            secret = doc["resources"][0]
        except (OSError, yaml.YAMLError, KeyError, IndexError, TypeError):
            return False
        if secret.get("name") != name:
            return False
        if not all(Path(f).is_file() for f in _filenames(secret)):
            return False
    return True


def _filenames(node: object) -> Iterator[str]:
    if isinstance(node, dict):
        for k, v in node.items():
            if k == "filename" and isinstance(v, str):
                yield v
            else:
                yield from _filenames(v)
    elif isinstance(node, list):
        for item in node:
            yield from _filenames(item)


def _key_matches(cert_pem: bytes, key_pem: bytes) -> bool:
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
        key = serialization.load_pem_private_key(key_pem, password=None)
    except ValueError:
        return False
    return bool(cert.public_key() == key.public_key())


# ---------------------------------------------------------------------------------------------
# files


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    # PKCS#8 unencrypted: Envoy (BoringSSL), grpcio and Python's ssl all read it.
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _write_private(path: Path, data: bytes) -> None:
    _atomic_write(path, data, 0o600)


def _write_public(path: Path, data: bytes) -> None:
    _atomic_write(path, data, 0o644)


def _atomic_write(path: Path, data: bytes, mode: int) -> None:
    """Write to a temp file in the same directory, fsync, then rename over ``path``.

    mkstemp creates the file 0600 before any byte is written, so a private key is never
    readable by others, even briefly; public files are widened afterwards. The rename is
    atomic (readers see the old or the new file) and, inside ``sds_dir``, it is the "moved to"
    event Envoy's ``watched_directory`` reacts to."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def _locked(pki: DevPki) -> Iterator[None]:
    """Serialise PKI writers (the launcher and a test run may start at the same time)."""
    fd = os.open(pki.directory / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
