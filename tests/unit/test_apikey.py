"""API keys: format, hashed storage, the store file and its reloads, the authenticator."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import logging
import os
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from extproc.authn import apikey
from extproc.authn.apikey import (
    MAX_KEY_LENGTH,
    ApiKeyAuthenticator,
    ApiKeyFileError,
    ApiKeyRecord,
    ApiKeyStore,
    create_key,
    generate_key,
    hash_key,
    parse_key_id,
    read_key_file,
    revoke_key,
    write_key_file,
)
from extproc.authn.base import AuthnFailure, Identity

T0 = datetime(2030, 1, 1, tzinfo=UTC)


class Clock:
    """A settable clock for validity checks."""

    def __init__(self, now: datetime = T0) -> None:
        self.now = now.timestamp()

    def __call__(self) -> float:
        return self.now

    def advance(self, **delta: float) -> None:
        self.now += timedelta(**delta).total_seconds()


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "keys.json"


@pytest.fixture
def clock() -> Clock:
    return Clock()


def bearer(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


def b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def b64decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def raw_file(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(path.read_text())
    return data


def write_raw(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data))


async def authn(auth: ApiKeyAuthenticator, headers: dict[str, str]) -> Any:
    return await auth.authenticate(headers)


def failure_reason(outcome: object) -> str:
    assert isinstance(outcome, AuthnFailure), outcome
    assert outcome.method == "api_key"
    return outcome.reason


# --- key format -------------------------------------------------------------------------------

KEY_SHAPE = re.compile(r"gk_([a-z2-7]{12})_([A-Za-z0-9_-]{43})")


def test_generated_key_has_prefix_public_id_and_256_bit_secret() -> None:
    key_id, key = generate_key()
    match = KEY_SHAPE.fullmatch(key)
    assert match is not None
    assert match.group(1) == key_id
    assert len(b64decode(match.group(2))) == 32
    assert parse_key_id(key) == key_id


def test_generated_keys_are_random() -> None:
    keys = [generate_key() for _ in range(500)]
    assert len({k for _, k in keys}) == 500
    assert len({i for i, _ in keys}) == 500


@pytest.mark.parametrize(
    "token",
    [
        "gk_",
        "gk_abc_def",
        "gk_ABCDEFGHIJKL_" + "a" * 43,  # upper-case id
        "gk_abcdefghijk1_" + "a" * 43,  # 1 is not base32
        "gk_abcdefghijkl_" + "a" * 42,  # secret too short
        "gk_abcdefghijkl_" + "a" * 44,  # secret too long
        "gk_abcdefghijkl_" + "a" * 42 + "=",  # padding
        "gk_abcdefghijkl_" + "a" * 43 + "\n",
        "gk_abcdefghijkl_" + "a" * 42 + "é",
    ],
)
def test_malformed_keys_have_no_id(token: str) -> None:
    assert parse_key_id(token) is None


# --- stored only as hashes --------------------------------------------------------------------


def test_store_holds_a_salted_hmac_and_never_the_key(path: Path) -> None:
    key, record = create_key(path, "alice")
    secret = key.split("_", 2)[2]
    text = path.read_text()
    assert key not in text
    assert secret not in text
    stored = raw_file(path)["keys"][0]
    assert stored["alg"] == "hmac-sha256"
    salt = b64decode(stored["salt"])
    assert len(salt) == 16
    assert stored["hash"] == b64(hmac.digest(salt, key.encode(), hashlib.sha256))
    assert stored["hash"] == record.hash


def test_each_key_has_its_own_salt(path: Path) -> None:
    create_key(path, "alice")
    create_key(path, "alice")
    salts = {k["salt"] for k in raw_file(path)["keys"]}
    assert len(salts) == 2


def test_hash_is_bound_to_the_key_id() -> None:
    salt = b"s" * 16
    assert hash_key(salt, "gk_aaaaaaaaaaaa_" + "x" * 43) != hash_key(
        salt, "gk_bbbbbbbbbbbb_" + "x" * 43
    )


async def test_verification_uses_constant_time_compare(
    path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    key, _ = create_key(path, "alice")
    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a: Any, b: Any) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr("extproc.authn.apikey.hmac.compare_digest", spy)
    auth = ApiKeyAuthenticator(ApiKeyStore.load(path))
    assert isinstance(await authn(auth, bearer(key)), Identity)
    assert len(calls) == 1
    wrong = key[:-1] + ("A" if key[-1] != "A" else "B")
    assert failure_reason(await authn(auth, bearer(wrong))) == "bad_secret"
    assert len(calls) == 2


# --- the store file ---------------------------------------------------------------------------


def test_file_layout(path: Path) -> None:
    _, record = create_key(
        path,
        "alice",
        tenant="acme",
        roles=["reader", "writer"],
        not_before=T0,
        not_after=T0 + timedelta(days=90),
        description="ci pipeline",
        metadata={"team": "ml", "tier": 2},
    )
    data = raw_file(path)
    assert data["version"] == 1
    [stored] = data["keys"]
    assert set(stored) == {
        "id", "alg", "salt", "hash", "principal", "tenant", "roles", "not_before",
        "not_after", "created_at", "revoked", "description", "metadata",
    }  # fmt: skip
    assert stored["id"] == record.id
    assert stored["principal"] == "alice"
    assert stored["tenant"] == "acme"
    assert stored["roles"] == ["reader", "writer"]
    assert stored["not_before"] == "2030-01-01T00:00:00Z"
    assert stored["not_after"] == "2030-04-01T00:00:00Z"
    assert datetime.fromisoformat(stored["created_at"]).tzinfo is not None
    assert stored["revoked"] is False
    assert stored["description"] == "ci pipeline"
    assert stored["metadata"] == {"team": "ml", "tier": 2}
    assert read_key_file(path) == [record]


def test_file_is_written_with_mode_0600_whatever_the_umask(path: Path) -> None:
    old = os.umask(0)
    try:
        _, record = create_key(path, "alice")
        assert path.stat().st_mode & 0o777 == 0o600
        path.chmod(0o644)
        revoke_key(path, record.id)
        assert path.stat().st_mode & 0o777 == 0o600
    finally:
        os.umask(old)


def test_write_is_atomic_and_leaves_no_temp_files(
    path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    create_key(path, "alice")
    before = path.read_bytes()

    def fail(*_: Any) -> None:
        raise OSError("disk full")

    monkeypatch.setattr("extproc.authn.apikey.os.replace", fail)
    with pytest.raises(OSError, match="disk full"):
        create_key(path, "bob")
    assert path.read_bytes() == before  # the old file is untouched
    assert sorted(p.name for p in path.parent.iterdir()) == ["keys.json", "keys.json.lock"]


def test_write_replaces_the_file(path: Path) -> None:
    create_key(path, "alice")
    with open(path, "rb") as reader:  # held open, so its inode cannot be reused
        create_key(path, "bob")
        # A new inode: the file was renamed into place, not rewritten under a reader's feet.
        assert path.stat().st_ino != os.fstat(reader.fileno()).st_ino
        assert b"bob" not in reader.read()
    assert [r.principal for r in read_key_file(path)] == ["alice", "bob"]


def valid_raw_record(**overrides: Any) -> dict[str, Any]:
    record: dict[str, Any] = {
        "id": "aaaaaaaaaaaa",
        "alg": "hmac-sha256",
        "salt": b64(b"s" * 16),
        "hash": b64(b"h" * 32),
        "principal": "alice",
        "tenant": None,
        "roles": [],
        "not_before": None,
        "not_after": None,
        "created_at": "2030-01-01T00:00:00Z",
        "revoked": False,
        "description": "",
        "metadata": {},
    }
    record.update(overrides)
    return record


@pytest.mark.parametrize(
    ("content", "field"),
    [
        ({"version": 1, "keys": [valid_raw_record(extra=1)]}, "keys[0].extra"),
        ({"version": 1, "keys": [valid_raw_record(not_after="next week")]}, "keys[0].not_after"),
        ({"version": 1, "keys": [valid_raw_record(not_after="2030-01-01T00:00:00")]}, "not_after"),
        ({"version": 1, "keys": [valid_raw_record(id="Bad")]}, "keys[0].id"),
        ({"version": 1, "keys": [valid_raw_record(salt="!!")]}, "keys[0].salt"),
        ({"version": 1, "keys": [valid_raw_record(hash=b64(b"h" * 31))]}, "keys[0].hash"),
        ({"version": 1, "keys": [valid_raw_record(alg="md5")]}, "keys[0].alg"),
        ({"version": 1, "keys": [valid_raw_record(principal="a\nb")]}, "keys[0].principal"),
        ({"version": 1, "keys": [valid_raw_record(roles=["a,b"])]}, "keys[0].roles[0]"),
        ({"version": 2, "keys": []}, "version"),
        ({"version": 1, "keys": [valid_raw_record(), valid_raw_record()]}, "duplicate key id"),
        (
            {
                "version": 1,
                "keys": [valid_raw_record(not_before=T0.isoformat(), not_after=T0.isoformat())],
            },
            "not_after must be later",
        ),
    ],
)
def test_invalid_file_names_file_and_field(path: Path, content: Any, field: str) -> None:
    write_raw(path, content)
    with pytest.raises(ApiKeyFileError) as info:
        ApiKeyStore.load(path)
    message = str(info.value)
    assert str(path) in message
    assert field in message
    assert b64(b"h" * 32) not in message  # never echoes values such as hashes
    assert "\n" not in message


@pytest.mark.parametrize("content", [b"{not json", b"\xff\xfe\x00binary", b""])
def test_unparseable_file_is_a_clear_error(path: Path, content: bytes) -> None:
    path.write_bytes(content)
    with pytest.raises(ApiKeyFileError, match="Invalid JSON"):
        ApiKeyStore.load(path)


def test_missing_file_is_an_empty_store_with_one_warning(
    path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    store = ApiKeyStore.load(path)
    assert len(store) == 0
    assert store.reload_if_changed() is False
    assert store.reload_if_changed() is False
    assert [r.levelname for r in caplog.records].count("WARNING") == 1
    assert "does not exist" in caplog.text


async def test_missing_file_rejects_keys_as_unknown(path: Path) -> None:
    auth = ApiKeyAuthenticator(ApiKeyStore.load(path))
    _, key = generate_key()
    assert failure_reason(await authn(auth, bearer(key))) == "unknown_key"


# --- reloads ----------------------------------------------------------------------------------


async def test_reload_picks_up_a_new_key_without_restart(path: Path) -> None:
    create_key(path, "alice")
    store = ApiKeyStore.load(path)
    auth = ApiKeyAuthenticator(store)
    new_key, _ = create_key(path, "bob")
    assert failure_reason(await authn(auth, bearer(new_key))) == "unknown_key"
    assert store.reload_if_changed() is True
    identity = await authn(auth, bearer(new_key))
    assert isinstance(identity, Identity)
    assert identity.principal == "bob"


def test_reload_does_nothing_when_unchanged(path: Path) -> None:
    create_key(path, "alice")
    store = ApiKeyStore.load(path)
    generation = store.generation
    assert store.reload_if_changed() is False
    # An old file is judged by stat alone.
    os.utime(path, (1_000_000_000, 1_000_000_000))
    store.reload_if_changed()
    assert store.reload_if_changed() is False
    assert store.generation == generation


def test_reload_sees_a_rewrite_that_stat_cannot_see(
    path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Two same-size writes within one coarse mtime tick can leave stat unchanged; simulate it.
    monkeypatch.setattr(apikey, "_signature", lambda st: (0, 0, 0, 0, 0))
    _, record = create_key(path, "alice")
    store = ApiKeyStore.load(path)
    path.write_text(path.read_text().replace('"alice"', '"alicf"'))
    # The file is young, so its content is compared too.
    assert store.reload_if_changed() is True
    entry = store.lookup(record.id)
    assert entry is not None
    assert entry.record.principal == "alicf"
    assert store.reload_if_changed() is False
    # Once the file is old, stat alone decides (and here it says: unchanged).
    monkeypatch.setattr(apikey, "_RACY_SECONDS", 0.0)
    path.write_text(path.read_text().replace('"alicf"', '"alicg"'))
    assert store.reload_if_changed() is False


async def test_invalid_new_content_keeps_the_last_good_keys(
    path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    key, _ = create_key(path, "alice")
    store = ApiKeyStore.load(path)
    auth = ApiKeyAuthenticator(store)
    good = raw_file(path)
    bad = json.loads(json.dumps(good))
    bad["keys"][0]["principal"] = ""
    write_raw(path, bad)
    with caplog.at_level(logging.ERROR):
        assert store.reload_if_changed() is False
        assert store.reload_if_changed() is False
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1  # reported once, not on every poll
    assert "keys[0].principal" in errors[0].getMessage()
    assert good["keys"][0]["hash"] not in caplog.text
    assert isinstance(await authn(auth, bearer(key)), Identity)
    # Once fixed, the file loads again.
    write_raw(path, good)
    assert store.reload_if_changed() is True


async def test_file_removed_at_runtime_means_no_keys(path: Path) -> None:
    key, _ = create_key(path, "alice")
    store = ApiKeyStore.load(path)
    auth = ApiKeyAuthenticator(store)
    assert isinstance(await authn(auth, bearer(key)), Identity)
    path.unlink()
    assert store.reload_if_changed() is True
    assert failure_reason(await authn(auth, bearer(key))) == "unknown_key"


async def test_watch_reloads_until_cancelled(path: Path) -> None:
    create_key(path, "alice")
    store = ApiKeyStore.load(path)
    auth = ApiKeyAuthenticator(store)
    task = asyncio.create_task(store.watch(interval_seconds=0.01))
    new_key, _ = create_key(path, "bob")
    for _ in range(200):
        if isinstance(await authn(auth, bearer(new_key)), Identity):
            break
        await asyncio.sleep(0.01)
    else:
        pytest.fail("the watcher did not load the new key")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_watch_survives_reload_errors(
    path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    store = ApiKeyStore.load(path)
    calls = 0

    def broken() -> bool:
        nonlocal calls
        calls += 1
        raise PermissionError("denied")

    monkeypatch.setattr(store, "reload_if_changed", broken)
    task = asyncio.create_task(store.watch(interval_seconds=0.001))
    while calls < 5:
        await asyncio.sleep(0.001)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert caplog.text.count("reload failed") == 1


# --- the authenticator ------------------------------------------------------------------------


async def test_success_yields_the_identity(path: Path, clock: Clock) -> None:
    not_after = T0 + timedelta(days=30)
    key, record = create_key(
        path,
        "alice",
        tenant="acme",
        roles=["reader", "writer"],
        not_before=T0 - timedelta(days=1),
        not_after=not_after,
        metadata={"team": "ml"},
    )
    auth = ApiKeyAuthenticator(ApiKeyStore.load(path), clock=clock)
    assert auth.method == "api_key"
    identity = await authn(auth, bearer(key))
    assert identity == Identity(
        principal="alice",
        method="api_key",
        tenant="acme",
        roles=frozenset({"reader", "writer"}),
        scopes=frozenset(),
        claims={"team": "ml"},
        credential_header="authorization",
        expires_at=not_after.timestamp(),
        credential_id=record.id,
    )
    with pytest.raises(TypeError):
        identity.claims["team"] = "other"  # read-only


async def test_key_without_end_has_no_expiry(path: Path) -> None:
    key, _ = create_key(path, "alice")
    identity = await authn(ApiKeyAuthenticator(ApiKeyStore.load(path)), bearer(key))
    assert isinstance(identity, Identity)
    assert identity.expires_at is None


async def test_configured_header_carries_a_key(path: Path) -> None:
    key, _ = create_key(path, "alice")
    auth = ApiKeyAuthenticator(ApiKeyStore.load(path), header="X-API-Key")
    identity = await authn(auth, {"x-api-key": key})
    assert isinstance(identity, Identity)
    assert identity.credential_header == "x-api-key"
    assert failure_reason(await authn(auth, {"x-api-key": "not-a-key"})) == "malformed_key"


async def test_unconfigured_header_is_ignored(path: Path) -> None:
    key, _ = create_key(path, "alice")
    auth = ApiKeyAuthenticator(ApiKeyStore.load(path))
    assert await authn(auth, {"x-api-key": key}) is None


async def test_key_in_two_headers_is_refused(path: Path) -> None:
    key, _ = create_key(path, "alice")
    auth = ApiKeyAuthenticator(ApiKeyStore.load(path), header="x-api-key")
    outcome = await authn(auth, {**bearer(key), "x-api-key": key})
    assert failure_reason(outcome) == "ambiguous_key"


def test_authorization_cannot_be_the_extra_header(path: Path) -> None:
    with pytest.raises(ValueError, match="Authorization"):
        ApiKeyAuthenticator(ApiKeyStore.load(path), header="Authorization")


JWT = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJhbGljZSJ9.c2lnbmF0dXJl"


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"authorization": f"Bearer {JWT}"},
        {"authorization": "Basic YWxpY2U6c2VjcmV0"},
        {"authorization": "Bearer"},
        {"authorization": "Bearer " + "x" * 10_000},  # a long JWT is not ours either
        {"x-api-key": ""},
    ],
)
async def test_no_api_key_means_none(path: Path, headers: dict[str, str]) -> None:
    create_key(path, "alice")
    auth = ApiKeyAuthenticator(ApiKeyStore.load(path), header="x-api-key")
    assert await authn(auth, headers) is None


@pytest.mark.parametrize(
    "token",
    [
        "gk_",
        "gk_short_secret",
        "gk_abcdefghijkl_" + "a" * 42,
        "gk_abcdefghijkl_" + "a" * 43 + ", gk_abcdefghijkl_" + "a" * 43,  # joined duplicates
        "gk_" + "a" * (MAX_KEY_LENGTH + 1),
    ],
)
async def test_malformed_key(path: Path, token: str) -> None:
    auth = ApiKeyAuthenticator(ApiKeyStore.load(path))
    outcome = await authn(auth, bearer(token))
    assert failure_reason(outcome) == "malformed_key"
    assert isinstance(outcome, AuthnFailure)
    assert outcome.credential_header == "authorization"


async def test_oversized_key_is_rejected_before_any_work(
    path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    auth = ApiKeyAuthenticator(ApiKeyStore.load(path), header="x-api-key")

    def must_not_run(*_: Any) -> Any:
        raise AssertionError("parsed or hashed an oversized key")

    monkeypatch.setattr(apikey, "parse_key_id", must_not_run)
    monkeypatch.setattr("extproc.authn.apikey.hashlib.sha256", must_not_run)
    outcome = await authn(auth, {"x-api-key": "gk_" + "a" * 1_000_000})
    assert failure_reason(outcome) == "malformed_key"


async def test_unknown_key(path: Path) -> None:
    create_key(path, "alice")
    auth = ApiKeyAuthenticator(ApiKeyStore.load(path))
    _, other = generate_key()
    assert failure_reason(await authn(auth, bearer(other))) == "unknown_key"


async def test_wrong_secret(path: Path) -> None:
    _, record = create_key(path, "alice")
    auth = ApiKeyAuthenticator(ApiKeyStore.load(path))
    _, other = generate_key()
    forged = f"gk_{record.id}_{other.split('_', 2)[2]}"
    outcome = await authn(auth, bearer(forged))
    assert failure_reason(outcome) == "bad_secret"
    unknown = await authn(auth, bearer(other))
    # The client cannot tell an unknown id from a wrong secret.
    assert isinstance(outcome, AuthnFailure)
    assert isinstance(unknown, AuthnFailure)
    assert outcome.detail == unknown.detail


async def test_tampered_hash_in_the_file_rejects_the_key(path: Path) -> None:
    key, _ = create_key(path, "alice")
    data = raw_file(path)
    data["keys"][0]["hash"] = b64(b"\x00" * 32)
    write_raw(path, data)
    auth = ApiKeyAuthenticator(ApiKeyStore.load(path))
    assert failure_reason(await authn(auth, bearer(key))) == "bad_secret"


async def test_hash_copied_to_another_id_does_not_verify(path: Path) -> None:
    key_a, rec_a = create_key(path, "alice")
    _, rec_b = create_key(path, "mallory")
    data = raw_file(path)
    # Give mallory's record alice's salt and hash: alice's secret must still not work for it.
    data["keys"][1].update(salt=data["keys"][0]["salt"], hash=data["keys"][0]["hash"])
    write_raw(path, data)
    auth = ApiKeyAuthenticator(ApiKeyStore.load(path))
    spliced = f"gk_{rec_b.id}_{key_a.split('_', 2)[2]}"
    assert failure_reason(await authn(auth, bearer(spliced))) == "bad_secret"
    assert rec_a.id != rec_b.id


async def test_revoked_key(path: Path) -> None:
    key, record = create_key(path, "alice")
    revoked, changed = revoke_key(path, record.id)
    assert (revoked.id, revoked.revoked, changed) == (record.id, True, True)
    assert revoke_key(path, record.id)[1] is False  # idempotent
    with pytest.raises(apikey.ApiKeyError, match="no key with id"):
        revoke_key(path, "zzzzzzzzzzzz")
    auth = ApiKeyAuthenticator(ApiKeyStore.load(path))
    assert failure_reason(await authn(auth, bearer(key))) == "key_revoked"


async def test_state_is_not_revealed_without_the_secret(path: Path) -> None:
    _, record = create_key(path, "alice")
    revoke_key(path, record.id)
    auth = ApiKeyAuthenticator(ApiKeyStore.load(path))
    _, other = generate_key()
    forged = f"gk_{record.id}_{other.split('_', 2)[2]}"
    assert failure_reason(await authn(auth, bearer(forged))) == "bad_secret"


async def test_validity_window_boundaries(path: Path, clock: Clock) -> None:
    not_before, not_after = T0, T0 + timedelta(days=1)
    key, _ = create_key(path, "alice", not_before=not_before, not_after=not_after)
    auth = ApiKeyAuthenticator(ApiKeyStore.load(path), clock=clock)
    clock.now = not_before.timestamp() - 1
    assert failure_reason(await authn(auth, bearer(key))) == "key_not_yet_valid"
    clock.now = not_before.timestamp()  # not_before <= now
    assert isinstance(await authn(auth, bearer(key)), Identity)
    clock.now = not_after.timestamp() - 0.001
    assert isinstance(await authn(auth, bearer(key)), Identity)
    clock.now = not_after.timestamp()  # now < not_after
    assert failure_reason(await authn(auth, bearer(key))) == "key_expired"


# --- rotation and caching ---------------------------------------------------------------------


async def test_rotation_without_downtime(path: Path, clock: Clock) -> None:
    old_key, old = create_key(path, "svc", roles=["r"], not_after=T0 + timedelta(days=10))
    store = ApiKeyStore.load(path)
    auth = ApiKeyAuthenticator(store, clock=clock)
    # Rotate: a second key for the same principal; both work during the overlap.
    new_key, new = create_key(path, "svc", roles=["r"], not_after=T0 + timedelta(days=100))
    store.reload_if_changed()
    for key, record in ((old_key, old), (new_key, new)):
        identity = await authn(auth, bearer(key))
        assert isinstance(identity, Identity)
        assert (identity.principal, identity.credential_id) == ("svc", record.id)
    # The old key expires: rejected, while the new one keeps working.
    clock.advance(days=10)
    assert failure_reason(await authn(auth, bearer(old_key))) == "key_expired"
    assert isinstance(await authn(auth, bearer(new_key)), Identity)
    # Or it is revoked before its end.
    clock.now = T0.timestamp()
    revoke_key(path, old.id)
    store.reload_if_changed()
    assert failure_reason(await authn(auth, bearer(old_key))) == "key_revoked"
    assert isinstance(await authn(auth, bearer(new_key)), Identity)


async def test_cache_skips_the_hash_but_respects_revocation(
    path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    key, record = create_key(path, "alice")
    store = ApiKeyStore.load(path)
    auth = ApiKeyAuthenticator(store)
    assert isinstance(await authn(auth, bearer(key)), Identity)
    hashes = 0
    real = apikey.hash_key

    def counting(salt: bytes, k: str) -> bytes:
        nonlocal hashes
        hashes += 1
        return real(salt, k)

    monkeypatch.setattr(apikey, "hash_key", counting)
    assert isinstance(await authn(auth, bearer(key)), Identity)
    assert hashes == 0  # served from the cache
    revoke_key(path, record.id)
    store.reload_if_changed()
    assert failure_reason(await authn(auth, bearer(key))) == "key_revoked"
    assert hashes == 1  # the reload dropped the cache


async def test_cache_respects_expiry(path: Path, clock: Clock) -> None:
    key, _ = create_key(path, "alice", not_after=T0 + timedelta(hours=1))
    auth = ApiKeyAuthenticator(ApiKeyStore.load(path), clock=clock)
    assert isinstance(await authn(auth, bearer(key)), Identity)
    clock.advance(hours=1)
    assert failure_reason(await authn(auth, bearer(key))) == "key_expired"


async def test_cache_is_bounded(path: Path) -> None:
    keys = [create_key(path, f"u{i}")[0] for i in range(5)]
    auth = ApiKeyAuthenticator(ApiKeyStore.load(path), cache_size=2)
    for key in keys:
        assert isinstance(await authn(auth, bearer(key)), Identity)
    assert len(auth._cache) == 2
    no_cache = ApiKeyAuthenticator(ApiKeyStore.load(path), cache_size=0)
    assert isinstance(await authn(no_cache, bearer(keys[0])), Identity)


async def test_cache_never_holds_a_bad_secret(path: Path) -> None:
    _, record = create_key(path, "alice")
    auth = ApiKeyAuthenticator(ApiKeyStore.load(path))
    _, other = generate_key()
    forged = f"gk_{record.id}_{other.split('_', 2)[2]}"
    for _ in range(2):
        assert failure_reason(await authn(auth, bearer(forged))) == "bad_secret"
    assert auth._cache == {}


# --- no key material in logs ------------------------------------------------------------------


async def test_nothing_logs_keys_secrets_or_hashes(
    path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    key, record = create_key(path, "alice")
    store = ApiKeyStore.load(path)
    auth = ApiKeyAuthenticator(store, header="x-api-key")
    _, other = generate_key()
    forged = f"gk_{record.id}_{other.split('_', 2)[2]}"
    for headers in (bearer(key), bearer(forged), {"x-api-key": key}, bearer(other)):
        await authn(auth, headers)
    revoke_key(path, record.id)
    store.reload_if_changed()
    data = raw_file(path)
    data["keys"][0]["bogus"] = data["keys"][0]["hash"]
    write_raw(path, data)
    store.reload_if_changed()
    assert caplog.records  # something was logged, and none of it is secret
    for secret in (key, key.split("_", 2)[2], forged, other, record.hash, record.salt):
        assert secret not in caplog.text


def test_record_round_trips_through_the_file(path: Path) -> None:
    _, record = create_key(path, "alice", tenant="t", roles=["a"], metadata={"x": [1, 2]})
    write_key_file(path, [record])
    assert read_key_file(path) == [record]
    assert ApiKeyRecord.model_validate_json(record.model_dump_json()) == record


def test_bad_arguments_to_create_key_are_clear_errors(path: Path) -> None:
    for kwargs in (
        {"principal": ""},
        {"principal": "a\r\nx-admin: 1"},
        {"principal": "a", "roles": ["has space"]},
        {"principal": "a", "not_after": datetime(2030, 1, 1)},  # naive
    ):
        with pytest.raises(apikey.ApiKeyError):
            create_key(path, **kwargs)
    assert not path.exists()
