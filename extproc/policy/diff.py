"""`extproc policy diff`: recorded requests decided against two policy directories, and the
decisions that change between them (outcome, status, code, version, cluster).

Recorded requests come from audit logs (records of policies with `audit: {record_requests:
true}`, replayed for the identity they recorded and with their decision id, so a shadow copy is
chosen as it was) or from `policy test` fixture files (their expectations are ignored; a
case's `repeat` is kept, so a changed quota shows). Each request is decided with empty quota
counters on both sides: a diff shows what the rules decide, not how much quota the recorded
traffic happened to use. Recorded bodies are masked: a change to PII rules does not show.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from extproc.policy.cases import RequestSpec, load_cases, recorded_spec
from extproc.policy.load import PolicyLoadError
from extproc.policy.replay import BadInput, Decided, Replayer, load_store

COMPARED = ("outcome", "status", "code", "version", "cluster")


@dataclass(frozen=True, slots=True)
class Recorded:
    label: str  # the decision id, or the case's name
    source: str  # file:line, or file[case index]
    spec: RequestSpec
    decision_id: str | None = None
    repeat: int = 1


@dataclass(slots=True)
class Recordings:
    requests: list[Recorded] = field(default_factory=list)
    skipped: Counter[str] = field(default_factory=Counter)  # by reason


def _is_audit_log(path: Path) -> bool:
    """JSON lines whose first line is an audit event; anything else is a fixture file (YAML,
    which JSON also is)."""
    with path.open("rb") as f:
        first = next((line for line in f if line.strip()), b"")
    try:
        head = orjson.loads(first)
    except orjson.JSONDecodeError:
        return False
    return isinstance(head, dict) and "event" in head


def read_recordings(paths: Sequence[Path]) -> Recordings:
    """Raises BadInput for a file that cannot be read or a fixture file that is invalid."""
    found = Recordings()
    for path in paths:
        try:
            audit = _is_audit_log(path)
        except OSError as exc:
            raise BadInput(f"{path}: cannot read: {exc.strerror}") from None
        if audit:
            _read_audit_log(path, found)
            continue
        try:
            cases = load_cases(path, os.environ)
        except PolicyLoadError as exc:
            raise BadInput(str(exc)) from None
        for index, case in enumerate(cases):
            found.requests.append(
                Recorded(case.label(), f"{path}[{index}]", case, repeat=case.repeat)
            )
    return found


def _read_audit_log(path: Path, found: Recordings) -> None:
    with path.open("rb") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = orjson.loads(line)
            except orjson.JSONDecodeError:
                found.skipped["unreadable line"] += 1
                continue
            recorded = record.get("recorded_request") if isinstance(record, dict) else None
            if not isinstance(recorded, dict):
                found.skipped["no recorded_request"] += 1
                continue
            try:
                spec = recorded_spec(recorded, record.get("transport"))
            except ValueError as exc:
                found.skipped[str(exc)] += 1
                continue
            decision_id = str(record.get("decision_id") or "") or None
            label = decision_id or f"{path}:{number}"
            found.requests.append(Recorded(label, f"{path}:{number}", spec, decision_id))


def compared(decided: Decided) -> dict[str, Any]:
    summary = decided.summary()
    return {key: summary.get(key) for key in COMPARED}


@dataclass(frozen=True, slots=True)
class Change:
    request: Recorded
    old: Decided
    new: Decided

    @property
    def fields(self) -> list[str]:
        old, new = compared(self.old), compared(self.new)
        return [key for key in COMPARED if old[key] != new[key]]

    def principal(self) -> str:
        identity = self.request.spec.identity
        return identity.principal if identity is not None else "(credentials)"

    def line(self) -> str:
        spec = self.request.spec
        return (
            f"{self.request.label}  {spec.method} {spec.path}  {self.principal()}: "
            f"{self.old.brief()} -> {self.new.brief()}"
        )

    def as_dict(self) -> dict[str, Any]:
        spec = self.request.spec
        return {
            "request": self.request.label,
            "source": self.request.source,
            "method": spec.method,
            "path": spec.path,
            "principal": self.principal(),
            "changed": self.fields,
            "old": self.old.summary(),
            "new": self.new.summary(),
        }


async def replay(old: Replayer, new: Replayer, requests: Sequence[Recorded]) -> list[Change]:
    changes = []
    for request in requests:
        decision_id, repeat = request.decision_id, request.repeat
        before = await old.decide(request.spec, repeat=repeat, decision_id=decision_id)
        after = await new.decide(request.spec, repeat=repeat, decision_id=decision_id)
        if compared(before) != compared(after):
            changes.append(Change(request, before, after))
    return changes


def run_diff_command(
    old_dir: Path,
    new_dir: Path,
    recorded: Sequence[Path],
    api_keys: Path | None,
    fmt: str,
    fail_on_change: bool = False,
) -> int:
    """Exit 0 (a change is information), 1 on a change with fail_on_change, 2 on bad input."""
    try:
        recordings = read_recordings(recorded)
        old = Replayer(load_store(old_dir, api_keys))
        new = Replayer(load_store(new_dir, api_keys))
    except BadInput as exc:
        print(exc, file=sys.stderr)
        return 2
    changes = asyncio.run(replay(old, new, recordings.requests))
    replayed, skipped = len(recordings.requests), sum(recordings.skipped.values())
    if fmt == "json":
        doc = {
            "old": {"directory": str(old_dir), "revision": old.current.revision},
            "new": {"directory": str(new_dir), "revision": new.current.revision},
            "replayed": replayed,
            "changed": [c.as_dict() for c in changes],
            "skipped": skipped,
            "skipped_by_reason": dict(sorted(recordings.skipped.items())),
        }
        print(json.dumps(doc, indent=2))
    else:
        print(f"old {old_dir} (revision {old.current.revision}) -> "
              f"new {new_dir} (revision {new.current.revision})")  # fmt: skip
        for change in changes:
            print(change.line())
        print(f"{replayed} replayed, {len(changes)} changed, {skipped} skipped")
        for reason, count in sorted(recordings.skipped.items()):
            print(f"  skipped {count}: {reason}")
    return 1 if fail_on_change and changes else 0
