from __future__ import annotations

import copy
import random

import pytest

from extproc.quota.usage import SseUsageTracker, ensure_stream_usage, usage_from_json

USAGE = {"prompt_tokens": 9, "completion_tokens": 12, "total_tokens": 21}

# An OpenAI chat stream asked with stream_options.include_usage, with the awkward bits: a
# comment line, an `event:` field, content that quotes a "usage" key, a two-line data field.
EVENTS = [
    b": keep-alive",
    b'data: {"id":"c1","choices":[{"index":0,"delta":{"role":"assistant"}}],"usage":null}',
    b'event: message\ndata:{"id":"c1","choices":[{"index":0,"delta":{"content":'
    b'"say \\"usage\\": {1}"}}],"usage":null}',
    b'data: {"id":"c1","choices":[{"index":0,"delta":{},\ndata: "finish_reason":"stop"}],'
    b'"usage":null}',
    b'data: {"id":"c1","choices":[],"usage": {"prompt_tokens":9,"completion_tokens":12,'
    b'"total_tokens":21}}',
    b"data: [DONE]",
]
USAGE_EVENT = 4


def _stream(separator: bytes, strip: bool = False) -> bytes:
    return b"".join(
        event.replace(b"\n", separator[: len(separator) // 2]) + separator
        for at, event in enumerate(EVENTS)
        if not (strip and at == USAGE_EVENT)
    )


def _run(tracker: SseUsageTracker, chunks: list[bytes]) -> bytes:
    return b"".join(tracker.feed(chunk) for chunk in chunks) + tracker.finish()


SEPARATORS = [b"\n\n", b"\r\n\r\n"]


@pytest.mark.parametrize("separator", SEPARATORS, ids=["lf", "crlf"])
@pytest.mark.parametrize("strip", [False, True], ids=["keep", "strip"])
def test_every_split_point(separator: bytes, strip: bool) -> None:
    stream = _stream(separator)
    expected = _stream(separator, strip=strip)
    for at in range(len(stream) + 1):
        tracker = SseUsageTracker(strip_usage_chunk=strip)
        assert _run(tracker, [stream[:at], stream[at:]]) == expected, at
        assert tracker.usage == USAGE, at


@pytest.mark.parametrize("separator", SEPARATORS, ids=["lf", "crlf"])
@pytest.mark.parametrize("strip", [False, True], ids=["keep", "strip"])
def test_byte_by_byte_and_random_chunks(separator: bytes, strip: bool) -> None:
    stream = _stream(separator)
    expected = _stream(separator, strip=strip)
    tracker = SseUsageTracker(strip_usage_chunk=strip)
    assert _run(tracker, [stream[at : at + 1] for at in range(len(stream))]) == expected
    assert tracker.usage == USAGE
    rng = random.Random(7)
    for _ in range(200):
        cuts = sorted(rng.sample(range(1, len(stream)), 5))
        chunks = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True)]
        tracker = SseUsageTracker(strip_usage_chunk=strip)
        assert _run(tracker, chunks) == expected, cuts
        assert tracker.usage == USAGE


def test_chunks_pass_through_unchanged_when_not_stripping() -> None:
    tracker = SseUsageTracker()
    stream = _stream(b"\n\n")
    for at in range(0, len(stream), 7):
        chunk = stream[at : at + 7]
        assert tracker.feed(chunk) is chunk  # no copy, no delay
    assert tracker.finish() == b""


def test_stripping_holds_only_the_incomplete_event() -> None:
    tracker = SseUsageTracker(strip_usage_chunk=True)
    first = EVENTS[1] + b"\n\n"
    assert tracker.feed(first + b"data: {") == first
    assert tracker.feed(b'"choices":[]}\n') == b""
    assert tracker.feed(b"\n") == b'data: {"choices":[]}\n\n'  # no usage: kept


@pytest.mark.parametrize(
    ("stream", "usage", "stripped"),
    [
        # The last event needs no separator to be read.
        (b'data: {"choices":[],"usage":{"prompt_tokens":1}}', (1, 0, 1), b""),
        (b'data: {"choices":[],"usage":{"prompt_tokens":1}}\n', (1, 0, 1), b""),
        # Usage beside choices (servers reporting it on every event): read, never stripped.
        (
            b'data: {"choices":[{"delta":{}}],"usage":{"completion_tokens":1}}\n\n'
            b'data: {"choices":[{"delta":{}}],"usage":{"completion_tokens":2}}\n\n',
            (0, 2, 2),
            None,
        ),
        (b'data: {"choices":[],"usage":null}\n\n', None, None),
        (
            b'data: {"usage":{"prompt_tokens":1},"choices":[],"x":"usage"}\n\n',
            (1, 0, 1),
            b"",
        ),
        (b'data: {"usage":{"prompt_tokens":1}}\n\n', (1, 0, 1), None),  # no choices: kept
        (b'data: {"choices":[],"usage":[1]}\n\n', None, None),
        (b'data: {"choices":[],"usage":{"prompt_tokens":1}\n\n', None, None),  # bad JSON
        (b'data: ["usage", {}]\n\n', None, None),
        (b"data: [DONE]\n\n", None, None),
        (b'event: usage\nid: 1\n\n{"usage":{"prompt_tokens":1}}\n\n', None, None),
        (b"", None, None),
        # Lone CR line ends are not recognised: passed through, not parsed.
        (b'data: {"choices":[],"usage":{"prompt_tokens":1}}\r\rdata: x\r\r', None, None),
    ],
)
def test_usage_events(
    stream: bytes, usage: tuple[int, int, int] | None, stripped: bytes | None
) -> None:
    expected = (
        None
        if usage is None
        else dict(zip(("prompt_tokens", "completion_tokens", "total_tokens"), usage, strict=True))
    )
    for strip in (False, True):
        tracker = SseUsageTracker(strip_usage_chunk=strip)
        forwarded = _run(tracker, [stream])
        assert tracker.usage == expected
        assert forwarded == (stripped if strip and stripped is not None else stream)


def test_oversized_events_pass_through_unparsed() -> None:
    usage_event = b'data: {"choices":[],"usage":{"prompt_tokens":1}}\n\n'
    big = b'data: {"choices":[],"pad":"' + b"x" * 300 + b'","usage":{"prompt_tokens":5}}\n\n'
    stream = big + usage_event + big
    for strip in (False, True):
        for size in (1, 7, 64, len(stream)):
            tracker = SseUsageTracker(strip_usage_chunk=strip, max_event_bytes=128)
            chunks = [stream[at : at + size] for at in range(0, len(stream), size)]
            forwarded = _run(tracker, chunks)
            assert forwarded == (big + big if strip else stream)
            assert tracker.usage == {"prompt_tokens": 1, "completion_tokens": 0, "total_tokens": 1}


def test_oversized_event_is_not_held() -> None:
    cap, chunk = 1024, b"x" * 4096
    tracker = SseUsageTracker(strip_usage_chunk=True, max_event_bytes=cap)
    fed = forwarded = 0
    fed += len(b"data: ")
    forwarded += len(tracker.feed(b"data: "))
    for _ in range(1000):
        fed += len(chunk)
        forwarded += len(tracker.feed(chunk))
        assert fed - forwarded <= cap + len(chunk)
    assert fed - forwarded <= 2  # what may begin a separator
    forwarded += len(tracker.feed(b"\n\ndata: [DONE]\n\n"))
    assert forwarded == fed + len(b"\n\ndata: [DONE]\n\n")
    assert tracker.finish() == b""


def test_many_events_in_one_chunk() -> None:
    events = b'data: {"choices":[{"delta":{"content":"x"}}],"usage":null}\n\n' * 20_000
    tail = b'data: {"choices":[],"usage":{"total_tokens":3}}\n\ndata: [DONE]\n\n'
    tracker = SseUsageTracker(strip_usage_chunk=True)
    assert _run(tracker, [events + tail]) == events + b"data: [DONE]\n\n"
    assert tracker.usage == {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 3}


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (
            b'{"id":"x","choices":[],"usage":{"prompt_tokens":9,"completion_tokens":12,'
            b'"total_tokens":21}}',
            USAGE,
        ),
        (b'{"usage": {"prompt_tokens": 9, "completion_tokens": 12}}', USAGE),
        (b'{"usage":{"prompt_tokens":"9"}}', dict.fromkeys(USAGE, 0)),
        (b'{"id":"x","choices":[]}', None),
        (b'{"usage":null}', None),
        (b'{"usage":"lots"}', None),
        (b'[{"usage":{}}]', None),
        (b'{"usage":{}', None),
        (b'not json, but says "usage"', None),
        (b"", None),
    ],
)
def test_usage_from_json(body: bytes, expected: dict[str, int] | None) -> None:
    assert usage_from_json(body) == expected


@pytest.mark.parametrize(
    ("doc", "changed", "after"),
    [
        ({"stream": True}, True, {"stream": True, "stream_options": {"include_usage": True}}),
        (
            {"stream": True, "stream_options": None},
            True,
            {"stream": True, "stream_options": {"include_usage": True}},
        ),
        (
            {"stream": True, "stream_options": {"include_usage": False, "x": 1}},
            True,
            {"stream": True, "stream_options": {"include_usage": True, "x": 1}},
        ),
        ({"stream": True, "stream_options": {"include_usage": True}}, False, None),
        ({"stream": True, "stream_options": "include_usage"}, False, None),
        ({"stream": True, "stream_options": [{"include_usage": True}]}, False, None),
        ({"stream": False}, False, None),
        ({"stream": "true"}, False, None),
        ({}, False, None),
    ],
)
def test_ensure_stream_usage(
    doc: dict[str, object], changed: bool, after: dict[str, object] | None
) -> None:
    before = copy.deepcopy(doc)
    assert ensure_stream_usage(doc) is changed
    assert doc == (after if changed else before)
