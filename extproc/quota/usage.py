"""Finding the real usage in a model's response, to settle a cost reserved at admission.

A JSON response carries a top-level `usage` object. A streamed (SSE) response carries it in one
of the last events, and only when the request asked for it with
`stream_options.include_usage`: `ensure_stream_usage` asks for it on the client's behalf, and
`SseUsageTracker(strip_usage_chunk=True)` then removes that event so the client gets the stream
it asked for.
"""

from __future__ import annotations

import orjson

from extproc.quota.cost import usage_facts
from extproc.sse import CARRY, event_data, event_ends

MAX_EVENT_BYTES = 1 << 20
_DONE = b"[DONE]"
_USAGE_KEY = b'"usage"'


def usage_from_json(body: bytes) -> dict[str, int] | None:
    """The `usage` of a JSON response body, or None when it has none or is not JSON."""
    if _USAGE_KEY not in body:
        return None  # skips parsing; an escaped key ("\u0075sage") is not worth a parse
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    usage = doc.get("usage") if isinstance(doc, dict) else None
    return usage_facts(usage) if isinstance(usage, dict) else None


def ensure_stream_usage(doc: dict[str, object]) -> bool:
    """Ask a streaming (chat) completions request for a final usage event.

    Returns True when `doc` was changed: the caller re-serialises it and strips the usage event
    from the response, as the client did not ask for it. A `stream_options` that is neither an
    object nor null is left alone (the upstream will judge it).
    """
    if doc.get("stream") is not True:
        return False
    options = doc.get("stream_options")
    if options is None:
        doc["stream_options"] = {"include_usage": True}
        return True
    if not isinstance(options, dict) or options.get("include_usage") is True:
        return False
    options["include_usage"] = True
    return True


class SseUsageTracker:
    """Watches an SSE response body, chunk by chunk, for the usage event.

    `feed` and `finish` return the bytes to forward. Without stripping they are the chunks
    unchanged. With `strip_usage_chunk`, complete events are forwarded (an incomplete one is held
    until its end arrives) except usage-only events (`choices` empty, `usage` an object).
    An event longer than `max_event_bytes` is forwarded as it arrives and never parsed, so memory
    stays bounded by that cap plus one chunk.
    """

    __slots__ = ("_buffer", "_max_event_bytes", "_oversize", "_scan_from", "_strip", "_usage")

    def __init__(
        self, *, strip_usage_chunk: bool = False, max_event_bytes: int = MAX_EVENT_BYTES
    ) -> None:
        self._strip = strip_usage_chunk
        self._max_event_bytes = max_event_bytes
        self._buffer = bytearray()  # the current, incomplete event (its tail once oversize)
        self._scan_from = 0  # bytes of the buffer already searched for a separator
        self._oversize = False
        self._usage: dict[str, int] | None = None

    @property
    def usage(self) -> dict[str, int] | None:
        """The last usage seen so far (servers that report usage on every event count up)."""
        return self._usage

    def feed(self, chunk: bytes) -> bytes:
        forward = self._consume(chunk)
        return bytes(forward) if self._strip else chunk

    def finish(self) -> bytes:
        """The end of the body: an unterminated last event is parsed too, then forwarded."""
        rest = bytes(self._buffer)
        self._buffer.clear()
        self._scan_from = 0
        oversize, self._oversize = self._oversize, False
        stripped = not oversize and self._parse(rest)
        return rest if self._strip and not stripped else b""

    def _consume(self, chunk: bytes) -> bytearray:
        buffer = self._buffer
        buffer += chunk
        forward = bytearray()
        start = 0
        for end in event_ends(buffer, self._scan_from):
            event = bytes(buffer[start:end])
            if self._oversize or len(event) > self._max_event_bytes:
                self._oversize = False
                forward += event
            elif not self._parse(event):
                forward += event
            start = end
        del buffer[:start]
        self._scan_from = max(len(buffer) - CARRY, 0)
        if self._oversize or len(buffer) > self._max_event_bytes:
            # Too long to hold or parse: let it through, keeping only what may start a separator.
            self._oversize = True
            forward += buffer[: self._scan_from]
            del buffer[: self._scan_from]
            self._scan_from = 0
        return forward

    def _parse(self, event: bytes) -> bool:
        """Record the usage an event carries; True when the event is to be stripped."""
        if _USAGE_KEY not in event:
            return False  # most events: skip splitting them into lines
        data = event_data(event)
        if data is None or data == _DONE or not _may_carry_usage(data):
            return False
        try:
            doc = orjson.loads(data)
        except orjson.JSONDecodeError:
            return False
        if not isinstance(doc, dict):
            return False
        usage = doc.get("usage")
        if not isinstance(usage, dict):
            return False
        self._usage = usage_facts(usage)
        return self._strip and doc.get("choices") == []


def _may_carry_usage(data: bytes) -> bool:
    """Whether a `"usage"` key is followed by an object: most streamed events carry
    `"usage":null` or nothing, and are not worth a JSON parse."""
    at = len(data)
    # From the end, where servers put it; earlier hits may be string values ("usage").
    while (at := data.rfind(_USAGE_KEY, 0, at)) >= 0:
        rest = data[at + len(_USAGE_KEY) : at + len(_USAGE_KEY) + 16].lstrip()
        if rest.startswith(b":") and rest[1:].lstrip().startswith(b"{"):
            return True
    return False
