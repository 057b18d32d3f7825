"""Tenant isolation: a caller reaches only its own tenant's models, versions and data.

- A model owned by some tenants (`tenancy.tenants`) does not exist for anyone else: 404, as for
  a path no model serves, so its existence is not revealed.
- Wherever a request names a tenant (a path segment, a header, a JSON body field), the name
  must be the caller's own tenant; a caller without a tenant may name none. A mismatch is 403.
- Quotas are keyed by the verified identity only (never by what a request names), and the
  gateway sets the tenant header upstream from the identity, overwriting any client copy.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from extproc.authn.base import Identity

PLACEHOLDER = "{tenant}"


@dataclass(frozen=True, slots=True)
class TenancyPlan:
    tenants: frozenset[str] | None = None
    require_tenant: bool = False
    path_template: tuple[str, ...] | None = None  # segments; "{tenant}" marks the tenant's
    headers: tuple[str, ...] = ()
    body_fields: tuple[tuple[str, ...], ...] = ()

    @property
    def needs_body(self) -> bool:
        return bool(self.body_fields)

    def visible_to(self, identity: Identity) -> bool:
        return self.tenants is None or identity.tenant in self.tenants

    def header_violation(
        self, identity: Identity, path: str, headers: Mapping[str, str]
    ) -> str | None:
        """Where the request names another tenant (before the body), or None."""
        if self.require_tenant and not identity.tenant:
            return "no tenant in the credential"
        if self.path_template is not None:
            named = path_tenant(self.path_template, path)
            if named is not None and named != identity.tenant:
                return "path names another tenant"
        for header in self.headers:
            value = headers.get(header)
            if value is not None and value.strip() != identity.tenant:
                return f"header {header} names another tenant"
        return None

    def body_violation(self, identity: Identity, doc: object) -> str | None:
        for path in self.body_fields:
            found = _lookup(doc, path)
            if found is _ABSENT:
                continue
            if not isinstance(found, str) or found != identity.tenant:
                return f"body field {'.'.join(path)} names another tenant"
        return None


def compile_template(template: str) -> tuple[str, ...]:
    return tuple(s for s in template.strip("/").split("/") if s)


def path_tenant(template: tuple[str, ...], path: str) -> str | None:
    """The tenant the path names where it matches the template, or None where it does not."""
    segments = [s for s in path.split("/") if s]
    if len(segments) < len(template):
        return None
    named = None
    for pattern, segment in zip(template, segments, strict=False):
        if pattern == PLACEHOLDER:
            named = segment
        elif pattern != "*" and pattern != segment:
            return None
    return named


_ABSENT = object()


def _lookup(doc: object, path: tuple[str, ...]) -> object:
    for key in path:
        if not isinstance(doc, dict) or key not in doc:
            return _ABSENT
        doc = doc[key]
    return doc
