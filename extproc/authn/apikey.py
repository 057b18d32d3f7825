"""API keys: the key format, how keys are hashed and stored, and the authenticator.

A key looks like `gk_<id>_<secret>`:

* `gk_` marks the token as ours, so a Bearer JWT is never mistaken for an API key;
* `<id>` is 12 random lower-case base32 characters (60 bits). It is public: it names the key in
  the store (one dictionary lookup), in `keys list` and in audit records;
* `<secret>` is 32 random bytes, base64url without padding (43 characters).

The store file holds, per key id, only an HMAC of the full key. The full key is shown once by
`keys create` and is never stored or logged. Nothing in this module logs keys, secrets or hashes.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import fcntl
import hashlib
import hmac
import logging
import os
import re
import secrets
import stat
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import MappingProxyType
from typing import Annotated, Any, Final, Literal

from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    JsonValue,
    ValidationError,
    model_validator,
)

from extproc.authn.base import (
    AuthMethod,
    AuthnFailure,
    AuthnOutcome,
    Identity,
    PeerCertificate,
    bearer_token,
)

log = logging.getLogger(__name__)

KEY_PREFIX = "gk"
KEY_ID_LENGTH = 12
KEY_SECRET_BYTES = 32
# Lower-case RFC 4648 base32: unambiguous to read aloud and safe in any log or URL.
_ID_ALPHABET = "abcdefghijklmnopqrstuvwxyz234567"
_KEY_RE = re.compile(
    rf"{KEY_PREFIX}_(?P<id>[a-z2-7]{{{KEY_ID_LENGTH}}})_[A-Za-z0-9_-]{{43}}", re.ASCII
)
_ID_PATTERN = rf"^[a-z2-7]{{{KEY_ID_LENGTH}}}$"
# A real key is 59 characters. Anything much longer is rejected before parsing or hashing, so
# a hostile header costs nothing.
MAX_KEY_LENGTH = 256

HASH_ALG: Final = "hmac-sha256"
_SALT_BYTES = 16
FILE_VERSION: Final = 1


class ApiKeyError(ValueError):
    """A user-facing problem with API keys or their store; the message is safe to print."""


class ApiKeyFileError(ApiKeyError):
    """The store file has invalid content. The message names the file and the field."""


# ---------------------------------------------------------------------------------------------
# Key format and hashing


def generate_key() -> tuple[str, str]:
    """A new random key: (key id, full key)."""
    key_id = "".join(secrets.choice(_ID_ALPHABET) for _ in range(KEY_ID_LENGTH))
    secret = secrets.token_urlsafe(KEY_SECRET_BYTES)  # base64url, no padding
    return key_id, f"{KEY_PREFIX}_{key_id}_{secret}"


def parse_key_id(key: str) -> str | None:
    """The key id of a well-formed key, or None if `key` does not have the key shape."""
    match = _KEY_RE.fullmatch(key)
    return match.group("id") if match else None


def looks_like_api_key(token: str) -> bool:
    """Whether a token claims to be one of our keys (well-formed or not)."""
    return token.startswith(KEY_PREFIX + "_")


def hash_key(salt: bytes, key: str) -> bytes:
    """HMAC-SHA256 of the full key under a per-key random salt.

    A fast hash is right here, unlike for passwords: the secret has 256 random bits, so even
    billions of guesses per second never find it, and a slow KDF (bcrypt, argon2) would only
    add milliseconds to every request. The salt keeps equal keys from having equal hashes and
    rules out precomputed tables. Hashing the full key (not just the secret) binds the hash to
    its key id, so a hash copied to another record does not verify.
    """
    return hmac.digest(salt, key.encode("ascii"), hashlib.sha256)


def _b64encode(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def _b64decode(text: str) -> bytes:
    padded = text + "=" * (-len(text) % 4)
    try:
        return base64.urlsafe_b64decode(padded.encode("ascii"))
    except (binascii.Error, UnicodeEncodeError) as exc:
        raise ValueError("not base64url") from exc


# ---------------------------------------------------------------------------------------------
# Store file schema


def _check_b64(length: int) -> Callable[[str], str]:
    def check(value: str) -> str:
        if len(_b64decode(value)) != length:
            raise ValueError(f"must be {length} bytes, base64url-encoded")
        return value

    return check


def _no_control_chars(value: str) -> str:
    # These values can end up in upstream headers and audit lines: no CR/LF injection.
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in value):
        raise ValueError("must not contain control characters")
    if value != value.strip():
        raise ValueError("must not start or end with whitespace")
    return value


def _valid_role(value: str) -> str:
    # Roles may be joined with commas in headers, so a role must not contain one.
    if not value or any(c.isspace() or c == "," for c in value):
        raise ValueError("must be non-empty, without whitespace or commas")
    return _no_control_chars(value)


Name = Annotated[str, Field(min_length=1, max_length=256), AfterValidator(_no_control_chars)]
Role = Annotated[str, Field(max_length=128), AfterValidator(_valid_role)]


KeyStatus = Literal["active", "revoked", "expired", "not_yet_valid"]


def key_status(
    revoked: bool, not_before: float | None, not_after: float | None, now: float
) -> KeyStatus:
    """A key is valid only when not revoked and not_before <= now < not_after."""
    if revoked:
        return "revoked"
    if not_before is not None and now < not_before:
        return "not_yet_valid"
    if not_after is not None and now >= not_after:
        return "expired"
    return "active"


class ApiKeyRecord(BaseModel):
    """One key as stored. It holds a hash of the key, never the key itself."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: Annotated[str, Field(pattern=_ID_PATTERN)]
    alg: Literal["hmac-sha256"] = HASH_ALG
    salt: Annotated[str, AfterValidator(_check_b64(_SALT_BYTES))]
    hash: Annotated[str, AfterValidator(_check_b64(32))]
    principal: Name
    tenant: Name | None = None
    roles: tuple[Role, ...] = ()
    not_before: AwareDatetime | None = None
    not_after: AwareDatetime | None = None
    created_at: AwareDatetime
    revoked: bool = False
    description: Annotated[str, Field(max_length=1024), AfterValidator(_no_control_chars)] = ""
    metadata: dict[str, JsonValue] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _window_is_not_empty(self) -> ApiKeyRecord:
        if self.not_before and self.not_after and self.not_after <= self.not_before:
            raise ValueError("not_after must be later than not_before")
        return self

    def status(self, now: float) -> KeyStatus:
        """The state of the key at unix time `now`; only "active" keys authenticate."""
        return key_status(
            self.revoked,
            self.not_before.timestamp() if self.not_before else None,
            self.not_after.timestamp() if self.not_after else None,
            now,
        )


class ApiKeyFile(BaseModel):
    """The whole store file: `{"version": 1, "keys": [...]}`."""

    model_config = ConfigDict(extra="forbid")

    version: Literal[1]
    keys: list[ApiKeyRecord] = Field(default_factory=list)

    @model_validator(mode="after")
    def _ids_are_unique(self) -> ApiKeyFile:
        seen: set[str] = set()
        for record in self.keys:
            if record.id in seen:
                raise ValueError(f"duplicate key id {record.id}")
            seen.add(record.id)
        return self


def _describe(exc: ValidationError) -> str:
    """Field paths and messages only: pydantic's own str() would echo input values (hashes)."""
    parts = []
    for error in exc.errors(include_url=False, include_input=False)[:3]:
        where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in error["loc"])
        parts.append(f"{where.lstrip('.') or '(top level)'}: {error['msg']}")
    more = exc.error_count() - len(parts)
    return "; ".join(parts) + (f" (and {more} more)" if more > 0 else "")


def parse_key_file(path: Path, content: bytes) -> list[ApiKeyRecord]:
    """Validated records from the bytes of a store file; ApiKeyFileError names file and field."""
    try:
        return ApiKeyFile.model_validate_json(content).keys
    except ValidationError as exc:
        raise ApiKeyFileError(f"{path}: invalid API key file: {_describe(exc)}") from None


def read_key_file(path: str | os.PathLike[str]) -> list[ApiKeyRecord]:
    """The records of a store file; a missing file is an empty store."""
    path = Path(path)
    try:
        content = path.read_bytes()
    except FileNotFoundError:
        return []
    return parse_key_file(path, content)


def write_key_file(path: str | os.PathLike[str], records: Iterable[ApiKeyRecord]) -> None:
    """Replace the store file atomically, mode 0600.

    The temporary file is in the same directory, so os.replace is an atomic rename: a reader
    (the server's reload) sees either the old or the new file, never a half-written one.
    """
    path = Path(path)
    content = ApiKeyFile(version=FILE_VERSION, keys=list(records)).model_dump_json(indent=2)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o600)  # mkstemp already does, but do not depend on it
            f.write(content.encode("utf-8") + b"\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    # Makes the rename itself durable; a revocation must survive a crash.
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Serialise read-modify-write of the store, so two CLI runs never lose an update.

    The lock is on a sibling file because the store file itself is replaced on every write.
    """
    fd = os.open(f"{path}.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # also releases the lock


# ---------------------------------------------------------------------------------------------
# Key management (used by the CLI and the demo launcher)


def _utc_now() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)


def create_key(
    path: str | os.PathLike[str],
    principal: str,
    tenant: str | None = None,
    roles: Iterable[str] = (),
    not_before: datetime | None = None,
    not_after: datetime | None = None,
    description: str = "",
    *,
    metadata: Mapping[str, JsonValue] | None = None,
) -> tuple[str, ApiKeyRecord]:
    """Create a key, store its hash in `path`, and return (full key, stored record).

    The full key exists only in the return value: show it to the user once and forget it.
    """
    path = Path(path)
    with _locked(path):
        records = read_key_file(path)
        taken = {r.id for r in records}
        key_id, key = generate_key()
        while key_id in taken:  # 60 random bits: never in practice, but cheap to rule out
            key_id, key = generate_key()
        salt = secrets.token_bytes(_SALT_BYTES)
        try:
            record = ApiKeyRecord(
                id=key_id,
                salt=_b64encode(salt),
                hash=_b64encode(hash_key(salt, key)),
                principal=principal,
                tenant=tenant,
                roles=tuple(roles),
                not_before=not_before,
                not_after=not_after,
                created_at=_utc_now(),
                description=description,
                metadata=dict(metadata or {}),
            )
        except ValidationError as exc:
            raise ApiKeyError(_describe(exc)) from None
        write_key_file(path, [*records, record])
    return key, record


def revoke_key(path: str | os.PathLike[str], key_id: str) -> tuple[ApiKeyRecord, bool]:
    """Mark a key revoked: (its record, whether it was active before). Idempotent.

    The record stays in the file, so audit records naming its id can still be explained.
    """
    path = Path(path)
    with _locked(path):
        records = read_key_file(path)
        for i, record in enumerate(records):
            if record.id == key_id:
                if record.revoked:
                    return record, False
                records[i] = record.model_copy(update={"revoked": True})
                write_key_file(path, records)
                return records[i], True
    raise ApiKeyError(f"no key with id {key_id!r} in {path}")


# ---------------------------------------------------------------------------------------------
# The store the server reads


@dataclass(frozen=True, slots=True)
class KeyEntry:
    """A stored key, decoded once at load so that verification does no parsing."""

    record: ApiKeyRecord
    salt: bytes
    digest: bytes
    not_before: float | None
    not_after: float | None
    roles: frozenset[str]
    claims: Mapping[str, Any]

    @classmethod
    def from_record(cls, record: ApiKeyRecord) -> KeyEntry:
        return cls(
            record=record,
            salt=_b64decode(record.salt),
            digest=_b64decode(record.hash),
            not_before=record.not_before.timestamp() if record.not_before else None,
            not_after=record.not_after.timestamp() if record.not_after else None,
            roles=frozenset(record.roles),
            claims=MappingProxyType(dict(record.metadata)),
        )

    def matches(self, key: str) -> bool:
        # Constant-time: the time taken must not tell how many leading bytes were right.
        return hmac.compare_digest(hash_key(self.salt, key), self.digest)


# (device, inode, size, mtime, ctime): any write, including os.replace, changes one of them.
_Signature = tuple[int, int, int, int, int]

# File systems stamp mtime from a coarse clock (a few ms on Linux). Two writes within one tick,
# of equal size, can look unchanged by stat alone; while the file is that young, compare its
# content too (the "racy git" problem). Older files are judged by stat alone.
_RACY_SECONDS = 2.0


def _signature(st: os.stat_result) -> _Signature:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


class ApiKeyStore:
    """The keys the server accepts, reloaded from the store file when it changes.

    Only this process's event loop thread calls reload_if_changed (via watch), so a reload and
    an authentication never interleave and no lock is needed.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._entries: dict[str, KeyEntry] = {}
        self._signature: _Signature | None = None
        self._seen_digest = b""  # of the content last parsed, valid or not
        self._warned_missing = False
        # Bumped on every content change; authenticators drop their caches when it moves.
        self.generation = 0

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> ApiKeyStore:
        """Load the store. Invalid content raises ApiKeyFileError: start-up must fail loudly."""
        store = cls(path)
        store._reload(strict=True)
        return store

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, key_id: str) -> KeyEntry | None:
        return self._entries.get(key_id)

    @property
    def records(self) -> tuple[ApiKeyRecord, ...]:
        return tuple(e.record for e in self._entries.values())

    def reload_if_changed(self) -> bool:
        """Reload if the file changed since the last look; True when the keys changed.

        Cheap when nothing changed: one stat. Invalid new content is logged (without any key
        material) and the last good keys stay in force.
        """
        return self._reload(strict=False)

    async def watch(self, interval_seconds: float = 1.0) -> None:
        """Poll the file every `interval_seconds` until cancelled."""
        last_error = ""
        while True:
            await asyncio.sleep(interval_seconds)
            try:
                self.reload_if_changed()
                last_error = ""
            except Exception as exc:  # keep watching whatever happens; old keys stay in force
                # Typically an OSError (permissions); report each distinct error once.
                if repr(exc) != last_error:
                    log.error("API key store %s: reload failed: %s", self.path, exc)
                    last_error = repr(exc)

    def _reload(self, *, strict: bool) -> bool:
        try:
            if not self._changed(os.stat(self.path)):
                return False  # the common case: a single stat
            with open(self.path, "rb") as f:
                # Stat the file we read, before reading: if a writer changes it meanwhile,
                # the next poll sees a new signature and reads again.
                st = os.fstat(f.fileno())
                signature = _signature(st)
                content = f.read()
        except FileNotFoundError:
            return self._missing()
        self._warned_missing = False
        self._signature = signature
        digest = hashlib.sha256(content).digest()
        if digest == self._seen_digest:
            return False
        self._seen_digest = digest
        try:
            records = parse_key_file(self.path, content)
        except ApiKeyFileError as exc:
            if strict:
                raise
            # The message holds field paths only, never values. The bad content is remembered,
            # so it is reported once, not on every poll.
            log.error("%s; keeping the %d keys loaded before", exc, len(self._entries))
            return False
        self._install(records)
        self._warn_if_readable(st)
        log.info("API key store %s: loaded %d keys", self.path, len(records))
        return True

    def _changed(self, st: os.stat_result) -> bool:
        young = time.time() - st.st_mtime < _RACY_SECONDS
        return young or _signature(st) != self._signature

    def _missing(self) -> bool:
        if not self._warned_missing:
            log.warning("API key store %s does not exist; no API key is accepted", self.path)
            self._warned_missing = True
        self._signature = None
        self._seen_digest = b""
        if not self._entries:
            return False
        self._install([])
        return True

    def _install(self, records: list[ApiKeyRecord]) -> None:
        self._entries = {r.id: KeyEntry.from_record(r) for r in records}
        self.generation += 1

    def _warn_if_readable(self, st: os.stat_result) -> None:
        if stat.S_IMODE(st.st_mode) & 0o077:
            log.warning(
                "API key store %s is accessible to group or others (mode %o); use 0600",
                self.path,
                stat.S_IMODE(st.st_mode),
            )


# ---------------------------------------------------------------------------------------------
# The authenticator


def _failure(reason: str, detail: str, header: str) -> AuthnFailure:
    return AuthnFailure(method="api_key", reason=reason, detail=detail, credential_header=header)


_INVALID = "the API key is not valid"


class ApiKeyAuthenticator:
    """Authenticates `Authorization: Bearer gk_...` and, if configured, a dedicated header.

    Keys are read from headers only, never from the query string: URLs end up in access logs,
    browser history and proxies. (This class is only given headers, so it could not anyway.)

    Checks run in this order: shape, key id, secret, then revocation and validity. The secret
    is verified before the key's state is reported, so knowing a key id (which is public)
    does not reveal whether that key is revoked or expired.
    """

    def __init__(
        self,
        store: ApiKeyStore,
        *,
        header: str | None = None,
        clock: Callable[[], float] = time.time,
        cache_size: int = 10_000,
    ) -> None:
        if header is not None and header.lower() == "authorization":
            raise ValueError("the Authorization header is always read; configure another one")
        self._store = store
        self._header = header.lower() if header else None
        self._clock = clock
        self._cache_size = cache_size
        # sha256(full key) -> entry whose secret was verified. Keyed by a digest so that no
        # key is kept in memory; state (revoked, validity) is checked again on every hit.
        self._cache: dict[bytes, KeyEntry] = {}
        self._cache_generation = store.generation

    @property
    def method(self) -> AuthMethod:
        return "api_key"

    async def authenticate(
        self, headers: Mapping[str, str], peer: PeerCertificate | None = None
    ) -> AuthnOutcome:
        found = self._credential(headers)
        if found is None or isinstance(found, AuthnFailure):
            return found
        key, header = found
        return self.verify(key, header)

    def _credential(self, headers: Mapping[str, str]) -> tuple[str, str] | AuthnFailure | None:
        """(key, header name) of the API key in the request, a failure, or None if there is none.

        A Bearer token is ours only if it starts with `gk_`; anything else (a JWT) is left to
        the other authenticators. A configured dedicated header is ours whatever it holds.
        """
        token = bearer_token(headers)
        from_bearer = token if token is not None and looks_like_api_key(token) else None
        from_header = headers.get(self._header) if self._header else None
        if from_header is not None:
            from_header = from_header.strip()
        if from_bearer and from_header:
            # Only one header is stripped before the request goes upstream; the other key
            # would leak. Refuse rather than choose.
            return _failure("ambiguous_key", "send the API key in one header only", "authorization")
        if from_bearer:
            return from_bearer, "authorization"
        if from_header and self._header:
            return from_header, self._header
        return None

    def verify(self, key: str, header: str = "authorization") -> Identity | AuthnFailure:
        """Verify one presented key; `header` is the header that carried it."""
        if len(key) > MAX_KEY_LENGTH:
            return _failure("malformed_key", "the API key is malformed", header)
        if self._cache_generation != self._store.generation:
            self._cache.clear()  # revocations and expiry changes take effect at once
            self._cache_generation = self._store.generation
        cache_key = hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()
        entry = self._cache.get(cache_key)
        if entry is None:
            key_id = parse_key_id(key)
            if key_id is None:
                return _failure("malformed_key", "the API key is malformed", header)
            entry = self._store.lookup(key_id)
            if entry is None:
                return _failure("unknown_key", _INVALID, header)
            if not entry.matches(key):
                return _failure("bad_secret", _INVALID, header)
            self._remember(cache_key, entry)
        return self._admit(entry, header)

    def _remember(self, cache_key: bytes, entry: KeyEntry) -> None:
        if self._cache_size <= 0:
            return
        if len(self._cache) >= self._cache_size:
            del self._cache[next(iter(self._cache))]  # oldest first
        self._cache[cache_key] = entry

    def _admit(self, entry: KeyEntry, header: str) -> Identity | AuthnFailure:
        status = key_status(entry.record.revoked, entry.not_before, entry.not_after, self._clock())
        if status == "revoked":
            return _failure("key_revoked", "the API key has been revoked", header)
        if status == "expired":
            return _failure("key_expired", "the API key has expired", header)
        if status == "not_yet_valid":
            return _failure("key_not_yet_valid", "the API key is not valid yet", header)
        record = entry.record
        return Identity(
            principal=record.principal,
            method="api_key",
            tenant=record.tenant,
            roles=entry.roles,
            claims=entry.claims,
            credential_header=header,
            expires_at=entry.not_after,
            credential_id=record.id,
        )
