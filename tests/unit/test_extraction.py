from __future__ import annotations

import copy
from typing import Any

import pytest

from extproc.inspect.extraction import (
    MAX_WALK_ITEMS,
    ExtractionLimitError,
    ExtractionRules,
    apply_extraction,
    parse_path,
)

OIP_RESPONSE: dict[str, Any] = {
    "model_name": "iris",
    "id": "r1",
    "outputs": [
        {
            "name": "probabilities",
            "datatype": "FP32",
            "shape": [2, 3],
            "data": [0.0012345, 0.9876, 0.0111655, 0.5, 0.3, 0.2],
            "parameters": {"internal_id": "node-7", "content_type": "np"},
        },
        {"name": "label", "datatype": "INT64", "shape": [2], "data": [1, 0]},
    ],
    "debug": {"trace": "..."},
}

CHAT_RESPONSE: dict[str, Any] = {
    "id": "chatcmpl-1",
    "object": "chat.completion",
    "choices": [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "Paris"},
            "logprobs": {
                "content": [
                    {"token": "Paris", "logprob": -0.01, "top_logprobs": [{"token": "Lyon"}]}
                ]
            },
            "finish_reason": "stop",
        },
        {"index": 1, "message": {"role": "assistant", "content": "x"}, "logprobs": None},
    ],
    "prompt_logprobs": [None, {"1": {"logprob": -2.0}}],
    "usage": {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6},
}


def _apply(doc: dict[str, Any], **rules: Any) -> tuple[dict[str, Any], bool]:
    doc = copy.deepcopy(doc)
    return doc, apply_extraction(doc, ExtractionRules(**rules))


def test_oip_probabilities_rounded() -> None:
    doc, changed = _apply(OIP_RESPONSE, score_fields=("outputs.0.data",), decimals=2)
    assert changed
    assert doc["outputs"][0]["data"] == [0.0, 0.99, 0.01, 0.5, 0.3, 0.2]
    assert doc["outputs"][1] == OIP_RESPONSE["outputs"][1]  # ints: nothing to round


def test_oip_probabilities_clamped_then_rounded() -> None:
    doc, _ = _apply(OIP_RESPONSE, score_fields=("outputs.*.data",), clamp=(0.01, 0.99), decimals=3)
    assert doc["outputs"][0]["data"] == [0.01, 0.988, 0.011, 0.5, 0.3, 0.2]
    # The INT64 labels are numbers in a score field too: clamped like the rest.
    assert doc["outputs"][1]["data"] == [0.99, 0.01]


def test_oip_top_k_is_per_row_of_the_shape() -> None:
    doc, changed = _apply(OIP_RESPONSE, score_fields=("outputs.0.data",), top_k=1)
    assert changed
    assert doc["outputs"][0]["data"] == [0.0, 0.9876, 0.0, 0.5, 0.0, 0.0]
    # Order: top_k, then clamp: the zeroed scores are clamped up, none is exactly 0 or 1.
    doc, _ = _apply(
        OIP_RESPONSE, score_fields=("outputs.0.data",), top_k=2, clamp=(0.01, 0.99), decimals=2
    )
    assert doc["outputs"][0]["data"] == [0.01, 0.99, 0.01, 0.5, 0.3, 0.01]


def test_top_k_on_nested_lists_and_objects_of_numbers() -> None:
    doc = {
        "predictions": [
            {"scores": [[0.1, 0.7, 0.2], [0.6, 0.3, 0.1]]},
            {"scores": {"cat": 0.2, "dog": 0.5, "fox": 0.3}},
        ]
    }
    doc, changed = _apply(doc, score_fields=("predictions.*.scores",), top_k=1)
    assert changed
    assert doc["predictions"][0]["scores"] == [[0.0, 0.7, 0.0], [0.6, 0.0, 0.0]]
    assert doc["predictions"][1]["scores"] == {"cat": 0.0, "dog": 0.5, "fox": 0.0}


def test_top_k_keeps_the_best_scored_objects() -> None:
    doc = {
        "predictions": [
            [
                {"label": "cat", "score": 0.61234},
                {"label": "dog", "score": 0.3},
                {"label": "fox", "score": 0.08766},
                {"label": "?"},
            ],
            [{"label": "a", "probability": 0.2}, {"label": "b", "confidence": 0.8}],
        ]
    }
    doc, changed = _apply(doc, score_fields=("predictions.*",), top_k=1, decimals=1)
    assert changed
    assert doc["predictions"] == [
        [{"label": "cat", "score": 0.6}, {"label": "?"}],
        [{"label": "b", "confidence": 0.8}],
    ]


def test_ties_keep_the_earlier_values() -> None:
    doc, _ = _apply({"s": [0.5, 0.5, 0.5]}, score_fields=("s",), top_k=2)
    assert doc == {"s": [0.5, 0.5, 0.0]}


def test_non_numbers_are_left_alone() -> None:
    doc = {"s": [True, "0.9", None, 0.12345, [0.5, False], {"x": 0.55555}], "b": False}
    out, _ = _apply(doc, score_fields=("s", "b", "s.*"), decimals=2, clamp=(0.2, 0.8))
    assert out == {"s": [True, "0.9", None, 0.2, [0.5, False], {"x": 0.56}], "b": False}


def test_nothing_to_do_reports_no_change() -> None:
    rules = {"score_fields": ("outputs.*.data",), "decimals": 4, "allow_logprobs": True}
    doc, changed = _apply({"outputs": [{"data": [0.5, 0.25]}]}, **rules)
    assert not changed
    assert doc == {"outputs": [{"data": [0.5, 0.25]}]}
    _, changed = _apply({"unrelated": 1}, **rules)
    assert not changed
    assert apply_extraction("text", ExtractionRules()) is False


def test_openai_logprobs_removed() -> None:
    doc, changed = _apply(CHAT_RESPONSE)
    assert changed
    assert [choice["logprobs"] for choice in doc["choices"]] == [None, None]
    assert doc["prompt_logprobs"] is None
    assert doc["choices"][0]["message"] == {"role": "assistant", "content": "Paris"}
    assert doc["usage"] == CHAT_RESPONSE["usage"]
    kept, changed = _apply(CHAT_RESPONSE, allow_logprobs=True)
    assert not changed
    assert kept == CHAT_RESPONSE


def test_streamed_chunk() -> None:
    chunk = {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "choices": [
            {
                "index": 0,
                "delta": {"content": "Par"},
                "logprobs": {"content": [{"token": "Par", "logprob": -0.2, "top_logprobs": []}]},
                "finish_reason": None,
            }
        ],
    }
    doc, changed = _apply(chunk)
    assert changed
    assert doc["choices"][0] == {
        "index": 0,
        "delta": {"content": "Par"},
        "logprobs": None,
        "finish_reason": None,
    }
    # The last chunk of a stream with usage has no choices: nothing to do.
    _, changed = _apply({"object": "chat.completion.chunk", "choices": [], "usage": {}})
    assert not changed


def test_allowed_logprobs_can_still_be_rounded() -> None:
    rules = {"allow_logprobs": True, "score_fields": ("choices.*.logprobs.content.*",)}
    doc, changed = _apply(CHAT_RESPONSE, decimals=1, **rules)
    assert changed
    assert doc["choices"][0]["logprobs"]["content"][0]["logprob"] == -0.0


def test_strip_nested_fields_with_wildcards() -> None:
    doc, changed = _apply(
        OIP_RESPONSE, strip_fields=("debug", "outputs.*.parameters.internal_id", "missing.x")
    )
    assert changed
    assert "debug" not in doc
    assert doc["outputs"][0]["parameters"] == {"content_type": "np"}
    assert doc["outputs"][1] == OIP_RESPONSE["outputs"][1]


def test_strip_then_score() -> None:
    doc = {"items": {"a": {"score": 0.123, "raw": [1, 2]}, "b": {"score": 0.987, "raw": [3]}}}
    out, _ = _apply(doc, strip_fields=("items.*.raw",), score_fields=("items.*.score",), decimals=1)
    assert out == {"items": {"a": {"score": 0.1}, "b": {"score": 1.0}}}


@pytest.mark.parametrize(
    ("path", "segments"),
    [
        ("outputs.*.data", ("outputs", "*", "data")),
        ("debug", ("debug",)),
        ("choices.0.logprobs", ("choices", "0", "logprobs")),
        ("a-b.c_d", ("a-b", "c_d")),
    ],
)
def test_parse_path(path: str, segments: tuple[str, ...]) -> None:
    assert parse_path(path) == segments


@pytest.mark.parametrize(
    ("path", "problem"),
    [
        ("", "empty"),
        ("outputs..data", "empty segment"),
        (".outputs", "empty segment"),
        ("outputs.", "empty segment"),
        ("outputs[0].data", "bad segment"),
        ("outputs.*x.data", "bad segment"),
        ("out puts", "bad segment"),
        ("a." * 40 + "a", "segments"),
        ("a" * 300, "characters"),
    ],
)
def test_bad_paths_rejected(path: str, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        parse_path(path)


def test_rules_are_checked_when_made() -> None:
    with pytest.raises(ValueError, match="bad segment"):
        ExtractionRules(score_fields=("outputs[*]",))
    with pytest.raises(ValueError, match="names a key"):
        ExtractionRules(strip_fields=("outputs.*",))
    with pytest.raises(ValueError, match="clamp"):
        ExtractionRules(clamp=(0.9, 0.1))
    with pytest.raises(ValueError, match="top_k"):
        ExtractionRules(top_k=0)
    with pytest.raises(ValueError, match="decimals"):
        ExtractionRules(decimals=-1)


def test_active() -> None:
    assert ExtractionRules().active()  # logprobs are removed by default
    assert not ExtractionRules(allow_logprobs=True).active()
    assert not ExtractionRules(allow_logprobs=True, score_fields=("a",)).active()
    assert ExtractionRules(allow_logprobs=True, score_fields=("a",), top_k=3).active()
    assert ExtractionRules(allow_logprobs=True, strip_fields=("debug",)).active()


def test_walk_is_bounded() -> None:
    doc = {"outputs": [{"data": [0.5]}] * (MAX_WALK_ITEMS + 1)}
    with pytest.raises(ExtractionLimitError):
        apply_extraction(doc, ExtractionRules(score_fields=("outputs.*.data",), decimals=1))
