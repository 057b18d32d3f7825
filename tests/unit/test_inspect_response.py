"""The respond phase without Envoy: JSON, SSE and text bodies, split at every boundary."""

from __future__ import annotations

import gzip
import itertools
import json
import random
import zlib
from typing import Any

import pytest

from extproc.inspect.plan import OutputPlan, compile_output
from extproc.inspect.response import (
    Blocked,
    Decoder,
    SseTransformer,
    TextTransformer,
    body_kind,
    transform_json,
)
from extproc.inspect.schema import Output

EMAIL = "alice.smith@example.com"
KEY = "AKIAIOSFODNN7EXAMPLE"


def plan(**output: Any) -> OutputPlan:
    spec = {"redact": {"mask": ["email", "card"], "block": ["aws_access_key"]}, **output}
    return compile_output(Output.model_validate(spec), {})


def event(doc: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(doc).encode() + b"\n\n"


def chunk_event(content: str | None, finish: str | None = None, **delta: Any) -> bytes:
    if content is not None:
        delta["content"] = content
    return event({"id": "c1", "object": "chat.completion.chunk",
                  "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})  # fmt: skip


def stream_of(text: str, piece: int = 4) -> bytes:
    events = [chunk_event(text[i : i + piece]) for i in range(0, len(text), piece)]
    return b"".join([*events, chunk_event(None, "stop"), b"data: [DONE]\n\n"])


def read_stream(raw: bytes) -> tuple[str, list[dict[str, Any]]]:
    docs = []
    for block in raw.decode().split("\n\n"):
        data = "".join(line[5:].strip() for line in block.split("\n") if line.startswith("data:"))
        if data and data != "[DONE]":
            docs.append(json.loads(data))
    text = "".join(
        c.get("delta", {}).get("content") or "" for d in docs for c in d.get("choices", [])
    )
    return text, docs


def feed_all(transformer: SseTransformer | TextTransformer, raw: bytes, cuts: list[int]) -> bytes:
    out = b""
    edges = [0, *cuts, len(raw)]
    for i, (a, b) in enumerate(itertools.pairwise(edges)):
        out += transformer.feed(raw[a:b], i == len(edges) - 2)
    return out


def test_body_kinds() -> None:
    assert body_kind("application/json; charset=utf-8") == "json"
    assert body_kind("application/problem+json") == "json"
    assert body_kind("text/event-stream") == "sse"
    assert body_kind("text/plain") == "text"
    assert body_kind("image/png") is None


def test_sse_value_split_across_events_at_every_chunk_boundary() -> None:
    text = f"write to {EMAIL} or pay with 4111 1111 1111 1111 today"
    raw = stream_of(text)
    expected = "write to [EMAIL] or pay with [CARD] today"
    for cut in range(1, len(raw)):  # every split of the byte stream in two
        out = feed_all(SseTransformer(plan()), raw, [cut])
        got, _ = read_stream(out)
        assert got == expected, cut
        assert "alice" not in out.decode() and "1111 1111" not in out.decode()
    rng = random.Random(7)
    for _ in range(50):
        cuts = sorted(rng.sample(range(1, len(raw)), 6))
        assert read_stream(feed_all(SseTransformer(plan()), raw, cuts))[0] == expected


def test_held_text_leaves_before_done_when_no_finish_event() -> None:
    raw = b"".join([chunk_event("mail "), chunk_event(EMAIL[:9]), chunk_event(EMAIL[9:]),
                    b"data: [DONE]\n\n"])  # fmt: skip
    out = SseTransformer(plan()).feed(raw, True)
    text, _ = read_stream(out)
    assert text == "mail [EMAIL]"
    assert out.endswith(b"data: [DONE]\n\n")


def test_tool_call_arguments_are_redacted_across_events() -> None:
    def call(args: str, finish: str | None = None) -> bytes:
        delta = {"tool_calls": [{"index": 0, "function": {"arguments": args}}]}
        return event({"choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})

    raw = call('{"to": "alice.sm') + call('ith@example.com"}') + call("", "stop")
    out = SseTransformer(plan()).feed(raw, True).decode()
    args = "".join(
        c["delta"]["tool_calls"][0]["function"]["arguments"]
        for d in read_stream(out.encode())[1]
        for c in d["choices"]
        if c.get("delta", {}).get("tool_calls")
    )
    assert args == '{"to": "[EMAIL]"}'


def test_blocked_type_raises_before_anything_of_it_leaves() -> None:
    # The key streams 4 characters per event: no event carrying a piece of it may leave
    # before the transformer refuses the stream.
    raw = stream_of("safe text " * 30 + f"then the key {KEY} and the end")
    transformer = SseTransformer(plan())
    out = b""
    with pytest.raises(Blocked):
        for i in range(0, len(raw), 50):
            out += transformer.feed(raw[i : i + 50], i + 50 >= len(raw))
    assert "safe text" in read_stream(out)[0]  # what came before did leave
    for piece in (KEY[:4], KEY[4:8], KEY[8:12], KEY[12:16], KEY[16:]):
        assert piece not in out.decode()


def test_other_events_are_redacted_alone_and_kept_whole() -> None:
    raw = b"event: note\nid: 7\ndata: " + json.dumps({"msg": f"from {EMAIL}"}).encode() + b"\n\n"
    out = SseTransformer(plan()).feed(raw, True)
    assert out == b'event: note\nid: 7\ndata: {"msg":"from [EMAIL]"}\n\n'
    keepalive = b": ping\n\n"
    assert SseTransformer(plan()).feed(keepalive, True) == keepalive


def test_json_answer_masked_and_logprobs_removed_when_extraction_set() -> None:
    body = json.dumps({"choices": [{"message": {"content": f"hi {EMAIL}"},
                                    "logprobs": {"content": []}}]}).encode()  # fmt: skip
    doc = json.loads(transform_json(body, plan(extraction={})))
    assert doc["choices"][0]["message"]["content"] == "hi [EMAIL]"
    assert doc["choices"][0]["logprobs"] is None
    untouched = json.dumps({"choices": [{"message": {"content": "hi"}}]}).encode()
    assert transform_json(untouched, plan()) is untouched
    with pytest.raises(Blocked):
        transform_json(json.dumps({"x": [KEY]}).encode(), plan())


def test_text_stream_split_anywhere() -> None:
    text = f"line one {EMAIL}\nline two".encode()
    for cut in range(1, len(text)):
        out = feed_all(TextTransformer(plan()), text, [cut])
        assert out == b"line one [EMAIL]\nline two"


def test_text_stream_keeps_multibyte_characters_split_across_chunks() -> None:
    text = "caf\u00e9 \u2014 " + EMAIL
    raw = text.encode()
    out = feed_all(TextTransformer(plan()), raw, [4])  # inside the two bytes of the e-acute
    assert out.decode() == "caf\u00e9 \u2014 [EMAIL]"


def test_decoder_gzip_and_deflate_streams() -> None:
    body = b"x" * 5000 + EMAIL.encode()
    for data in (gzip.compress(body), zlib.compress(body)):
        decoder = Decoder("gzip" if data[:2] == b"\x1f\x8b" else "deflate")
        out = b"".join(decoder.feed(data[i : i + 100], i + 100 >= len(data))
                       for i in range(0, len(data), 100))  # fmt: skip
        assert out == body


def test_decoder_refuses_a_bomb() -> None:
    bomb = gzip.compress(b"\0" * 20_000_000)
    decoder = Decoder("gzip")
    with pytest.raises(Blocked):
        for i in range(0, len(bomb), 1000):
            decoder.feed(bomb[i : i + 1000], i + 1000 >= len(bomb))


def test_oversized_event_is_not_passed_unread() -> None:
    transformer = SseTransformer(plan())
    with pytest.raises(Blocked):
        transformer.feed(b"data: " + b"a" * (2 << 20), False)
