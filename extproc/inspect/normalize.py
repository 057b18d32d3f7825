"""Text as a detector should see it: the tricks that hide a phrase from a matcher, undone.

`normalize` is for matching only; its output is never shown to anyone or sent upstream. It
removes invisible characters, folds compatibility forms (fullwidth, mathematical letters),
diacritics and look-alike letters (Cyrillic, Greek, ...) to plain Latin, casefolds, joins
letters spaced apart ("i g n o r e") and collapses whitespace.

`decoded_variants` finds payloads hidden in an encoding a model reads fluently but a matcher
does not (base64, base32, ascii85, hex, binary, morse, escapes, percent-encoding, HTML
entities, rot13, reversed text, leetspeak, ASCII smuggled in tag characters or variation
selectors) and returns them decoded, for the detector to normalise and scan too.

Cost: each step is one pass of a C-implemented primitive (unicodedata, str.translate, str
methods, Hyperscan, regular expressions that never back off more than a few characters), so
time is linear in the input. Python's `re` tries a pattern that opens with a character class
at every position, so the costly ones run only behind a byte-class pre-check (see
_byte_classes) that prose almost never passes: normalize plus decoded_variants take about
7 µs for 400 characters of English prose. No step is skipped on long input:
callers bound it (the injection detector scans at most 256 KB a request). `decoded_variants`
searches only the first MAX_DECODE_SEARCH_CHARS of a text, skips each decoder whose marker
characters are absent, decodes at most MAX_CANDIDATES runs and returns at most MAX_VARIANTS
strings of at most MAX_VARIANT_CHARS each.
"""

from __future__ import annotations

import base64
import binascii
import codecs
import html
import json
import re
import string
import threading
import unicodedata
import urllib.parse
from collections.abc import Callable
from importlib.resources import files

import hyperscan

MAX_DECODE_SEARCH_CHARS = 64 * 1024
MAX_CANDIDATES = 64
MAX_VARIANTS = 8
MAX_VARIANT_CHARS = 16 * 1024
# A decoded payload is kept only when this share of it is printable text.
MIN_PRINTABLE_RATIO = 0.9


def _invisible_and_marks() -> tuple[set[int], set[int]]:
    """Code points that render as nothing, and combining marks, from the Unicode database.

    Invisible: format (Cf) characters, plus ranges listed below that matter even where a
    Python release assigns them differently. Marks (Mn, Me): accents and zalgo stacks once
    NFKD has split them from their letters, and the variation selectors.
    """
    invisible: set[int] = set()
    marks: set[int] = set()
    for block in (range(0x20000), range(0xE0000, 0xE1000)):
        for cp in block:
            category = unicodedata.category(chr(cp))
            if category == "Cf":
                invisible.add(cp)
            elif category in ("Mn", "Me"):
                marks.add(cp)
    for start, end in (
        (0x00AD, 0x00AD),  # soft hyphen
        (0x034F, 0x034F),  # combining grapheme joiner
        (0x180B, 0x180F),  # Mongolian variation selectors and vowel separator
        (0x200B, 0x200F),  # zero-width space, joiners, LRM/RLM
        (0x202A, 0x202E),  # bidi embeddings and overrides
        (0x2060, 0x206F),  # word joiner, invisible operators, bidi isolates
        (0xFE00, 0xFE0F),  # variation selectors
        (0xFEFF, 0xFEFF),  # zero-width no-break space (BOM)
        (0xE0000, 0xE007F),  # tag characters (ASCII smuggling)
        (0xE0100, 0xE01EF),  # variation selectors supplement
    ):
        invisible.update(range(start, end + 1))
    return invisible, marks - invisible


def _confusable_fold() -> dict[int, str]:
    """Non-ASCII characters that look like one ASCII letter or digit, mapped to it (lowercase).

    The data is Unicode TR39 confusables as shipped by `confusable-homoglyphs`; a character is
    folded only when its look-alikes include exactly one ASCII letter or digit (casefolded),
    which holds for every entry of the 3.3.1 data. A letter is folded by its lowercase form
    first: Cyrillic "\u0406" looks like "l" but its lowercase "\u0456" looks like "i", which
    is what a reader takes it for in "\u0406GNORE".
    """
    data = json.loads(
        files("confusable_homoglyphs").joinpath("confusables.json").read_text("utf-8")
    )
    alnum = set(string.ascii_letters + string.digits)

    def ascii_look_alike(char: str) -> str | None:
        found = {h["c"].lower() for h in data.get(char, ()) if h["c"] in alnum}
        return found.pop() if len(found) == 1 else None

    table: dict[int, str] = {}
    for char in data:
        if len(char) != 1 or char.isascii():
            continue
        lower = char.lower()
        target = (ascii_look_alike(lower) if len(lower) == 1 else None) or ascii_look_alike(char)
        if target is not None:
            table[ord(char)] = target
    return table


_INVISIBLE, _MARKS = _invisible_and_marks()
# Characters that render as blank space without being Unicode whitespace, and the whitespace
# that NFKD leaves non-ASCII: read as a space.
_BLANKS = {cp: " " for cp in (0x0085, 0x115F, 0x1160, 0x1680, 0x2800, 0x3164, 0xFFA0)}
_LINES = {0x2028: "\n", 0x2029: "\n"}  # line and paragraph separators
# For strip_invisible: invisible characters removed, nothing else.
_DELETE: dict[int, str | None] = {**dict.fromkeys(_INVISIBLE), **_BLANKS, **_LINES}
# For normalize, applied after NFKD in one pass: invisible characters and marks removed,
# look-alikes folded.
_TABLE: dict[int, str | None] = {
    **_confusable_fold(),
    **dict.fromkeys(_MARKS),
    **_DELETE,
}
# Three or more single letters each followed by one separator: "i g n o r e", "i.g.n.o.r.e".
# A double space ends a run, so "i g n o r e  a l l" becomes "ignore all". An attempt fails
# within a few characters unless it starts a run of three letters; then it takes the run whole,
# backing off at most one letter from a word that follows ("i g n o r e previous"): linear.
_SPACED = re.compile(r"(?<![^\W\d_])(?:[^\W\d_][ .\-_*+~|/]){2,}[^\W\d_](?![^\W\d_])")
_SPACED_SEPARATORS = str.maketrans("", "", " .-_*+~|/")


def _byte_classes(classes: dict[str, bytes], other: bytes = b" ") -> bytes:
    """A bytes.translate table: each listed ASCII character to its class byte, all else to other.

    Pre-checks translate text's UTF-8 bytes and look for a class pattern with `in`: a C-speed
    test that is false for almost all prose, so the regular expression behind it (which Python
    tries at every position) runs only where it can match. Bytes of non-ASCII characters are
    `other`, which no pattern below counts as part of a run.
    """
    table = bytearray(other * 256)
    for chars, cls in classes.items():
        for char in chars:
            table[ord(char)] = cls[0]
    return bytes(table)


# A spaced run of letters (a letter, a separator, a letter, a separator, a letter, with no
# letter on either side) reads "sasasas" once letters are "a", all else "s", and the text is
# padded with "s": a necessary condition for _SPACED in ASCII text, where letters are [A-Za-z].
_SPACED_PROBE = _byte_classes({string.ascii_letters: b"a"}, other=b"s")
_HSPACE = re.compile(r"[^\S\n]+")
_NEWLINES = re.compile(r" ?\n\s*")
# Whitespace that _HSPACE or _NEWLINES would change shows as "w", "ss", "sn", "ns" or "nn" in
# this probe (space "s", newline "n", other whitespace "w"): a few `in` tests instead of a
# regular-expression pass over text that has none.
_WHITESPACE_PROBE = _byte_classes({" ": b"s", "\n": b"n", "\t\r\x0b\x0c\x1c\x1d\x1e\x1f": b"w"})


def strip_invisible(text: str) -> str:
    """The text without invisible characters, NFKC-normalised (case and letters kept)."""
    if text.isascii():
        return text  # no ASCII character is invisible, and NFKC leaves ASCII as it is
    return unicodedata.normalize("NFKC", text.translate(_DELETE))


def normalize(text: str) -> str:
    """The text as a detector should see it (lossy: for matching only)."""
    if not text.isascii():
        # NFKD splits accents off and maps compatibility forms (fullwidth, mathematical,
        # circled letters) to plain ones; the table then drops invisibles and marks and folds
        # look-alikes. Decomposing fully is why marks can be dropped without recomposing.
        text = unicodedata.normalize("NFKD", text).translate(_TABLE)
    text = text.casefold()
    if not text.isascii() or _may_have_spaced_run(text):
        text = _SPACED.sub(_join_letters, text)
    # After NFKD and the table, all whitespace left is ASCII (see _BLANKS).
    probe = text.encode().translate(_WHITESPACE_PROBE)
    if b"w" in probe or b"ss" in probe:
        text = _HSPACE.sub(" ", text)
        probe = text.encode().translate(_WHITESPACE_PROBE)
    if b"n" in probe and (b"sn" in probe or b"ns" in probe or b"nn" in probe):
        text = _NEWLINES.sub("\n", text)
    return text.strip()


def _may_have_spaced_run(ascii_text: str) -> bool:
    return b"sasasas" in b"s%bs" % ascii_text.encode().translate(_SPACED_PROBE)


def _join_letters(match: re.Match[str]) -> str:
    return match.group().translate(_SPACED_SEPARATORS)


# --- decoded variants ----------------------------------------------------------------------

# Base64 (standard or URL-safe, possibly wrapped at line ends), base32 and bare hex share this
# pattern; byte-separated hex and binary have their own. Shorter runs are mostly words and
# identifiers (16 base64 characters carry 12 bytes).
_BASE64_RUN = re.compile(r"[A-Za-z0-9+/_\-]{16,}={0,2}(?:\r?\n[A-Za-z0-9+/_\-]{4,}={0,2})*")
# No look-behind: a pattern that starts with a character class lets the engine skip ahead.
_HEX_BYTES = re.compile(r"(?:[0-9A-Fa-f]{2}[ :,]){7,}[0-9A-Fa-f]{2}")
_BINARY_RUN = re.compile(r"[01]{8} ?(?:[01]{8} ?){3,}")
_ESCAPE = re.compile(r"\\(?:u([0-9A-Fa-f]{4})|x([0-9A-Fa-f]{2})|U([0-9A-Fa-f]{8}))")
_PERCENT = re.compile(r"%[0-9A-Fa-f]{2}")
_ENTITY = re.compile(r"&(?:#[0-9]{1,7}|#[xX][0-9A-Fa-f]{1,6}|[A-Za-z][A-Za-z0-9]{1,31});")
_ASCII85 = re.compile(r"<~[!-u\s]{10,}~>")
_MORSE = re.compile(r"(?:[.-]{1,7}(?: / | {1,3}))(?:[.-]{1,7}(?: / | {1,3})){6,}[.-]{1,7}")
_MORSE_LETTERS = (
    ".- -... -.-. -.. . ..-. --. .... .. .--- -.- .-.. -- -. --- .--. --.- .-. ... - ..- ...- "
    ".-- -..- -.-- --.. ----- .---- ..--- ...-- ....- ..... -.... --... ---.. ----."
)
_MORSE_CODE = dict(
    zip(_MORSE_LETTERS.split(" "), string.ascii_lowercase + string.digits, strict=True)
)
_BASE32_CHARS = frozenset(string.ascii_uppercase + "234567=")
_ROT13_MARKER = re.compile(r"rot[\s_-]?13|caesar", re.IGNORECASE)
# English function words as they read after rot13, and reversed: two of them in a text say it
# is English text so encoded (checked with `in`, cheaply).
_ROT13_WORDS = (" gur ", " naq ", " lbh ", " bs ", " vf ", " gb ", " vg ", " sbe ", " lbhe ")
_REVERSED_WORDS = (" eht ", " dna ", " uoy ", " fo ", " si ", " ot ", " ti ", " rof ", " ruoy ")


class _WordMarkers:
    """Which of _ROT13_WORDS and _REVERSED_WORDS a text holds, in one Hyperscan pass.

    Eighteen `in` tests cost ten times one scan (24 µs against 2.5 µs on 2,000 characters).
    """

    def __init__(self) -> None:
        words = _ROT13_WORDS + _REVERSED_WORDS
        self._rot13 = len(_ROT13_WORDS)
        self._db = hyperscan.Database(mode=hyperscan.HS_MODE_BLOCK)
        self._db.compile(
            expressions=[w.encode() for w in words],
            ids=list(range(len(words))),
            elements=len(words),
            flags=[hyperscan.HS_FLAG_SINGLEMATCH] * len(words),
        )
        self._local = threading.local()  # scratch space must not be shared by threads

    def count(self, folded: str) -> tuple[int, int]:
        """(rot13 words, reversed words) found, each word counted once."""
        scratch: hyperscan.Scratch | None = getattr(self._local, "scratch", None)
        if scratch is None:
            scratch = self._local.scratch = hyperscan.Scratch(self._db)
        hits: set[int] = set()

        def on_match(word: int, _start: int, _end: int, _flags: int, _ctx: object) -> None:
            hits.add(word)

        self._db.scan(folded.encode(), match_event_handler=on_match, scratch=scratch)
        rot13 = sum(1 for word in hits if word < self._rot13)
        return rot13, len(hits) - rot13


_WORD_MARKERS = _WordMarkers()
# Words mixing letters and leetspeak digits: "1gn0r3", "pr3v10u5"; not hex numbers (a letter
# past "f" is required) nor pieces of base64 (no "+", "/", "=" next to the word).
_LEET_WORD = re.compile(
    r"(?<![\w+/=@$])(?=[a-z0-9@$]*[g-z])(?=[a-z0-9@$]*[0134579@$])[a-z0-9@$]{4,20}(?![\w+/=@$])",
    re.IGNORECASE,
)
_LEET_CHARS = "0134579@$"
_LEET = str.maketrans(_LEET_CHARS, "oieastgas")
# ASCII letters to "a", leetspeak characters to "1", all else to " ": then "a1" and "1a"
# count where a digit touches a letter, with C-speed bytes methods instead of a regex pass.
_LEET_PROBE = _byte_classes({string.ascii_letters: b"a", _LEET_CHARS: b"1"})
# Necessary conditions for _BASE64_RUN and _HEX_BYTES, as byte-class patterns (see
# _byte_classes): 16 base64 characters in a row; 8 hex pairs with a separator between each.
_BASE64_PROBE = _byte_classes({string.ascii_letters + string.digits + "+/_-": b"b"})
_BASE64_NEEDLE = b"b" * 16
_HEX_PROBE = _byte_classes({string.hexdigits: b"h", " :,": b"s"})
_HEX_NEEDLE = b"hhs" * 7 + b"hh"
# ASCII smuggled as Unicode tag characters (U+E0020..U+E007E mirror ASCII), and bytes smuggled
# as runs of variation selectors (VS1..VS16 carry 0..15, VS17..VS256 carry 16..255).
_TAG_CHAR = re.compile("[\U000e0020-\U000e007e]")
_SELECTOR_RUN = re.compile("[\ufe00-\ufe0f\U000e0100-\U000e01ef]{4,}")
# Escapes, percent-encoding and leetspeak are decoded only when the text uses them this often:
# one "%20" or "b4" is normal text.
MIN_MARKERS = 3


def _printable_text(raw: bytes) -> str | None:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None
    if not text:
        return None
    printable = sum(1 for c in text if c.isprintable() or c in "\n\r\t")
    return text if printable / len(text) >= MIN_PRINTABLE_RATIO else None


def _from_base64_or_hex(run: str) -> str | None:
    run = run.replace("\r", "").replace("\n", "")
    if len(run) % 2 == 0 and all(c in string.hexdigits for c in run):
        return _printable_text(bytes.fromhex(run))
    if run.isupper() and all(c in _BASE32_CHARS for c in run):
        body = run.rstrip("=")
        try:
            return _printable_text(base64.b32decode(body + "=" * (-len(body) % 8)))
        except (binascii.Error, ValueError):
            return None
    if run.isdigit() or run.islower() or run.isupper():
        return None  # a word, a number or an identifier: base64 of text mixes cases
    run = run.rstrip("=")
    if len(run) % 4 == 1:
        run = run[:-1]
    padded = run + "=" * (-len(run) % 4)
    altchars = b"-_" if ("-" in run or "_" in run) else None
    try:
        raw = base64.b64decode(padded, altchars=altchars, validate=True)
    except (binascii.Error, ValueError):
        return None
    return _printable_text(raw)


def _from_ascii85(run: str) -> str | None:
    try:
        return _printable_text(base64.a85decode(run, adobe=True, ignorechars=b" \t\n\r"))
    except ValueError:
        return None


def _from_morse(run: str) -> str | None:
    words = run.split(" / ") if " / " in run else run.split("   ")
    decoded = " ".join("".join(_MORSE_CODE.get(c, "") for c in w.split()) for w in words)
    return decoded if decoded.strip() else None


def _from_hex_bytes(run: str) -> str | None:
    return _printable_text(bytes.fromhex(re.sub("[ :,]", "", run)))


def _from_binary(run: str) -> str | None:
    bits = run.replace(" ", "")
    return _printable_text(bytes(int(bits[i : i + 8], 2) for i in range(0, len(bits) - 7, 8)))


def _from_selectors(run: str) -> str | None:
    return _printable_text(
        bytes(ord(c) - 0xFE00 if ord(c) < 0x10000 else ord(c) - 0xE0100 + 16 for c in run)
    )


def _unescape(match: re.Match[str]) -> str:
    code = int(next(g for g in match.groups() if g is not None), 16)
    return chr(code) if code <= 0x10FFFF else match.group()


def decoded_variants(text: str) -> list[str]:
    """Payloads hidden in the text, decoded; empty when nothing decodes to readable text.

    Each entry is either a decoded run (base64, hex, binary, tag characters, variation
    selectors, base32, ascii85, morse) or the first MAX_VARIANT_CHARS of the text with one
    layer of escapes, percent-encoding, HTML entities, rot13, reversal or leetspeak undone.
    Not normalised. One layer only: a payload encoded twice is not unwrapped. Each step is
    skipped, at the cost of a substring test, when its marker characters are absent.
    """
    raw = text[:MAX_DECODE_SEARCH_CHARS]
    variants: list[str] = []

    def add(variant: str | None) -> None:
        if variant is None or len(variants) >= MAX_VARIANTS:
            return
        variant = variant[:MAX_VARIANT_CHARS]
        if variant.strip() and variant not in variants:
            variants.append(variant)

    if not raw.isascii():
        # These live in the invisible characters that strip_invisible removes.
        add("".join(chr(ord(c) - 0xE0000) for c in _TAG_CHAR.findall(raw)) or None)
        for match in _SELECTOR_RUN.finditer(raw):
            add(_from_selectors(match.group()[:MAX_VARIANT_CHARS]))
    text = strip_invisible(raw)
    encoded = text.encode()
    runs: list[tuple[re.Pattern[str], Callable[[str], str | None]]] = []
    if _BASE64_NEEDLE in encoded.translate(_BASE64_PROBE):
        runs.append((_BASE64_RUN, _from_base64_or_hex))
    if _HEX_NEEDLE in encoded.translate(_HEX_PROBE):
        runs.append((_HEX_BYTES, _from_hex_bytes))
    if "01" in text:  # every byte of ASCII text but the controls starts with 0 then 0 or 1
        runs.append((_BINARY_RUN, _from_binary))
    if "<~" in text:
        runs.append((_ASCII85, _from_ascii85))
    if ".-" in text or "-." in text:
        runs.append((_MORSE, _from_morse))
    candidates = 0
    for pattern, decode in runs:
        for match in pattern.finditer(text):
            if candidates >= MAX_CANDIDATES or len(variants) >= MAX_VARIANTS:
                break
            candidates += 1
            # 4 base64 chars carry 3 bytes: cap the decoded size before decoding.
            add(decode(match.group()[: MAX_VARIANT_CHARS * 4 // 3]))

    window = text[:MAX_VARIANT_CHARS]
    if "\\" in window and len(_ESCAPE.findall(window)) >= MIN_MARKERS:
        add(_ESCAPE.sub(_unescape, window))
    if "%" in window and len(_PERCENT.findall(window)) >= MIN_MARKERS:
        add(urllib.parse.unquote(window, errors="replace"))
    if "&" in window and _ENTITY.search(window) is not None:
        add(html.unescape(window))
    rot13_words, reversed_words = _WORD_MARKERS.count(window.casefold())
    if rot13_words >= 2 or (
        ("13" in text or "aesar" in text) and _ROT13_MARKER.search(text) is not None
    ):
        add(codecs.encode(window, "rot13"))
    if reversed_words >= 2:
        add(window[::-1])
    probe = window.encode().translate(_LEET_PROBE)
    if (
        b"1" in probe  # cheaper than counting pairs in prose without digits
        and probe.count(b"a1") + probe.count(b"1a") >= MIN_MARKERS
        and len(_LEET_WORD.findall(window)) >= MIN_MARKERS
    ):
        add(window.translate(_LEET))
    return variants
