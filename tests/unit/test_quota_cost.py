from __future__ import annotations

import base64

import pytest

from extproc.quota.cost import (
    MAX_COST,
    MAX_MODEL_CHARS,
    MAX_SOURCE_CHARS,
    MAX_WALK_ITEMS,
    REQUEST_VARIABLES,
    USAGE_VARIABLES,
    CostExpressionError,
    Fact,
    compile_cost,
    request_facts,
    usage_facts,
)

FACTS: dict[str, Fact] = {
    **request_facts({}, 0),
    "prompt_tokens": 10,
    "max_tokens": 5,
    "n": 2,
    "model": "gpt-4o",
    "stream": True,
}


@pytest.mark.parametrize(
    ("source", "changes", "expected"),
    [
        ("prompt_tokens + max_tokens * n", {}, 20),
        ("double(prompt_tokens) * 1.5", {"prompt_tokens": 3}, 5),  # 4.5, rounded up
        ("double(prompt_tokens) / 3.0", {"prompt_tokens": 1}, 1),
        ("prompt_tokens - 100", {}, 0),  # never negative
        ("-5.5", {}, 0),
        ("9223372036854775807", {}, MAX_COST),
        ("1e300", {}, MAX_COST),
        ("double(n) / 0.0", {}, MAX_COST),  # +infinity
        ("2u * uint(n)", {}, 4),
        ("0.0", {}, 0),
        ("model.startsWith('gpt-4') ? 3 * prompt_tokens : prompt_tokens", {}, 30),
        ("model in ['a', 'b'] ? 1 : 2", {}, 2),
        ("stream ? 2 : 1", {}, 2),
        ("stream ? 2 : 1", {"stream": False}, 1),
        ("size(model) + 1", {}, 7),
        ("// a comment\nprompt_tokens\n  + 1", {}, 11),
    ],
)
def test_evaluate(source: str, changes: dict[str, Fact], expected: int) -> None:
    assert compile_cost(source, REQUEST_VARIABLES).evaluate({**FACTS, **changes}) == expected


@pytest.mark.parametrize(
    ("source", "variables", "message"),
    [
        (
            "prompt_tokens + foo",
            REQUEST_VARIABLES,
            "line 1, column 17: undeclared reference to 'foo' (variables: body_bytes, ",
        ),
        ("completion_tokens", REQUEST_VARIABLES, "line 1, column 1: undeclared reference to"),
        ("max_tokens", USAGE_VARIABLES, "line 1, column 1: undeclared reference to 'max_tokens'"),
        ("prompt_tokens +", REQUEST_VARIABLES, "line 1, column 16: Syntax error: mismatched input"),
        ("1 +\n  // comment\n  bar", REQUEST_VARIABLES, "line 3, column 3: undeclared reference"),
        ("", REQUEST_VARIABLES, "line 1, column 1: Syntax error"),
        (
            "model + 1",
            REQUEST_VARIABLES,
            "line 1, column 7: found no matching overload for '_+_' applied to '(string, int)'",
        ),
        ("prompt_tokens * 1.5", REQUEST_VARIABLES, "applied to '(int, double)'"),
        ("prompt_tokens > 1", REQUEST_VARIABLES, "the expression gives bool, not a number"),
        ("model", REQUEST_VARIABLES, "the expression gives string, not a number"),
        ("[1, 2]", REQUEST_VARIABLES, "the expression gives list<int>, not a number"),
        # Comprehensions are off: facts are scalars, so they could only multiply work.
        ("[1, 2].all(x, x > 0) ? 1 : 0", REQUEST_VARIABLES, "macros such as all, exists, map"),
        ("[1, 2].map(x, x).size()", REQUEST_VARIABLES, "macros such as"),
        ("1" * (MAX_SOURCE_CHARS + 1), REQUEST_VARIABLES, "1001 characters long; at most 1000"),
        ("a + b + c + d + e", frozenset(), "; and 2 more errors (variables: none)"),
        ("n + é", REQUEST_VARIABLES, "line 1, column 5: Syntax error: token recognition error"),
    ],
)
def test_compile_errors(source: str, variables: frozenset[str], message: str) -> None:
    with pytest.raises(CostExpressionError) as caught:
        compile_cost(source, variables)
    text = str(caught.value)
    assert message in text
    # One line, fit to follow "file: field.path: ".
    assert "\n" not in text
    assert "in container" not in text
    assert "[INVALID_ARGUMENT]" not in text


def test_longest_expression_allowed() -> None:
    source = "size('" + "x" * (MAX_SOURCE_CHARS - 12) + "') + n"
    assert len(source) == MAX_SOURCE_CHARS
    assert compile_cost(source, REQUEST_VARIABLES).evaluate(FACTS) == MAX_SOURCE_CHARS - 12 + 2


def test_nesting_is_limited() -> None:
    # cel-cpp's parser stops at 32 levels: a left-leaning sum of 40 terms is too deep.
    with pytest.raises(CostExpressionError, match=r"^Exceeded max recursion depth of 32"):
        compile_cost(" + ".join(["n"] * 40), REQUEST_VARIABLES)
    assert compile_cost(" + ".join(["n"] * 30), REQUEST_VARIABLES).evaluate(FACTS) == 60


@pytest.mark.parametrize(
    ("source", "facts", "message"),
    [
        ("prompt_tokens / (n - 2)", FACTS, "divide by zero"),
        ("max_tokens * 9223372036854775807", FACTS, "overflow"),
        ("(double(n) - double(n)) / 0.0", FACTS, "NaN"),
        ("prompt_tokens + n", {"prompt_tokens": 1}, 'No value with name "n"'),
        ("prompt_tokens + 1", {"prompt_tokens": 1.5}, "evaluation failed"),
        ("prompt_tokens + 1", {"prompt_tokens": "1"}, "evaluation failed"),
        ("stream ? 1 : 2", {"stream": 1}, "evaluation failed"),
        ("prompt_tokens + 1", {"prompt_tokens": 2**70}, "evaluation failed"),
    ],
)
def test_evaluation_errors(source: str, facts: dict[str, Fact], message: str) -> None:
    expression = compile_cost(source, REQUEST_VARIABLES)
    with pytest.raises(CostExpressionError, match="evaluation failed") as caught:
        expression.evaluate(facts)
    assert message in str(caught.value)


def test_undeclared_types_are_checked_at_evaluation() -> None:
    expression = compile_cost("extra", frozenset({"extra"}))
    assert expression.evaluate({"extra": 2.5}) == 3
    with pytest.raises(CostExpressionError, match="the result is bool, not a number"):
        expression.evaluate({"extra": True})
    with pytest.raises(CostExpressionError, match="the result is string"):
        expression.evaluate({"extra": "x"})


def test_variable_names_must_be_identifiers() -> None:
    with pytest.raises(ValueError, match="not a CEL identifier") as caught:
        compile_cost("1", frozenset({"a-b"}))
    assert not isinstance(caught.value, CostExpressionError)  # a caller's bug, not the policy's


def test_expression_keeps_its_source() -> None:
    expression = compile_cost("n", REQUEST_VARIABLES)
    assert expression.source == "n"
    assert repr(expression) == "CostExpression('n')"


# --- request facts ---------------------------------------------------------------------------


def _data_url(payload: bytes, media: str = "image/png") -> str:
    return f"data:{media};base64," + base64.b64encode(payload).decode()


DEFAULTS: dict[str, Fact] = {
    "body_bytes": 0,
    "prompt_chars": 0,
    "prompt_tokens": 0,
    "messages": 0,
    "max_tokens": 0,
    "n": 1,
    "stream": False,
    "image_count": 0,
    "image_bytes": 0,
    "tensor_elements": 0,
    "model": "",
}


@pytest.mark.parametrize(
    ("case", "doc", "expected"),
    [
        ("not an object", [1, 2], {}),
        ("null", None, {}),
        ("empty", {}, {}),
        (
            "chat with text",
            {
                "model": "gpt-4o",
                "messages": [
                    {"role": "system", "content": "Be brief."},
                    {"role": "user", "content": "Hello there"},
                    {"role": "assistant", "content": None, "tool_calls": []},
                ],
                "max_completion_tokens": 100,
                "n": 2,
                "stream": True,
            },
            {
                "model": "gpt-4o",
                "messages": 3,
                "prompt_chars": 20,
                "prompt_tokens": 5,
                "max_tokens": 100,
                "n": 2,
                "stream": True,
            },
        ),
        (
            "chat with parts",
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "text", "text": "What is in this image?"},
                            {"type": "image_url", "image_url": {"url": _data_url(b"x" * 1000)}},
                            {"type": "image_url", "image_url": {"url": "https://x.test/a.png"}},
                            {"type": "image_url", "image_url": _data_url(b"y" * 10)},
                            {"type": "text", "text": 42},
                            {"type": "input_audio", "input_audio": {"data": "AAAA"}},
                            "stray",
                        ],
                    }
                ]
            },
            {
                "messages": 1,
                "prompt_chars": 22,
                "prompt_tokens": 6,
                "image_count": 3,
                "image_bytes": 1010,
            },
        ),
        ("odd messages", {"messages": "hi"}, {}),
        ("odd message", {"messages": ["hi", 3, {"content": 7}]}, {"messages": 3}),
        ("completion prompt", {"prompt": "abcdefghi"}, {"prompt_chars": 9, "prompt_tokens": 3}),
        (
            "completion prompts",
            {"prompt": ["abc", "de", 5]},
            {"prompt_chars": 9, "prompt_tokens": 3},
        ),
        # A token id counts as 4 characters, so prompt_tokens is the number of ids.
        ("token ids", {"prompt": [1, 2, 3]}, {"prompt_chars": 12, "prompt_tokens": 3}),
        (
            "token id lists",
            {"input": [[1, 2], [3, "x", True], "abcd"]},
            {"prompt_chars": 16, "prompt_tokens": 4},
        ),
        ("embedding input", {"input": "a" * 9}, {"prompt_chars": 9, "prompt_tokens": 3}),
        ("max_tokens", {"max_tokens": 50}, {"max_tokens": 50}),
        ("larger of both", {"max_tokens": 50, "max_completion_tokens": 20}, {"max_tokens": 50}),
        ("larger of both", {"max_tokens": 5, "max_completion_tokens": 20}, {"max_tokens": 20}),
        ("garbage limit", {"max_tokens": "50", "max_completion_tokens": True}, {}),
        ("negative limit", {"max_tokens": -50}, {}),
        ("float limit", {"max_tokens": 10.5}, {"max_tokens": 11}),
        ("huge limit", {"max_tokens": 2**64 - 1}, {"max_tokens": 2**40}),
        ("n zero", {"n": 0}, {}),
        ("n garbage", {"n": "3"}, {}),
        ("stream garbage", {"stream": "true"}, {}),
        ("model garbage", {"model": 123}, {}),
        ("model too long", {"model": "m" * 1000}, {"model": "m" * MAX_MODEL_CHARS}),
        (
            "tensors",
            {"inputs": [{"shape": [1, 3, 224, 224]}, {"shape": [2, 2]}, {"shape": []}]},
            {"tensor_elements": 150528 + 4 + 1},
        ),
        ("huge tensor", {"inputs": [{"shape": [2**62] * 100}]}, {"tensor_elements": 2**40}),
        ("zero after huge", {"inputs": [{"shape": [2**62, 2**62, 0]}]}, {}),
        ("bad dims", {"inputs": [{"shape": [2, -1]}, {"shape": [2, True]}, {"shape": [1.5]}]}, {}),
        ("bad tensors", {"inputs": [{"shape": "2x2"}, [2, 2], None]}, {}),
    ],
)
def test_request_facts(case: str, doc: object, expected: dict[str, Fact]) -> None:
    assert request_facts(doc, 0) == {**DEFAULTS, **expected}


def test_request_facts_cover_the_request_variables() -> None:
    assert request_facts({}, 0).keys() == REQUEST_VARIABLES
    assert request_facts({}, 1234)["body_bytes"] == 1234
    assert request_facts({}, -1)["body_bytes"] == 0


@pytest.mark.parametrize("size", range(20))
def test_image_bytes_from_base64_length(size: int) -> None:
    payload = bytes(range(size))
    for url in (_data_url(payload), _data_url(payload).rstrip("=")):
        part = {"type": "image_url", "image_url": {"url": url}}
        doc = {"messages": [{"content": [part]}]}
        assert request_facts(doc, 0)["image_bytes"] == size


@pytest.mark.parametrize(
    ("url", "size"),
    [
        ("data:text/plain,hello%20", 8),  # not base64: the encoded length bounds it
        ("DATA:image/png;BASE64,QUJD", 3),
        ("data:;base64,", 0),
        ("data:image/png;base64", 0),  # no payload at all
        ("data:" + "x" * 300 + ",QUJD", 0),  # header too long to be a real media type
        ("https://x.test/image.png", 0),
    ],
)
def test_image_bytes_of_odd_urls(url: str, size: int) -> None:
    doc = {"messages": [{"content": [{"type": "image_url", "image_url": {"url": url}}]}]}
    facts = request_facts(doc, 0)
    assert (facts["image_count"], facts["image_bytes"]) == (1, size)


def test_walk_is_bounded() -> None:
    many = [{"role": "user", "content": "a"}] * (MAX_WALK_ITEMS * 3)
    facts = request_facts({"messages": many, "prompt": ["b"] * 10}, 0)
    assert facts["messages"] == MAX_WALK_ITEMS * 3  # counted in O(1)
    assert facts["prompt_chars"] == MAX_WALK_ITEMS  # the prompt's turn never comes

    parts = [{"type": "text", "text": "a"}] * (MAX_WALK_ITEMS * 3)
    facts = request_facts({"messages": [{"content": parts}]}, 0)
    assert facts["prompt_chars"] == MAX_WALK_ITEMS - 1  # the message itself was one item

    shapes = [{"shape": [2] * 10}, {"shape": [1] * MAX_WALK_ITEMS}, {"shape": [3]}]
    assert request_facts({"inputs": shapes}, 0)["tensor_elements"] == 2**10


def test_request_facts_evaluate() -> None:
    doc = {"messages": [{"role": "user", "content": "x" * 400}], "max_tokens": 256, "n": 2}
    expression = compile_cost("prompt_tokens + max_tokens * n", REQUEST_VARIABLES)
    assert expression.evaluate(request_facts(doc, 500)) == 100 + 512


# --- usage facts -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("usage", "expected"),
    [
        ({"prompt_tokens": 9, "completion_tokens": 12, "total_tokens": 21}, (9, 12, 21)),
        ({"prompt_tokens": 9, "completion_tokens": 12}, (9, 12, 21)),
        ({"prompt_tokens": 9, "completion_tokens": 12, "total_tokens": "x"}, (9, 12, 21)),
        ({"prompt_tokens": 9, "completion_tokens": 12, "total_tokens": 30}, (9, 12, 30)),
        ({"prompt_tokens": "9", "completion_tokens": None, "total_tokens": True}, (0, 0, 0)),
        ({"prompt_tokens": -9, "completion_tokens": [1]}, (0, 0, 0)),
        ({"prompt_tokens": 2**70}, (2**40, 0, 2**40)),
        ({"prompt_tokens": 1.5}, (2, 0, 2)),
        ({}, (0, 0, 0)),
    ],
)
def test_usage_facts(usage: dict[str, object], expected: tuple[int, int, int]) -> None:
    facts = usage_facts(usage)
    assert facts.keys() == USAGE_VARIABLES
    assert (facts["prompt_tokens"], facts["completion_tokens"], facts["total_tokens"]) == expected


def test_usage_facts_evaluate() -> None:
    expression = compile_cost("prompt_tokens + 4 * completion_tokens", USAGE_VARIABLES)
    assert expression.evaluate(usage_facts({"prompt_tokens": 9, "completion_tokens": 12})) == 57
