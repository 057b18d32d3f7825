from __future__ import annotations

import copy
import time
from typing import Any

import pytest

from extproc.inspect.profiles import (
    MAX_TEXT_FIELDS,
    MAX_WALK_ITEMS,
    ChatLimits,
    CompletionsLimits,
    EmbeddingsLimits,
    TensorLimits,
    TensorSpec,
    TextField,
    check_chat,
    check_completions,
    check_embeddings,
    check_tensors,
    field_path,
    image_urls,
    input_types,
    text_fields,
)
from extproc.inspect.violation import MAX_QUOTED_CHARS, Violation

PNG_URL = "data:image/png;base64,iVBORw0KGgo="

CHAT: dict[str, Any] = {
    "model": "llama-3-8b",
    "messages": [
        {"role": "system", "content": "Be brief."},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "What is in this picture?"},
                {"type": "image_url", "image_url": {"url": PNG_URL, "detail": "low"}},
                {"type": "input_audio", "input_audio": {"data": "UklGRg==", "format": "wav"}},
            ],
        },
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f"}}],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "42"},
        {"role": "assistant", "content": [{"type": "refusal", "refusal": "No."}]},
    ],
    "tools": [
        {
            "type": "function",
            "function": {"name": "lookup", "parameters": {"type": "object"}},
        }
    ],
    "max_tokens": 100,
    "max_completion_tokens": None,
    "n": 1,
    "temperature": 0.7,
    "top_p": 1,
    "stream": False,
    "some_field_openai_added_last_week": {"x": 1},
}


def _chat(**changes: Any) -> dict[str, Any]:
    doc = copy.deepcopy(CHAT)
    for key, value in changes.items():
        if value is ...:
            del doc[key]
        else:
            doc[key] = value
    return doc


def _is(result: Violation | None, status: int, code: str, field: str) -> Violation:
    assert isinstance(result, Violation), result
    assert (result.status, result.code, result.field) == (status, code, field), result
    return result


# --- chat ------------------------------------------------------------------------------------


def test_valid_chat_request() -> None:
    assert check_chat(CHAT, ChatLimits()) is None
    assert check_chat(_chat(tools=..., max_tokens=...), ChatLimits(allow_tools=False)) is None


@pytest.mark.parametrize(
    ("doc", "status", "code", "field"),
    [
        ([], 400, "invalid_request", ""),
        (_chat(model=...), 400, "invalid_request", "model"),
        (_chat(model=7), 400, "invalid_request", "model"),
        (_chat(model=""), 422, "invalid_field", "model"),
        (_chat(messages=...), 400, "invalid_request", "messages"),
        (_chat(messages={"role": "user"}), 400, "invalid_request", "messages"),
        (_chat(messages=[]), 422, "invalid_field", "messages"),
        (_chat(messages=[{"role": "user", "content": "a"}, "hi"]), 400, "invalid_request",
         "messages[1]"),
        (_chat(messages=[{"content": "a"}]), 400, "invalid_request", "messages[0].role"),
        (_chat(messages=[{"role": "root", "content": "a"}]), 422, "invalid_role",
         "messages[0].role"),
        (_chat(messages=[{"role": "tool", "content": "a"}]), 400, "invalid_request",
         "messages[0].tool_call_id"),
        (_chat(messages=[{"role": "user"}]), 400, "invalid_request", "messages[0].content"),
        (_chat(messages=[{"role": "user", "content": 5}]), 400, "invalid_request",
         "messages[0].content"),
        (_chat(messages=[{"role": "user", "content": []}]), 422, "invalid_field",
         "messages[0].content"),
        (_chat(messages=[{"role": "user", "content": ["hi"]}]), 400, "invalid_request",
         "messages[0].content[0]"),
        (_chat(messages=[{"role": "user", "content": [{"text": "hi"}]}]), 400, "invalid_request",
         "messages[0].content[0].type"),
        (_chat(messages=[{"role": "user", "content": [{"type": "text", "text": 5}]}]), 400,
         "invalid_request", "messages[0].content[0].text"),
        (_chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]),
         400, "invalid_request", "messages[0].content[0].image_url.url"),
        (_chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}]),
         400, "invalid_request", "messages[0].content[0].image_url"),
        (_chat(messages=[{"role": "user", "content": [
            {"type": "input_audio", "input_audio": {"data": "AAAA"}}]}]),
         400, "invalid_request", "messages[0].content[0].input_audio.format"),
        (_chat(messages=[{"role": "user", "content": [{"type": "video_url", "video_url": {}}]}]),
         422, "unsupported_content_type", "messages[0].content[0].type"),
        (_chat(messages=[{"role": "user", "content": [{"type": "refusal", "refusal": "x"}]}]),
         422, "unsupported_content_type", "messages[0].content[0].type"),
        (_chat(max_tokens="100"), 400, "invalid_request", "max_tokens"),
        (_chat(max_tokens=True), 400, "invalid_request", "max_tokens"),
        (_chat(max_tokens=0), 422, "invalid_field", "max_tokens"),
        (_chat(max_completion_tokens=-1), 422, "invalid_field", "max_completion_tokens"),
        (_chat(n=2), 422, "invalid_field", "n"),
        (_chat(n=1.0), 400, "invalid_request", "n"),
        (_chat(temperature=2.5), 422, "invalid_field", "temperature"),
        (_chat(temperature=True), 400, "invalid_request", "temperature"),
        (_chat(top_p=1.01), 422, "invalid_field", "top_p"),
        (_chat(top_p="1"), 400, "invalid_request", "top_p"),
        (_chat(stream="yes"), 400, "invalid_request", "stream"),
        (_chat(tools={"type": "function"}), 400, "invalid_request", "tools"),
        (_chat(tools=[{"type": "code_interpreter"}]), 422, "invalid_field", "tools[0].type"),
        (_chat(tools=[{"type": "function"}]), 400, "invalid_request", "tools[0].function"),
        (_chat(tools=[{"type": "function", "function": {"parameters": {}}}]), 400,
         "invalid_request", "tools[0].function.name"),
        (_chat(tools=[{"type": "function", "function": {"name": "f", "parameters": []}}]), 400,
         "invalid_request", "tools[0].function.parameters"),
        (_chat(functions=[{"description": "no name"}]), 400, "invalid_request",
         "functions[0].name"),
    ],
)  # fmt: skip
def test_chat_violations(doc: object, status: int, code: str, field: str) -> None:
    _is(check_chat(doc, ChatLimits()), status, code, field)


def test_chat_limits() -> None:
    limits = ChatLimits(
        max_messages=2, roles=frozenset({"user"}), max_tokens=50, max_n=3, max_tools=1
    )
    user = {"role": "user", "content": "hi"}
    ok = {"model": "m", "messages": [user, user], "max_tokens": 50, "n": 3}
    assert check_chat(ok, limits) is None
    _is(check_chat({**ok, "messages": [user] * 3}, limits), 422, "too_many_messages", "messages")
    refused = _is(check_chat({**ok, "max_tokens": 51}, limits), 422, "invalid_field", "max_tokens")
    assert "50" in refused.message
    _is(
        check_chat({**ok, "max_completion_tokens": 51}, limits),
        422,
        "invalid_field",
        "max_completion_tokens",
    )
    _is(check_chat({**ok, "n": 4}, limits), 422, "invalid_field", "n")
    system = {"role": "system", "content": "x"}
    _is(check_chat({**ok, "messages": [system]}, limits), 422, "invalid_role", "messages[0].role")
    tools = CHAT["tools"] * 2
    _is(check_chat({**ok, "tools": tools}, limits), 422, "too_many_tools", "tools")


def test_tools_refused_when_not_allowed() -> None:
    limits = ChatLimits(allow_tools=False)
    _is(check_chat(CHAT, limits), 422, "tools_not_allowed", "tools")
    legacy = _chat(tools=..., functions=[{"name": "f", "parameters": {}}])
    _is(check_chat(legacy, limits), 422, "tools_not_allowed", "functions")
    # Nothing is offered by an empty or null list.
    assert check_chat(_chat(tools=[]), limits) is None
    assert check_chat(_chat(tools=None), limits) is None


def test_chat_walk_is_bounded() -> None:
    part = {"type": "text", "text": "a"}
    doc = {"model": "m", "messages": [{"role": "user", "content": [part] * (MAX_WALK_ITEMS + 1)}]}
    start = time.perf_counter()
    _is(check_chat(doc, ChatLimits()), 413, "too_many_items", "messages[0].content")
    assert time.perf_counter() - start < 0.1


def test_messages_do_not_echo_client_input() -> None:
    role = "r" * 500
    doc = _chat(messages=[{"role": role, "content": "a"}])
    refused = _is(check_chat(doc, ChatLimits()), 422, "invalid_role", "messages[0].role")
    assert "r" * (MAX_QUOTED_CHARS + 1) not in refused.message


# --- completions and embeddings --------------------------------------------------------------


@pytest.mark.parametrize("prompt", ["Once upon", ["a", "b"], [1, 2, 3], [[1, 2], [3]], ""])
def test_valid_completions(prompt: object) -> None:
    doc = {"model": "m", "prompt": prompt, "max_tokens": 16, "n": 1, "best_of": 1}
    assert check_completions(doc, CompletionsLimits()) is None


@pytest.mark.parametrize(
    ("changes", "status", "code", "field"),
    [
        ({"prompt": None}, 400, "invalid_request", "prompt"),
        ({"prompt": 5}, 400, "invalid_request", "prompt"),
        ({"prompt": []}, 422, "invalid_field", "prompt"),
        ({"prompt": ["a", 1]}, 400, "invalid_request", "prompt"),
        ({"prompt": [True, False]}, 400, "invalid_request", "prompt"),
        ({"prompt": ["x"] * 3}, 422, "too_many_prompts", "prompt"),
        ({"prompt": [[1], [2], [3]]}, 422, "too_many_prompts", "prompt"),
        ({"prompt": [1, -2]}, 422, "invalid_field", "prompt"),
        ({"prompt": [[1], []]}, 422, "invalid_field", "prompt[1]"),
        ({"prompt": [[1], [2, -1]]}, 422, "invalid_field", "prompt[1]"),
        ({"prompt": [[1], ["a"]]}, 400, "invalid_request", "prompt[1]"),
        ({"max_tokens": 11}, 422, "invalid_field", "max_tokens"),
        ({"n": 3}, 422, "invalid_field", "n"),
        ({"best_of": 3}, 422, "invalid_field", "best_of"),
        ({"model": None}, 400, "invalid_request", "model"),
    ],
)
def test_completions_violations(
    changes: dict[str, Any], status: int, code: str, field: str
) -> None:
    doc = {"model": "m", "prompt": "hi", **changes}
    limits = CompletionsLimits(max_prompts=2, max_tokens=10, max_n=2)
    _is(check_completions(doc, limits), status, code, field)


@pytest.mark.parametrize("value", ["hello", ["a", "b"], [1, 2, 3], [[1, 2], [3]]])
def test_valid_embeddings(value: object) -> None:
    doc = {"model": "m", "input": value, "encoding_format": "float", "dimensions": 256}
    assert check_embeddings(doc, EmbeddingsLimits()) is None


@pytest.mark.parametrize(
    ("changes", "status", "code", "field"),
    [
        ({"input": None}, 400, "invalid_request", "input"),
        ({"input": ""}, 422, "invalid_field", "input"),
        ({"input": ["a", ""]}, 422, "invalid_field", "input[1]"),
        ({"input": ["a", "b", "c"]}, 422, "too_many_inputs", "input"),
        ({"input": [{"text": "a"}]}, 400, "invalid_request", "input"),
        ({"encoding_format": "hex"}, 422, "invalid_field", "encoding_format"),
        ({"encoding_format": 1}, 400, "invalid_request", "encoding_format"),
        ({"dimensions": 0}, 422, "invalid_field", "dimensions"),
        ({"model": ""}, 422, "invalid_field", "model"),
    ],
)
def test_embeddings_violations(changes: dict[str, Any], status: int, code: str, field: str) -> None:
    doc = {"model": "m", "input": "hi", **changes}
    _is(check_embeddings(doc, EmbeddingsLimits(max_inputs=2)), status, code, field)


# --- Open Inference Protocol -----------------------------------------------------------------


def _tensor(name: str = "x", datatype: str = "FP32", shape: Any = (2, 2), data: Any = None,
            **extra: Any) -> dict[str, Any]:  # fmt: skip
    if data is None:
        data = [0.5, 1, -2.5, 3e10]
    tensor = {"name": name, "datatype": datatype, "shape": list(shape), "data": data, **extra}
    if data is ...:
        del tensor["data"]
    return tensor


def _oip(*tensors: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"inputs": list(tensors), **extra}


@pytest.mark.parametrize(
    "tensor",
    [
        _tensor(),
        _tensor(data=[[0.5, 1], [-2.5, 3e10]]),
        _tensor(datatype="INT64", shape=(2, 1, 2), data=[[[1, 2]], [[-(2**63), 2**63 - 1]]]),
        _tensor(datatype="UINT8", shape=(3,), data=[0, 128, 255]),
        _tensor(datatype="BOOL", shape=(2,), data=[True, False]),
        _tensor(datatype="BYTES", shape=(1, 2), data=["a", "b"]),
        _tensor(datatype="FP16", shape=(), data=[65504]),
        _tensor(datatype="INT8", shape=(0, 5), data=[]),
        _tensor(parameters={"content_type": "str"}),
    ],
)
def test_valid_tensors(tensor: dict[str, Any]) -> None:
    doc = _oip(tensor, id="r1", parameters={}, outputs=[{"name": "y"}])
    assert check_tensors(doc, TensorLimits()) is None


@pytest.mark.parametrize(
    ("doc", "status", "code", "field"),
    [
        ("x", 400, "invalid_request", ""),
        ({}, 400, "invalid_request", "inputs"),
        (_oip(), 422, "invalid_field", "inputs"),
        (_oip(_tensor(), id=1), 400, "invalid_request", "id"),
        (_oip("x"), 400, "invalid_request", "inputs[0]"),
        (_oip({"name": "x", "shape": [1], "data": [1]}), 400, "invalid_request",
         "inputs[0].datatype"),
        (_oip(_tensor(datatype="FLOAT")), 422, "invalid_field", "inputs[0].datatype"),
        (_oip(_tensor(shape=(2, -2))), 422, "invalid_field", "inputs[0].shape[1]"),
        (_oip(_tensor(shape=(2, "2"))), 400, "invalid_request", "inputs[0].shape[1]"),
        (_oip(_tensor(shape=(1,) * 33)), 422, "invalid_field", "inputs[0].shape"),
        (_oip(_tensor(data=...)), 400, "invalid_request", "inputs[0].data"),
        (_oip(_tensor(data={"a": 1})), 400, "invalid_request", "inputs[0].data"),
        (_oip(_tensor(parameters=[])), 400, "invalid_request", "inputs[0].parameters"),
        (_oip(_tensor(), _tensor()), 422, "invalid_field", "inputs[1].name"),
        (_oip(_tensor(shape=(2, 3))), 422, "tensor_shape_mismatch", "inputs[0].data"),
        (_oip(_tensor(data=[[0.5, 1], [2.5]])), 422, "tensor_shape_mismatch",
         "inputs[0].data[1]"),
        (_oip(_tensor(data=[[0.5, 1], 2.5, 3.5])), 422, "tensor_shape_mismatch",
         "inputs[0].data"),
        (_oip(_tensor(data=[[0.5, 1], 2.5])), 422, "tensor_shape_mismatch", "inputs[0].data[1]"),
        (_oip(_tensor(shape=(4,), data=[1, 2, [3], 4])), 422, "tensor_type_mismatch",
         "inputs[0].data[2]"),
        (_oip(_tensor(data=[1, 2, "3", 4])), 422, "tensor_type_mismatch", "inputs[0].data[2]"),
        (_oip(_tensor(data=[1, 2, True, 4])), 422, "tensor_type_mismatch", "inputs[0].data[2]"),
        (_oip(_tensor(datatype="FP16", data=[1, 2, 3, 70000])), 422, "tensor_type_mismatch",
         "inputs[0].data[3]"),
        (_oip(_tensor(datatype="INT8", data=[[1, 2], [300, 4]])), 422, "tensor_type_mismatch",
         "inputs[0].data[1][0]"),
        (_oip(_tensor(datatype="UINT32", data=[1, 2, -1, 4])), 422, "tensor_type_mismatch",
         "inputs[0].data[2]"),
        (_oip(_tensor(datatype="INT32", data=[1, 2, 3.0, 4])), 422, "tensor_type_mismatch",
         "inputs[0].data[2]"),
        (_oip(_tensor(datatype="BOOL", data=[True, 1, False, True])), 422,
         "tensor_type_mismatch", "inputs[0].data[1]"),
        (_oip(_tensor(datatype="BYTES", data=["a", "b", None, "d"])), 422,
         "tensor_type_mismatch", "inputs[0].data[2]"),
    ],
)  # fmt: skip
def test_tensor_violations(doc: object, status: int, code: str, field: str) -> None:
    _is(check_tensors(doc, TensorLimits()), status, code, field)


def test_tensor_element_budget_counts_all_inputs() -> None:
    limits = TensorLimits(max_elements=10)
    assert check_tensors(_oip(_tensor(), _tensor(name="y")), limits) is None
    # The declared shape alone is refused: its data is never walked.
    _is(
        check_tensors(_oip(_tensor(shape=(1000, 1000), data=[])), limits),
        422,
        "too_many_elements",
        "inputs[0].shape",
    )
    three = _oip(_tensor(), _tensor(name="y"), _tensor(name="z"))
    _is(check_tensors(three, limits), 422, "too_many_elements", "inputs[2].shape")


def test_tensor_specs() -> None:
    limits = TensorLimits(
        inputs=(TensorSpec("x", "FP32", (-1, 2)), TensorSpec("mask", "BOOL", (-1,)))
    )
    mask = _tensor(name="mask", datatype="BOOL", shape=(1,), data=[True])
    assert check_tensors(_oip(_tensor(), mask), limits) is None
    _is(check_tensors(_oip(_tensor()), limits), 422, "missing_tensor", "inputs")
    _is(
        check_tensors(_oip(_tensor(name="y"), mask), limits),
        422,
        "tensor_not_allowed",
        "inputs[0].name",
    )
    _is(
        check_tensors(_oip(_tensor(datatype="FP64"), mask), limits),
        422,
        "tensor_type_mismatch",
        "inputs[0].datatype",
    )
    refused = _is(
        check_tensors(_oip(_tensor(shape=(1, 4)), mask), limits),
        422,
        "tensor_shape_mismatch",
        "inputs[0].shape",
    )
    assert "[*, 2]" in refused.message
    _is(
        check_tensors(_oip(_tensor(shape=(4,)), mask), limits),
        422,
        "tensor_shape_mismatch",
        "inputs[0].shape",
    )


def test_large_tensor_is_checked_quickly() -> None:
    data = [0.25] * 1_000_000
    doc = _oip(_tensor(shape=(1000, 1000), data=data))
    start = time.perf_counter()
    assert check_tensors(doc, TensorLimits()) is None
    assert time.perf_counter() - start < 0.5


# --- input types, images, text ---------------------------------------------------------------


def test_input_types() -> None:
    assert input_types(CHAT) == {"text", "image", "audio"}
    assert input_types({"messages": [{"role": "user", "content": "hi"}]}) == {"text"}
    assert input_types({"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": PNG_URL}}]}]}) == {"image"}  # fmt: skip
    assert input_types({"prompt": [1, 2]}) == {"text"}
    assert input_types({"input": "x"}) == {"text"}
    assert input_types(_oip(_tensor())) == {"tensor"}
    assert input_types(["not", "a", "request"]) == frozenset()


def test_image_urls() -> None:
    doc = _chat()
    doc["messages"].append(
        {"role": "user", "content": [{"type": "text", "text": "and"},
                                     {"type": "image_url", "image_url": "https://x/y.png"}]}
    )  # fmt: skip
    assert image_urls(doc) == [
        ("messages[1].content[1].image_url.url", PNG_URL),
        ("messages[5].content[1].image_url", "https://x/y.png"),
    ]
    assert image_urls({"messages": "x"}) == []


def test_chat_text_fields_can_be_replaced_in_place() -> None:
    doc = _chat()
    fields = text_fields(doc, "openai_chat")
    assert isinstance(fields, list)
    assert [(field.path, field.text) for field in fields] == [
        ("messages[0].content", "Be brief."),
        ("messages[1].content[0].text", "What is in this picture?"),
        ("messages[3].content", "42"),
    ]
    for field in fields:
        field.replace(field.text.upper())
    assert doc["messages"][0]["content"] == "BE BRIEF."
    assert doc["messages"][1]["content"][0]["text"] == "WHAT IS IN THIS PICTURE?"
    assert doc["messages"][3]["content"] == "42"


def test_prompt_and_input_text_fields() -> None:
    doc = {"model": "m", "prompt": ["one", [1, 2], "two"]}
    fields = text_fields(doc, "openai_completions")
    assert isinstance(fields, list)
    assert [(field.path, field.key, field.text) for field in fields] == [
        ("prompt[0]", 0, "one"),
        ("prompt[2]", 2, "two"),
    ]
    fields[1].replace("2")
    assert doc["prompt"] == ["one", [1, 2], "2"]
    single = {"model": "m", "input": "hello"}
    fields = text_fields(single, "openai_embeddings")
    assert isinstance(fields, list)
    assert [(field.path, field.container, field.key) for field in fields] == [
        ("input", single, "input")
    ]


@pytest.mark.parametrize("profile", [None, "oip", "something_else"])
def test_every_string_value(profile: str | None) -> None:
    doc = _oip(
        _tensor(datatype="BYTES", shape=(2,), data=["alpha", "beta"]),
        parameters={"note": "gamma", "odd key": "delta", "n": 3},
        id="r1",
    )
    fields = text_fields(doc, profile)
    assert isinstance(fields, list)
    assert [(field.path, field.text) for field in fields] == [
        ("inputs[0].name", "x"),
        ("inputs[0].datatype", "BYTES"),
        ("inputs[0].data[0]", "alpha"),
        ("inputs[0].data[1]", "beta"),
        ("parameters.note", "gamma"),
        ("parameters['odd key']", "delta"),
        ("id", "r1"),
    ]
    fields[2].replace("[masked]")
    assert doc["inputs"][0]["data"] == ["[masked]", "beta"]


def test_text_fields_fail_closed_when_too_many() -> None:
    doc = {"messages": [{"role": "user", "content": "x"}] * (MAX_TEXT_FIELDS + 1)}
    for profile in ("openai_chat", None):
        refused = text_fields(doc, profile)
        assert isinstance(refused, Violation)
        assert (refused.status, refused.code) == (413, "too_many_text_fields")
    # Numbers are skipped in one pass: a big tensor is not "too many".
    big = _oip(_tensor(shape=(500_000,), data=[0.5] * 500_000))
    fields = text_fields(big, None)
    assert isinstance(fields, list)
    assert len(fields) == 2


def test_field_path() -> None:
    assert field_path(["messages", 2, "content", 0, "image_url", "url"]) == (
        "messages[2].content[0].image_url.url"
    )
    assert field_path([0, "a b", "ok"]) == "[0]['a b'].ok"
    long_key = field_path(["k" * 500])
    assert len(long_key) <= MAX_QUOTED_CHARS + 2
    assert field_path([]) == ""


def test_text_field_is_a_plain_record() -> None:
    holder: dict[str, Any] = {"t": "a"}
    field = TextField("t", holder, "t", "a")
    field.replace("b")
    assert (holder, field.text) == ({"t": "b"}, "b")
