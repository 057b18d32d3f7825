from __future__ import annotations

import dataclasses
import threading
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Any

import pytest

from extproc.authz.conditions import (
    ConditionError,
    ConditionFacts,
    compile_condition,
    ip_in,
)
from extproc.celx import MAX_SOURCE_CHARS

FACTS = ConditionFacts(
    principal="alice",
    tenant="acme",
    auth_method="jwt",
    roles=frozenset({"ml-reader", "dev"}),
    scopes=frozenset({"models:read"}),
    claims={"tier": "gold", "level": 3, "groups": ["ml", "ops"], "org": {"id": "o-1"}},
    method="POST",
    path="/v1/chat/completions",
    host="models.example",
    headers={"x-team": "ml", "content-type": "application/json"},
    source_ip="10.1.2.3",
    model="llama",
    version="v2",
    input_types=frozenset(),
    cost=0,
    now=datetime(2024, 7, 3, 10, 0, tzinfo=UTC).timestamp(),  # a Wednesday
    region="eu-west-1",
    load=0.5,
)


def _at(*when: int) -> float:
    return datetime(*when, tzinfo=UTC).timestamp()  # type: ignore[misc]


def _holds(source: str, **changes: Any) -> bool:
    return compile_condition(source).evaluate(dataclasses.replace(FACTS, **changes))


@pytest.mark.parametrize(
    ("source", "message"),
    [
        (
            "identity.rolez == []",
            "line 1, column 9: undeclared reference to 'identity.rolez' "
            "(identity has: principal, tenant, method, roles, scopes, claims)",
        ),
        ("request.pth == '/'", "undeclared reference to 'request.pth' (request has: method, path,"),
        (
            "regoin == 'eu'",
            "line 1, column 1: undeclared reference to 'regoin' "
            "(variables: identity, request, now, region, load; functions: ip_in)",
        ),
        ("true &&\n  // a comment\n  foo", "line 3, column 3: undeclared reference to 'foo'"),
        (
            "request.method + 1 == 2",
            "line 1, column 16: found no matching overload for '_+_' applied to '(string, int)'",
        ),
        ("region == 1", "line 1, column 8: found no matching overload for '_==_'"),
        ("load > 1", "applied to '(double, int)'"),  # CEL does not mix int and double
        ("request.cost", "line 1, column 1: the condition gives int, not bool"),
        ("identity.roles", "the condition gives list<string>, not bool"),
        ("region ==", "line 1, column 10: Syntax error"),
        ("", "line 1, column 1: Syntax error"),
        ("x" * (MAX_SOURCE_CHARS + 1), "1001 characters long; at most 1000 allowed"),
        ("identity.roles.map(r, r) == []", "(only the macros all, exists, exists_one and has are"),
        ("identity.roles.filter(r, true) == []", "only the macros all, exists, exists_one and has"),
        (
            "identity.roles.exists(r,\n  identity.scopes.all(s, s != r))",
            "line 2, column 22: a comprehension (all, exists, exists_one) may not be nested",
        ),
        (
            "now.getHours('Europe/Pariss') > 8",
            "line 1, column 13: unknown time zone 'Europe/Pariss'",
        ),
        ("ip_in(request.source_ip, ['10.0.0.1/8'])", "line 1, column 6: ip_in: not a CIDR range:"),
        ("ip_in(request.source_ip, ['10.0.0.0/33'])", "ip_in: not a CIDR range"),
        ("ip_in(request.source_ip, [1])", "found no matching overload for 'ip_in'"),
        ("ipIn(request.source_ip, [])", "undeclared reference to 'ipIn' (variables: identity,"),
    ],
)
def test_compile_errors(source: str, message: str) -> None:
    with pytest.raises(ConditionError) as caught:
        compile_condition(source)
    text = str(caught.value)
    assert message in text
    assert "\n" not in text  # one line, fit to follow "file: field: "
    assert "in container" not in text


def test_longest_condition_allowed() -> None:
    source = "size('" + "x" * (MAX_SOURCE_CHARS - 12) + "') > 1"
    assert len(source) == MAX_SOURCE_CHARS
    assert compile_condition(source).evaluate(FACTS) is True


# Paris is UTC+2 in July and UTC+1 in January.
OFFICE_HOURS = "now.getHours('Europe/Paris') >= 8 && now.getHours('Europe/Paris') < 18"
WEEKDAY = "now.getDayOfWeek('Asia/Tokyo') >= 1 && now.getDayOfWeek('Asia/Tokyo') <= 5"


@pytest.mark.parametrize(
    ("source", "now", "expected"),
    [
        (OFFICE_HOURS, _at(2024, 7, 3, 6, 30), True),  # 08:30 in Paris
        (OFFICE_HOURS, _at(2024, 1, 3, 6, 30), False),  # 07:30 in Paris
        (OFFICE_HOURS, _at(2024, 1, 3, 16, 59), True),  # 17:59 in Paris
        (OFFICE_HOURS, _at(2024, 7, 3, 16, 0), False),  # 18:00 in Paris
        ("now.getHours() == 6", _at(2024, 7, 3, 6, 30), True),  # UTC without a zone
        ("now.getHours('+05:30') == 12", _at(2024, 7, 3, 6, 30), True),
        (WEEKDAY, _at(2024, 7, 7, 12, 0), False),  # Sunday in Tokyo
        (WEEKDAY, _at(2024, 7, 7, 15, 30), True),  # Sunday in UTC, Monday 00:30 in Tokyo
        (WEEKDAY, _at(2024, 7, 5, 15, 30), False),  # Friday in UTC, Saturday in Tokyo
        ("now < timestamp('2024-07-04T00:00:00Z')", _at(2024, 7, 3, 23, 59), True),
        ("now < timestamp('2024-07-04T00:00:00Z')", _at(2024, 7, 4, 0, 0), False),
    ],
)
def test_time_windows(source: str, now: float, expected: bool) -> None:
    assert _holds(source, now=now) is expected


@pytest.mark.parametrize(
    ("source", "changes", "expected"),
    [
        ("region == 'eu-west-1'", {}, True),
        ("region == 'eu-west-1'", {"region": "us-east-1"}, False),
        ("region.startsWith('eu-')", {"region": ""}, False),
        ("load < 0.8", {}, True),
        ("load < 0.8", {"load": 0.95}, False),
        ("load < 0.8", {"load": 0}, True),  # an int load is still a double
        ("'ml-reader' in identity.roles", {}, True),
        ("'admin' in identity.roles", {}, False),
        ("identity.roles.exists(r, r.startsWith('ml-'))", {}, True),
        ("identity.roles.exists(r, r.startsWith('ml-'))", {"roles": frozenset({"dev"})}, False),
        ("identity.roles.all(r, r != 'banned')", {"roles": frozenset()}, True),
        ("identity.roles.exists_one(r, r.endsWith('er'))", {}, True),
        ("'models:read' in identity.scopes", {"scopes": frozenset()}, False),
        ("identity.principal == 'alice' && identity.tenant == 'acme'", {}, True),
        ("identity.tenant == ''", {"tenant": ""}, True),
        ("identity.method == 'api_key'", {}, False),
        ("identity.method == 'api_key'", {"auth_method": "api_key"}, True),
        ("identity.claims.tier == 'gold' && identity.claims.level >= 3", {}, True),
        ("identity.claims.level >= 4", {}, False),
        ("'ml' in identity.claims.groups", {}, True),
        ("identity.claims.groups.exists(g, g == 'ops')", {"claims": {"groups": []}}, False),
        ("identity.claims.org.id == 'o-1'", {}, True),
        ("has(identity.claims.tier)", {"claims": {}}, False),
        ("has(identity.claims.tier) && identity.claims.tier == 'gold'", {"claims": {}}, False),
        ("identity.claims.active", {"claims": {"active": True}}, True),  # dyn result, a bool
        ("identity.claims.tier == 'gold'", {"claims": MappingProxyType({"tier": "gold"})}, True),
        ("request.headers['x-team'] == 'ml'", {}, True),
        ("'x-debug' in request.headers", {}, False),
        ("has(request.headers.x) || size(request.headers) == 2", {}, True),
        (
            "request.headers['x-team'] == 'ml'",
            {"headers": MappingProxyType({"x-team": "ml"})},
            True,
        ),
        ("request.method == 'POST' && request.path.startsWith('/v1/')", {}, True),
        ("request.host.endsWith('.example') && request.model == 'llama'", {}, True),
        ("request.version in ['v1', 'v3']", {}, False),
        ("request.cost <= 1000", {"cost": 1001}, False),
        ("'image' in request.input_types", {"input_types": frozenset({"text", "image"})}, True),
        ("'image' in request.input_types", {}, False),
    ],
)
def test_conditions(source: str, changes: dict[str, Any], expected: bool) -> None:
    assert _holds(source, **changes) is expected


@pytest.mark.parametrize(
    ("source_ip", "expected"),
    [
        ("10.1.2.3", True),
        ("192.168.0.10", True),  # a single address is a /32
        ("192.168.0.11", False),
        ("11.0.0.1", False),
        ("2001:db8::1", True),
        ("2001:db9::1", False),
        ("::ffff:10.9.9.9", True),  # an IPv4-mapped address matches the IPv4 range
        ("::ffff:11.9.9.9", False),
    ],
)
def test_ip_in(source_ip: str, expected: bool) -> None:
    source = "ip_in(request.source_ip, ['10.0.0.0/8', '192.168.0.10', '2001:db8::/32'])"
    assert _holds(source, source_ip=source_ip) is expected


def test_ip_in_ranges_from_claims() -> None:
    source = "ip_in(request.source_ip, identity.claims.networks)"
    assert _holds(source, claims={"networks": ["10.0.0.0/8"]}) is True
    assert _holds(source, claims={"networks": ["172.16.0.0/12"]}) is False
    with pytest.raises(ConditionError, match=r"evaluation failed: .*ip_in: not a CIDR range"):
        _holds(source, claims={"networks": ["10.0.0.0/99"]})


@pytest.mark.parametrize("source_ip", ["", "10.1.2", "not an address"])
def test_ip_in_fails_closed_without_an_address(source_ip: str) -> None:
    # Raising, not False: `!ip_in(...)` must not let an unknown address through.
    condition = compile_condition("!ip_in(request.source_ip, ['10.0.0.0/8'])")
    with pytest.raises(ConditionError, match=r"evaluation failed: .*ip_in: "):
        condition.evaluate(dataclasses.replace(FACTS, source_ip=source_ip))


def test_ip_in_called_directly() -> None:
    assert ip_in("10.0.0.1", ["10.0.0.0/31"]) is True
    assert ip_in("10.0.0.2", ["10.0.0.0/31"]) is False
    assert ip_in("10.0.0.2", []) is False


@pytest.mark.parametrize(
    ("source", "changes", "message"),
    [
        ("identity.claims.nope == 'x'", {}, 'Key not found in map : "nope"'),
        ("request.headers['x-missing'] == 'x'", {}, "Key not found"),
        ("identity.claims.tier", {}, "the result is string, not bool"),
        ("identity.claims.level > 1", {"claims": {"level": 2**70}}, "out of range"),
        ("identity.claims.level > 1", {"claims": {"level": {1, 2}}}, "evaluation failed"),
        ("identity.claims.big.all(x, x >= 0)", {"claims": {"big": [1] * 10_001}}, "budget"),
        ("request.cost / (request.cost - 1) > 0", {"cost": 1}, "divide by zero"),
    ],
)
def test_evaluation_errors(source: str, changes: dict[str, Any], message: str) -> None:
    with pytest.raises(ConditionError) as caught:
        _holds(source, **changes)
    assert message in str(caught.value)


def test_unread_facts_are_not_evaluated() -> None:
    # A claim CEL cannot represent breaks only the conditions that read the claims.
    facts = dataclasses.replace(FACTS, claims={"huge": 2**70})
    assert compile_condition("region == 'eu-west-1'").evaluate(facts) is True
    with pytest.raises(ConditionError):
        compile_condition("has(identity.claims.tier)").evaluate(facts)


def test_errors_are_absorbed_like_cel_does() -> None:
    # CEL's logical operators are commutative: `error || true` is true, `error && false` false.
    assert _holds("identity.claims.nope == 'x' || region == 'eu-west-1'") is True
    assert _holds("identity.claims.nope == 'x' && region == 'nowhere'") is False
    with pytest.raises(ConditionError):
        _holds("identity.claims.nope == 'x' || region == 'nowhere'")


@pytest.mark.parametrize(
    ("source", "reads_body", "variables"),
    [
        ("request.cost < 100", True, {"request.cost"}),
        ("'image' in request.input_types", True, {"request.input_types"}),
        ("identity.principal == 'request.cost'", False, {"identity.principal"}),
        ("// request.cost\nregion == 'x' && load < 0.5", False, {"region", "load"}),
        (
            "identity.roles.exists(r, r == 'a') && now.getHours() > 1",
            False,
            {"identity.roles", "now"},
        ),
        ("has(identity.claims.x) || request.cost > 1", True, {"identity.claims", "request.cost"}),
        ("true", False, set()),
    ],
)
def test_reads_body(source: str, reads_body: bool, variables: set[str]) -> None:
    condition = compile_condition(source)
    assert condition.reads_body is reads_body
    assert condition.variables == variables


def test_condition_keeps_its_source() -> None:
    condition = compile_condition("load < 0.5")
    assert condition.source == "load < 0.5"
    assert repr(condition) == "Condition('load < 0.5')"


def test_concurrent_evaluation_from_threads() -> None:
    condition = compile_condition(
        "identity.principal.startsWith('user-') && ip_in(request.source_ip, ['10.0.0.0/8'])"
    )
    wrong: list[tuple[int, int]] = []

    def work(thread: int) -> None:
        for i in range(300):
            inside = (thread + i) % 2 == 0
            facts = dataclasses.replace(
                FACTS,
                principal=f"user-{thread}-{i}",
                source_ip=f"10.0.{thread}.{i % 250}" if inside else f"11.0.{thread}.{i % 250}",
            )
            if condition.evaluate(facts) is not inside:
                wrong.append((thread, i))

    threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert wrong == []
