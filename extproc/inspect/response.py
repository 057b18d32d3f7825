"""The respond phase on a response body: redaction and extraction defences, whole or streamed.

Three shapes, chosen from the response's Content-Type:
- JSON, read whole (Envoy buffers it): extraction defences, then every string value redacted.
- Server-sent events, as they stream: each event rewritten alone, except the text a model
  streams in pieces (`choices[i].delta.content` and its kin), which runs through a
  `StreamRedactor` per choice and field, so a value split across events is still caught. What
  is held back leaves with a later event, at the choice's end, or before `[DONE]`.
- Other text, as it streams: one StreamRedactor over the decoded text.
A finding of a type listed under `block` ends the response: a JSON body is replaced by an error, a
stream gets one final error event and nothing more (Envoy cannot take back what was sent).

A compressed body (`gzip`, `deflate`) is decoded here, within a ratio cap, and goes out
identity-encoded; the gateway also removes Accept-Encoding on the way up so models rarely
compress at all. Anything else it cannot read is refused rather than passed unread.
"""

from __future__ import annotations

import codecs
import zlib
from collections import Counter
from collections.abc import Iterator, Sequence
from typing import Any

import orjson

from extproc.inspect.extraction import ExtractionLimitError, apply_extraction
from extproc.inspect.pii import Finding
from extproc.inspect.plan import OutputPlan, PiiCheck
from extproc.inspect.text_stream import StreamRedactor
from extproc.sse import CARRY, event_data, event_ends

# A single event (or JSON value inside one) over this is not inspected: the stream is ended.
MAX_EVENT_BYTES = 1 << 20
MAX_WALK_ITEMS = 100_000
DECODABLE = frozenset({"gzip", "x-gzip", "deflate"})
MAX_DECODE_RATIO = 200
# Streamed text fields, per choice: where models put the text they stream in pieces.
_STREAMED_FIELDS: tuple[tuple[str, ...], ...] = (
    ("delta", "content"),
    ("delta", "reasoning_content"),
    ("delta", "refusal"),
    ("text",),
)


class Blocked(Exception):
    """A finding of a blocked type, or a body that cannot be read safely."""


def body_kind(content_type: str) -> str | None:
    """json, sse, text, or None (bytes the detectors do not read: passed as they are)."""
    media = content_type.partition(";")[0].strip().lower()
    if media == "application/json" or media.endswith("+json"):
        return "json"
    if media == "text/event-stream":
        return "sse"
    if media.startswith("text/") or media in ("application/x-ndjson", "application/xml"):
        return "text"
    return None


def redact_strings(doc: Any, check: PiiCheck, tally: Counter[str] | None = None) -> bool:
    """Mask findings in every string value (not keys) of a JSON document, in place; `tally`
    counts what was masked, by type."""
    changed = False
    for container, key, text in _strings(doc):
        findings = check.scanner.scan(text)
        if findings:
            _refuse_blocked(check, findings)
            if tally is not None:
                tally.update(f.type for f in findings)
            container[key] = check.masker.apply(text, findings)
            changed = True
    return changed


def _strings(doc: Any) -> Iterator[tuple[Any, Any, str]]:
    stack = [doc]
    visited = 0
    while stack and visited < MAX_WALK_ITEMS:
        node = stack.pop()
        items = node.items() if isinstance(node, dict) else enumerate(node)
        for key, value in items:
            visited += 1
            if isinstance(value, str):
                yield node, key, value
            elif isinstance(value, dict | list):
                stack.append(value)
    if stack:
        raise Blocked  # too big to read whole: never passed unread


def transform_json(body: bytes, plan: OutputPlan, tally: Counter[str] | None = None) -> bytes:
    """The JSON body with extraction defences applied and values redacted (raises Blocked)."""
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        # Labelled JSON but is not: still text that may carry what must not leave.
        return _redact_text(body.decode("utf-8", "replace"), plan, tally).encode()
    changed = False
    if isinstance(doc, dict | list):
        changed = _extraction(doc, plan)
        if plan.redact is not None:
            changed = redact_strings(doc, plan.redact, tally) or changed
    elif isinstance(doc, str) and plan.redact is not None:
        redacted = _redact_text(doc, plan, tally)
        changed, doc = redacted != doc, redacted
    return orjson.dumps(doc) if changed else body


def _extraction(doc: dict[str, Any] | list[Any], plan: OutputPlan) -> bool:
    try:
        return apply_extraction(doc, plan.extraction)
    except ExtractionLimitError:
        raise Blocked from None  # too large to coarsen whole: never forwarded as it is


def _redact_text(text: str, plan: OutputPlan, tally: Counter[str] | None) -> str:
    check = plan.redact
    if check is None:
        return text
    findings = check.scanner.scan(text)
    if not findings:
        return text
    _refuse_blocked(check, findings)
    if tally is not None:
        tally.update(f.type for f in findings)
    return check.masker.apply(text, findings)


def _refuse_blocked(check: PiiCheck, findings: Sequence[Finding]) -> None:
    if check.block and any(f.type in check.block for f in findings):
        raise Blocked


class Decoder:
    """Content-Encoding removed as the body streams, within MAX_DECODE_RATIO."""

    def __init__(self, encoding: str) -> None:
        wbits = 16 + zlib.MAX_WBITS if encoding in ("gzip", "x-gzip") else zlib.MAX_WBITS
        self._inflater = zlib.decompressobj(wbits)
        self._in = 0
        self._out = 0

    def feed(self, chunk: bytes, end: bool) -> bytes:
        self._in += len(chunk)
        budget = max(self._in, 1024) * MAX_DECODE_RATIO - self._out
        try:
            out = self._inflater.decompress(chunk, budget + 1)
            if end:
                out += self._inflater.flush()
        except zlib.error:
            raise Blocked from None
        self._out += len(out)
        if len(out) > budget or self._inflater.unconsumed_tail:
            raise Blocked  # a bomb, or more than the ratio allows
        return out


class TextTransformer:
    """Plain streamed text: decoded incrementally, redacted with a bounded hold-back."""

    def __init__(self, plan: OutputPlan, tally: Counter[str] | None = None) -> None:
        self.tally: Counter[str] = tally if tally is not None else Counter()
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")
        check = plan.redact
        self._redactor = (
            StreamRedactor(check.scanner, check.masker, plan.hold_back, plan.max_hold)
            if check is not None
            else None
        )
        self._block = check.block if check is not None else frozenset()

    def feed(self, chunk: bytes, end: bool) -> bytes:
        text = self._decoder.decode(chunk, final=end)
        if self._redactor is None:
            return text.encode()
        out = self._redactor.push(text)
        if end:
            out += self._redactor.flush()
            self.tally.update(self._redactor.by_type)
        if self._block and not self._block.isdisjoint(self._redactor.by_type):
            raise Blocked
        return out.encode()


class SseTransformer:
    """Server-sent events rewritten as they stream (see the module docstring)."""

    def __init__(self, plan: OutputPlan, tally: Counter[str] | None = None) -> None:
        self._plan = plan
        # What was masked, by type: counted as each channel's text leaves (its end).
        self.tally: Counter[str] = tally if tally is not None else Counter()
        self._buffer = bytearray()
        self._scan_from = 0
        self._channels: dict[tuple[object, ...], StreamRedactor] = {}
        # The last chunk document seen, as the frame for text flushed at the stream's end.
        self._frame: dict[str, Any] | None = None

    def feed(self, chunk: bytes, end: bool) -> bytes:
        buffer = self._buffer
        buffer += chunk
        out = bytearray()
        start = 0
        for stop in event_ends(buffer, self._scan_from):
            out += self._event(bytes(buffer[start:stop]))
            start = stop
        del buffer[:start]
        self._scan_from = max(len(buffer) - CARRY, 0)
        if len(buffer) > MAX_EVENT_BYTES:
            raise Blocked  # an event too large to read is not passed unread
        if end:
            if buffer.strip():
                out += self._event(bytes(buffer) + b"\n\n")
            buffer.clear()
            out += self._flush_all()
        return bytes(out)

    def _event(self, event: bytes) -> bytes:
        data = event_data(event)
        if data is None:
            return event  # comments, keep-alives
        if data.strip() == b"[DONE]":
            return self._flush_all() + event
        try:
            doc = orjson.loads(data)
        except orjson.JSONDecodeError:
            text = data.decode("utf-8", "replace")
            redacted = _redact_text(text, self._plan, self.tally).encode()
            return event if redacted == data else _with_data(event, redacted)
        if not isinstance(doc, dict):
            return event
        changed = _extraction(doc, self._plan)
        if self._plan.redact is not None:
            changed = self._redact_event(doc) or changed
        return _with_data(event, orjson.dumps(doc)) if changed else event

    def _redact_event(self, doc: dict[str, Any]) -> bool:
        check = self._plan.redact
        assert check is not None
        choices = doc.get("choices")
        changed = False
        if isinstance(choices, list) and choices:
            self._frame = doc
            for position, choice in enumerate(choices[:128]):
                if isinstance(choice, dict):
                    changed = self._redact_choice(choice, position) or changed
            return changed
        if doc.get("type") == "response.output_text.delta" and isinstance(doc.get("delta"), str):
            key = ("responses", doc.get("item_id"), doc.get("content_index"))
            return self._push(doc, "delta", key, final=False)
        # Anything else stands alone: every string in it redacted where it is.
        return redact_strings(doc, check, self.tally)

    def _redact_choice(self, choice: dict[str, Any], position: int) -> bool:
        index = choice.get("index", position)
        final = choice.get("finish_reason") is not None
        changed = False
        for path in _STREAMED_FIELDS:
            holder: Any = choice
            for step in path[:-1]:
                holder = holder.get(step) if isinstance(holder, dict) else None
            if isinstance(holder, dict) and isinstance(holder.get(path[-1]), str):
                changed = self._push(holder, path[-1], (index, *path), final) or changed
            elif final and (index, *path) in self._channels:
                rest = self._flush((index, *path))
                if rest:
                    _emit_rest(choice, (index, *path), rest)
                    changed = True
        # Tool call arguments stream too; each call is its own channel.
        delta = choice.get("delta")
        calls = delta.get("tool_calls") if isinstance(delta, dict) else None
        for call in calls[:128] if isinstance(calls, list) else ():
            function = call.get("function") if isinstance(call, dict) else None
            if isinstance(function, dict) and isinstance(function.get("arguments"), str):
                key = (index, "tool_calls", call.get("index"), "arguments")
                changed = self._push(function, "arguments", key, final) or changed
        if final:
            changed = self._flush_choice(choice, index) or changed
        return changed

    def _push(
        self, holder: dict[str, Any], name: str, key: tuple[object, ...], final: bool
    ) -> bool:
        redactor = self._channels.get(key)
        if redactor is None:
            check = self._plan.redact
            assert check is not None
            redactor = StreamRedactor(
                check.scanner, check.masker, self._plan.hold_back, self._plan.max_hold
            )
            self._channels[key] = redactor
        text = holder[name]
        out = redactor.push(text)
        if final:
            out += redactor.flush()
            del self._channels[key]
            self.tally.update(redactor.by_type)
        self._check_block(redactor)
        holder[name] = out
        return bool(out != text)

    def _flush_choice(self, choice: dict[str, Any], index: object) -> bool:
        """Text still held for this choice's other channels (tool calls) leaves with its end."""
        changed = False
        for key in [k for k in self._channels if k[0] == index]:
            rest = self._flush(key)
            if rest:
                _emit_rest(choice, key, rest)
                changed = True
        return changed

    def _flush_all(self) -> bytes:
        """Text still held at `[DONE]` or the body's end, as one more chunk event."""
        if not self._channels:
            return b""
        choices: dict[object, dict[str, Any]] = {}
        for key in list(self._channels):
            rest = self._flush(key)
            if rest and key[0] != "responses":
                choice = choices.setdefault(key[0], {"index": key[0], "finish_reason": None})
                _emit_rest(choice, key, rest)
        self._channels.clear()
        if not choices:
            return b""
        frame = {k: v for k, v in (self._frame or {}).items() if k not in ("choices", "usage")}
        frame["choices"] = list(choices.values())
        return b"data: " + orjson.dumps(frame) + b"\n\n"

    def _flush(self, key: tuple[object, ...]) -> str:
        redactor = self._channels.pop(key)
        rest = redactor.flush()
        self.tally.update(redactor.by_type)
        self._check_block(redactor)
        return rest

    def _check_block(self, redactor: StreamRedactor) -> None:
        check = self._plan.redact
        if check is not None and check.block and not check.block.isdisjoint(redactor.by_type):
            raise Blocked


def _emit_rest(choice: dict[str, Any], key: tuple[Any, ...], text: str) -> None:
    """Put text held back for channel `key` into a choice that leaves now."""
    if key[1] == "tool_calls":
        delta = choice.setdefault("delta", {})
        calls = delta.setdefault("tool_calls", [])
        calls.append({"index": key[2], "function": {"arguments": text}})
        return
    holder = choice
    for step in key[1:-1]:
        holder = holder.setdefault(step, {})
    holder[key[-1]] = holder.get(key[-1], "") + text


def _with_data(event: bytes, data: bytes) -> bytes:
    """The event with its data replaced, its other fields (event:, id:) kept."""
    kept = [
        line for line in event.split(b"\n") if line.strip(b"\r") and not line.startswith(b"data:")
    ]
    return b"".join(line + b"\n" for line in kept) + b"data: " + data + b"\n\n"


def error_event(error_json: bytes) -> bytes:
    """A final event carrying a JSON error: OpenAI's own shape for an error inside a stream,
    which its SDKs raise as an APIError."""
    return b"data: " + error_json + b"\n\n"
