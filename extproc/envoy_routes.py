"""Envoy routes and fallback clusters for the model versions, generated so they cannot drift.

The input is one :class:`VersionUpstream` per model version (the Envoy cluster that serves it
and what Envoy should enforce towards it). The output is what goes into Envoy's config:

- :func:`routes`: the virtual host's route list. The decision server picks an upstream by
  setting the request header ``x-gateway-cluster`` (overwrite, with ``clear_route_cache``) to a
  *selection key* (:func:`selection_key`); every key the versions allow has one route, matched
  on the exact value. Before them a guard route keeps clients off the decision server's own
  cluster; after them a catch-all answers 503, so a missing or unknown key never reaches a pod.
- :func:`fallback_clusters`: one ``envoy.clusters.composite`` cluster per (candidate,
  fallback) pair, listing the candidate once per attempt it gets and then the fallback. The
  composite cluster picks its member by the router's attempt number, so a route to it with
  ``num_retries`` = the candidate's retries + 1 tries the candidate, then the fallback once.

  Not ``envoy.clusters.aggregate`` with ``retry_priority: previous_priorities``, the usual
  recipe: with Envoy 1.40 its retries do reach the fallback, but its health-based choice of
  the first attempt goes stale once the candidate's health has changed a few times (measured:
  a pod stopped and restarted twice, or ejected and brought back twice, then stays "unhealthy"
  for the aggregate while its own cluster reports it healthy), and the candidate silently gets
  no traffic. The composite cluster has no health view of its own: every request tries the
  candidate first (its own cluster still balances over its healthy pods), so a dead candidate
  costs a failed attempt (a refused connection or a 503 is quick; per_try_timeout bounds a
  hung one) and a recovered one gets its traffic back at once.
- :func:`check_clusters` / :func:`check_routes`: what is wrong with a given Envoy config for
  these versions, as sentences (a missing cluster, a pod cluster without health checks ...).

Selection keys, one header: ``C`` (cluster C), ``C__fallback__F`` (C, retried on F; also the
fallback cluster's name), and either of those plus ``__mirror__M`` (a copy of the request to
M, answer discarded). There is deliberately no second header: a mirror picked by a header
(``request_mirror_policies.cluster_header``) would have to stay on the request up to the
router, so it reaches both the primary and the shadow pod, and a client copy of it that
survived would pick any cluster, the decision server's included. Here mirror targets are
fixed in the config, and the one header that selects them is dropped at the listener when a
client sends it (``internal_only_headers``) and overwritten by the decision server.

Settings are per cluster: versions that share a cluster must agree on its timeout, retries and
per-try timeout (one Envoy cluster, one way to call it); their fallbacks and mirrors add keys.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

# The header the decision server sets to pick a route (see extproc.pipeline.upstream).
ROUTE_HEADER = "x-gateway-cluster"
# Never read by a route; dropped at the listener like ROUTE_HEADER so a client copy reaches
# neither a filter nor a pod (a mirror header is what other gateways use, and what a client
# would try).
MIRROR_HEADER = "x-gateway-mirror"
# Headers the listener removes from client requests before any filter runs
# (route_config.internal_only_headers).
INTERNAL_ONLY_HEADERS: tuple[str, ...] = (ROUTE_HEADER, MIRROR_HEADER)
DECISION_CLUSTER = "decision_server"
FALLBACK_SEP = "__fallback__"
MIRROR_SEP = "__mirror__"
NO_UPSTREAM_ROUTE = "no-upstream"
GUARD_ROUTE = "guard-decision-server"
LEAST_REQUEST = "LEAST_REQUEST"
FALLBACK_TYPE = "envoy.clusters.composite"
FALLBACK_CONFIG = "type.googleapis.com/envoy.extensions.clusters.composite.v3.ClusterConfig"
PREVIOUS_HOSTS = "envoy.retry_host_predicates.previous_hosts"
# 5xx already covers resets and refused connections; they are named so the intent reads.
RETRY_ON = "5xx,reset,connect-failure"
MAX_RETRIES = 5
MAX_TIMEOUT_SECONDS = 3600.0
# The listener's stream_idle_timeout (130 s) would cut a version that may take longer than
# this before it sends a byte; such routes get their own idle timeout (timeout + 10 s).
HCM_IDLE_COVERS_SECONDS = 120.0
# Fallback attempts are bounded by each route's num_retries; the fallback cluster's retry
# circuit breaker (Envoy's default: 3 retries in flight) must not drop them under load.
FALLBACK_MAX_RETRIES = 8192
NO_UPSTREAM_BODY = (
    '{"error":{"code":"no_upstream","message":"no model upstream is configured for this request"}}'
)

# Envoy cluster names as policies may write them (extproc.policy.schema.ClusterName).
_CLUSTER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


@dataclass(frozen=True)
class VersionUpstream:
    """What Envoy enforces towards one model version's cluster."""

    cluster: str  # the Envoy cluster that serves this version (exists in the config)
    timeout_seconds: float = 120.0
    retries: int = 0  # extra attempts on the same cluster (0..5)
    per_try_timeout_seconds: float | None = None
    fallback_cluster: str | None = None  # retried here when `cluster` fails
    mirror_clusters: tuple[str, ...] = ()  # shadow copies (each selectable per request)

    def __post_init__(self) -> None:
        object.__setattr__(self, "mirror_clusters", tuple(self.mirror_clusters))
        names = [self.cluster, *self.mirror_clusters]
        if self.fallback_cluster is not None:
            names.append(self.fallback_cluster)
        for name in names:
            _check_cluster_name(name)
        if not 0 < self.timeout_seconds <= MAX_TIMEOUT_SECONDS:
            raise ValueError(
                f"{self.cluster}: timeout_seconds must be in (0, {MAX_TIMEOUT_SECONDS:g}], "
                f"got {self.timeout_seconds!r}"
            )
        if isinstance(self.retries, bool) or not 0 <= self.retries <= MAX_RETRIES:
            raise ValueError(
                f"{self.cluster}: retries must be 0..{MAX_RETRIES}, got {self.retries!r}"
            )
        per_try = self.per_try_timeout_seconds
        if per_try is not None and not 0 < per_try <= self.timeout_seconds:
            raise ValueError(
                f"{self.cluster}: per_try_timeout_seconds must be in (0, timeout_seconds], "
                f"got {per_try!r}"
            )
        if self.fallback_cluster == self.cluster:
            raise ValueError(f"{self.cluster}: a cluster cannot be its own fallback")
        if self.cluster in self.mirror_clusters:
            raise ValueError(f"{self.cluster}: a cluster cannot mirror to itself")
        if len(set(self.mirror_clusters)) != len(self.mirror_clusters):
            raise ValueError(f"{self.cluster}: mirror_clusters lists a cluster twice")

    @property
    def settings(self) -> tuple[int, int, int | None]:
        """(timeout ms, retries, per-try timeout ms): what versions on one cluster share."""
        per_try = self.per_try_timeout_seconds
        return (_ms(self.timeout_seconds), self.retries, None if per_try is None else _ms(per_try))


def _check_cluster_name(name: str) -> None:
    if not isinstance(name, str) or not _CLUSTER_NAME.match(name):
        raise ValueError(f"not a cluster name (letters, digits, . _ -; 1..128): {name!r}")
    if name == DECISION_CLUSTER:
        raise ValueError(f"{DECISION_CLUSTER} is the decision server, not a model cluster")


def _ms(seconds: float) -> int:
    return max(1, round(seconds * 1000))


def _duration(ms: int) -> str:
    """A protobuf Duration as Envoy's YAML/JSON wants it ("120s", "0.250s")."""
    seconds, rest = divmod(ms, 1000)
    return f"{seconds}s" if rest == 0 else f"{seconds}.{rest:03d}s"


def selection_key(cluster: str, fallback: str | None = None, mirror: str | None = None) -> str:
    """The ``x-gateway-cluster`` value that sends a request to ``cluster``, retried on
    ``fallback`` when it fails, with a copy to ``mirror``. Only keys the configured versions
    allow have a route; any other value gets the catch-all's 503."""
    key = cluster if fallback is None else f"{cluster}{FALLBACK_SEP}{fallback}"
    return key if mirror is None else f"{key}{MIRROR_SEP}{mirror}"


def fallback_cluster_name(cluster: str, fallback: str) -> str:
    """The generated cluster for ``cluster`` falling back to ``fallback``."""
    return selection_key(cluster, fallback)


# --------------------------------------------------------------------------- the table


@dataclass(frozen=True)
class Selection:
    """One route: the upstream selection a key stands for, and how Envoy calls it."""

    key: str
    cluster: str
    fallback: str | None
    mirror: str | None
    timeout_ms: int
    retries: int
    per_try_timeout_ms: int | None

    @property
    def target(self) -> str:
        """The cluster the route names: the pod cluster, or the generated fallback cluster."""
        if self.fallback is None:
            return self.cluster
        return fallback_cluster_name(self.cluster, self.fallback)

    @property
    def members(self) -> list[str]:
        """A fallback cluster's members, one per attempt: the candidate, then the fallback."""
        assert self.fallback is not None
        return [self.cluster] * (self.retries + 1) + [self.fallback]


@dataclass
class _ClusterPlan:
    settings: tuple[int, int, int | None]
    fallbacks: set[str] = field(default_factory=set)
    mirrors: set[str] = field(default_factory=set)


def selections(upstreams: Iterable[VersionUpstream]) -> list[Selection]:
    """Every selection the versions allow, sorted by key.

    Raises ValueError when versions on one cluster disagree on its settings, or when two
    selections would share a key (a cluster name that looks like a generated key)."""
    plans: dict[str, _ClusterPlan] = {}
    for up in upstreams:
        plan = plans.setdefault(up.cluster, _ClusterPlan(up.settings))
        if plan.settings != up.settings:
            first, other = _describe_settings(plan.settings), _describe_settings(up.settings)
            raise ValueError(
                f"cluster {up.cluster}: versions disagree on its timeout, retries or per-try "
                f"timeout ({first} vs {other})"
            )
        if up.fallback_cluster is not None:
            plan.fallbacks.add(up.fallback_cluster)
        plan.mirrors.update(up.mirror_clusters)
    found: dict[str, Selection] = {}
    for cluster, plan in plans.items():
        timeout, retries, per_try = plan.settings
        for fallback in (None, *sorted(plan.fallbacks)):
            for mirror in (None, *sorted(plan.mirrors)):
                key = selection_key(cluster, fallback, mirror)
                sel = Selection(key, cluster, fallback, mirror, timeout, retries, per_try)
                if key in found:
                    raise ValueError(f"selection key {key!r} stands for two different upstreams")
                found[key] = sel
    generated = {s.target for s in found.values() if s.fallback is not None}
    collisions = sorted(generated & _referenced(found.values()))
    if collisions:
        raise ValueError(f"cluster names collide with generated fallback clusters: {collisions}")
    return [found[key] for key in sorted(found)]


def _referenced(sels: Iterable[Selection]) -> set[str]:
    names: set[str] = set()
    for s in sels:
        names.add(s.cluster)
        names.update(n for n in (s.fallback, s.mirror) if n is not None)
    return names


def _describe_settings(settings: tuple[int, int, int | None]) -> str:
    timeout, retries, per_try = settings
    per = "" if per_try is None else f", per try {_duration(per_try)}"
    return f"timeout {_duration(timeout)}, {retries} retries{per}"


def referenced_clusters(upstreams: Iterable[VersionUpstream]) -> list[str]:
    """The model pod clusters the versions name (candidates, fallbacks, mirrors), sorted."""
    return sorted(_referenced(selections(upstreams)))


# --------------------------------------------------------------------------- routes


def _header_match(value: str) -> dict[str, Any]:
    return {"prefix": "/", "headers": [{"name": ROUTE_HEADER, "string_match": {"exact": value}}]}


def _retry_policy(sel: Selection) -> dict[str, Any] | None:
    if sel.fallback is None and sel.retries == 0:
        return None
    policy: dict[str, Any] = {
        "retry_on": RETRY_ON,
        # With a fallback, one retry more: the fallback cluster's last member is the fallback.
        "num_retries": sel.retries if sel.fallback is None else sel.retries + 1,
    }
    if sel.per_try_timeout_ms is not None:
        policy["per_try_timeout"] = _duration(sel.per_try_timeout_ms)
    # A retry prefers another pod of the cluster when there is one.
    policy["retry_host_predicate"] = [
        {
            "name": PREVIOUS_HOSTS,
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.retry.host.previous_hosts.v3."
                "PreviousHostsPredicate"
            },
        }
    ]
    policy["host_selection_retry_max_attempts"] = 3
    return policy


def _route(sel: Selection) -> dict[str, Any]:
    action: dict[str, Any] = {"cluster": sel.target, "timeout": _duration(sel.timeout_ms)}
    if sel.timeout_ms > HCM_IDLE_COVERS_SECONDS * 1000:
        action["idle_timeout"] = _duration(sel.timeout_ms + 10_000)
    retry = _retry_policy(sel)
    if retry is not None:
        action["retry_policy"] = retry
    if sel.mirror is not None:
        # The copy's Host gets a "-shadow" suffix; Envoy discards its answer.
        action["request_mirror_policies"] = [{"cluster": sel.mirror}]
    return {"name": sel.key, "match": _header_match(sel.key), "route": action}


def guard_route() -> dict[str, Any]:
    return {
        "name": GUARD_ROUTE,
        "match": _header_match(DECISION_CLUSTER),
        "direct_response": {"status": 404},
    }


def catch_all_route() -> dict[str, Any]:
    return {
        "name": NO_UPSTREAM_ROUTE,
        "match": {"prefix": "/"},
        "direct_response": {"status": 503, "body": {"inline_string": NO_UPSTREAM_BODY}},
        "response_headers_to_add": [
            {
                "header": {"key": "content-type", "value": "application/json"},
                "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
            }
        ],
    }


def _describe(sel: Selection) -> str:
    tries = f"{sel.retries + 1} tries" if sel.retries else "1 try"
    text = f"{sel.cluster}: {tries}"
    if sel.fallback is not None:
        text += f", then 1 on {sel.fallback}"
    if sel.mirror is not None:
        text += f"; a copy to {sel.mirror}"
    text += f"; timeout {_duration(sel.timeout_ms)}"
    if sel.per_try_timeout_ms is not None:
        text += f" ({_duration(sel.per_try_timeout_ms)} per try)"
    return text


def annotated_routes(upstreams: Iterable[VersionUpstream]) -> list[tuple[str, dict[str, Any]]]:
    """:func:`routes`, each with a one-line description for a config comment."""
    return [
        (
            "Guard: the decision server's cluster is never a model upstream, whatever the header "
            "says.",
            guard_route(),
        ),
        *((_describe(sel), _route(sel)) for sel in selections(upstreams)),
        (
            "Fail closed: no or an unknown selection key (the decision server did not route the "
            "request, or picked a version this config does not know) reaches no pod: 503, so it "
            "reads as a gateway fault to fix, not as a missing resource.",
            catch_all_route(),
        ),
    ]


def routes(upstreams: Iterable[VersionUpstream]) -> list[dict[str, Any]]:
    """The virtual host's routes: guard, one per selection key, catch-all."""
    return [route for _, route in annotated_routes(upstreams)]


# --------------------------------------------------------------------------- clusters


def _fallback_cluster(sel: Selection) -> dict[str, Any]:
    return {
        "name": sel.target,
        "lb_policy": "CLUSTER_PROVIDED",
        "cluster_type": {
            "name": FALLBACK_TYPE,
            "typed_config": {
                "@type": FALLBACK_CONFIG,
                "clusters": [{"name": name} for name in sel.members],
            },
        },
        "circuit_breakers": {
            "thresholds": [{"priority": "DEFAULT", "max_retries": FALLBACK_MAX_RETRIES}]
        },
    }


def annotated_fallback_clusters(
    upstreams: Iterable[VersionUpstream],
) -> list[tuple[str, dict[str, Any]]]:
    """:func:`fallback_clusters`, each with a one-line description for a config comment."""
    found = {s.target: s for s in selections(upstreams) if s.fallback is not None}
    return [
        (
            f"{sel.cluster} falling back to {sel.fallback}: attempt n goes to member n.",
            _fallback_cluster(sel),
        )
        for _, sel in sorted(found.items())
    ]


def fallback_clusters(upstreams: Iterable[VersionUpstream]) -> list[dict[str, Any]]:
    """One composite cluster per (candidate, fallback) pair."""
    return [cluster for _, cluster in annotated_fallback_clusters(upstreams)]


# --------------------------------------------------------------------------- checks


def _clusters_by_name(envoy_config: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    static = envoy_config.get("static_resources") or {}
    return {str(c.get("name")): c for c in static.get("clusters") or [] if isinstance(c, Mapping)}


def check_clusters(
    envoy_config: Mapping[str, Any], upstreams: Sequence[VersionUpstream]
) -> list[str]:
    """What is wrong with the config's clusters for these versions (empty: nothing).

    Every cluster a version names must exist and be a pod cluster fit to serve a model:
    LEAST_REQUEST, active health checks, outlier detection. Every fallback pair needs its
    fallback cluster, exactly as generated."""
    clusters = _clusters_by_name(envoy_config)
    problems: list[str] = []
    for name in referenced_clusters(upstreams):
        found = clusters.get(name)
        if found is None:
            problems.append(f"cluster {name} is not in the Envoy config")
            continue
        if "cluster_type" in found:
            problems.append(f"cluster {name} is not a pod cluster (it has a cluster_type)")
            continue
        policy = found.get("lb_policy", "ROUND_ROBIN")
        if policy != LEAST_REQUEST:
            problems.append(f"cluster {name} uses lb_policy {policy}, not {LEAST_REQUEST}")
        if not found.get("health_checks"):
            problems.append(f"cluster {name} has no active health_checks")
        if not found.get("outlier_detection"):
            problems.append(f"cluster {name} has no outlier_detection")
    for expected in fallback_clusters(upstreams):
        name = expected["name"]
        found = clusters.get(name)
        if found is None:
            problems.append(f"fallback cluster {name} is not in the Envoy config")
        elif found != expected:
            want = [m["name"] for m in expected["cluster_type"]["typed_config"]["clusters"]]
            problems.append(
                f"fallback cluster {name} differs from the generated {FALLBACK_TYPE} cluster "
                f"of {want}"
            )
    return problems


def _route_configs(envoy_config: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    found = []
    static = envoy_config.get("static_resources") or {}
    for listener in static.get("listeners") or []:
        for chain in listener.get("filter_chains") or []:
            for filt in chain.get("filters") or []:
                config = (filt.get("typed_config") or {}).get("route_config")
                if filt.get("name") == "envoy.filters.network.http_connection_manager" and config:
                    found.append(config)
    return found


def check_routes(
    envoy_config: Mapping[str, Any], upstreams: Sequence[VersionUpstream]
) -> list[str]:
    """What is wrong with the config's routes for these versions (empty: nothing).

    Every virtual host must carry exactly the generated routes, in order; the route config
    must drop client copies of the routing headers (internal_only_headers)."""
    expected = routes(upstreams)
    problems: list[str] = []
    configs = _route_configs(envoy_config)
    if not configs:
        return ["no http_connection_manager with a static route_config"]
    for config in configs:
        name = config.get("name", "?")
        missing = set(INTERNAL_ONLY_HEADERS) - set(config.get("internal_only_headers") or [])
        if missing:
            problems.append(f"route config {name} lets clients send {sorted(missing)}")
        for vhost in config.get("virtual_hosts") or []:
            problems.extend(_check_vhost(f"{name}/{vhost.get('name', '?')}", vhost, expected))
    return problems


def _check_vhost(where: str, vhost: Mapping[str, Any], expected: list[dict[str, Any]]) -> list[str]:
    actual = list(vhost.get("routes") or [])
    if actual == expected:
        return []
    problems = []
    by_name = {r.get("name"): r for r in actual if isinstance(r, Mapping)}
    for route in expected:
        got = by_name.get(route["name"])
        if got is None:
            problems.append(f"{where}: no route {route['name']}")
        elif got != route:
            problems.append(f"{where}: route {route['name']} differs from the versions' settings")
    extra = sorted(str(n) for n in by_name.keys() - {r["name"] for r in expected})
    if extra:
        problems.append(f"{where}: routes not generated from the versions: {extra}")
    if len(by_name) != len(actual):
        problems.append(f"{where}: routes without a name")
    if not problems:
        problems.append(f"{where}: the routes are not in the generated order")
    return problems
