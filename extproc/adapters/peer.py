"""The client certificate of the downstream connection, as Envoy reports it.

Only fields Envoy fills from the TLS connection are read, never request headers. What Envoy
1.40 sends (observed with the real binary; a listener that requests a client certificate and
validates it against a CA, so an untrusted certificate already fails the handshake):

ext_authz, `CheckRequest.attributes.source`:
- `principal`: the first URI SAN, else the first DNS SAN, else the subject; empty without a
  client certificate;
- `certificate` (only with `include_peer_certificate: true`): the leaf certificate as
  URL-encoded PEM (`-----BEGIN%20CERTIFICATE-----%0AMIIB...%2B...`), no chain.

ext_proc, `ProcessingRequest.attributes["envoy.filters.http.ext_proc"]` (a Struct; the key is
this constant whatever the filter is named), only for the names listed in the filter's
`request_attributes` and only on the request-headers message (`response_attributes` go on the
response-headers message; body messages carry none):
- `connection.mtls`: bool, false without a client certificate;
- `connection.peer_certificate`: the leaf as plain PEM (not URL-encoded, despite Envoy's
  attribute docs); absent without a certificate;
- `connection.uri_san_peer_certificate`, `connection.dns_san_peer_certificate`: the FIRST
  entry only (a string), absent when there is none;
- `connection.subject_peer_certificate`: the subject, `""` without a certificate.

The subject is in OpenSSL's RFC 2253 form, most specific first, with OpenSSL's short names and
non-ASCII bytes escaped (`CN=J\\C3\\BCrgen,title=boss,emailAddress=a@b.example,DC=example`).
When the PEM is available it is parsed (all SANs, not just the first) and its subject printed
the same way, so both adapters and both attribute sets name a caller identically.
"""

from __future__ import annotations

import functools
import logging
import re
from typing import Any
from urllib.parse import unquote

from cryptography import x509
from cryptography.x509.oid import NameOID
from envoy.service.auth.v3 import external_auth_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2

from extproc.authn.base import PeerCertificate

log = logging.getLogger(__name__)

EXT_PROC_ATTRIBUTES_KEY = "envoy.filters.http.ext_proc"
MTLS = "connection.mtls"
PEER_CERTIFICATE = "connection.peer_certificate"
URI_SAN = "connection.uri_san_peer_certificate"
DNS_SAN = "connection.dns_san_peer_certificate"
SUBJECT = "connection.subject_peer_certificate"
# What the ext_proc filter's request_attributes should list for mTLS: the PEM gives every SAN.
# URI_SAN, DNS_SAN and SUBJECT are read as a fallback when PEER_CERTIFICATE is not requested.
EXT_PROC_PEER_ATTRIBUTES = (MTLS, PEER_CERTIFICATE)

# OpenSSL's short names where cryptography would print a dotted OID or another spelling
# (checked against Envoy for title, emailAddress, serialNumber, street).
_OPENSSL_NAMES = {
    NameOID.EMAIL_ADDRESS: "emailAddress",
    NameOID.SERIAL_NUMBER: "serialNumber",
    NameOID.STREET_ADDRESS: "street",
    NameOID.TITLE: "title",
    NameOID.GIVEN_NAME: "GN",
    NameOID.SURNAME: "SN",
    NameOID.INITIALS: "initials",
    NameOID.PSEUDONYM: "pseudonym",
    NameOID.GENERATION_QUALIFIER: "generationQualifier",
    NameOID.DN_QUALIFIER: "dnQualifier",
    NameOID.POSTAL_CODE: "postalCode",
    NameOID.POSTAL_ADDRESS: "postalAddress",
    NameOID.BUSINESS_CATEGORY: "businessCategory",
    NameOID.UNSTRUCTURED_NAME: "unstructuredName",
    NameOID.X500_UNIQUE_IDENTIFIER: "x500UniqueIdentifier",
}
# Characters OpenSSL prints as \XX in RFC 2253 mode: controls and every non-ASCII byte.
_TO_ESCAPE = re.compile(r"[\x01-\x1f\x7f-\U0010ffff]")
_URI_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*:")


def peer_from_ext_authz(request: external_auth_pb2.CheckRequest) -> PeerCertificate | None:
    """The client certificate of a Check call, or None when the client presented none."""
    source = request.attributes.source
    if source.certificate:
        peer = peer_from_pem(source.certificate)
        if peer is not None:
            return peer
    if source.principal:
        return _from_principal(source.principal)
    return None


def peer_from_ext_proc(
    request: external_processor_pb2.ProcessingRequest,
) -> PeerCertificate | None:
    """The client certificate named in a request-headers message's attributes, or None.

    Later messages of the stream carry no attributes: keep what the first one gave.
    """
    if EXT_PROC_ATTRIBUTES_KEY not in request.attributes:
        return None
    fields = request.attributes[EXT_PROC_ATTRIBUTES_KEY].fields
    mtls = _value(fields, MTLS, "bool_value")
    if mtls is False:
        return None
    pem = _value(fields, PEER_CERTIFICATE, "string_value")
    if pem:
        peer = peer_from_pem(pem)
        if peer is not None:
            return peer
    subject = _value(fields, SUBJECT, "string_value") or ""
    uri = _value(fields, URI_SAN, "string_value")
    dns = _value(fields, DNS_SAN, "string_value")
    if not (subject or uri or dns):
        return None
    return PeerCertificate(
        subject=subject, uri_sans=(uri,) if uri else (), dns_sans=(dns,) if dns else ()
    )


@functools.lru_cache(maxsize=1024)
def peer_from_pem(text: str) -> PeerCertificate | None:
    """Subject and SANs of a PEM certificate, plain or URL-encoded; None when it does not parse.

    Cached: a client sends the same certificate on every request of every connection.
    """
    # Both forms start with "-----BEGIN"; plain PEM never contains "%".
    pem = unquote(text) if "%" in text else text
    try:
        cert = x509.load_pem_x509_certificate(pem.encode("ascii"))
        subject = envoy_subject(cert.subject)
        try:
            sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        except x509.ExtensionNotFound:
            return PeerCertificate(subject=subject)
        uris = sans.get_values_for_type(x509.UniformResourceIdentifier)
        dns_names = sans.get_values_for_type(x509.DNSName)
    except ValueError as exc:  # also UnicodeEncodeError: not a certificate we can read
        log.warning("the peer certificate Envoy reported could not be parsed (%s)", exc)
        return None
    return PeerCertificate(subject=subject, uri_sans=tuple(uris), dns_sans=tuple(dns_names))


def envoy_subject(name: x509.Name) -> str:
    """The subject as Envoy (OpenSSL, RFC 2253 flags) prints it."""
    text = name.rfc4514_string(_OPENSSL_NAMES)
    return _TO_ESCAPE.sub(_escape, text)


def _escape(match: re.Match[str]) -> str:
    return "".join(f"\\{byte:02X}" for byte in match.group().encode("utf-8", "surrogatepass"))


def _from_principal(principal: str) -> PeerCertificate:
    """ext_authz without the certificate: the principal is a URI SAN, DNS SAN or subject.

    An attribute type (`CN`, `2.5.4.3`) cannot contain `:`, and a DNS name contains neither
    `:` nor `=`, so the three forms are told apart by their first characters. Only the first
    SAN is known: enable include_peer_certificate for the full list.
    """
    if _URI_SCHEME.match(principal):
        return PeerCertificate(uri_sans=(principal,))
    if "=" in principal:
        return PeerCertificate(subject=principal)
    return PeerCertificate(dns_sans=(principal,))


def _value(fields: Any, name: str, kind: str) -> Any:
    """A Struct member of the expected kind, or None (absent or of another kind)."""
    if name not in fields:
        return None
    value = fields[name]
    return getattr(value, kind) if value.WhichOneof("kind") == kind else None
