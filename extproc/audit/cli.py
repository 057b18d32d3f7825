"""`extproc audit verify`: check a log's hash chain."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from extproc.audit.chain import GENESIS, verify


def _verify(args: argparse.Namespace) -> int:
    key = args.key_file.read_bytes().strip() if args.key_file is not None else None
    status = 0
    start = args.start
    for path in args.logs:
        try:
            result = verify(path, key, start)
        except OSError as exc:
            print(f"{path}: cannot read: {exc}", file=sys.stderr)
            return 2
        for problem in result.problems:
            print(f"{path}: {problem}", file=sys.stderr)
        if args.expect_head is not None and path == args.logs[-1] and (
            result.head != args.expect_head
        ):
            print(f"{path}: head {result.head} is not the expected {args.expect_head} "
                  "(lines cut off the end, or the last line edited)", file=sys.stderr)  # fmt: skip
            status = 1
        verdict = "BROKEN" if result.problems else "ok"
        print(f"{path}: {verdict}: {result.records} records, head {result.head}")
        if result.problems:
            status = 1
        start = result.head  # rotated files continue one chain
    return status


def add_audit_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    verify_cmd = sub.add_parser(
        "verify",
        help="check that no record of an audit log was removed, inserted, reordered or edited",
    )
    verify_cmd.add_argument(
        "logs", type=Path, nargs="+", help="audit log files; several: oldest first (rotation)"
    )
    verify_cmd.add_argument(
        "--key-file", type=Path, help="the HMAC key the server chained with (audit_key_file)"
    )
    verify_cmd.add_argument(
        "--start", default=GENESIS, help="the hash the first record carries (default: a new log)"
    )
    verify_cmd.add_argument(
        "--expect-head", help="the head recorded elsewhere: catches lines cut off the end"
    )
    verify_cmd.set_defaults(func=_verify)
