"""Headers the decision server owns on the way upstream: one implementation for both adapters.

Every header here is set with overwrite or removed, so a client-supplied copy never survives.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from extproc.envoy_routes import selection_key
from extproc.pipeline.decision import Allow

PRINCIPAL = "x-gateway-principal"
TENANT = "x-gateway-tenant"
DECISION_ID = "x-gateway-decision-id"
MODEL = "x-gateway-model"
VERSION = "x-gateway-version"
# Envoy's generated routes match this one exactly (extproc.envoy_routes): the version's
# cluster, and its fallback and mirror clusters when the caller may use them.
CLUSTER = "x-gateway-cluster"
AUTH_METHOD = "x-gateway-auth-method"

# Which worker process decided: lets operators (and tests) see load spread over workers.
WORKER = str(os.getpid())

OWNED_HEADERS: tuple[str, ...] = (
    PRINCIPAL,
    TENANT,
    DECISION_ID,
    MODEL,
    VERSION,
    CLUSTER,
    AUTH_METHOD,
)


@dataclass(frozen=True, slots=True)
class HeaderMutation:
    set: tuple[tuple[str, str], ...]
    remove: tuple[str, ...]


def template_key(allow: Allow) -> tuple[object, ...]:
    """Everything the two functions below read: equal keys give equal mutations and metadata,
    so adapters can build each response once and patch in only the decision id."""
    who = allow.identity
    return (
        (who.principal, who.tenant, who.method, who.credential_header),
        (allow.policy, allow.model, allow.version, allow.cluster, allow.credential_headers),
        (allow.fallback_cluster, allow.mirror_cluster),
        allow.strip_headers,
    )


def allow_mutation(allow: Allow) -> HeaderMutation:
    """The headers to set and remove; the per-request DECISION_ID is set by the adapter."""
    # Version and method travel in dynamic metadata only (each header set costs Envoy and us
    # on every request); a client's copies of them are still removed.
    values = {
        PRINCIPAL: allow.identity.principal,
        MODEL: allow.model,
        CLUSTER: selection_key(allow.cluster, allow.fallback_cluster, allow.mirror_cluster),
    }
    if allow.identity.tenant is not None:
        values[TENANT] = allow.identity.tenant
    remove = [name for name in OWNED_HEADERS if name not in values and name != DECISION_ID]
    # No credential goes upstream: neither the one used nor any other the model accepts.
    remove.extend(h for h in allow.credential_headers if h not in remove)
    if allow.identity.credential_header not in remove:
        remove.append(allow.identity.credential_header)
    remove.extend(h for h in allow.strip_headers if h not in remove)
    return HeaderMutation(set=tuple(values.items()), remove=tuple(remove))


def dynamic_metadata(allow: Allow) -> dict[str, str]:
    """What Envoy keeps as dynamic metadata (a channel clients cannot write); the adapter adds
    the per-request `decision_id`."""
    meta = {
        "principal": allow.identity.principal,
        "auth_method": allow.identity.method,
        "policy": allow.policy,
        "model": allow.model,
        "version": allow.version,
        "cluster": allow.cluster,
        "worker": WORKER,
    }
    if allow.identity.tenant is not None:
        meta["tenant"] = allow.identity.tenant
    if not allow.output.sanitize_errors:
        meta["errors"] = "raw"  # read by the 5xx stream (adapters/ext_proc_errors.py)
    return meta
