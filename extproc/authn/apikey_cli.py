"""`extproc keys create|list|revoke`: manage the API key store file.

Errors in what the user typed or in the store file exit with status 2 and one line on stderr;
file-system errors (permissions, missing directory) exit with 1. Never a traceback.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta

from extproc.authn.apikey import (
    ApiKeyError,
    ApiKeyRecord,
    create_key,
    read_key_file,
    revoke_key,
)

Command = Callable[[argparse.Namespace], int]

_DURATION_RE = re.compile(r"(\d+)([smhdw])")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_timestamp(text: str) -> datetime:
    """An RFC 3339 timestamp with an explicit offset, as UTC (e.g. 2030-01-31T00:00:00Z)."""
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise ApiKeyError(f"{text!r} is not an RFC 3339 timestamp") from None
    if value.tzinfo is None:
        # A timestamp without an offset would mean different instants on different hosts.
        raise ApiKeyError(f"{text!r} has no time zone; add Z or an offset like +02:00")
    return value.astimezone(UTC)


def parse_duration(text: str) -> timedelta:
    """A duration such as 90d, 12h, 30m, 45s or 2w."""
    match = _DURATION_RE.fullmatch(text.strip())
    if not match or int(match.group(1)) == 0:
        raise ApiKeyError(f"{text!r} is not a positive duration like 90d, 12h or 30m")
    return timedelta(seconds=int(match.group(1)) * _UNITS[match.group(2)])


def _parse_metadata(items: Sequence[str]) -> dict[str, str]:
    metadata: dict[str, str] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise ApiKeyError(f"metadata {item!r} is not NAME=VALUE")
        metadata[name] = value
    return metadata


def _validity(args: argparse.Namespace) -> tuple[datetime | None, datetime | None]:
    not_before = parse_timestamp(args.not_before) if args.not_before else None
    not_after = parse_timestamp(args.not_after) if args.not_after else None
    if args.expires_in:
        start = not_before or datetime.now(UTC).replace(microsecond=0)
        not_after = start + parse_duration(args.expires_in)
    if not_after is not None and not_after.timestamp() <= time.time():
        raise ApiKeyError("the key would already be expired; check --not-after")
    if not_before and not_after and not_after <= not_before:
        raise ApiKeyError("--not-after must be later than --not-before")
    return not_before, not_after


def _create(args: argparse.Namespace) -> int:
    not_before, not_after = _validity(args)
    key, record = create_key(
        args.file,
        args.principal,
        tenant=args.tenant,
        roles=args.role,
        not_before=not_before,
        not_after=not_after,
        description=args.description,
        metadata=_parse_metadata(args.metadata),
    )
    # The key alone on stdout, so it can be piped into a secret store; the note goes to stderr.
    print(key)
    print(
        f"created key {record.id} for {record.principal}; "
        "save the key now, it will not be shown again",
        file=sys.stderr,
    )
    return 0


def _format_time(value: datetime | None) -> str:
    return value.isoformat().replace("+00:00", "Z") if value else "-"


def _row(record: ApiKeyRecord, now: float) -> list[str]:
    return [
        record.id,
        record.principal,
        record.tenant or "-",
        ",".join(record.roles) or "-",
        _format_time(record.not_before),
        _format_time(record.not_after),
        record.status(now),
        record.description,
    ]


def _list(args: argparse.Namespace) -> int:
    records = read_key_file(args.file)
    if not records:
        print(f"no keys in {args.file}", file=sys.stderr)
        return 0
    header = ["ID", "PRINCIPAL", "TENANT", "ROLES", "NOT_BEFORE", "NOT_AFTER", "STATUS", "DESC"]
    now = time.time()
    # Hashes and salts are deliberately not shown: they are of no use to an operator.
    rows = [header, *(_row(r, now) for r in records)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    return 0


def _revoke(args: argparse.Namespace) -> int:
    record, changed = revoke_key(args.file, args.id)
    if changed:
        print(f"revoked key {record.id} (principal {record.principal})")
    else:
        print(f"key {record.id} was already revoked")
    return 0


def _guarded(command: Command) -> Command:
    """Turn expected errors into an exit status and one line on stderr."""

    def run(args: argparse.Namespace) -> int:
        try:
            return command(args)
        except ApiKeyError as exc:
            print(f"error: {_one_line(str(exc))}", file=sys.stderr)
            return 2
        except OSError as exc:
            print(f"error: {_one_line(str(exc))}", file=sys.stderr)
            return 1

    return run


def _one_line(message: str) -> str:
    return " ".join(message.split())


def add_keys_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register `create`, `list` and `revoke` on the `keys` command's subparsers.

    Each sets `func(args) -> exit status`. The caller owns the `keys` parser:
    `add_keys_commands(keys.add_subparsers(dest="keys_command", required=True))`.
    """
    create = commands.add_parser("create", help="create a key and print it once")
    create.add_argument("--file", required=True, help="the API key store (JSON)")
    create.add_argument("--principal", required=True, help="who the key authenticates")
    create.add_argument("--tenant", help="the principal's tenant")
    create.add_argument("--role", action="append", default=[], help="a role; repeatable")
    create.add_argument("--not-before", metavar="TS", help="RFC 3339 start of validity")
    until = create.add_mutually_exclusive_group()
    until.add_argument("--not-after", metavar="TS", help="RFC 3339 end of validity")
    until.add_argument("--expires-in", metavar="DURATION", help="validity, e.g. 90d or 12h")
    create.add_argument("--description", default="", help="a note for operators")
    create.add_argument(
        "--metadata",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a key attribute visible to authorization rules as a claim; repeatable",
    )
    create.set_defaults(func=_guarded(_create))

    listing = commands.add_parser("list", help="list keys (never their hashes)")
    listing.add_argument("--file", required=True, help="the API key store (JSON)")
    listing.set_defaults(func=_guarded(_list))

    revoke = commands.add_parser("revoke", help="revoke a key; it stays listed")
    revoke.add_argument("--file", required=True, help="the API key store (JSON)")
    revoke.add_argument("--id", required=True, help="the key id (the part after gk_)")
    revoke.set_defaults(func=_guarded(_revoke))
