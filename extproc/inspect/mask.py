"""What a found value is replaced with: its label, a safe part of it, or a keyed hash.

- `label`: `[EMAIL]`, `[CARD]`, ...
- `partial`: what helps a reader without disclosing the value. Cards, phones and IBANs keep
  their last 4 characters (`[CARD ****1111]`, `[PHONE ****4567]`, an IBAN its country too:
  `[IBAN DE ****3000]`); an email keeps its first character and its domain (`j***@example.com`).
  Every other type, secrets above all, shows its label only: part of a key is still a key.
- `hash`: `[EMAIL:<10 hex>]`, the start of HMAC-SHA256(key, type + ":" + normalised value),
  so one value maps to one token across requests (joinable in logs) and cannot be recovered
  without the key. Normalising (card digits without separators, a lower-cased email) makes
  spellings of one value share a token.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
from collections.abc import Sequence
from typing import Literal, get_args

from extproc.inspect.pii import PII_LABELS, Finding

MaskStyle = Literal["label", "partial", "hash"]
MASK_STYLES: tuple[str, ...] = get_args(MaskStyle)
MIN_KEY_BYTES = 16
HASH_HEX_CHARS = 10
_LAST_FOUR = frozenset({"card", "phone", "iban"})


class Masker:
    """Replaces values with the masks of one style (see the module docstring)."""

    __slots__ = ("_key", "style")

    def __init__(self, style: MaskStyle, key: bytes | None = None) -> None:
        if style not in MASK_STYLES:
            raise ValueError(f"unknown mask style {style!r}")
        if style == "hash" and (key is None or len(key) < MIN_KEY_BYTES):
            # A short or missing key makes tokens guessable: hash every phone number and compare.
            raise ValueError(f"mask style 'hash' needs a key of at least {MIN_KEY_BYTES} bytes")
        self.style: MaskStyle = style
        self._key = key or b""

    def mask(self, finding_type: str, value: str) -> str:
        label = PII_LABELS.get(finding_type, finding_type.upper())
        if self.style == "hash":
            message = f"{finding_type}:{_normalised(finding_type, value)}"
            digest = hmac.new(self._key, message.encode("utf-8", "surrogatepass"), hashlib.sha256)
            return f"[{label}:{digest.hexdigest()[:HASH_HEX_CHARS]}]"
        if self.style == "partial":
            if finding_type == "email" and "@" in value:
                return f"{value[0]}***{value[value.rindex('@') :]}"
            if finding_type in _LAST_FOUR:
                compact = _compact(value)
                country = f"{compact[:2]} " if finding_type == "iban" else ""
                return f"[{label} {country}****{compact[-4:]}]"
        return f"[{label}]"

    def apply(self, text: str, findings: Sequence[Finding]) -> str:
        """`text` with each finding's span masked; findings sorted and non-overlapping, as
        `PiiScanner.scan` returns them."""
        parts: list[str] = []
        at = 0
        for finding in findings:
            if finding.start < at or finding.end > len(text):
                raise ValueError("findings must be sorted, non-overlapping and inside the text")
            parts.append(text[at : finding.start])
            parts.append(self.mask(finding.type, text[finding.start : finding.end]))
            at = finding.end
        parts.append(text[at:])
        return "".join(parts)


def _compact(value: str) -> str:
    """Letters and digits only, upper-cased: separators and spelling do not change a number."""
    return "".join(ch for ch in value if ch.isascii() and ch.isalnum()).upper()


def _normalised(finding_type: str, value: str) -> str:
    if finding_type in ("card", "phone", "iban", "ssn"):
        return _compact(value)
    if finding_type == "email":
        return value.lower()
    if finding_type == "ipv6":
        try:
            return ipaddress.IPv6Address(value).compressed
        except ValueError:
            return value.lower()
    if finding_type == "private_key":
        return "".join(value.split())  # line endings and wrapping do not change the key
    return value
