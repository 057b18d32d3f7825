"""`extproc policy test`: fixture cases decided through the real core and checked against what
each case expects. Only the expectations a case gives are checked; every case starts with
empty quota counters unless it repeats itself (`repeat: N`)."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from extproc.policy.cases import Case, Expectation, load_cases
from extproc.policy.load import PolicyLoadError
from extproc.policy.replay import BadInput, Decided, Replayer, load_store


@dataclass(frozen=True, slots=True)
class Mismatch:
    field: str
    expected: object
    actual: object

    def __str__(self) -> str:
        if self.field == "reason":
            return f"reason: expected to contain {_show(self.expected)}, got {_show(self.actual)}"
        return f"{self.field}: expected {_show(self.expected)}, got {_show(self.actual)}"


def _show(value: object) -> str:
    if value is None:
        return "none"
    if isinstance(value, str):
        return repr(value) if value == "" or " " in value else value
    return json.dumps(value, sort_keys=True)


def check(expect: Expectation, decided: Decided) -> list[Mismatch]:
    """What the decision does not do that the case expects, field by field."""
    deny, allow = decided.deny, decided.allow
    actual: dict[str, Any] = {
        "outcome": decided.record["outcome"],
        "status": deny.status if deny else None,
        "code": deny.code if deny else None,
        "phase": deny.phase if deny else None,
        "reason": deny.reason if deny else None,
        "version": allow.version if allow else None,
        "cluster": allow.cluster if allow else None,
        "redactions": decided.redactions,
        "flags": sorted(allow.flags) if allow else None,
        "dry_run": decided.dry_run_phases,
    }
    out = []
    for field, expected in expect.model_dump(exclude_none=True).items():
        got = actual[field]
        if field == "reason":
            ok = got is not None and expected in got
        elif field == "flags":
            ok = got == sorted(expected)
        else:
            ok = got == expected
        if not ok:
            out.append(Mismatch(field, expected, got))
    return out


@dataclass(frozen=True, slots=True)
class CaseResult:
    file: str
    index: int
    case: Case
    decided: Decided
    mismatches: tuple[Mismatch, ...]

    @property
    def passed(self) -> bool:
        return not self.mismatches

    def line(self) -> str:
        where = f"{self.file}[{self.index}] {self.case.label()}"
        if self.passed:
            return f"PASS {where}"
        differences = "; ".join(str(m) for m in self.mismatches)
        return f"FAIL {where}: {differences} (decision: {self.decided.brief()})"

    def as_dict(self) -> dict[str, Any]:
        return {
            "file": self.file,
            "index": self.index,
            "name": self.case.label(),
            "passed": self.passed,
            "mismatches": [
                {"field": m.field, "expected": m.expected, "actual": m.actual}
                for m in self.mismatches
            ],
            "decision": self.decided.summary(),
        }


async def run_cases(
    replayer: Replayer, files: Sequence[tuple[str, Sequence[Case]]]
) -> list[CaseResult]:
    results = []
    for file, cases in files:
        for index, case in enumerate(cases):
            decided = await replayer.decide(case, repeat=case.repeat)
            mismatches = tuple(check(case.expect, decided))
            results.append(CaseResult(file, index, case, decided, mismatches))
    return results


def run_test_command(
    directory: Path,
    fixtures: Sequence[Path],
    api_keys: Path | None,
    fmt: str,
) -> int:
    """Exit 0 when every case passes, 1 when one fails, 2 when an input cannot be used."""
    try:
        files = [(str(path), load_cases(path, os.environ)) for path in fixtures]
        replayer = Replayer(load_store(directory, api_keys))
    except (PolicyLoadError, BadInput) as exc:
        print(exc, file=sys.stderr)
        return 2
    results = asyncio.run(run_cases(replayer, files))
    failed = sum(not r.passed for r in results)
    if fmt == "json":
        doc = {
            "revision": replayer.current.revision,
            "cases": [r.as_dict() for r in results],
            "passed": len(results) - failed,
            "failed": failed,
        }
        print(json.dumps(doc, indent=2))
    else:
        for result in results:
            print(result.line())
        print(f"{len(results)} cases: {len(results) - failed} passed, {failed} failed "
              f"(policy revision {replayer.current.revision})")  # fmt: skip
    return 1 if failed else 0
