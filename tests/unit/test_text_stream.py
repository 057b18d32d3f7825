"""Streaming redaction (extproc.inspect.text_stream): any split masks like the whole text."""

from __future__ import annotations

import random
import time

import pytest

from extproc.inspect.mask import Masker
from extproc.inspect.pii import PII_TYPES, scanner_for
from extproc.inspect.text_stream import StreamRedactor

SCANNER = scanner_for(PII_TYPES)
LABEL = Masker("label")
# Prose without values: version numbers, times and order ids are not PII.
PROSE = "the quick brown fox jumps over the lazy dog, version 1.2.3 at 12:30, order 1234567890"
WORDS = PROSE.split()

TEXT = (
    "Hi, I'm john.doe@example.com (or jürgen@x.de), call +1 (555) 123-4567 or 555.123.4567. "
    "Card 4111 1111 1111 1111 exp 12/25; IBAN DE89 3704 0044 0532 0130 00, ssn 123-45-6789, "
    "from 192.168.1.10 / fe80::1 (not 1.2.3.4.5). aws_secret_access_key = "
    "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY and AKIAIOSFODNN7EXAMPLE.\n"
    "-----BEGIN RSA PRIVATE KEY-----\nMIIEowIBAAKCAQEA\nabc+/=\n-----END RSA PRIVATE KEY-----\n"
    "token eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0."
    "SflKxwRJSMeKKF2QT4fwpMeJf36POk6yJV_adQssw5c. Keys: "
    "ghp_abcdefghijklmnopqrstuvwxyzABCDEFGHIJ, xoxb-123456789012-1234567890123-AbCdEfGh "
    "AIzaSyA-1234567890abcdefghijklmnopqrstu sk-proj-Abc123def456GHI789jkl012mno345 "
    "(sk_live_4eC39HqLyjWDarjtT1zdp7dc). Done 😀 \ud800 x@y.co"
)


def whole(text: str, masker: Masker = LABEL) -> str:
    return masker.apply(text, SCANNER.scan(text))


def streamed(pieces: list[str], masker: Masker = LABEL, **kwargs: int) -> str:
    redactor = StreamRedactor(SCANNER, masker, **kwargs)
    return "".join(redactor.push(piece) for piece in pieces) + redactor.flush()


def test_the_text_holds_every_kind_of_value() -> None:
    assert {f.type for f in SCANNER.scan(TEXT)} == set(PII_TYPES)
    assert len(SCANNER.scan(TEXT)) == 19


@pytest.mark.parametrize("masker", [LABEL, Masker("partial"), Masker("hash", key=b"0" * 32)])
def test_every_single_split_point(masker: Masker) -> None:
    expected = whole(TEXT, masker)
    assert "john.doe" not in expected and "4111" not in expected
    for at in range(len(TEXT) + 1):
        assert streamed([TEXT[:at], TEXT[at:]], masker) == expected, at


def test_random_multi_splits() -> None:
    expected = whole(TEXT)
    rng = random.Random(20240115)
    for _ in range(300):
        cuts = sorted(rng.sample(range(1, len(TEXT)), rng.randint(2, 60)))
        pieces = [TEXT[a:b] for a, b in zip([0, *cuts], [*cuts, len(TEXT)], strict=True)]
        assert streamed(pieces) == expected, cuts


def test_one_character_at_a_time() -> None:
    assert streamed(list(TEXT)) == whole(TEXT)


def test_random_texts_and_splits() -> None:
    # Values and fragments glued by separators that can join or break them.
    fragments = [
        "a@b.co", "+44 20 7946 0958", "4111 1111 1111 1111", "4111111111111111",
        "GB29NWBK60161331926819", "123-45-6789", "192.168.1.10", "1.2.3", "fe80::1",
        "ghp_abcdefghijklmnopqrstuvwxyzABCDEFGHIJ", "sk-proj-Abc123def456GHI789jkl012",
        "-----BEGIN PRIVATE KEY-----\nMIIEow\n", "-----END PRIVATE KEY-----",
        "word", "12", "5", "@", ".", "-", ":", "é", "x" * 40,
    ]  # fmt: skip
    separators = ["", " ", "\n", ".", "-", ",", "@"]
    rng = random.Random(7)
    for _ in range(400):
        parts = [rng.choice(fragments) + rng.choice(separators) for _ in range(rng.randint(1, 10))]
        text = "".join(parts)
        cuts = sorted({rng.randint(1, len(text)) for _ in range(rng.randint(1, 20))})
        pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]
        assert streamed(pieces) == whole(text), (text, cuts)


@pytest.mark.parametrize(
    "value",
    [
        "4111 1111 1111 1111",
        "DE89 3704 0044 0532 0130 00",
        "+1 (555) 123-4567",
        "john.doe@example.com",
        "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0."
        "SflKxwRJSMeKKF2QT4fwpMeJf36POk6yJV_adQssw5c",
    ],
)
def test_value_split_in_its_middle(value: str) -> None:
    middle = len(value) // 2
    redactor = StreamRedactor(SCANNER, LABEL)
    first = redactor.push("x " * 100 + "send to " + value[:middle])
    assert value[:middle] not in first
    out = first + redactor.push(value[middle:] + " thanks" + " y" * 100) + redactor.flush()
    assert (
        out == "x " * 100 + f"send to [{SCANNER.scan(value)[0].type.upper()}] thanks" + " y" * 100
    )
    assert redactor.findings == 1


def test_text_without_values_is_emitted_promptly() -> None:
    redactor = StreamRedactor(SCANNER, LABEL)
    longest_run = max(map(len, WORDS)) + 1
    pieces = [WORDS[i % len(WORDS)] + " " for i in range(2000)]
    out = []
    for piece in pieces:
        out.append(redactor.push(piece))
        assert redactor.held <= redactor.hold_back + longest_run
    out.append(redactor.flush())
    assert redactor.held == 0
    assert "".join(out) == "".join(pieces)


def test_hold_back_is_raised_to_cover_values_with_spaces() -> None:
    redactor = StreamRedactor(SCANNER, LABEL, hold_back=4, max_hold=16)
    assert redactor.hold_back >= SCANNER.max_spaced_chars
    assert redactor.max_hold >= SCANNER.max_match_chars
    text = "pay with 4111 1111 1111 1111 now " * 3
    assert streamed(list(text), hold_back=4, max_hold=16) == whole(text)
    # A scanner of short values only holds back little.
    assert StreamRedactor(scanner_for(["email"]), LABEL, hold_back=8).hold_back == 8


def test_unterminated_private_key_is_held_until_its_end_line() -> None:
    redactor = StreamRedactor(SCANNER, LABEL)
    out = redactor.push("Here: -----BEGIN PRIVATE KEY-----\n")
    for _ in range(40):
        out += redactor.push("MIIEvQIBADANBgkqhkiG9w0BAQEFAASCBKcwggSjAgEAAoIBAQC7\n")
    assert "MIIE" not in out
    assert redactor.held > 40 * 50
    out += redactor.push("-----END PRIVATE KEY-----\nThanks! " + "and more " * 20)
    assert out.startswith("Here: [PRIVATE_KEY]\nThanks!")
    assert redactor.held <= redactor.hold_back
    assert "MIIE" not in out + redactor.flush()


def test_a_run_longer_than_max_hold_is_let_out() -> None:
    redactor = StreamRedactor(SCANNER, LABEL)
    run = "A" * (redactor.max_hold * 2)
    out = ""
    for i in range(0, len(run), 300):
        out += redactor.push(run[i : i + 300])
        assert redactor.held <= redactor.max_hold + 300
    out += redactor.push("-AKIAIOSFODNN7EXAMPLE-") + redactor.push("B" * 500) + redactor.flush()
    assert out == run + "-[AWS_ACCESS_KEY]-" + "B" * 500


def test_counts_by_type() -> None:
    redactor = StreamRedactor(SCANNER, LABEL)
    filler = "and so on " * 10
    out = redactor.push("mail a@b.co " + filler + "c@d.org, " + filler + "card 4111 1111 ")
    assert redactor.findings == 2  # the card number is still held: it may go on
    out += redactor.push("1111 1111 done") + redactor.flush()
    assert out == f"mail [EMAIL] {filler}[EMAIL], {filler}card [CARD] done"
    assert redactor.findings == 3
    assert redactor.by_type == {"email": 2, "card": 1}


def test_empty_pushes_and_flushes() -> None:
    redactor = StreamRedactor(SCANNER, LABEL)
    assert redactor.push("") == ""
    assert redactor.flush() == ""
    assert redactor.push("a@b.co") == ""
    assert redactor.flush() == "[EMAIL]"
    assert redactor.flush() == ""


def test_cost_per_piece_is_small() -> None:
    rng = random.Random(3)
    text = " ".join(rng.choice(WORDS) for _ in range(12_000))
    pieces = [text[i : i + 300] for i in range(0, len(text), 300)]
    redactor = StreamRedactor(SCANNER, LABEL)
    started = time.perf_counter()
    out = "".join(redactor.push(p) for p in pieces) + redactor.flush()
    per_piece = (time.perf_counter() - started) / len(pieces)
    assert out == text
    assert per_piece < 0.002  # measured about 11 us


def test_the_longest_run_still_covered() -> None:
    redactor = StreamRedactor(SCANNER, LABEL)
    longest = redactor.max_hold - redactor.hold_back
    run = "A" * (longest - 21) + "-AKIAIOSFODNN7EXAMPLE"
    text = "start " + run + " end " + "z " * 100
    assert len(run) == longest
    pieces = [text[i : i + 7] for i in range(0, len(text), 7)]
    assert (
        streamed(pieces)
        == whole(text)
        == "start " + run[:-20] + "[AWS_ACCESS_KEY] end " + "z " * 100
    )
