"""Python side of the benchmark load generator (bench/loadgen.c) and CPU accounting helpers.

- ``build_loadgen(out_dir)`` compiles loadgen.c with the system C compiler when the binary is
  missing or older than the source.
- ``run_load(binary, port=..., ...)`` runs one closed-loop measurement and returns a
  ``LoadResult``. If ``cpu_pids`` is given, the CPU time of those processes is sampled exactly
  at the start and end of the measurement window (loadgen announces both on stderr), so the
  warmup is excluded from the CPU figures too.
- ``cpu_seconds(pid)`` / ``cpu_seconds_tree(pids)`` read utime+stime from /proc/<pid>/stat;
  ``process_tree(pid)`` lists a process and its descendants (e.g. a multi-worker server).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

SOURCE = Path(__file__).with_name("loadgen.c")
BINARY_NAME = "loadgen"
CFLAGS = ("-O2", "-Wall", "-Wextra")
_CLK_TCK = os.sysconf("SC_CLK_TCK")


class LoadgenError(RuntimeError):
    """The load generator could not be built or did not produce a result."""


def _find_compiler() -> str:
    candidates = [os.environ.get("CC", ""), "cc", "gcc", "clang"]
    for cand in candidates:
        if cand and (found := shutil.which(cand)):
            return found
    raise LoadgenError(
        "no C compiler found (tried $CC, cc, gcc, clang); install one to build bench/loadgen.c"
    )


def build_loadgen(out_dir: Path, *, force: bool = False) -> Path:
    """Compiles bench/loadgen.c into ``out_dir/loadgen`` unless an up-to-date binary exists."""
    out_dir.mkdir(parents=True, exist_ok=True)
    binary = out_dir / BINARY_NAME
    if (
        not force
        and binary.exists()
        and os.access(binary, os.X_OK)
        and binary.stat().st_mtime >= SOURCE.stat().st_mtime
    ):
        return binary
    compiler = _find_compiler()
    tmp = out_dir / f".{BINARY_NAME}.{os.getpid()}.tmp"
    cmd = [compiler, *CFLAGS, "-o", str(tmp), str(SOURCE), "-lpthread"]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise LoadgenError(f"compiling loadgen failed: {' '.join(cmd)}\n{proc.stderr}")
    tmp.replace(binary)  # atomic, so concurrent builds never see a half-written binary
    return binary


@dataclass(frozen=True)
class LoadResult:
    """One measurement window. Latencies in milliseconds; only post-warmup requests count."""

    requests: int
    errors: int
    status: dict[int, int]
    duration_s: float
    rps: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    mean_ms: float
    error_kinds: dict[str, int]
    connections: int
    threads: int
    loadgen_cpu_s: float
    # CPU seconds used by each pid in ``cpu_pids`` during the measurement window.
    cpu_s: dict[int, float] = field(default_factory=dict)
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def ok(self) -> int:
        """Responses with a 2xx status."""
        return sum(n for code, n in self.status.items() if 200 <= code < 300)

    def cpu_us_per_request(self, pids: Iterable[int] | None = None) -> float:
        """CPU microseconds per completed request, summed over ``pids`` (default: all sampled)."""
        chosen = self.cpu_s.keys() if pids is None else pids
        total = sum(self.cpu_s.get(pid, 0.0) for pid in chosen)
        return total * 1e6 / self.requests if self.requests else 0.0

    @classmethod
    def from_json(
        cls, data: Mapping[str, Any], cpu_s: Mapping[int, float] | None = None
    ) -> LoadResult:
        lat = data["latency_ms"]
        status = {int(k): int(v) for k, v in data.get("status", {}).items() if k.isdigit()}
        return cls(
            requests=int(data["requests"]),
            errors=int(data["errors"]),
            status=status,
            duration_s=float(data["duration_s"]),
            rps=float(data["rps"]),
            p50_ms=float(lat["p50"]),
            p90_ms=float(lat["p90"]),
            p99_ms=float(lat["p99"]),
            max_ms=float(lat["max"]),
            mean_ms=float(lat["mean"]),
            error_kinds={str(k): int(v) for k, v in data.get("error_kinds", {}).items()},
            connections=int(data.get("connections", 0)),
            threads=int(data.get("threads", 0)),
            loadgen_cpu_s=float(data.get("loadgen_cpu_s", 0.0)),
            cpu_s=dict(cpu_s or {}),
            raw=dict(data),
        )


def run_load(
    binary: Path,
    *,
    port: int,
    path: str = "/",
    method: str = "GET",
    headers: Sequence[tuple[str, str]] | Sequence[str] = (),
    body: bytes = b"",
    connections: int = 16,
    duration: float = 5.0,
    warmup: float = 1.0,
    threads: int = 1,
    host: str = "127.0.0.1",
    timeout: float = 10.0,
    cpu_pids: Sequence[int] = (),
) -> LoadResult:
    """Runs loadgen once and parses its JSON result.

    ``headers`` are ("name", "value") pairs or "name: value" strings. ``cpu_pids`` are sampled
    (utime+stime) at the start and end of the measurement window; the differences are in
    ``LoadResult.cpu_s``.
    """
    args = [
        str(binary),
        "--host", host,
        "--port", str(port),
        "--path", path,
        "--method", method,
        "--connections", str(connections),
        "--duration", repr(float(duration)),
        "--warmup", repr(float(warmup)),
        "--threads", str(threads),
        "--timeout", repr(float(timeout)),
    ]  # fmt: skip
    for h in headers:
        line = h if isinstance(h, str) else f"{h[0]}: {h[1]}"
        args += ["--header", line]

    with tempfile.TemporaryDirectory(prefix="loadgen-") as tmp:
        if body:
            body_file = Path(tmp) / "body"
            body_file.write_bytes(body)
            args += ["--body-file", str(body_file)]
        proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert proc.stdout is not None and proc.stderr is not None
        marks: dict[str, dict[int, float]] = {}
        stderr_lines: list[str] = []
        reader = threading.Thread(
            target=_read_stderr,
            args=(proc.stderr, cpu_pids, marks, stderr_lines),
            daemon=True,
        )
        reader.start()
        try:
            out = proc.stdout.read()
            proc.wait(timeout=warmup + duration + timeout + 30)
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        finally:
            proc.stdout.close()
        reader.join(timeout=5)

    if proc.returncode != 0 or not out.strip():
        raise LoadgenError(
            f"loadgen exited with {proc.returncode}: {''.join(stderr_lines).strip()}"
        )
    try:
        data = json.loads(out)
    except json.JSONDecodeError as exc:
        raise LoadgenError(f"loadgen printed invalid JSON: {out!r}") from exc

    cpu: dict[int, float] = {}
    start, end = marks.get("MEASURE_START", {}), marks.get("MEASURE_END", {})
    for pid in cpu_pids:
        if pid in start and pid in end:
            cpu[pid] = end[pid] - start[pid]
    return LoadResult.from_json(data, cpu)


def _read_stderr(
    stream: IO[str],
    pids: Sequence[int],
    marks: dict[str, dict[int, float]],
    lines: list[str],
) -> None:
    for line in stream:
        tag = line.strip()
        if tag in ("MEASURE_START", "MEASURE_END"):
            marks[tag] = {pid: cpu_seconds(pid) for pid in pids if _alive(pid)}
        else:
            lines.append(line)
    stream.close()


def _alive(pid: int) -> bool:
    return Path(f"/proc/{pid}/stat").exists()


def _stat_fields(pid: int) -> list[str]:
    text = Path(f"/proc/{pid}/stat").read_text()
    # The command name (field 2) is in parentheses and may contain spaces or ')'.
    return text[text.rindex(")") + 2 :].split()


def cpu_seconds(pid: int) -> float:
    """User+system CPU seconds of one process (all its threads, not its children)."""
    fields = _stat_fields(pid)
    # fields[0] is field 3 (state); utime and stime are fields 14 and 15.
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


def cpu_seconds_tree(pids: Iterable[int]) -> float:
    """Sum of ``cpu_seconds`` over several processes; processes that are gone count 0."""
    total = 0.0
    for pid in pids:
        try:
            total += cpu_seconds(pid)
        except (FileNotFoundError, ProcessLookupError):
            continue
    return total


def process_tree(pid: int) -> list[int]:
    """``pid`` followed by all its live descendants (from /proc/*/stat parent links)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int(_stat_fields(int(entry.name))[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    result, todo = [], [pid]
    while todo:
        p = todo.pop()
        result.append(p)
        todo.extend(children.get(p, ()))
    return result


def main(argv: Sequence[str] | None = None) -> int:
    """``python bench/loadgen.py [loadgen args]``: builds the binary into .run/ and runs it."""
    import sys

    out_dir = Path(__file__).resolve().parent.parent / ".run"
    binary = build_loadgen(out_dir)
    return subprocess.call([str(binary), *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    raise SystemExit(main())
