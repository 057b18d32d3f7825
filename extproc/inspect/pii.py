"""Finding personal data and secrets in text: which spans hold which type of value.

Hyperscan proposes candidates, one pattern per type kept separate (a combined alternation drops
another type's overlapping hit when the winner then fails validation); Python validates each
candidate (Luhn, mod-97, octet ranges, the characters around it), and `merge` keeps a
non-overlapping set. A database is compiled once per set of enabled types: `scanner_for` caches
it, so a policy reload with the same types does not compile again.

Only ASCII forms are recognised. The text is scanned with every non-ASCII character replaced
by "?", one byte per character: no pattern matches "?" or a non-ASCII byte, so matches are the
same as on UTF-8 bytes, and offsets stay character offsets without a byte-to-character map.
Lone surrogates (JSON may carry them) become "?" the same way.
"""

from __future__ import annotations

import base64
import binascii
import bisect
import ipaddress
import re
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from functools import lru_cache
from types import MappingProxyType
from typing import TypeAlias

import hyperscan
import orjson

PII_TYPES: tuple[str, ...] = (
    "email",
    "phone",
    "card",
    "ssn",
    "iban",
    "ipv4",
    "ipv6",
    "aws_access_key",
    "aws_secret_key",
    "gcp_api_key",
    "github_token",
    "slack_token",
    "openai_key",
    "stripe_key",
    "private_key",
    "jwt",
)
# The label a masked value shows ("[EMAIL]"): the type's name in capitals.
PII_LABELS: Mapping[str, str] = MappingProxyType({t: t.upper() for t in PII_TYPES})
SECRET_TYPES = frozenset(
    {
        "aws_access_key",
        "aws_secret_key",
        "gcp_api_key",
        "github_token",
        "slack_token",
        "openai_key",
        "stripe_key",
        "private_key",
        "jwt",
    }
)

# How far past an unterminated or long private key body a finding may reach (an RSA 8192-bit
# PEM is about 6,400 characters).
PEM_BODY_CHARS = 8192
# Validation reads at most this many characters after a candidate (".5" after "1.2.3.4").
RIGHT_CONTEXT = 2
# ... and at most this many before it ("1." before "2.3.4.5"), except that a value without
# whitespace may look further back within its own run of non-whitespace.
LEFT_CONTEXT = 2


@dataclass(frozen=True, slots=True)
class Finding:
    """A value of `type` at `text[start:end]` (character offsets into the scanned str)."""

    type: str
    start: int
    end: int


# A validator gets the text and a candidate span; it returns the span of the value (possibly
# trimmed or extended), or None to reject the candidate.
_Check: TypeAlias = Callable[[str, int, int], tuple[int, int] | None]

_DIGIT = frozenset("0123456789")
_ALNUM = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789")
_WORD = _ALNUM | {"_"}
_LOCAL = _ALNUM | set("._%+-")
_UPPER = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZ")
_LOWER = frozenset("abcdefghijklmnopqrstuvwxyz")
_B64 = _ALNUM | {"+", "/"}
_B64URL = _ALNUM | {"_", "-"}
_SLACK = _ALNUM | {"-"}
_NUMBER_JOINERS = frozenset("-./,")
_PHONE_JOINERS = frozenset("-./_")


def _at(text: str, i: int) -> str:
    """The character at `i`, or "" outside the text (so membership tests read as False)."""
    return text[i] if 0 <= i < len(text) else ""


def _joined(text: str, start: int, end: int) -> bool:
    """Whether the span is part of a longer number ("1.2.3.4.5", "123-45-6789-0")."""
    before = _at(text, start - 1) in _NUMBER_JOINERS and _at(text, start - 2) in _DIGIT
    after = _at(text, end) in _NUMBER_JOINERS and _at(text, end + 1) in _DIGIT
    return before or after


def _trim(text: str, end: int, chars: frozenset[str]) -> int:
    """Drop the delimiter a pattern consumed to mark the end of a run (no lookahead in
    Hyperscan): `...(?:[^chars]|$)`."""
    return end - 1 if end > 0 and text[end - 1] not in chars else end


_LUHN_DOUBLED = {str(d): d * 2 - 9 if d > 4 else d * 2 for d in range(10)}


def luhn_ok(digits: str) -> bool:
    """The Luhn check over a string of ASCII digits (every second one from the right doubled)."""
    doubled = sum(map(_LUHN_DOUBLED.__getitem__, digits[-2::-2]))
    return (sum(map(int, digits[-1::-2])) + doubled) % 10 == 0


def iban_ok(compact: str) -> bool:
    """Mod-97 over an IBAN without spaces (letters count as 10..35)."""
    rearranged = compact[4:] + compact[:4]
    return int("".join(str(int(ch, 36)) for ch in rearranged)) % 97 == 1


# Lengths from the SWIFT IBAN registry; a country missing here may use any length from 15 to 34.
_IBAN_REGISTRY = """
    AD24 AE23 AL28 AT20 AZ28 BA20 BE16 BG22 BH22 BI27 BR29 BY28 CH21 CR22 CY28 CZ24 DE22 DJ27
    DK18 DO28 EE20 EG29 ES24 FI18 FK18 FO18 FR27 GB22 GE22 GI23 GL18 GR27 GT28 HN28 HR21 HU28
    IE22 IL23 IQ23 IS26 IT27 JO30 KW30 KZ20 LB28 LC32 LI21 LT20 LU20 LV21 LY25 MC27 MD24 ME22
    MK19 MN20 MR27 MT31 MU30 NI28 NL18 NO15 OM23 PK24 PL28 PS29 PT25 QA29 RO24 RS22 RU33 SA24
    SC31 SD18 SE24 SI19 SK24 SM27 SO23 ST25 SV28 TL23 TN24 TR26 UA29 VA22 VG24 XK20 YE30
"""
_IBAN_LENGTHS = {entry[:2]: int(entry[2:]) for entry in _IBAN_REGISTRY.split()}


def _email(text: str, start: int, end: int) -> tuple[int, int] | None:
    # The domain holds no "@" and at most 253 characters: look no further back (a long
    # "a@b.cc.cc.cc..." run reports a candidate at every label).
    at = text.rfind("@", max(start, end - 255), end)
    if at < 0:
        return None
    if _at(text, start - 1).isalnum():
        # "jürgen@x.de": the match starts after a non-ASCII letter (an ASCII one would be in
        # the match). Take the whole local part rather than leave its first letters in view.
        floor = max(0, at - 65)
        while start > floor and (text[start - 1] in _LOCAL or text[start - 1].isalnum()):
            start -= 1
    while start < at and text[start] == ".":
        start += 1  # ".john@x.org": the leftmost start took dots that cannot begin an address
    local = text[start:at]
    if not local or len(local) > 64 or local.endswith(".") or ".." in local:
        return None  # a longer run is garbage (base64, a hash), not an address
    if _at(text, start - 1) == "@" or _at(text, end) == "@":
        return None
    if _at(text, end) == "." and _at(text, end + 1) in _ALNUM:
        return None  # the domain goes on: a longer candidate is the address
    return start, end


def _phone(text: str, start: int, end: int) -> tuple[int, int] | None:
    value = text[start:end]
    digits = "".join(ch for ch in value if ch in _DIGIT)
    before, after = _at(text, start - 1), _at(text, end)
    if before in _WORD or before in _PHONE_JOINERS or before == "+":
        return None  # inside an identifier or a longer number ("ORD-555-123-4567")
    if after in _PHONE_JOINERS and _at(text, end + 1) in _ALNUM:
        return None
    if value.startswith("+"):
        return (start, end) if 8 <= len(digits) <= 15 else None
    # North American: optional 1, then an area code that cannot start with 0 or 1.
    area = digits[1:4] if len(digits) == 11 and digits[0] == "1" else digits[:3]
    return (start, end) if len(digits) in (10, 11) and area[0] not in "01" else None


def _card(text: str, start: int, end: int) -> tuple[int, int] | None:
    value = text[start:end]
    if len(set(value) - _DIGIT) > 1:
        return None  # mixed separators
    digits = value.replace(" ", "").replace("-", "")
    # Issuer numbers start with 2..6; this also drops 13-digit millisecond timestamps.
    if digits[0] not in "23456" or not luhn_ok(digits) or _joined(text, start, end):
        return None
    return start, end


def _ssn(text: str, start: int, end: int) -> tuple[int, int] | None:
    area, group, serial = text[start:end].split("-")
    if area in ("000", "666") or area[0] == "9" or group == "00" or serial == "0000":
        return None
    return None if _joined(text, start, end) else (start, end)


def _iban(text: str, start: int, end: int) -> tuple[int, int] | None:
    compact = text[start:end].replace(" ", "")
    expected = _IBAN_LENGTHS.get(compact[:2])
    length_ok = len(compact) == expected if expected else 15 <= len(compact) <= 34
    return (start, end) if length_ok and iban_ok(compact) else None


def _ipv4(text: str, start: int, end: int) -> tuple[int, int] | None:
    for octet in text[start:end].split("."):
        if int(octet) > 255 or (len(octet) > 1 and octet[0] == "0"):
            return None
    return None if _joined(text, start, end) else (start, end)


def _ipv6(text: str, start: int, end: int) -> tuple[int, int] | None:
    value = text[start:end]
    before, after = _at(text, start - 1), _at(text, end)
    if before in _WORD or before == ":" or after == ":" or _joined(text, start, end):
        return None  # "std::cout", a longer colon run
    if not any(ch in _DIGIT for ch in value):
        return None  # "cafe::babe" is more likely a word pair than an address
    try:
        ipaddress.IPv6Address(value)
    except ValueError:
        return None  # "12:30:45", a MAC address
    return start, end


def _bounded(limit: int) -> _Check:
    """A token whose pattern ends on a word boundary, no longer than `limit`."""

    def check(text: str, start: int, end: int) -> tuple[int, int] | None:
        return (start, end) if end - start <= limit else None

    return check


def _aws_secret(text: str, start: int, end: int) -> tuple[int, int] | None:
    # The pattern includes the key name before the value: the finding is the value alone.
    end = _trim(text, end, _B64)
    return end - 40, end


def _gcp(text: str, start: int, end: int) -> tuple[int, int] | None:
    return start, _trim(text, end, _B64URL)


def _slack(text: str, start: int, end: int) -> tuple[int, int] | None:
    end = _trim(text, end, _SLACK)
    body = text[start + 5 : end]
    if end - start > 255 or "-" not in body or not any(ch in _DIGIT for ch in body):
        return None  # "xoxb-your-token-here"
    return start, end


def _openai(text: str, start: int, end: int) -> tuple[int, int] | None:
    end = _trim(text, end, _B64URL)
    body = set(text[start + 3 : end])
    # Keys are random: mixed case and digits. Hyphenated prose after "sk-" is not.
    if end - start > 300 or not (body & _DIGIT and body & _UPPER and body & _LOWER):
        return None
    return start, end


def _jwt(text: str, start: int, end: int) -> tuple[int, int] | None:
    end = _trim(text, end, _B64URL)
    if end - start > 8192:
        return None
    header = text[start : text.index(".", start)]
    try:
        decoded = orjson.loads(base64.urlsafe_b64decode(header + "=" * (-len(header) % 4)))
    except (binascii.Error, ValueError):  # orjson.JSONDecodeError is a ValueError
        return None
    return (start, end) if isinstance(decoded, dict) and "alg" in decoded else None


# The body after a private key header: base64, whitespace, legacy PEM headers ("Proc-Type:
# 4,ENCRYPTED"), the END line, and backslashes for keys pasted with escaped newlines.
_PEM_BODY = re.compile(r"[A-Za-z0-9+/=:,\\ \t\r\n-]*")
_PEM_END = re.compile(r"-----END (?:[A-Z0-9]{1,20} ){0,2}PRIVATE KEY(?: BLOCK)?-----")


def _private_key(text: str, start: int, end: int) -> tuple[int, int] | None:
    """The header, the body and the END line. Without an END line, everything up to the first
    character a key cannot hold: an unterminated key is masked to where it visibly stops (in
    a stream, to the end of what has arrived, which keeps it held)."""
    body = _PEM_BODY.match(text, end, end + PEM_BODY_CHARS)
    assert body is not None  # the pattern matches the empty string
    stop = body.end()
    at = text.find("-----END", end, stop)
    if at >= 0 and (closing := _PEM_END.match(text, at, stop)):
        return start, closing.end()
    return start, stop


@dataclass(frozen=True, slots=True)
class _Pattern:
    """One Hyperscan expression for a type.

    `spaced` is the longest match when the expression can match whitespace (what a stream
    must hold back to see the value whole), else 0: a value that never holds whitespace is kept
    whole by holding the last run of non-whitespace instead, whatever its length.
    """

    type: str
    regex: str
    check: _Check
    spaced: int = 0
    flags: int = 0


# Every repetition that can cross whitespace is bounded. Runs without whitespace are unbounded
# in the expression (Hyperscan refuses leftmost-start tracking of long bounded repeats, "Pattern
# is too large") and bounded by their validator instead; `_MAX_CHARS` states each bound.
_PATTERNS: tuple[_Pattern, ...] = (
    _Pattern(
        "email",
        r"[A-Za-z0-9._%+-]+@[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
        r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*\.[A-Za-z]{2,24}\b",
        _email,
    ),
    # International, with a leading +: 8 to 15 digits in groups.
    _Pattern(
        "phone",
        r"\+[1-9]\d{0,2}[ .-]?(?:\(\d{1,4}\)[ .-]?)?\d{1,4}(?:[ .-]?\d{1,4}){1,4}\b",
        _phone,
        spaced=36,
    ),
    # North American: (555) 123-4567, 555-123-4567, 1 555 123 4567. Bare digit runs are not
    # phones (order ids, timestamps).
    _Pattern(
        "phone",
        r"(?:\b1[ .-]?)?(?:\(\d{3}\)[ .-]?|\b\d{3}[ .-])\d{3}[ .-]\d{4}\b",
        _phone,
        spaced=16,
    ),
    _Pattern(
        "card",
        r"\b(?:\d{13,19}|\d{4}(?:[ -]\d{4}){3}(?:[ -]\d{3})?|\d{4}[ -]\d{6}[ -]\d{4,5})\b",
        _card,
        spaced=23,
    ),
    _Pattern("ssn", r"\b\d{3}-\d{2}-\d{4}\b", _ssn),
    _Pattern("iban", r"\b[A-Z]{2}\d{2}(?:[A-Z0-9]{4}){2,7}[A-Z0-9]{0,3}\b", _iban),
    _Pattern(
        "iban",
        r"\b[A-Z]{2}\d{2}(?: [A-Z0-9]{4}){2,7}(?: [A-Z0-9]{1,3})?\b",
        _iban,
        spaced=43,
    ),
    _Pattern("ipv4", r"\b(?:\d{1,3}\.){3}\d{1,3}\b", _ipv4),
    _Pattern(
        "ipv6",
        r"(?:[0-9A-Fa-f]{0,4}:){2,7}(?:[0-9A-Fa-f]{1,4}|(?:\d{1,3}\.){3}\d{1,3})\b",
        _ipv6,
    ),
    _Pattern("aws_access_key", r"\b(?:AKIA|ASIA)[A-Z0-9]{16}\b", _bounded(20)),
    # A bare 40-character base64 run is too common to call a secret: only after its key name.
    _Pattern(
        "aws_secret_key",
        r"(?:aws_?secret(?:_?access)?_?key|secret_?access_?key)[\"']?[ \t]{0,3}[:=]{1,2}"
        r"[ \t]{0,3}[\"']?[A-Za-z0-9/+]{40}(?:[^A-Za-z0-9/+=]|$)",
        _aws_secret,
        spaced=72,
        flags=hyperscan.HS_FLAG_CASELESS,
    ),
    _Pattern("gcp_api_key", r"\bAIza[0-9A-Za-z_-]{35}(?:[^0-9A-Za-z_-]|$)", _gcp),
    _Pattern("github_token", r"\bgh[pousr]_[A-Za-z0-9]{36,}\b", _bounded(255)),
    _Pattern("github_token", r"\bgithub_pat_[A-Za-z0-9_]{22,}\b", _bounded(255)),
    _Pattern("slack_token", r"\bxox[abpr]-[A-Za-z0-9-]{10,}(?:[^A-Za-z0-9-]|$)", _slack),
    _Pattern("openai_key", r"\bsk-[A-Za-z0-9_-]{20,}(?:[^A-Za-z0-9_-]|$)", _openai),
    _Pattern("stripe_key", r"\b[rs]k_live_[A-Za-z0-9]{20,}\b", _bounded(255)),
    _Pattern(
        "private_key",
        r"-----BEGIN (?:[A-Z0-9]{1,20} ){0,2}PRIVATE KEY(?: BLOCK)?-----",
        _private_key,
        spaced=75,
    ),
    _Pattern(
        "jwt",
        r"\beyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{16,}(?:[^A-Za-z0-9_-]|$)",
        _jwt,
    ),
)

# The longest finding of each type, as its pattern or validator bounds it.
_MAX_CHARS = {
    "email": 64 + 254,
    "phone": 36,
    "card": 23,
    "ssn": 11,
    "iban": 43,
    "ipv4": 15,
    "ipv6": 50,
    "aws_access_key": 20,
    "aws_secret_key": 40,
    "gcp_api_key": 39,
    "github_token": 255,
    "slack_token": 255,
    "openai_key": 300,
    "stripe_key": 255,
    "private_key": 75 + PEM_BODY_CHARS,
    "jwt": 8192,
}

# Which finding wins an overlap: secrets (a distinctive prefix), then checksummed numbers, then
# structured values, then phones (the loosest shape); a longer value before a shorter one.
_RANK = {
    **dict.fromkeys(SECRET_TYPES, 3),
    "card": 2,
    "iban": 2,
    "ssn": 1,
    "email": 1,
    "ipv4": 1,
    "ipv6": 1,
    "phone": 0,
}


def _priority(finding: Finding) -> tuple[int, int, int]:
    return -_RANK[finding.type], finding.start - finding.end, finding.start


def merge(candidates: Iterable[Finding]) -> list[Finding]:
    """A non-overlapping choice among validated candidates, sorted by start.

    Within each group of mutually overlapping candidates, the best by rank, then length, then
    position is kept and whatever overlaps it dropped, repeatedly. Groups are independent, so a
    choice never depends on text outside its group (what lets a stream decide piece by piece).
    """
    kept: list[Finding] = []
    group: list[Finding] = []
    group_end = -1
    for finding in sorted(candidates, key=lambda f: (f.start, f.end)):
        if group and finding.start >= group_end:
            kept.extend(_choose(group))
            group = []
        group.append(finding)
        group_end = max(group_end, finding.end)
    kept.extend(_choose(group))
    return kept


def _choose(group: list[Finding]) -> list[Finding]:
    if len(group) < 2:
        return group
    # Kept findings sorted by start (and so by end: they do not overlap); a candidate only
    # needs checking against its two neighbours. A long chain of overlaps ("4242 4242 4242
    # ..." is a card at every group) stays O(n log n).
    starts: list[int] = []
    chosen: list[Finding] = []
    for finding in sorted(group, key=_priority):
        i = bisect.bisect_right(starts, finding.start)
        if (i == 0 or chosen[i - 1].end <= finding.start) and (
            i == len(chosen) or finding.end <= chosen[i].start
        ):
            starts.insert(i, finding.start)
            chosen.insert(i, finding)
    return chosen


class PiiScanner:
    """Finds values of the enabled types. Compiling takes about 0.2 s: use `scanner_for`.

    Thread safety: Hyperscan scratch space may serve one scan at a time, and the scan releases
    the GIL, so each thread gets its own scratch (allocated on its first scan) instead of
    sharing one behind a lock that would serialise threads for the whole scan.
    """

    __slots__ = ("_checks", "_db", "_local", "max_match_chars", "max_spaced_chars", "types")

    def __init__(self, types: Iterable[str]) -> None:
        self.types = frozenset(types)
        unknown = self.types.difference(PII_TYPES)
        if unknown:
            raise ValueError(f"unknown PII types: {', '.join(sorted(unknown))}")
        patterns = [p for p in _PATTERNS if p.type in self.types]
        # The longest finding any enabled type can produce (a private key with its body).
        self.max_match_chars = max((_MAX_CHARS[t] for t in self.types), default=0)
        # The longest match that may contain whitespace: a stream holds back at least this.
        self.max_spaced_chars = max((p.spaced for p in patterns), default=0)
        self._checks = [(p.type, p.check) for p in patterns]
        self._local = threading.local()
        self._db: hyperscan.Database | None = None
        if patterns:
            self._db = hyperscan.Database(mode=hyperscan.HS_MODE_BLOCK)
            self._db.compile(
                expressions=[p.regex.encode() for p in patterns],
                ids=list(range(len(patterns))),
                flags=[p.flags | hyperscan.HS_FLAG_SOM_LEFTMOST for p in patterns],
            )

    def scan(self, text: str) -> list[Finding]:
        """The values in `text`: validated, non-overlapping, sorted by start."""
        return merge(self.candidates(text))

    def candidates(self, text: str) -> list[Finding]:
        """Every validated candidate, sorted by start; they may overlap (see `merge`)."""
        return sorted(set(self._validated(text)), key=lambda f: (f.start, f.end))

    def contains(self, text: str) -> bool:
        """Whether `text` holds any value (stops at the first one)."""
        return next(self._validated(text), None) is not None

    def _validated(self, text: str) -> Iterator[Finding]:
        for pattern_id, start, end in self._hits(text):
            finding_type, check = self._checks[pattern_id]
            span = check(text, start, end)
            if span is not None:
                yield Finding(finding_type, *span)

    def _hits(self, text: str) -> list[tuple[int, int, int]]:
        if self._db is None or not text:
            return []
        hits: list[tuple[int, int, int]] = []

        def on_match(pattern_id: int, start: int, end: int, flags: int, context: object) -> None:
            hits.append((pattern_id, start, end))

        data = text.encode("ascii", "replace")  # see the module docstring
        self._db.scan(data, match_event_handler=on_match, scratch=self._scratch())
        return hits

    def _scratch(self) -> hyperscan.Scratch:
        scratch: hyperscan.Scratch | None = getattr(self._local, "scratch", None)
        if scratch is None:
            scratch = self._local.scratch = hyperscan.Scratch(self._db)
        return scratch


def scanner_for(types: Iterable[str]) -> PiiScanner:
    """The scanner for a set of types, compiled once per process and set of types."""
    return _scanner_for(frozenset(types))


@lru_cache(maxsize=32)
def _scanner_for(types: frozenset[str]) -> PiiScanner:
    return PiiScanner(types)
