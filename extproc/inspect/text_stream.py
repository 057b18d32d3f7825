"""Masking text that arrives in pieces (SSE deltas, chunked plain text).

`StreamRedactor` emits text once no value can still reach into it, so the concatenation of
everything it returns equals `masker.apply(whole, scanner.scan(whole))` for the whole text,
whatever the split into pieces, as long as no run of non-whitespace characters is longer than
`max_hold - hold_back`. `max_hold` is raised so that this is at least
`scanner.max_match_chars` (8,267 characters with every type enabled): any value the scanner
can find fits. A longer run is let out all but its last `hold_back` characters; a value
straddling that cut is split, its first part masked, the rest possibly shown.

How the cut between emitted and held text is chosen, after each piece:
- Hold the last `hold_back` characters. It is raised to the longest pattern match that may
  contain whitespace (cards, phones, IBANs, a key name before its value), plus the characters
  a validator reads after a value: whatever ends in the unseen text starts after the cut.
- Move the cut back to just after whitespace. Values without whitespace (emails, tokens, JWTs)
  of any length are then held whole, as long as their run.
- Move the cut back to the start of any candidate that straddles it (a private key without its
  END line yet reaches the end of the text, so it is held until the END line arrives).
Each scan covers the held text plus the last emitted characters, so that values at its start
are judged with the same surrounding characters as in the whole text; candidates that start in
that emitted part were already decided and are skipped.
"""

from __future__ import annotations

from collections import Counter

from extproc.inspect.mask import Masker
from extproc.inspect.pii import LEFT_CONTEXT, RIGHT_CONTEXT, Finding, PiiScanner, merge

# What the cut may follow: the ASCII whitespace no pattern of a value without whitespace
# matches (patterns are ASCII-only, so other Unicode spaces never occur inside a match).
_WHITESPACE = (" ", "\n", "\t", "\r", "\f", "\v")


class StreamRedactor:
    """Masks one stream of text; `push` each piece, then `flush` at the end of the stream.

    `hold_back` and `max_hold` are the effective values, possibly raised (module docstring).
    `findings` counts the values masked so far, `by_type` the same per type.
    """

    __slots__ = (
        "_context",
        "_context_chars",
        "_masker",
        "_pending",
        "_scanner",
        "by_type",
        "findings",
        "hold_back",
        "max_hold",
    )

    def __init__(
        self, scanner: PiiScanner, masker: Masker, hold_back: int = 64, max_hold: int = 4096
    ) -> None:
        self._scanner = scanner
        self._masker = masker
        self.hold_back = max(hold_back, scanner.max_spaced_chars + RIGHT_CONTEXT, 1)
        self.max_hold = max(max_hold, scanner.max_match_chars + self.hold_back)
        # Emitted text kept for the next scan: a match that may cross whitespace can start no
        # further back, and validators read LEFT_CONTEXT characters before a value.
        self._context_chars = scanner.max_spaced_chars + LEFT_CONTEXT
        self._context = ""
        self._pending = ""
        self.findings = 0
        self.by_type: Counter[str] = Counter()

    @property
    def held(self) -> int:
        """Characters received and not yet emitted."""
        return len(self._pending)

    def push(self, text: str) -> str:
        """Take the next piece; returns the text now safe to emit, already masked."""
        if not text:
            return ""
        self._pending += text
        return self._emit(final=False)

    def flush(self) -> str:
        """The end of the stream: everything still held, masked."""
        return self._emit(final=True) if self._pending else ""

    def _emit(self, *, final: bool) -> str:
        base = len(self._context)
        text = self._context + self._pending
        candidates = [c for c in self._scanner.candidates(text) if c.start >= base]
        cut = len(text) if final else self._cut(text, base, candidates)
        if cut <= base:
            return ""
        chosen: list[Finding] = []
        for c in candidates:
            if c.end <= cut:
                chosen.append(c)
            elif c.start < cut:  # only after a forced cut: mask the part that is let out
                chosen.append(Finding(c.type, c.start, cut))
        findings = [Finding(f.type, f.start - base, f.end - base) for f in merge(chosen)]
        self.findings += len(findings)
        self.by_type.update(f.type for f in findings)
        out = self._masker.apply(text[base:cut], findings)
        self._context = text[max(0, cut - self._context_chars) : cut]
        self._pending = text[cut:]
        return out

    def _cut(self, text: str, base: int, candidates: list[Finding]) -> int:
        """Where emitted text ends: see the module docstring."""
        end = len(text)
        limit = end - self.hold_back
        if limit <= base:
            return base
        space = max(text.rfind(ch, base, limit) for ch in _WHITESPACE)
        cut = space + 1 if space >= base else base
        forced = end - cut > self.max_hold  # one run without whitespace, too long to hold
        if forced:
            cut = limit
        # Candidates are sorted by start: from the last, each one moving the cut back can only
        # make an earlier one straddle it.
        for c in reversed(candidates):
            if c.start < cut < c.end:
                cut = c.start
        if forced and end - cut > self.max_hold:
            cut = limit  # a value longer than max_hold: split it (its first part is masked)
        return cut
