"""Routes and fallback clusters generated from the model versions, and the drift checks."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Any

import pytest
import yaml

from extproc import envoy_routes as er
from extproc.envoy_routes import VersionUpstream as Up
from extproc.envoyconf import (
    DEMO_UPSTREAMS,
    TEMPLATES,
    EnvoyValues,
    Template,
    policy_upstreams,
    render,
)

REPO = Path(__file__).resolve().parents[2]
CANARY = Up("chat-v2", retries=1, per_try_timeout_seconds=2, fallback_cluster="chat-v1")


def by_name(items: list[dict[str, Any]], name: str) -> dict[str, Any]:
    (found,) = [i for i in items if i.get("name") == name]
    return found


def keys(node: object) -> set[str]:
    if isinstance(node, dict):
        return set(node).union(*(keys(v) for v in node.values()))
    if isinstance(node, list):
        return set().union(*(keys(v) for v in node))
    return set()


# --------------------------------------------------------------------------- the input


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"cluster": "bad name"}, "not a cluster name"),
        ({"cluster": "-leading-dash"}, "not a cluster name"),
        ({"cluster": "decision_server"}, "decision server"),
        ({"fallback_cluster": "decision_server"}, "decision server"),
        ({"mirror_clusters": ("decision_server",)}, "decision server"),
        ({"timeout_seconds": 0}, "timeout_seconds"),
        ({"timeout_seconds": 3601}, "timeout_seconds"),
        ({"retries": 6}, "retries"),
        ({"retries": -1}, "retries"),
        ({"retries": True}, "retries"),
        ({"per_try_timeout_seconds": 0}, "per_try_timeout_seconds"),
        ({"per_try_timeout_seconds": 121}, "per_try_timeout_seconds"),
        ({"fallback_cluster": "c"}, "own fallback"),
        ({"mirror_clusters": ("c",)}, "itself"),
        ({"mirror_clusters": ("m", "m")}, "twice"),
    ],
)
def test_invalid_upstreams_are_refused(change: dict[str, Any], message: str) -> None:
    fields: dict[str, Any] = {"cluster": "c", **change}
    with pytest.raises(ValueError, match=message):
        Up(**fields)


def test_selection_keys() -> None:
    assert er.selection_key("c") == "c"
    assert er.selection_key("c", "s") == "c__fallback__s" == er.fallback_cluster_name("c", "s")
    assert er.selection_key("c", mirror="m") == "c__mirror__m"
    assert er.selection_key("c", "s", "m") == "c__fallback__s__mirror__m"


def test_versions_sharing_a_cluster_must_agree_on_its_settings() -> None:
    # Fallbacks and mirrors add keys; the timeout and retries belong to the cluster.
    assert len(er.selections([Up("c", fallback_cluster="s"), Up("c"), Up("s")])) == 3
    with pytest.raises(ValueError, match="disagree"):
        er.selections([Up("c", timeout_seconds=30), Up("c", fallback_cluster="s")])
    with pytest.raises(ValueError, match="disagree"):
        er.selections([Up("c", retries=1), Up("c")])


def test_generated_names_cannot_collide_with_real_ones() -> None:
    with pytest.raises(ValueError, match="two different upstreams"):
        er.selections([Up("a__mirror__b"), Up("a", mirror_clusters=("b",))])
    with pytest.raises(ValueError, match="collide"):
        er.selections([Up("a", fallback_cluster="b"), Up("x", fallback_cluster="a__fallback__b")])


# --------------------------------------------------------------------------- routes


def test_plain_versions_keep_todays_routes() -> None:
    routes = er.routes([Up("b"), Up("a")])
    assert [r["name"] for r in routes] == ["guard-decision-server", "a", "b", "no-upstream"]
    guard = routes[0]
    assert guard["match"]["headers"][0]["string_match"] == {"exact": "decision_server"}
    assert guard["direct_response"] == {"status": 404}
    a = by_name(routes, "a")
    assert a["match"] == {
        "prefix": "/",
        "headers": [{"name": "x-gateway-cluster", "string_match": {"exact": "a"}}],
    }
    assert a["route"] == {"cluster": "a", "timeout": "120s"}
    catch_all = routes[-1]
    assert catch_all["match"] == {"prefix": "/"}
    assert catch_all["direct_response"]["status"] == 503
    assert "route" not in catch_all


def test_timeouts_and_same_cluster_retries() -> None:
    (route,) = [r for r in er.routes([Up("a", 2.5, 2, 0.75)]) if r["name"] == "a"]
    action = route["route"]
    assert action["timeout"] == "2.500s" and "idle_timeout" not in action
    retry = action["retry_policy"]
    assert retry["retry_on"] == "5xx,reset,connect-failure"
    assert retry["num_retries"] == 2
    assert retry["per_try_timeout"] == "0.750s"
    assert retry["retry_host_predicate"][0]["name"] == "envoy.retry_host_predicates.previous_hosts"
    assert "retry_priority" not in retry


def test_a_long_timeout_outlasts_the_listeners_idle_timeout() -> None:
    action = by_name(er.routes([Up("a", 600)]), "a")["route"]
    assert action["timeout"] == "600s" and action["idle_timeout"] == "610s"


def test_fallback_goes_through_a_composite_cluster() -> None:
    routes = er.routes([CANARY, Up("chat-v1")])
    names = [r["name"] for r in routes[1:-1]]
    # Without the fallback (a caller who may not use the stable version) the candidate alone.
    assert names == ["chat-v1", "chat-v2", "chat-v2__fallback__chat-v1"]
    action = by_name(routes, "chat-v2__fallback__chat-v1")["route"]
    assert action["cluster"] == "chat-v2__fallback__chat-v1"
    retry = action["retry_policy"]
    # Two tries on the candidate (1 + retries), then one on the fallback.
    assert retry["num_retries"] == 2
    assert retry["per_try_timeout"] == "2s"
    assert "retry_priority" not in retry  # the cluster picks by attempt, not by priority
    plain = by_name(routes, "chat-v2")["route"]
    assert plain["cluster"] == "chat-v2" and plain["retry_policy"]["num_retries"] == 1

    (composite,) = er.fallback_clusters([CANARY, Up("chat-v1")])
    assert composite["name"] == "chat-v2__fallback__chat-v1"
    assert composite["lb_policy"] == "CLUSTER_PROVIDED"
    assert composite["cluster_type"]["name"] == "envoy.clusters.composite"
    members = composite["cluster_type"]["typed_config"]["clusters"]
    assert members == [{"name": "chat-v2"}, {"name": "chat-v2"}, {"name": "chat-v1"}]
    assert composite["circuit_breakers"]["thresholds"][0]["max_retries"] >= 1024


def test_fallback_without_retries_tries_the_fallback_once() -> None:
    ups = [Up("c", fallback_cluster="s")]
    retry = by_name(er.routes(ups), "c__fallback__s")["route"]["retry_policy"]
    assert retry["num_retries"] == 1
    assert "per_try_timeout" not in retry
    (composite,) = er.fallback_clusters(ups)
    assert composite["cluster_type"]["typed_config"]["clusters"] == [{"name": "c"}, {"name": "s"}]


def test_mirrors_are_fixed_clusters_selected_by_key() -> None:
    ups = [Up("c", fallback_cluster="s", mirror_clusters=("m1", "m2")), Up("s"), Up("m1"), Up("m2")]
    routes = er.routes(ups)
    names = {r["name"] for r in routes}
    for base in ("c", "c__fallback__s"):
        assert {base, f"{base}__mirror__m1", f"{base}__mirror__m2"} <= names
    action = by_name(routes, "c__fallback__s__mirror__m2")["route"]
    assert action["cluster"] == "c__fallback__s"
    assert action["request_mirror_policies"] == [{"cluster": "m2"}]
    # Nothing is taken from a header but the route key itself.
    assert "cluster_header" not in keys(routes)
    assert "request_mirror_policies" not in by_name(routes, "c")["route"]


def test_annotated_routes_describe_each_route() -> None:
    comments = dict(
        (route["name"], comment) for comment, route in er.annotated_routes([CANARY, Up("chat-v1")])
    )
    assert comments["chat-v2__fallback__chat-v1"] == (
        "chat-v2: 2 tries, then 1 on chat-v1; timeout 120s (2s per try)"
    )


# --------------------------------------------------------------------------- the checks


@pytest.fixture
def values(tmp_path: Path) -> EnvoyValues:
    return EnvoyValues(
        listen_address="127.0.0.1",
        listen_port=8443,
        admin_port=9901,
        decision_host="127.0.0.1",
        decision_port=50051,
        sds_dir=tmp_path / "sds",
        access_log_path=tmp_path / "access.log",
        chat_v1_port=8101,
        chat_v2_port=8102,
        oip_v1_port=8201,
    )


DEMO_CANARY = (
    Up("demo-chat-v1", mirror_clusters=("demo-chat-v2",)),
    Up("demo-chat-v2", 10, 1, 3, "demo-chat-v1"),
    Up("demo-oip-v1"),
)


def rendered(
    values: EnvoyValues, template: Template = "ext_proc", ups: tuple[Up, ...] | None = None
) -> dict[str, Any]:
    if ups is not None:
        values = dataclasses.replace(values, upstreams=ups)
    config: dict[str, Any] = yaml.safe_load(render(template, values))
    return config


@pytest.mark.parametrize("template", TEMPLATES)
@pytest.mark.parametrize("ups", [DEMO_UPSTREAMS, DEMO_CANARY], ids=["demo", "canary"])
def test_rendered_configs_carry_exactly_the_generated_routes(
    values: EnvoyValues, template: Template, ups: tuple[Up, ...]
) -> None:
    config = rendered(values, template, ups)
    hcm = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
    (vhost,) = hcm["typed_config"]["route_config"]["virtual_hosts"]
    assert vhost["routes"] == er.routes(ups)
    clusters = config["static_resources"]["clusters"]
    generated = [c for c in clusters if "cluster_type" in c]
    assert generated == er.fallback_clusters(ups)
    assert er.check_clusters(config, ups) == [] and er.check_routes(config, ups) == []


def test_demo_policies_name_the_demo_clusters() -> None:
    assert policy_upstreams(REPO / "policies") == DEMO_UPSTREAMS


def test_render_refuses_versions_the_template_cannot_serve(values: EnvoyValues) -> None:
    with pytest.raises(ValueError, match="demo-chat-v3 is not in the Envoy config"):
        rendered(values, ups=(*DEMO_UPSTREAMS, Up("demo-chat-v3")))


def drift(config: dict[str, Any], change: str) -> dict[str, Any]:
    config = copy.deepcopy(config)
    clusters = config["static_resources"]["clusters"]
    chat_v2 = by_name(clusters, "demo-chat-v2")
    if change == "missing":
        clusters.remove(by_name(clusters, "demo-oip-v1"))
    elif change == "round_robin":
        chat_v2["lb_policy"] = "ROUND_ROBIN"
    elif change == "default_lb":
        del chat_v2["lb_policy"]
    elif change == "no_health_checks":
        del chat_v2["health_checks"]
    elif change == "no_outlier_detection":
        chat_v2["outlier_detection"] = {}
    elif change == "no_fallback_cluster":
        clusters.remove(by_name(clusters, "demo-chat-v2__fallback__demo-chat-v1"))
    elif change == "fallback_order":
        fallback = by_name(clusters, "demo-chat-v2__fallback__demo-chat-v1")
        fallback["cluster_type"]["typed_config"]["clusters"].reverse()
    elif change == "aggregate":
        fallback = by_name(clusters, "demo-chat-v2__fallback__demo-chat-v1")
        fallback["cluster_type"]["name"] = "envoy.clusters.aggregate"
    return config


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        ("missing", "cluster demo-oip-v1 is not in the Envoy config"),
        ("round_robin", "cluster demo-chat-v2 uses lb_policy ROUND_ROBIN, not LEAST_REQUEST"),
        ("default_lb", "cluster demo-chat-v2 uses lb_policy ROUND_ROBIN, not LEAST_REQUEST"),
        ("no_health_checks", "cluster demo-chat-v2 has no active health_checks"),
        ("no_outlier_detection", "cluster demo-chat-v2 has no outlier_detection"),
        ("no_fallback_cluster", "fallback cluster demo-chat-v2__fallback__demo-chat-v1 is not"),
        ("fallback_order", "fallback cluster demo-chat-v2__fallback__demo-chat-v1 differs"),
        ("aggregate", "fallback cluster demo-chat-v2__fallback__demo-chat-v1 differs"),
    ],
)
def test_check_clusters_finds_drift(values: EnvoyValues, change: str, problem: str) -> None:
    config = drift(rendered(values, ups=DEMO_CANARY), change)
    problems = er.check_clusters(config, DEMO_CANARY)
    assert len(problems) == 1 and problems[0].startswith(problem), problems


def test_a_version_cannot_name_a_generated_cluster(values: EnvoyValues) -> None:
    config = rendered(values, ups=DEMO_CANARY)
    problems = er.check_clusters(config, [Up("demo-chat-v2__fallback__demo-chat-v1")])
    assert problems == [
        "cluster demo-chat-v2__fallback__demo-chat-v1 is not a pod cluster (it has a cluster_type)"
    ]


def test_check_routes_finds_drift(values: EnvoyValues) -> None:
    config = rendered(values, ups=DEMO_CANARY)
    route_config = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0][
        "typed_config"
    ]["route_config"]
    routes = route_config["virtual_hosts"][0]["routes"]
    by_name(routes, "demo-chat-v2")["route"]["timeout"] = "120s"  # hand-edited
    routes.insert(-1, {"name": "x", "match": {"prefix": "/"}, "route": {"cluster_header": "h"}})
    route_config["internal_only_headers"] = ["x-gateway-mirror"]
    assert er.check_routes(config, DEMO_CANARY) == [
        "route config models lets clients send ['x-gateway-cluster']",
        "models/models: route demo-chat-v2 differs from the versions' settings",
        "models/models: routes not generated from the versions: ['x']",
    ]
    routes.pop(-2)
    routes.reverse()
    by_name(routes, "demo-chat-v2")["route"]["timeout"] = "10s"
    assert er.check_routes(config, DEMO_CANARY)[-1] == (
        "models/models: the routes are not in the generated order"
    )
    assert er.check_routes({}, DEMO_CANARY) == [
        "no http_connection_manager with a static route_config"
    ]
