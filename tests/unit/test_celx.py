from __future__ import annotations

import cel_expr_python.cel as cel
import pytest

from extproc import celx


class _Error(ValueError):
    pass


def _no_hint(undeclared: frozenset[str]) -> str:
    return f" [{', '.join(sorted(undeclared))}]" if undeclared else ""


def _compile(env: cel.Env, source: str) -> cel.Expression:
    return celx.compile_source(env, source, error=_Error, hint=_no_hint)


@pytest.mark.parametrize("name", ["a-b", "1a", "a..b", "a.", ""])
def test_variable_names_must_be_identifiers(name: str) -> None:
    with pytest.raises(ValueError, match="not a CEL identifier"):
        celx.environment({name: cel.Type.INT})


def test_dotted_variables_are_typed_fields() -> None:
    env = celx.environment({"request.size": cel.Type.INT, "request.path": cel.Type.STRING})
    program = _compile(env, "request.size > 1 && request.path == '/'")
    value, kind = celx.evaluate(program, {"request.size": 2, "request.path": "/"}, error=_Error)
    assert (value.value(), kind) == (True, cel.Type.BOOL)
    with pytest.raises(_Error, match="line 1, column 14: found no matching overload"):
        _compile(env, "request.path + 1 == 2")


def test_only_the_chosen_macros_are_enabled() -> None:
    env = celx.environment({"xs": cel.Type.List(cel.Type.INT)}, macros={"exists"})
    value, _ = celx.evaluate(_compile(env, "xs.exists(x, x > 1)"), {"xs": [1, 2]}, error=_Error)
    assert value.value() is True
    with pytest.raises(_Error, match=r"undeclared reference to 'all'.* \[all, x\]$"):
        _compile(env, "xs.all(x, x > 1)")
    bare = celx.environment({"xs": cel.Type.List(cel.Type.INT)})
    with pytest.raises(_Error, match="undeclared reference to 'exists'"):
        _compile(bare, "xs.exists(x, x > 1)")
    with pytest.raises(ValueError, match="not CEL macros"):
        celx.environment({}, macros={"reduce"})


def test_source_length_is_capped() -> None:
    env = celx.environment({})
    longest = "'" + "x" * (celx.MAX_SOURCE_CHARS - 2) + "'"
    assert _compile(env, longest).return_type() == cel.Type.STRING
    with pytest.raises(_Error, match=r"^the expression is 1001 characters long; at most 1000"):
        _compile(env, longest + " ")


@pytest.mark.parametrize(
    ("status", "expected"),
    [
        ("", "does not compile"),
        ("INTERNAL: something odd\nmore", "INTERNAL: something odd"),
        (
            "INVALID_ARGUMENT: ERROR: <input>:2:5: undeclared reference to 'a' (in container '')\n"
            " | x\n | ^ [INVALID_ARGUMENT]",
            "line 2, column 5: undeclared reference to 'a' [a]",
        ),
        ("ERROR: <input>:-1:0: too deep [INVALID_ARGUMENT]", "too deep"),
    ],
)
def test_describe_compile_error(status: str, expected: str) -> None:
    assert celx.describe_compile_error(status, _no_hint) == expected


def test_evaluation_failures_raise_the_callers_error() -> None:
    env = celx.environment({"n": cel.Type.INT})
    program = _compile(env, "10 / n")
    value, kind = celx.evaluate(program, {"n": 5}, error=_Error)
    assert (value.value(), kind) == (2, cel.Type.INT)
    with pytest.raises(_Error, match=r"^evaluation failed: .*divide by zero"):
        celx.evaluate(program, {"n": 0}, error=_Error)  # an error value
    with pytest.raises(_Error, match=r"^evaluation failed: "):
        celx.evaluate(program, {"n": object()}, error=_Error)  # the binding raises
    with pytest.raises(_Error, match=r"^evaluation failed: "):
        celx.evaluate(program, {}, error=_Error)  # a missing variable


def test_checked_ast_and_location() -> None:
    env = celx.environment({"n": cel.Type.INT})
    source = "'é' == 'e' ||\n  n > 1"
    checked = celx.checked_ast(_compile(env, source))
    names = {reference.name for reference in checked.reference_map.values()}
    assert "n" in names
    greater = checked.expr.call_expr.args[1]
    assert greater.call_expr.function == "_>_"
    assert celx.location(source, checked, greater.id) == "line 2, column 5: "
