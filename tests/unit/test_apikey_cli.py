"""`extproc keys create|list|revoke`, driven through argparse as extproc/cli.py will."""

from __future__ import annotations

import argparse
import json
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from extproc.authn.apikey import ApiKeyAuthenticator, ApiKeyStore, read_key_file
from extproc.authn.apikey_cli import add_keys_commands, parse_duration, parse_timestamp
from extproc.authn.base import AuthnFailure, Identity


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    # The same wiring as extproc/cli.py.
    parser = argparse.ArgumentParser(prog="extproc")
    keys = parser.add_subparsers(dest="command", required=True).add_parser("keys")
    add_keys_commands(keys.add_subparsers(dest="keys_command", required=True))
    args = parser.parse_args(list(argv))
    code: int = args.func(args)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "keys.json"


def create(capsys: pytest.CaptureFixture[str], path: Path, *extra: str) -> str:
    code, out, err = run(capsys, "keys", "create", "--file", str(path), *extra)
    assert code == 0, err
    return out.strip()


def assert_one_line_error(err: str, *fragments: str) -> None:
    assert err.startswith("error: ")
    assert err.count("\n") == 1
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in err


async def test_create_prints_the_key_once_and_stores_its_hash(
    capsys: pytest.CaptureFixture[str], path: Path
) -> None:
    code, out, err = run(
        capsys, "keys", "create", "--file", str(path), "--principal", "alice",
        "--tenant", "acme", "--role", "reader", "--role", "writer",
        "--description", "ci", "--metadata", "team=ml",
    )  # fmt: skip
    assert code == 0
    key = out.removesuffix("\n")
    assert "\n" not in key and key.startswith("gk_")
    assert err.count("\n") == 1
    assert "will not be shown again" in err
    assert key not in err
    assert key not in path.read_text()
    assert path.stat().st_mode & 0o777 == 0o600
    [record] = read_key_file(path)
    assert (record.principal, record.tenant, record.roles) == (
        "alice",
        "acme",
        ("reader", "writer"),
    )
    assert record.description == "ci"
    assert record.metadata == {"team": "ml"}
    assert (record.not_before, record.not_after) == (None, None)
    identity = await ApiKeyAuthenticator(ApiKeyStore.load(path)).authenticate(
        {"authorization": f"Bearer {key}"}
    )
    assert isinstance(identity, Identity)
    assert identity.principal == "alice"
    assert identity.claims == {"team": "ml"}


def test_create_with_explicit_validity(capsys: pytest.CaptureFixture[str], path: Path) -> None:
    create(
        capsys, path, "--principal", "alice",
        "--not-before", "2030-01-01T00:00:00Z", "--not-after", "2030-03-01T02:00:00+02:00",
    )  # fmt: skip
    [record] = read_key_file(path)
    assert record.not_before == datetime(2030, 1, 1, tzinfo=UTC)
    assert record.not_after == datetime(2030, 3, 1, tzinfo=UTC)


def test_create_with_expires_in(capsys: pytest.CaptureFixture[str], path: Path) -> None:
    create(capsys, path, "--principal", "alice", "--expires-in", "90d")
    [record] = read_key_file(path)
    assert record.not_after is not None
    expected = time.time() + 90 * 86400
    assert abs(record.not_after.timestamp() - expected) < 5


def test_expires_in_counts_from_not_before(capsys: pytest.CaptureFixture[str], path: Path) -> None:
    create(
        capsys, path, "--principal", "a", "--not-before", "2030-01-01T00:00:00Z",
        "--expires-in", "12h",
    )  # fmt: skip
    [record] = read_key_file(path)
    assert record.not_after == datetime(2030, 1, 1, 12, tzinfo=UTC)


@pytest.mark.parametrize(
    ("extra", "fragment"),
    [
        (["--not-after", "tomorrow"], "not an RFC 3339 timestamp"),
        (["--not-after", "2030-01-01T00:00:00"], "no time zone"),
        (["--not-before", "2030-13-01T00:00:00Z"], "not an RFC 3339 timestamp"),
        (["--expires-in", "90 days"], "not a positive duration"),
        (["--expires-in", "0d"], "not a positive duration"),
        (["--not-after", "2001-01-01T00:00:00Z"], "already be expired"),
        (
            ["--not-before", "2031-01-01T00:00:00Z", "--not-after", "2030-01-01T00:00:00Z"],
            "later than --not-before",
        ),
        (["--role", "has space"], "roles[0]"),
        (["--tenant", ""], "tenant"),
        (["--metadata", "novalue"], "NAME=VALUE"),
    ],
)
def test_create_rejects_bad_input(
    capsys: pytest.CaptureFixture[str], path: Path, extra: list[str], fragment: str
) -> None:
    code, out, err = run(
        capsys, "keys", "create", "--file", str(path), "--principal", "alice", *extra
    )
    assert code == 2
    assert out == ""
    assert_one_line_error(err, fragment)
    assert not path.exists()


def test_create_rejects_a_principal_with_a_newline(
    capsys: pytest.CaptureFixture[str], path: Path
) -> None:
    code, _, err = run(capsys, "keys", "create", "--file", str(path), "--principal", "a\nb")
    assert code == 2
    assert_one_line_error(err, "principal", "control characters")


def test_argparse_errors_exit_2(capsys: pytest.CaptureFixture[str], path: Path) -> None:
    for argv in (
        ["keys", "create", "--file", str(path)],  # no --principal
        ["keys", "create", "--file", str(path), "--principal", "a",
         "--not-after", "2030-01-01T00:00:00Z", "--expires-in", "1d"],  # both ends
        ["keys"],
        ["keys", "revoke", "--file", str(path)],  # no --id
    ):  # fmt: skip
        with pytest.raises(SystemExit) as info:
            run(capsys, *argv)
        assert info.value.code == 2
        assert "Traceback" not in capsys.readouterr().err


def test_list_shows_keys_but_never_hashes(capsys: pytest.CaptureFixture[str], path: Path) -> None:
    key_a = create(capsys, path, "--principal", "alice", "--tenant", "acme", "--role", "r1")
    key_b = create(capsys, path, "--principal", "bob", "--not-after", "2099-01-01T00:00:00Z")
    code, out, err = run(capsys, "keys", "list", "--file", str(path))
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].split() == [
        "ID", "PRINCIPAL", "TENANT", "ROLES", "NOT_BEFORE", "NOT_AFTER", "STATUS", "DESC",
    ]  # fmt: skip
    records = read_key_file(path)
    assert lines[1].split() == [records[0].id, "alice", "acme", "r1", "-", "-", "active"]
    assert lines[2].split() == [
        records[1].id, "bob", "-", "-", "-", "2099-01-01T00:00:00Z", "active",
    ]  # fmt: skip
    for secret in (key_a, key_b, *(r.hash for r in records), *(r.salt for r in records)):
        assert secret not in out


def test_list_of_an_empty_store(capsys: pytest.CaptureFixture[str], path: Path) -> None:
    code, out, err = run(capsys, "keys", "list", "--file", str(path))
    assert (code, out) == (0, "")
    assert "no keys" in err


async def test_revoke(capsys: pytest.CaptureFixture[str], path: Path) -> None:
    key = create(capsys, path, "--principal", "alice")
    keep = create(capsys, path, "--principal", "alice")
    key_id = key.split("_")[1]
    code, out, _ = run(capsys, "keys", "revoke", "--file", str(path), "--id", key_id)
    assert code == 0
    assert f"revoked key {key_id}" in out
    code, out, _ = run(capsys, "keys", "list", "--file", str(path))
    statuses = {line.split()[0]: line.split()[-1] for line in out.splitlines()[1:]}
    assert statuses == {key_id: "revoked", keep.split("_")[1]: "active"}
    auth = ApiKeyAuthenticator(ApiKeyStore.load(path))
    outcome = await auth.authenticate({"authorization": f"Bearer {key}"})
    assert isinstance(outcome, AuthnFailure)
    assert outcome.reason == "key_revoked"
    assert isinstance(await auth.authenticate({"authorization": f"Bearer {keep}"}), Identity)
    # Revoking again is harmless.
    code, out, _ = run(capsys, "keys", "revoke", "--file", str(path), "--id", key_id)
    assert code == 0
    assert "already revoked" in out


def test_revoke_unknown_id(capsys: pytest.CaptureFixture[str], path: Path) -> None:
    create(capsys, path, "--principal", "alice")
    code, _, err = run(capsys, "keys", "revoke", "--file", str(path), "--id", "nosuchkeyxxx")
    assert code == 2
    assert_one_line_error(err, "nosuchkeyxxx", str(path))


def test_invalid_store_file(capsys: pytest.CaptureFixture[str], path: Path) -> None:
    path.write_text(json.dumps({"version": 1, "keys": [{"id": "x"}]}))
    for argv in (
        ["list"],
        ["create", "--principal", "a"],
        ["revoke", "--id", "aaaaaaaaaaaa"],
    ):
        code, out, err = run(capsys, "keys", argv[0], "--file", str(path), *argv[1:])
        assert code == 2
        assert out == ""
        assert_one_line_error(err, str(path), "keys[0]")


def test_unwritable_location_exits_1(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    missing_dir = tmp_path / "nope" / "keys.json"
    code, out, err = run(capsys, "keys", "create", "--file", str(missing_dir), "--principal", "a")
    assert code == 1
    assert out == ""
    assert_one_line_error(err, "nope")


def test_parse_helpers() -> None:
    assert parse_duration("45s") == timedelta(seconds=45)
    assert parse_duration("30m") == timedelta(minutes=30)
    assert parse_duration("12h") == timedelta(hours=12)
    assert parse_duration("90d") == timedelta(days=90)
    assert parse_duration("2w") == timedelta(weeks=2)
    assert parse_timestamp("2030-01-01T01:00:00+01:00") == datetime(2030, 1, 1, tzinfo=UTC)
