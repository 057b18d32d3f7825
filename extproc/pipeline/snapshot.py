"""A request as its audit record keeps it, when the policy asks (audit.record_requests): enough
for `extproc policy diff` to replay it against another policy version, and nothing secret.

Credentials, cookies and the query string are left out; every string in the JSON body is
masked for every PII and secret type (whatever the policy itself masks), and a body over the
policy's cap is left out whole rather than cut into invalid JSON.
"""

from __future__ import annotations

import copy
from functools import cache
from typing import TYPE_CHECKING, Any

from extproc.inspect.mask import Masker
from extproc.inspect.pii import PII_TYPES, scanner_for
from extproc.inspect.plan import PiiCheck
from extproc.inspect.response import redact_strings

if TYPE_CHECKING:
    from extproc.pipeline.context import RequestContext
    from extproc.policy.compiled import CompiledPolicy

# Never recorded, whatever the policy's credential headers are.
UNRECORDED_HEADERS = frozenset(
    {"authorization", "proxy-authorization", "cookie", "x-api-key", "api-key", "x-goog-api-key"}
)


@cache
def _all_pii() -> PiiCheck:
    # Compiled on first use (0.2 s): only policies that record requests pay for it.
    return PiiCheck(scanner_for(PII_TYPES), Masker("label"), frozenset())


def request_snapshot(
    ctx: RequestContext, policy: CompiledPolicy, doc: object, raw: bytes
) -> dict[str, Any]:
    hidden = UNRECORDED_HEADERS | set(policy.credential_headers)
    headers = {k: v for k, v in ctx.headers.items() if k not in hidden and not k.startswith(":")}
    redact_strings(headers, _all_pii())
    snapshot: dict[str, Any] = {
        "method": ctx.method,
        "path": ctx.path,
        "host": ctx.host,
        "headers": headers,
        "source_address": ctx.source_address,
    }
    identity = ctx.trail.identity
    if identity is not None:
        # Who asked, as rules see it, so a replay decides for the same caller. Claims are
        # masked like the body (an email claim is PII).
        claims = dict(identity.claims)
        redact_strings(claims, _all_pii())
        snapshot["identity"] = {
            "principal": identity.principal,
            "tenant": identity.tenant,
            "method": identity.method,
            "roles": sorted(identity.roles),
            "scopes": sorted(identity.scopes),
            "claims": claims,
        }
    cap = policy.record_requests or 0
    if not raw:
        snapshot["body"] = None
    elif len(raw) > cap or doc is None:
        snapshot["body_omitted"] = "too_large" if len(raw) > cap else "not_json"
    else:
        body = copy.deepcopy(doc)
        redact_strings(body, _all_pii())
        snapshot["body"] = body
    return snapshot
