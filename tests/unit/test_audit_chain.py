"""The audit log's hash chain: what verify catches, what the writer escapes and keeps."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest

from extproc.audit.chain import (
    GENESIS,
    MIN_ROTATE_BYTES,
    AuditLog,
    escape_misleading,
    rotated_files,
    rotated_path,
    verify,
)
from extproc.cli import main
from extproc.settings import Settings


def _write(path: Path, n: int, key: bytes | None = None) -> None:
    log = AuditLog(path, key)
    for i in range(n):
        log.write({"event": "decision", "decision_id": f"d{i}", "outcome": "allow"})
    log.close()


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines()


def test_an_untouched_log_verifies(tmp_path: Path) -> None:
    log = tmp_path / "audit.jsonl"
    _write(log, 20)
    result = verify(log)
    assert result.problems == []
    assert result.records == 20
    records = [json.loads(line) for line in _lines(log)]
    assert [r["seq"] for r in records] == list(range(20))
    assert records[0]["prev"] == GENESIS


@pytest.mark.parametrize("victim", [0, 7, 18])
def test_a_deleted_line_is_caught(tmp_path: Path, victim: int) -> None:
    log = tmp_path / "audit.jsonl"
    _write(log, 20)
    lines = _lines(log)
    del lines[victim]
    log.write_text("\n".join(lines) + "\n")
    problems = verify(log).problems
    assert problems and problems[0].startswith(f"line {victim + 1}: chain broken")


def test_an_edited_line_is_caught_at_the_next(tmp_path: Path) -> None:
    log = tmp_path / "audit.jsonl"
    _write(log, 10)
    lines = _lines(log)
    lines[4] = lines[4].replace('"outcome":"allow"', '"outcome":"deny"')
    log.write_text("\n".join(lines) + "\n")
    assert verify(log).problems == [
        "line 6: chain broken (the line before it was edited or removed, or this one was inserted)"
    ]


def test_swapped_lines_are_caught(tmp_path: Path) -> None:
    log = tmp_path / "audit.jsonl"
    _write(log, 6)
    lines = _lines(log)
    lines[2], lines[3] = lines[3], lines[2]
    log.write_text("\n".join(lines) + "\n")
    assert len(verify(log).problems) >= 2


def test_an_edited_last_line_shows_only_against_the_head(tmp_path: Path) -> None:
    log = tmp_path / "audit.jsonl"
    _write(log, 5)
    head = verify(log).head
    lines = _lines(log)
    lines[-1] = lines[-1].replace('"allow"', '"deny"')
    log.write_text("\n".join(lines) + "\n")
    result = verify(log)
    assert result.problems == []
    assert result.head != head


def test_keyed_chain_cannot_be_rechained_without_the_key(tmp_path: Path) -> None:
    log = tmp_path / "audit.jsonl"
    key = b"k" * 32
    _write(log, 5, key)
    assert verify(log, key).problems == []
    # Read with SHA-256 (or another key) every link fails: the links are HMACs.
    assert len(verify(log).problems) == 4
    assert len(verify(log, b"x" * 32).problems) == 4


def test_a_restart_continues_the_chain(tmp_path: Path) -> None:
    log = tmp_path / "audit.jsonl"
    _write(log, 3)
    _write(log, 3)
    result = verify(log)
    assert result.problems == [] and result.records == 6
    assert [json.loads(line)["seq"] for line in _lines(log)] == list(range(6))


def test_a_torn_last_line_is_reported_and_the_chain_resumes(tmp_path: Path) -> None:
    log = tmp_path / "audit.jsonl"
    _write(log, 3)
    with log.open("ab") as f:
        f.write(b'{"seq": 3, "prev": "ab')  # a crash mid-write
    _write(log, 2)
    result = verify(log)
    assert result.problems == ["line 4: not an audit record"]
    events = [json.loads(line).get("event") for line in _lines(log)[4:]]
    assert events == ["chain_resumed", "decision", "decision"]


def test_control_characters_from_clients_are_escaped(tmp_path: Path) -> None:
    log = tmp_path / "audit.jsonl"
    nasty = "a\nb\x1b[31mc\x85d\u2028e\u202ef\x7fg"
    audit = AuditLog(log)
    audit.write({"event": "decision", "principal": nasty})
    audit.close()
    raw = log.read_bytes()
    assert raw.count(b"\n") == 1  # one record, one line
    for forbidden in (b"\x1b", b"\xc2\x85", b"\xe2\x80\xa8", b"\xe2\x80\xae", b"\x7f"):
        assert forbidden not in raw
    assert json.loads(raw)["principal"] == nasty  # escaped, not lost
    assert verify(log).problems == []


def test_escape_keeps_ordinary_text() -> None:
    text = json.dumps({"p": "héllo wörld — ☃"}, ensure_ascii=False).encode()
    assert escape_misleading(text) == text


def test_a_full_queue_drops_and_says_so(tmp_path: Path) -> None:
    log = tmp_path / "audit.jsonl"
    dropped: list[int] = []
    audit = AuditLog(log, max_queued=0, on_drop=lambda: dropped.append(1))
    audit.write({"event": "decision"})
    audit.write({"event": "decision"})
    assert audit.dropped == 2 and len(dropped) == 2
    audit._max = 10  # room again: the next record follows a gap marker
    audit.write({"event": "decision", "decision_id": "kept"})
    audit.close()
    records = [json.loads(line) for line in _lines(log)]
    assert records[0] == {"seq": 0, "prev": GENESIS, "event": "records_dropped", "count": 2}
    assert records[1]["decision_id"] == "kept"


def test_cli_verify(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    log = tmp_path / "audit.jsonl"
    _write(log, 4)
    assert main(["audit", "verify", str(log)]) == 0
    assert "ok: 4 records" in capsys.readouterr().out
    lines = _lines(log)
    log.write_text("\n".join(lines[:1] + lines[2:]) + "\n")
    assert main(["audit", "verify", str(log)]) == 1
    captured = capsys.readouterr()
    assert "BROKEN" in captured.out and "line 2: chain broken" in captured.err


def _write_big(path: Path, n: int, max_bytes: int, start: int = 0) -> None:
    log = AuditLog(path, max_bytes=max_bytes)
    for i in range(start, start + n):
        log.write({"event": "decision", "decision_id": f"d{i}", "pad": "x" * 100})
    log.close()


def test_rotation_keeps_one_chain_across_files(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    log = tmp_path / "audit.w0.jsonl"
    _write_big(log, 200, max_bytes=MIN_ROTATE_BYTES)
    rotated = rotated_files(log)
    assert len(rotated) >= 5
    files = [*rotated, log]
    assert sorted(tmp_path.glob("audit.w0.*jsonl")) == files  # the shell's order: oldest first
    line_size = max(len(line) + 1 for f in files for line in _lines(f))
    for f in rotated:
        assert MIN_ROTATE_BYTES <= f.stat().st_size < MIN_ROTATE_BYTES + line_size
    records = [json.loads(line) for f in files for line in _lines(f)]
    assert [r["seq"] for r in records] == list(range(len(records)))  # nothing lost or doubled
    assert [r["decision_id"] for r in records if r["event"] == "decision"] == [
        f"d{i}" for i in range(200)
    ]
    for previous, f in itertools.pairwise(files):
        first = json.loads(_lines(f)[0])
        assert (first["event"], first["previous"]) == ("log_rotated", previous.name)
        # Each file is named after the sequence number of its first record.
        assert int(previous.name.split(".")[2]) == json.loads(_lines(previous)[0])["seq"]
    assert main(["audit", "verify", *map(str, files)]) == 0
    out = capsys.readouterr().out
    assert out.count(": ok: ") == len(files)
    # Drop a whole rotated file: the next file's first line shows it.
    rotated[2].unlink()
    assert main(["audit", "verify", *map(str, [*rotated[:2], *rotated[3:], log])]) == 1
    assert "line 1: chain broken" in capsys.readouterr().err


def test_a_restart_after_rotation_continues_the_chain(tmp_path: Path) -> None:
    log = tmp_path / "audit.jsonl"
    _write_big(log, 60, max_bytes=MIN_ROTATE_BYTES)
    _write_big(log, 60, max_bytes=MIN_ROTATE_BYTES, start=60)
    # Stopped right after a rotation, before the new file's first line: the next start goes
    # on from the last rotated file.
    log.rename(rotated_path(log, json.loads(_lines(log)[0])["seq"]))
    _write_big(log, 60, max_bytes=MIN_ROTATE_BYTES, start=120)
    files = [*rotated_files(log), log]
    head = GENESIS
    for f in files:
        result = verify(f, start=head)
        assert result.problems == [], (f.name, result.problems)
        head = result.head
    records = [json.loads(line) for f in files for line in _lines(f)]
    assert [r["seq"] for r in records] == list(range(len(records)))
    decisions = [r["decision_id"] for r in records if r["event"] == "decision"]
    assert decisions == [f"d{i}" for i in range(180)]


def test_a_rotation_never_overwrites_history(tmp_path: Path) -> None:
    log = tmp_path / "audit.jsonl"
    taken = rotated_path(log, 0)
    taken.write_bytes(b"history not to lose\n")  # say, a chain started again from seq 0
    _write_big(log, 40, max_bytes=MIN_ROTATE_BYTES)
    assert taken.read_bytes() == b"history not to lose\n"
    (moved,) = tmp_path.glob("audit.000000000000-*.jsonl")
    assert json.loads(_lines(moved)[0])["seq"] == 0


@pytest.mark.parametrize("max_bytes", [1, MIN_ROTATE_BYTES - 1, -5])
def test_a_size_too_small_to_rotate_is_refused(tmp_path: Path, max_bytes: int) -> None:
    with pytest.raises(ValueError, match="max_bytes"):
        AuditLog(tmp_path / "audit.jsonl", max_bytes=max_bytes)
    problems = Settings(insecure=True, audit_log=tmp_path / "a.jsonl", audit_max_bytes=max_bytes)
    assert "audit_max_bytes must be 0 (never rotate) or >= 4096" in problems.validate()
