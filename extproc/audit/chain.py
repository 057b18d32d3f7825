"""The audit log: append-only JSON lines, each carrying the hash of the line before it.

A deleted, inserted, reordered or edited line breaks the chain at the next line, which
`extproc audit verify` reports. Editing the last line, or cutting lines off the end, shows only
against a head kept elsewhere (verify prints the head; ship it with your log pipeline). With a
key (EXTPROC_AUDIT_KEY_FILE) the links are HMAC-SHA256 instead of SHA-256, so whoever can write
the file but does not hold the key cannot re-chain an edited log.

With a size limit the writer rotates: the full file is renamed after the sequence number of its
first record (audit.w0.jsonl -> audit.w0.000000001234.jsonl, so names sort oldest first, the
active file last) and the new file opens with a `log_rotated` record naming it, linked to its
last line: the chain runs on across files (`extproc audit verify audit.w0.*jsonl`). Rotated
files are left for the log pipeline to ship and remove.

Records are written by one thread: the request path only enqueues (about a microsecond) and
never waits for the disk. When the queue is full the record is dropped and counted, and the
next line written says how many were lost: the log never silently has a hole.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import logging
import os
import queue
import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

log = logging.getLogger(__name__)

GENESIS = "0" * 64
MAX_QUEUED = 65536
BATCH_SECONDS = 0.02
# A rotated file holds at least a few records (and a rotation record cannot rotate again).
MIN_ROTATE_BYTES = 4096
# Characters JSON leaves raw that can still mislead a terminal or a log viewer: DEL, the C1
# controls, line and paragraph separators, and bidirectional overrides. orjson already escapes
# the C0 controls. Each appears in orjson's output only inside a string, as whole UTF-8
# sequences (these lead bytes are never continuation bytes), so escaping them keeps valid JSON
# that reads back as the same text.
_MISLEADING = re.compile(rb"\x7f|\xc2[\x80-\x9f]|\xe2\x80[\xa8-\xae]|\xe2\x81[\xa6-\xa9]")


def _escape(match: re.Match[bytes]) -> bytes:
    return b"\\u%04x" % ord(match.group().decode())


def escape_misleading(line: bytes) -> bytes:
    return _MISLEADING.sub(_escape, line)


def link(line: bytes, key: bytes | None) -> str:
    """The hash the next line carries as `prev`."""
    if key is None:
        return hashlib.sha256(line).hexdigest()
    return hmac.new(key, line, hashlib.sha256).hexdigest()


def worker_path(path: Path, worker: int) -> Path:
    """Each worker keeps its own chain: audit.jsonl -> audit.w0.jsonl."""
    return path.with_name(f"{path.stem}.w{worker}{path.suffix}")


def rotation_problem(max_bytes: int) -> str | None:
    """What is wrong with a rotation size, if anything (a negative one would rotate forever)."""
    if max_bytes != 0 and not MIN_ROTATE_BYTES <= max_bytes <= 2**50:
        return f"audit_max_bytes must be 0 (never rotate) or >= {MIN_ROTATE_BYTES}"
    return None


def rotated_path(path: Path, first_seq: int) -> Path:
    """Where a full file goes: named after its first record's sequence number."""
    return path.with_name(f"{path.stem}.{first_seq:012d}{path.suffix}")


def rotated_files(path: Path) -> list[Path]:
    """The files rotated out of `path`, oldest first."""
    pattern = re.compile(re.escape(path.stem) + r"\.\d{12}" + re.escape(path.suffix) + "$")
    return sorted(p for p in path.parent.glob(f"{path.stem}.*") if pattern.match(p.name))


def _first_seq(path: Path) -> int | None:
    unreadable = (OSError, orjson.JSONDecodeError, KeyError, TypeError, ValueError)
    with contextlib.suppress(*unreadable), path.open("rb") as f:
        return int(orjson.loads(f.readline())["seq"])
    return None


def _last_line(path: Path) -> bytes | None:
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            if size == 0:
                return None
            chunk = 65536
            data = b""
            while size > 0 and data.count(b"\n") < 2:
                step = min(chunk, size)
                size -= step
                f.seek(size)
                data = f.read(step) + data
            return data.rstrip(b"\n").rsplit(b"\n", 1)[-1]
    except FileNotFoundError:
        return None


class AuditLog:
    def __init__(
        self,
        path: Path,
        key: bytes | None = None,
        max_queued: int = MAX_QUEUED,
        on_drop: Callable[[], None] | None = None,
        max_bytes: int = 0,
    ) -> None:
        """`max_bytes`: rotate once the file reaches this size (0: never)."""
        problem = rotation_problem(max_bytes)
        if problem is not None:
            raise ValueError(problem)
        self.path = path
        self._key = key
        self._max = max_queued
        self._on_drop = on_drop
        self._max_bytes = max_bytes
        self._queue: queue.SimpleQueue[dict[str, Any] | None] = queue.SimpleQueue()
        self.dropped = 0
        self.written = 0
        path.parent.mkdir(parents=True, exist_ok=True)
        last = _last_line(path)
        resumed_here = last is not None
        if last is None and (rotated := rotated_files(path)):
            # Stopped between a rotation and the new file's first line: go on from the last.
            last = _last_line(rotated[-1])
        self._seq = 0
        self._prev = GENESIS
        torn = False
        if last is not None:
            # Continue the chain a restart left behind.
            self._prev = link(last, key)
            try:
                self._seq = int(orjson.loads(last)["seq"]) + 1
            except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
                torn = True  # a write cut short (a crash): verify will show that line
        self._file = path.open("ab")
        self._size = self._file.tell()
        first = _first_seq(path) if self._size else None
        self._first_seq = self._seq if first is None else first
        if torn:
            if resumed_here:  # end the torn line, or the next record would join it
                self._file.write(b"\n")
                self._size += 1
            self._append({"event": "chain_resumed", "after": "unreadable last line"})
        self._thread = threading.Thread(target=self._run, name="audit-writer", daemon=True)
        self._thread.start()

    def write(self, record: dict[str, Any]) -> None:
        """Queue one record; never blocks."""
        if self._queue.qsize() >= self._max:
            self.dropped += 1
            if self._on_drop is not None:
                self._on_drop()
            return
        self._queue.put(record)

    def close(self, timeout: float = 5.0) -> None:
        """Write what is queued, then stop the writer."""
        self._queue.put(None)
        self._thread.join(timeout)
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()

    def _run(self) -> None:
        reported = 0
        while True:
            batch = [self._queue.get()]
            # Let a batch gather: one wake-up and one flush per batch. Waking this thread for
            # every record costs the request path more (GIL hand-offs) than writing it does.
            time.sleep(BATCH_SECONDS)
            with contextlib.suppress(queue.Empty):
                while len(batch) < self._max:
                    batch.append(self._queue.get_nowait())
            for record in batch:
                if record is None:
                    self._file.flush()
                    return
                try:
                    if self.dropped != reported:
                        lost, reported = self.dropped - reported, self.dropped
                        self._append({"event": "records_dropped", "count": lost})
                    self._append(record)
                except Exception:  # the writer must outlive one bad record
                    log.exception("audit record not written")
            self._file.flush()

    def _append(self, record: dict[str, Any]) -> None:
        line = orjson.dumps({"seq": self._seq, "prev": self._prev, **record}, default=str)
        line = escape_misleading(line)
        self._file.write(line + b"\n")
        self._size += len(line) + 1
        self._prev = link(line, self._key)
        self._seq += 1
        self.written += 1
        if self._max_bytes and self._size >= self._max_bytes:
            self._rotate()

    def _rotate(self) -> None:
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        target = rotated_path(self.path, self._first_seq)
        if target.exists():  # a chain restarted from scratch: never overwrite history
            target = target.with_name(f"{target.stem}-{time.time_ns()}{target.suffix}")
        os.rename(self.path, target)
        self._file = self.path.open("ab")
        self._size = 0
        self._first_seq = self._seq
        self._append({"event": "log_rotated", "previous": target.name})


@dataclass
class Verification:
    records: int = 0
    head: str = GENESIS
    problems: list[str] = field(default_factory=list)


def _lines(path: Path) -> Iterator[bytes]:
    with path.open("rb") as f:
        for raw in f:
            yield raw.rstrip(b"\n")


def verify(path: Path, key: bytes | None = None, start: str = GENESIS) -> Verification:
    """Check every link of the chain. `start` is the hash the first line must carry (GENESIS
    for a new log; a previous file's head after rotation)."""
    result = Verification()
    prev, seq = start, None
    for number, line in enumerate(_lines(path), 1):
        try:
            record = orjson.loads(line)
            got_prev, got_seq = record["prev"], record["seq"]
        except (orjson.JSONDecodeError, KeyError, TypeError):
            result.problems.append(f"line {number}: not an audit record")
            prev, seq = link(line, key), None
            continue
        if got_prev != prev:
            result.problems.append(
                f"line {number}: chain broken (the line before it was edited or removed, "
                "or this one was inserted)"
            )
        if seq is not None and got_seq != seq:
            result.problems.append(f"line {number}: sequence {got_seq}, expected {seq}")
        result.records += 1
        prev = link(line, key)
        seq = got_seq + 1 if isinstance(got_seq, int) else None
    result.head = prev
    return result
