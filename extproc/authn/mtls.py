"""Client identity from the TLS client certificate that Envoy verified (mutual TLS).

The identity comes only from the PeerCertificate the adapters build from what Envoy reports
about the connection (extproc/adapters/peer.py), never from a request header. Envoy has already
checked the chain against the listener's client CA; this method decides which certificates name
an acceptable caller:

- SPIFFE: a certificate with exactly one URI SAN (the X.509-SVID rule), a well-formed SPIFFE ID
  (`spiffe://<trust domain>/<path>`) in one of `trust_domains`: the principal is that ID.
- Subject: otherwise, when the subject (RFC 4514 form, most specific first, as Envoy prints it:
  `CN=client-a,O=Acme`) is in `subjects` or fully matches one of `subject_patterns` (Python
  regular expressions; mind that `.` and `+` are special and that `.*` also spans `,`).

Tenant: with `tenant_from_path_segment="tenant"`, the SPIFFE path is read as name/value pairs and
the segment after `tenant` is the tenant: `spiffe://corp/tenant/acme/svc/x` has tenant `acme`
(with `"ns"`, Istio's `spiffe://cluster.local/ns/<namespace>/sa/<account>` yields the namespace).
An ID without that segment has no tenant; one naming it twice, or with nothing after it, is
refused, since either reading could be the intended one.

No certificate: None (another method may apply). A certificate that names no acceptable caller:
`certificate_not_accepted`.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from extproc.authn.base import (
    AuthMethod,
    AuthnFailure,
    AuthnOutcome,
    Identity,
    PeerCertificate,
)

MAX_SPIFFE_ID_BYTES = 2048
MAX_TRUST_DOMAIN_BYTES = 255
# SPIFFE-ID 2.1 and 2.2: lower-case trust domain; path segments of letters, digits, `.-_`.
_TRUST_DOMAIN = re.compile(r"[a-z0-9._-]+")
_SPIFFE_ID = re.compile(r"spiffe://([a-z0-9._-]+)((?:/[A-Za-z0-9._-]+)*)")


@dataclass(frozen=True, slots=True)
class SpiffeId:
    trust_domain: str
    segments: tuple[str, ...]

    @property
    def path(self) -> str:
        return "".join(f"/{segment}" for segment in self.segments)

    def __str__(self) -> str:
        return f"spiffe://{self.trust_domain}{self.path}"


def parse_spiffe_id(uri: str) -> SpiffeId | None:
    """A SPIFFE ID exactly as the SPIFFE-ID standard allows it, or None.

    No port, user info, query, fragment, percent-encoding, upper-case trust domain, empty,
    `.` or `..` segment, and no trailing `/`.
    """
    if len(uri.encode("utf-8", "surrogatepass")) > MAX_SPIFFE_ID_BYTES:
        return None
    match = _SPIFFE_ID.fullmatch(uri)
    if match is None:
        return None
    trust_domain, path = match.groups()
    if len(trust_domain) > MAX_TRUST_DOMAIN_BYTES:
        return None
    segments = tuple(path.split("/")[1:])
    if any(segment in (".", "..") for segment in segments):
        return None
    return SpiffeId(trust_domain, segments)


class MtlsAuthenticator:
    """Accepts verified client certificates from the configured trust domains or subjects."""

    def __init__(
        self,
        *,
        trust_domains: Collection[str] = (),
        subjects: Collection[str] = (),
        subject_patterns: Collection[str] = (),
        tenant_from_path_segment: str | None = None,
    ) -> None:
        self._trust_domains = _strings(trust_domains, "trust_domains")
        for domain in self._trust_domains:
            if _TRUST_DOMAIN.fullmatch(domain) is None or len(domain) > MAX_TRUST_DOMAIN_BYTES:
                raise ValueError(
                    f"mTLS trust domain {domain!r} is not a SPIFFE trust domain name "
                    "(lower-case letters, digits, '.', '-', '_'; no scheme)"
                )
        self._subjects = _strings(subjects, "subjects")
        self._subject_patterns = tuple(
            _compile(pattern) for pattern in sorted(_strings(subject_patterns, "subject_patterns"))
        )
        if not (self._trust_domains or self._subjects or self._subject_patterns):
            raise ValueError("mTLS needs trust_domains, subjects or subject_patterns")
        if tenant_from_path_segment is not None and (
            not isinstance(tenant_from_path_segment, str)
            or re.fullmatch(r"[A-Za-z0-9._-]+", tenant_from_path_segment) is None
        ):
            raise ValueError("mTLS tenant_from_path_segment must be a SPIFFE path segment")
        self._tenant_segment = tenant_from_path_segment

    @property
    def method(self) -> AuthMethod:
        return "mtls"

    async def authenticate(
        self, headers: Mapping[str, str], peer: PeerCertificate | None = None
    ) -> AuthnOutcome:
        if peer is None:
            return None
        spiffe_id = self._accepted_spiffe_id(peer)
        if spiffe_id is not None:
            return self._spiffe_identity(spiffe_id, peer)
        if peer.subject and self._subject_accepted(peer.subject):
            return Identity(
                principal=peer.subject,
                method="mtls",
                claims=_claims(peer, None),
                credential_id="x509-subject",
            )
        return _failure("certificate_not_accepted", "the client certificate is not accepted")

    def _accepted_spiffe_id(self, peer: PeerCertificate) -> SpiffeId | None:
        # X.509-SVID: exactly one URI SAN. With several, which one names the caller is a guess.
        if not self._trust_domains or len(peer.uri_sans) != 1:
            return None
        spiffe_id = parse_spiffe_id(peer.uri_sans[0])
        if spiffe_id is None or spiffe_id.trust_domain not in self._trust_domains:
            return None
        return spiffe_id

    def _spiffe_identity(self, spiffe_id: SpiffeId, peer: PeerCertificate) -> AuthnOutcome:
        tenant: str | None = None
        if self._tenant_segment is not None:
            segments = spiffe_id.segments
            positions = [i for i, segment in enumerate(segments) if segment == self._tenant_segment]
            if len(positions) > 1 or (positions and positions[0] + 1 >= len(segments)):
                return _failure("ambiguous_tenant", "the client certificate names no clear tenant")
            tenant = segments[positions[0] + 1] if positions else None
        return Identity(
            principal=str(spiffe_id),
            method="mtls",
            tenant=tenant,
            claims=_claims(peer, spiffe_id),
            credential_id=f"spiffe://{spiffe_id.trust_domain}",
        )

    def _subject_accepted(self, subject: str) -> bool:
        return subject in self._subjects or any(
            pattern.fullmatch(subject) is not None for pattern in self._subject_patterns
        )


def _failure(reason: str, detail: str) -> AuthnFailure:
    # No header carried this credential; "authorization" is what the pipeline strips anyway.
    return AuthnFailure(method="mtls", reason=reason, detail=detail)


def _claims(peer: PeerCertificate, spiffe_id: SpiffeId | None) -> Mapping[str, Any]:
    """What authorization rules on claims can look at (nothing in it is secret)."""
    claims: dict[str, Any] = {
        "subject": peer.subject,
        "uri_sans": list(peer.uri_sans),
        "dns_sans": list(peer.dns_sans),
    }
    if spiffe_id is not None:
        claims["spiffe_id"] = str(spiffe_id)
        claims["trust_domain"] = spiffe_id.trust_domain
        claims["spiffe_path"] = spiffe_id.path
    return MappingProxyType(claims)


def _strings(values: Collection[str], what: str) -> frozenset[str]:
    if isinstance(values, str | bytes):
        raise ValueError(f"mTLS {what} must be a collection of strings, not one string")
    result = frozenset(values)
    if not all(isinstance(value, str) and value for value in result):
        raise ValueError(f"mTLS {what} must be non-empty strings")
    return result


def _compile(pattern: str) -> re.Pattern[str]:
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise ValueError(f"mTLS subject pattern {pattern!r} is not a valid regex: {exc}") from None
