"""Reading a token's claims into an Identity: one implementation for every token method.

A JWT's payload and an introspection answer (RFC 7662) carry the same claims (`exp`, `nbf`,
`aud`, the subject, tenant, roles, scopes) and must be read the same strict way: JSON with no
duplicate members and no NaN, NumericDates that are finite numbers, tenants that are
non-empty strings, role and scope sets that are a space-separated string or a list of strings.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any


class CredentialError(Exception):
    """A credential that is not acceptable. `reason` is a stable code for audit and metrics;
    `detail` is safe to show the client."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(reason)
        self.reason = reason
        self.detail = detail


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # Parsers disagree on which duplicate wins (`{"active": false, "active": true}`): a
    # document relying on that is refused.
    result = dict(pairs)
    if len(result) != len(pairs):
        raise ValueError("duplicate member")
    return result


def _reject_constant(name: str) -> Any:
    # NaN and Infinity are not JSON; `"exp": Infinity` must not mean "never expires".
    raise ValueError(f"{name} is not JSON")


def strict_json_object(raw: bytes) -> dict[str, Any]:
    """A JSON object with no duplicate members and no NaN/Infinity. Raises ValueError."""
    value = json.loads(raw, object_pairs_hook=_reject_duplicates, parse_constant=_reject_constant)
    if not isinstance(value, dict):
        raise ValueError("not a JSON object")
    return value


def numeric_date(claims: Mapping[str, Any], name: str) -> float | None:
    value = claims.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise CredentialError("invalid_claim", f"the token's {name} is not a NumericDate")
    return float(value)


def audience_accepted(aud: object, audiences: frozenset[str]) -> bool | None:
    """Whether `aud` (a string or a list of strings) names one of `audiences`; None when it is
    neither shape (the callers name that case differently)."""
    if isinstance(aud, str):
        return aud in audiences
    if isinstance(aud, list) and all(isinstance(item, str) for item in aud):
        return not audiences.isdisjoint(aud)
    return None


def principal(claims: Mapping[str, Any], name: str) -> str:
    value = claims.get(name)
    if not isinstance(value, str) or not value:
        raise CredentialError("missing_claim", "the token does not name its subject")
    return value


def tenant(claims: Mapping[str, Any], name: str | None) -> str | None:
    if name is None or claims.get(name) is None:
        return None
    value = claims[name]
    if not isinstance(value, str) or not value:
        # A tenant that is a number or empty would compare unpredictably in authorization.
        raise CredentialError("invalid_claim", "the token's tenant is not a non-empty string")
    return value


def claim_set(claims: Mapping[str, Any], name: str | None) -> frozenset[str]:
    """Roles or scopes: a space-separated string (RFC 7662 / RFC 8693 `scope`) or a list."""
    if name is None or claims.get(name) is None:
        return frozenset()
    value = claims[name]
    if isinstance(value, str):
        return frozenset(value.split())
    if isinstance(value, list) and all(isinstance(item, str) for item in value):
        return frozenset(value)
    raise CredentialError(
        "invalid_claim", f"the token's {name} claim is not a string or list of strings"
    )
