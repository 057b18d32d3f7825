"""The audit log's hash chain: what verify catches, what the writer escapes and keeps."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from extproc.audit.chain import GENESIS, AuditLog, escape_misleading, verify
from extproc.cli import main


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

