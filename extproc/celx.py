"""CEL for policy owners: environments, compilation and evaluation shared by every expression kind.

CEL comes from `cel-expr-python` (Google's binding of cel-cpp, the implementation Envoy itself
uses), because it type-checks at compile time: a misspelt variable, `int + string` or a result of
the wrong type is reported with its line and column when the policy loads, not on the first
request. Each kind of expression (cost expressions in `extproc.quota.cost`, rule conditions in
`extproc.authz.conditions`) declares its own variables and result type on top of this module.

Bounds that hold for every expression: the source is at most MAX_SOURCE_CHARS long, cel-cpp's
parser stops at 32 levels of nesting, and cel-cpp stops an evaluation after 10,000 comprehension
iterations in all ("Iteration budget exceeded").
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

# The wheel ships cel.pyi but no py.typed marker; see the mypy override for cel_expr_python.
import cel_expr_python.cel as cel

# CEL's own protos, shipped (untyped) by xds-protos.
from cel.expr import checked_pb2  # type: ignore[import-untyped]
from google.protobuf import any_pb2

MAX_SOURCE_CHARS = 1_000
MACROS = frozenset({"all", "exists", "exists_one", "map", "filter", "has"})
IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")

_CEL_ERROR = re.compile(r"ERROR: <input>:(-?\d+):(-?\d+): ([^\n]*)")
_UNDECLARED = re.compile(r"undeclared reference to '([^']*)'")
_MAX_REPORTED_ERRORS = 3
_ERROR = cel.Type.ERROR

ErrorType = Callable[[str], Exception]
# Given the names the checker found undeclared, a note to append to the message (or "").
Hint = Callable[[frozenset[str]], str]


def environment(
    variables: Mapping[str, cel.Type],
    *,
    macros: Iterable[str] = (),
    functions: Sequence[cel.FunctionDecl] = (),
) -> cel.Env:
    """An environment declaring `variables` and `functions`, with only `macros` enabled.

    A variable name may be dotted (`request.path`): CEL then resolves `request.path` as that one
    variable, so each field has its own declared type and is passed only when it is read.
    Raises ValueError (a caller's bug, not a policy error) for a name that is not an identifier.
    """
    for name in variables:
        if not all(IDENTIFIER.fullmatch(part) for part in name.split(".")):
            raise ValueError(f"not a CEL identifier: {name!r}")
    unknown = set(macros) - MACROS
    if unknown:
        raise ValueError(f"not CEL macros: {sorted(unknown)}")
    return cel.NewEnv(
        config=_config(frozenset(macros)), variables=dict(variables), functions=list(functions)
    )


@functools.lru_cache(maxsize=8)
def _config(macros: frozenset[str]) -> cel.EnvConfig:
    if not macros:
        return cel.NewEnvConfigFromYaml("stdlib:\n  disable_macros: true\n")
    included = "".join(f"    - {name}\n" for name in sorted(macros))
    return cel.NewEnvConfigFromYaml(f"stdlib:\n  include_macros:\n{included}")


def compile_source(env: cel.Env, source: str, *, error: ErrorType, hint: Hint) -> cel.Expression:
    """Compile and type-check `source`; raises `error` with a one-line message on failure."""
    if len(source) > MAX_SOURCE_CHARS:
        raise error(
            f"the expression is {len(source)} characters long; at most {MAX_SOURCE_CHARS} allowed"
        )
    try:
        return env.compile(source)
    except Exception as exc:  # the binding raises RuntimeError with cel-cpp's status text
        raise error(describe_compile_error(str(exc), hint)) from None


def describe_compile_error(status: str, hint: Hint) -> str:
    """cel-cpp's multi-line status text as one line: "line L, column C: what; ..."."""
    errors = _CEL_ERROR.findall(status)
    if not errors:
        return status.splitlines()[0] if status else "does not compile"
    parts = []
    undeclared: set[str] = set()
    for line, column, what in errors[:_MAX_REPORTED_ERRORS]:
        what = re.sub(r"\s*\[[A-Z_]+\]$", "", what.replace(" (in container '')", ""))
        # Some errors (e.g. nesting deeper than the parser's limit of 32) have no position.
        where = f"line {line}, column {column}: " if int(line) > 0 else ""
        parts.append(where + what)
        undeclared.update(_UNDECLARED.findall(what))
    if len(errors) > _MAX_REPORTED_ERRORS:
        parts.append(f"and {len(errors) - _MAX_REPORTED_ERRORS} more errors")
    return "; ".join(parts) + hint(frozenset(undeclared))


def evaluate(
    program: cel.Expression, data: Mapping[str, Any], *, error: ErrorType
) -> tuple[cel.Value, cel.Type]:
    """The value of `program` and its type (never ERROR: any failure raises
    `error("evaluation failed: ...")`). The type comes along as asking for it costs ~0.4 µs."""
    try:
        value = program.eval(data=data)
    except Exception as exc:  # anything the library raises must fail closed, never escape
        raise error(f"evaluation failed: {exc}") from None
    kind = value.type()
    if kind == _ERROR:
        raise error(f"evaluation failed: {value.value()}")
    return value, kind


def checked_ast(program: cel.Expression) -> checked_pb2.CheckedExpr:
    """The type-checked syntax tree of `program`, to inspect what it reads and calls."""
    wrapper = any_pb2.Any.FromString(program.serialize())
    checked = checked_pb2.CheckedExpr()
    if not wrapper.Unpack(checked):
        raise ValueError(f"unexpected serialized CEL program: {wrapper.type_url}")
    return checked


def location(source: str, checked: checked_pb2.CheckedExpr, expr_id: int) -> str:
    """ "line L, column C: " for a node of `checked`, as cel-cpp writes it in compile errors."""
    offset = checked.source_info.positions.get(expr_id, 0)
    line_start = source.rfind("\n", 0, offset) + 1
    return f"line {source.count(chr(10), 0, offset) + 1}, column {offset - line_start + 1}: "
