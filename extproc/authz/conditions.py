"""Rule conditions: `when: <CEL expression>`, an extra test a policy rule puts on a request.

A rule applies its other checks and additionally requires its condition to be true, e.g.

    "admin" in identity.roles
      || (now.getHours("Europe/Paris") >= 8 && now.getHours("Europe/Paris") < 18)
    ip_in(request.source_ip, ["10.0.0.0/8", "2001:db8::/32"]) && load < 0.8

A condition is compiled once when the policy loads (`compile_condition`) and evaluated on each
request's `ConditionFacts`. Every field is declared with its own type (`identity.roles` is a
list of strings, `request.cost` an int, `now` a timestamp), so `request.method + 1`, a misspelt
field or a result that is not a bool is reported with its line and column at load time. Time zone
names given as literals (`now.getHours("Europe/Paris")`) and CIDR literals given to `ip_in` are
checked at load time too.

Bounded evaluation: the source is at most celx.MAX_SOURCE_CHARS long and cel-cpp stops after
10,000 comprehension iterations. The macros `all`, `exists`, `exists_one` and `has` are enabled,
because tests over roles, scopes and claim lists need them and those lists are small. `map` and
`filter` are not (a condition is a predicate: building lists only adds work), and a comprehension
may not be nested in another, so each one runs at most once per item of one list or map.
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from operator import attrgetter
from typing import Any

# The wheel ships cel.pyi but no py.typed marker; see the mypy override for cel_expr_python.
import cel_expr_python.cel as cel

from extproc import celx

_T = cel.Type
_MACROS = frozenset({"all", "exists", "exists_one", "has"})
# Timestamp accessors whose optional argument is a time zone ("Europe/Paris", "+01:00").
_TIME_ACCESSORS = frozenset(
    {
        "getFullYear",
        "getMonth",
        "getDayOfYear",
        "getDayOfMonth",
        "getDate",
        "getDayOfWeek",
        "getHours",
        "getMinutes",
        "getSeconds",
        "getMilliseconds",
    }
)
# Distinct range lists seen by ip_in: those of all loaded policies, and claims-based ones.
_MAX_CACHED_RANGES = 1024


class ConditionError(ValueError):
    """A condition that does not compile, or an evaluation that gave no bool (fail closed).

    The message reads well after a "file: field: " prefix, e.g. "line 1, column 9: undeclared
    reference to 'identity.rolez' (identity has: principal, tenant, method, roles, scopes, claims)".
    """


@dataclass(frozen=True, slots=True)
class ConditionFacts:
    """Everything a condition may read, built per request by the caller."""

    principal: str
    tenant: str  # "" when none
    auth_method: str  # "jwt" | "api_key" | "introspection" | "mtls"
    roles: frozenset[str]
    scopes: frozenset[str]
    # Verified token claims or API key metadata: plain dicts, lists, str, int, float, bool, None.
    claims: Mapping[str, Any]
    method: str
    path: str
    host: str
    headers: Mapping[str, str]  # lower-case names, credential headers already removed
    source_ip: str  # "" when unknown
    model: str
    version: str
    input_types: frozenset[str]  # empty at header time
    cost: int  # estimated request cost, 0 when unknown
    now: float  # unix seconds
    region: str  # "" when unknown
    load: float  # 0.0..1.0, the server's current load


@dataclass(frozen=True, slots=True)
class _Variable:
    type: cel.Type
    read: Callable[[ConditionFacts], object]  # the CEL value, from the facts


def _sorted(name: str) -> Callable[[ConditionFacts], object]:
    get = attrgetter(name)
    return lambda facts: sorted(get(facts))  # CEL takes lists, not sets; sorted: deterministic


def _plain(name: str) -> Callable[[ConditionFacts], object]:
    get = attrgetter(name)

    def read(facts: ConditionFacts) -> object:
        value = get(facts)
        return value if type(value) is dict else dict(value)  # CEL takes only plain dicts

    return read


def _timestamp(facts: ConditionFacts) -> datetime:
    return datetime.fromtimestamp(facts.now, UTC)


_VARIABLES: dict[str, _Variable] = {
    "identity.principal": _Variable(_T.STRING, attrgetter("principal")),
    "identity.tenant": _Variable(_T.STRING, attrgetter("tenant")),
    "identity.method": _Variable(_T.STRING, attrgetter("auth_method")),
    "identity.roles": _Variable(_T.List(_T.STRING), _sorted("roles")),
    "identity.scopes": _Variable(_T.List(_T.STRING), _sorted("scopes")),
    "identity.claims": _Variable(_T.Map(_T.STRING, _T.DYN), _plain("claims")),
    "request.method": _Variable(_T.STRING, attrgetter("method")),
    "request.path": _Variable(_T.STRING, attrgetter("path")),
    "request.host": _Variable(_T.STRING, attrgetter("host")),
    "request.headers": _Variable(_T.Map(_T.STRING, _T.STRING), _plain("headers")),
    "request.source_ip": _Variable(_T.STRING, attrgetter("source_ip")),
    "request.model": _Variable(_T.STRING, attrgetter("model")),
    "request.version": _Variable(_T.STRING, attrgetter("version")),
    "request.input_types": _Variable(_T.List(_T.STRING), _sorted("input_types")),
    "request.cost": _Variable(_T.INT, attrgetter("cost")),
    "now": _Variable(_T.TIMESTAMP, _timestamp),
    "region": _Variable(_T.STRING, attrgetter("region")),
    "load": _Variable(_T.DOUBLE, lambda facts: float(facts.load)),
}
# Known only once the request body has been read.
BODY_VARIABLES = frozenset({"request.input_types", "request.cost"})
_OBJECTS = ("identity", "request")
_TOP_LEVEL = ("identity", "request", "now", "region", "load")


class Condition:
    """A compiled condition; `evaluate` is safe to call on the request path, from any thread."""

    __slots__ = ("_env", "_program", "_reads", "reads_body", "source", "variables")

    def __init__(
        self, source: str, env: cel.Env, program: cel.Expression, variables: frozenset[str]
    ) -> None:
        self.source = source
        self._env = env  # the program is only used while its environment lives
        self._program = program
        # The variables the program reads: only these are built and passed to CEL.
        self.variables = variables
        self._reads = tuple((name, _VARIABLES[name].read) for name in sorted(variables))
        # True when the condition can only be decided once the body has been read.
        self.reads_body = not variables.isdisjoint(BODY_VARIABLES)

    def evaluate(self, facts: ConditionFacts) -> bool:
        """Whether the condition holds. Raises ConditionError: the caller must fail closed."""
        data = {name: read(facts) for name, read in self._reads}
        value, kind = celx.evaluate(self._program, data, error=ConditionError)
        if kind != _T.BOOL:  # only a dyn result (a claim) can be something else
            raise ConditionError(f"the result is {kind.name().lower()}, not bool")
        result: bool = value.value()
        return result

    def __repr__(self) -> str:
        return f"Condition({self.source!r})"


def compile_condition(source: str) -> Condition:
    """Compile (and type-check) a condition; raises ConditionError."""
    env = _environment()
    program = celx.compile_source(env, source, error=ConditionError, hint=_hint)
    result = program.return_type()
    if not (result == _T.BOOL or result == _T.DYN):
        raise ConditionError(
            f"line 1, column 1: the condition gives {result.name().lower()}, not bool"
        )
    checked = celx.checked_ast(program)
    _check_tree(source, checked, checked.expr, nested=False)
    names = {reference.name for reference in checked.reference_map.values()}
    return Condition(source, env, program, frozenset(names.intersection(_VARIABLES)))


@functools.cache
def _environment() -> cel.Env:
    declaration = cel.FunctionDecl(
        "ip_in",
        [
            cel.Overload(
                "ip_in_string_list_string",
                return_type=_T.BOOL,
                parameters=[_T.STRING, _T.List(_T.STRING)],
                impl=ip_in,
            )
        ],
    )
    variables = {name: variable.type for name, variable in _VARIABLES.items()}
    return celx.environment(variables, macros=_MACROS, functions=[declaration])


def _hint(undeclared: frozenset[str]) -> str:
    if undeclared & (celx.MACROS - _MACROS):
        # The macro's loop variable is then undeclared too: say only what to change.
        return " (only the macros all, exists, exists_one and has are enabled)"
    notes = []
    for prefix in _OBJECTS:
        if any(name == prefix or name.startswith(prefix + ".") for name in undeclared):
            fields = (name.split(".", 1)[1] for name in _VARIABLES if name.startswith(prefix + "."))
            notes.append(f"{prefix} has: {', '.join(fields)}")
    if any(name.split(".", 1)[0] not in _OBJECTS for name in undeclared - celx.MACROS):
        notes.append(f"variables: {', '.join(_TOP_LEVEL)}; functions: ip_in")
    return "".join(f" ({note})" for note in notes)


# --- load-time checks of the syntax tree -----------------------------------------------------


def _check_tree(source: str, checked: Any, expr: Any, *, nested: bool) -> None:
    """Reject nested comprehensions, unknown time zones and malformed CIDR literals."""
    kind = expr.WhichOneof("expr_kind")
    if kind == "comprehension_expr":
        loop = expr.comprehension_expr
        if nested:
            raise ConditionError(
                celx.location(source, checked, expr.id)
                + "a comprehension (all, exists, exists_one) may not be nested in another"
            )
        _check_tree(source, checked, loop.iter_range, nested=False)
        for part in (loop.accu_init, loop.loop_condition, loop.loop_step, loop.result):
            _check_tree(source, checked, part, nested=True)
        return
    if kind == "call_expr":
        _check_call(source, checked, expr)
    for child in _children(expr, kind):
        _check_tree(source, checked, child, nested=nested)


def _children(expr: Any, kind: str | None) -> Iterator[Any]:
    if kind == "select_expr":
        yield expr.select_expr.operand
    elif kind == "call_expr":
        if expr.call_expr.HasField("target"):
            yield expr.call_expr.target
        yield from expr.call_expr.args
    elif kind == "list_expr":
        yield from expr.list_expr.elements
    elif kind == "struct_expr":
        for entry in expr.struct_expr.entries:
            if entry.HasField("map_key"):
                yield entry.map_key
            yield entry.value


def _check_call(source: str, checked: Any, expr: Any) -> None:
    call = expr.call_expr
    where = celx.location(source, checked, expr.id)
    if call.function in _TIME_ACCESSORS and call.HasField("target") and len(call.args) == 1:
        zone = _string_literal(call.args[0])
        if zone is not None and not _known_time_zone(zone):
            raise ConditionError(f"{where}unknown time zone {zone!r}")
    elif call.function == "ip_in" and len(call.args) == 2:
        ranges = call.args[1]
        if ranges.WhichOneof("expr_kind") == "list_expr":
            literals = (_string_literal(element) for element in ranges.list_expr.elements)
            try:
                _networks(tuple(text for text in literals if text is not None))
            except ValueError as exc:
                raise ConditionError(f"{where}{exc}") from None


def _string_literal(expr: Any) -> str | None:
    if expr.WhichOneof("expr_kind") == "const_expr" and expr.const_expr.HasField("string_value"):
        text: str = expr.const_expr.string_value
        return text
    return None


@functools.lru_cache(maxsize=256)
def _known_time_zone(zone: str) -> bool:
    """Whether cel-cpp itself resolves `zone` (from the system's tz database)."""
    probe = _time_zone_probe()
    try:
        return probe.eval(data={"zone": zone}).type() == _T.INT
    except Exception:
        return False


@functools.cache
def _time_zone_probe() -> cel.Expression:
    env = celx.environment({"zone": _T.STRING})
    return env.compile('timestamp("2000-01-01T00:00:00Z").getHours(zone)')


# --- ip_in -----------------------------------------------------------------------------------

_Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def ip_in(address: str, ranges: Sequence[str]) -> bool:
    """Whether `address` lies in one of `ranges` (CIDR blocks or single addresses).

    An IPv4-mapped IPv6 address (::ffff:10.1.2.3) also matches IPv4 ranges. Raises ValueError,
    which fails the evaluation, for an empty or malformed address or range.
    """
    if not address:
        raise ValueError("ip_in: the source address is unknown")
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        raise ValueError(f"ip_in: not an IP address: {address[:64]!r}") from None
    networks = _networks(tuple(ranges))
    mapped = ip.ipv4_mapped if isinstance(ip, ipaddress.IPv6Address) else None
    return any(ip in network or (mapped is not None and mapped in network) for network in networks)


@functools.lru_cache(maxsize=_MAX_CACHED_RANGES)
def _networks(ranges: tuple[str, ...]) -> tuple[_Network, ...]:
    networks = []
    for text in ranges:
        if not isinstance(text, str):
            raise ValueError(f"ip_in: not a CIDR range: {text!r}")
        try:
            networks.append(ipaddress.ip_network(text, strict=True))
        except ValueError as exc:
            raise ValueError(f"ip_in: not a CIDR range: {str(exc)[:100]}") from None
    return tuple(networks)
