"""Server-sent events framing, shared by everything that reads a streamed response.

Events are found in a growing buffer without re-searching bytes already searched; only the
framing lives here, what an event means is for the reader.
"""

from __future__ import annotations

from collections.abc import Iterator

DATA = b"data:"
# A blank line ends an SSE event: "\n\n", or "\n\r\n" (which also covers "\r\n\r\n"). Lines
# ended by a lone "\r" are not recognised: such a stream passes through unparsed.
SEPARATORS = (b"\n\n", b"\n\r\n")
# A separator is at most 3 bytes, so one may begin in the last 2 bytes already seen.
CARRY = 2


def event_ends(buffer: bytearray, scan_from: int) -> Iterator[int]:
    """The index just past each event separator in `buffer` from `scan_from` on, in order."""
    found = [buffer.find(sep, scan_from) for sep in SEPARATORS]
    while ends := [at + len(sep) for at, sep in zip(found, SEPARATORS, strict=True) if at >= 0]:
        end = min(ends)
        yield end
        # Searches resume past the event just ended, and one that found nothing stays so: each
        # byte is searched once per separator, however many events a chunk holds.
        found = [
            buffer.find(sep, end) if 0 <= at < end else at
            for at, sep in zip(found, SEPARATORS, strict=True)
        ]


def event_data(event: bytes) -> bytes | None:
    """The event's data: its `data:` lines joined by "\n", or None when it has none."""
    # Split at LF only, like the event separators: a lone CR is not taken for a line end.
    lines = [line.removesuffix(b"\r") for line in event.split(b"\n")]
    lines = [
        line[6:] if line.startswith(b"data: ") else line[5:]
        for line in lines
        if line.startswith(DATA)
    ]
    return b"\n".join(lines) if lines else None
