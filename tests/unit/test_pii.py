"""PII and secret detection (extproc.inspect.pii) and masking (extproc.inspect.mask)."""

from __future__ import annotations

import re
import threading
import time

import pytest

from extproc.inspect.mask import Masker
from extproc.inspect.pii import (
    _MAX_CHARS,
    _PATTERNS,
    PEM_BODY_CHARS,
    PII_LABELS,
    PII_TYPES,
    Finding,
    PiiScanner,
    iban_ok,
    luhn_ok,
    merge,
    scanner_for,
)

SCANNER = scanner_for(PII_TYPES)

AWS_SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
JWT = (
    "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiIxMjM0NTY3ODkwIiwibmFtZSI6IkpvaG4gRG9lIn0"
    ".SflKxwRJSMeKKF2QT4fwpMeJf36POk6yJV_adQssw5c"
)
PEM = (
    "-----BEGIN RSA PRIVATE KEY-----\nMIIEowIBAAKCAQEAx4UbaDzY5\nQ2xv+/bm9ZxJk=\n"
    "-----END RSA PRIVATE KEY-----"
)


def found(text: str, scanner: PiiScanner = SCANNER) -> list[tuple[str, str]]:
    return [(f.type, text[f.start : f.end]) for f in scanner.scan(text)]


POSITIVES = {
    "email": [
        "john.doe@example.com",
        "j.o-h_n+tag@mail.example.co.uk",
        "ADMIN@EXAMPLE.ORG",
        "x@y.io",
    ],
    "phone": [
        "+1 (555) 123-4567",
        "+44 20 7946 0958",
        "+4930901820",
        "(415) 555-2671",
        "555-123-4567",
        "555.123.4567",
        "1-800-555-0199",
    ],
    "card": [
        "4111 1111 1111 1111",
        "4111-1111-1111-1111",
        "4111111111111111",
        "5555555555554444",
        "3782 822463 10005",  # Amex 4-6-5
        "4222222222222",  # 13 digits
        "6011 1111 1111 1111 110",  # 19 digits, 4-4-4-4-3
        "3056 930902 5904",  # Diners 4-6-4
    ],
    "ssn": ["123-45-6789", "078-05-1120"],
    "iban": [
        "DE89 3704 0044 0532 0130 00",
        "DE89370400440532013000",
        "GB29 NWBK 6016 1331 9268 19",
        "FR1420041010050500013M02606",
        "NO9386011117947",
        "BE68 5390 0754 7034",
    ],
    "ipv4": ["192.168.1.10", "10.0.0.1", "8.8.8.8", "255.255.255.255"],
    "ipv6": [
        "2001:db8::ff00:42:8329",
        "fe80::1",
        "::1",
        "::ffff:192.168.1.1",
        "2001:0db8:85a3:0000:0000:8a2e:0370:7334",
    ],
    "aws_access_key": ["AKIAIOSFODNN7EXAMPLE", "ASIAY34FZKBOKMUTVV7A"],
    "gcp_api_key": ["AIzaSyA-1234567890abcdefghijklmnopqrstu"],
    "github_token": [
        "ghp_abcdefghijklmnopqrstuvwxyzABCDEFGHIJ",
        "gho_16C7e42F292c6912E7710c838347Ae178B4a",
        "github_pat_11ABCDEFG0123456789abc_abcdefghijklmnopqrstuvwxyz0123456789ABCDEFGHIJKLMNOPQRSTUVW",
    ],
    "slack_token": [
        "xoxb-123456789012-1234567890123-AbCdEfGhIjKlMnOpQrStUvWx",
        "xoxp-1234-5678-91011-00e4dd3e0b1c6d7e8f9a",
    ],
    "openai_key": [
        "sk-proj-Abc123def456GHI789jkl012mno345PQR678stu",
        "sk-4eC39HqLyjWDarjtT1zdp7dcT3BlbkFJabc123XYZ",
    ],
    "stripe_key": ["sk_live_4eC39HqLyjWDarjtT1zdp7dc", "rk_live_51H8abcDEF123ghiJKL456mno"],
    "jwt": [JWT],
    "private_key": [
        PEM,
        "-----BEGIN PRIVATE KEY-----\nMIIEvQIBADANBgkqhkiG9w0BAQEFAASC\n-----END PRIVATE KEY-----",
        "-----BEGIN OPENSSH PRIVATE KEY-----\\nb3BlbnNzaC1rZXktdjEAAAAA\\n"
        "-----END OPENSSH PRIVATE KEY-----",  # pasted with escaped newlines
    ],
}


def test_every_type_has_positive_cases_and_a_label() -> None:
    assert set(POSITIVES) | {"aws_secret_key"} == set(PII_TYPES)
    assert PII_LABELS["email"] == "EMAIL"
    assert PII_LABELS["card"] == "CARD"
    assert set(PII_LABELS) == set(PII_TYPES)


@pytest.mark.parametrize(
    ("pii_type", "value"), [(t, v) for t, values in POSITIVES.items() for v in values]
)
def test_positive_in_prose(pii_type: str, value: str) -> None:
    text = f"Please note: {value}, thanks."
    assert found(text) == [(pii_type, value)]
    # At the very start and end of the text too (no surrounding characters).
    assert found(value) == [(pii_type, value)]


@pytest.mark.parametrize(
    "text",
    [
        "aws_secret_access_key = " + AWS_SECRET,
        "AWS_SECRET_ACCESS_KEY=" + AWS_SECRET,
        '"SecretAccessKey": "' + AWS_SECRET + '"',
        "aws_secret_key: '" + AWS_SECRET + "'",
    ],
)
def test_aws_secret_key_only_the_value_after_its_name(text: str) -> None:
    assert found(text) == [("aws_secret_key", AWS_SECRET)]


NEGATIVES = [
    # cards: bad Luhn, digit runs, timestamps, wrong issuer digit, mixed separators
    "4111 1111 1111 1112",
    "4111111111111112",
    "41111111111111111111111",
    "card 1111111111111117",  # Luhn-valid but no issuer starts with 1
    "4111-1111 1111-1111",
    "ts 1700000000000 ms",
    # IBAN: bad check digits, wrong length for the country
    "DE89 3704 0044 0532 0130 01",
    "DE88370400440532013000",
    "DE89 3704 0044 0532 0130",
    # SSN: area 000 / 666 / 9xx, group 00, serial 0000, inside a longer number
    "000-12-3456",
    "666-12-3456",
    "912-34-5678",
    "123-00-4567",
    "123-45-0000",
    "1-123-45-6789",
    "123-45-6789-1",
    # IP: versions, out-of-range octets, leading zeros, times, MAC, C++ scopes
    "version 1.2.3.4.5",
    "build 10.0.19041.1",
    "256.1.1.1",
    "192.168.001.001",
    "at 12:30:45",
    "mac 00:1A:2B:3C:4D:5E",
    "std::cout << x;",
    "Foo::Bar::baz",
    "cafe::babe",
    # phones: bare digit runs, dates, identifiers, too few digits
    "order 1234567890",
    "2024-01-15 12:30:45",
    "ORD-555-123-4567",
    "123-456-7890",  # no area code starts with 1
    "+12 34",
    # emails in garbage
    "xx@@y.com",
    "a@b.com@c.org",
    "user@localhost",
    "@example.com",
    "a" * 70 + "@example.com",
    # secrets-like prose
    "use sk- as a prefix",
    "pip install sk-learn and scikit-learn-intelex",
    "sk-this-is-a-long-hyphenated-phrase-here",
    "xoxb-your-token-here-please",
    "AKIA-EXAMPLE",
    "ghp_short",
    "eyJhbGciOi.eyJzdWIiOi.abc",
    "eyJub3RqdXN0IjoxfQ.eyJzdWIiOiIxMjM0NTY3ODkwIn0.SflKxwRJSMeKKF2QT4fwpMeJf36POk6yJV",
    "the secret access key is not here",
    # other benign strings
    "uuid 123e4567-e89b-12d3-a456-426614174000",
    "sha256 e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
    "price $1,234.56 or 1.234,56 EUR",
    "2024-01-15T12:30:45.123Z",
    "PO number 4500012345 line 10",
    "",
]


@pytest.mark.parametrize("text", NEGATIVES)
def test_benign_text_has_no_findings(text: str) -> None:
    assert found(text) == []
    assert not SCANNER.contains(text)


def test_card_expiry_after_the_number_does_not_hide_it() -> None:
    text = "4111 1111 1111 1111 12/25 and 4111111111111111 08/27"
    assert [t for t, _ in found(text)] == ["card", "card"]


def test_digit_run_inside_a_word_is_not_a_card() -> None:
    assert found("id_4111111111111111 x4111111111111111") == []


def test_validated_type_wins_an_overlap() -> None:
    # "+4222222222222" is a phone shape (+ and 13 digits) and a Luhn-valid card.
    text = "+4222222222222"
    types = {c.type for c in SCANNER.candidates(text)}
    assert types == {"phone", "card"}
    assert found(text) == [("card", "4222222222222")]


def test_longer_value_wins_an_overlap_of_the_same_rank() -> None:
    # Every group end of a spaced IBAN and of an international phone is a candidate.
    text = "+44 20 7946 0958"
    assert len(SCANNER.candidates(text)) > 1
    assert found(text) == [("phone", text)]
    assert found("a@mail.example.com") == [("email", "a@mail.example.com")]


def test_merge_keeps_non_overlapping_best() -> None:
    cands = [
        Finding("phone", 0, 14),
        Finding("card", 1, 14),
        Finding("email", 20, 30),
        Finding("email", 20, 25),
        Finding("ipv4", 40, 50),
    ]
    assert merge(cands) == [
        Finding("card", 1, 14),
        Finding("email", 20, 30),
        Finding("ipv4", 40, 50),
    ]
    assert merge([]) == []


def test_email_leading_dots_are_not_part_of_it() -> None:
    assert found("see ...john@x.org") == [("email", "john@x.org")]


def test_private_key_without_end_line_is_masked_to_where_it_stops() -> None:
    text = "key: -----BEGIN PRIVATE KEY-----\nMIIEvQIBADANBgkqhkiG9w0B\nAQEFAASC"
    [(kind, value)] = found(text)
    assert kind == "private_key"
    assert text.endswith(value) and value.startswith("-----BEGIN")
    # A character a key cannot hold ends it.
    text2 = "-----BEGIN EC PRIVATE KEY-----\nMHcCAQEEIBkg\n\n(truncated) thanks"
    assert found(text2) == [("private_key", "-----BEGIN EC PRIVATE KEY-----\nMHcCAQEEIBkg\n\n")]


def test_private_key_body_is_bounded() -> None:
    text = "-----BEGIN PRIVATE KEY-----\n" + "A" * (PEM_BODY_CHARS * 2)
    [finding] = SCANNER.scan(text)
    assert finding.end - finding.start <= SCANNER.max_match_chars


def test_jwt_needs_a_json_header_with_alg() -> None:
    assert found(f"Bearer {JWT}.") == [("jwt", JWT)]
    no_alg = "eyJ0eXAiOiJKV1QifQ.eyJzdWIiOiIxMjM0NTY3ODkwIn0.SflKxwRJSMeKKF2QT4fwpMeJf36POk6yJV"
    assert found(no_alg) == []


def test_offsets_are_characters_after_non_ascii_text() -> None:
    text = "Grüße, 日本語 😀 — mail: jürgen@x.de / john@example.com, 4111 1111 1111 1111"
    assert found(text) == [
        # Only ASCII addresses are matched; the whole local part is still taken.
        ("email", "jürgen@x.de"),
        ("email", "john@example.com"),
        ("card", "4111 1111 1111 1111"),
    ]


def test_lone_surrogates_do_not_crash() -> None:
    text = "\ud800 x@y.com \udfff 4111111111111111 \ud83d"
    assert found(text) == [("email", "x@y.com"), ("card", "4111111111111111")]


def test_scanner_enables_only_its_types() -> None:
    scanner = PiiScanner(["email"])
    text = "john@example.com 4111111111111111 AKIAIOSFODNN7EXAMPLE"
    assert found(text, scanner) == [("email", "john@example.com")]
    assert scanner.types == frozenset({"email"})
    assert PiiScanner([]).scan(text) == []
    assert PiiScanner([]).max_match_chars == 0


def test_unknown_type_is_refused() -> None:
    with pytest.raises(ValueError, match="passport"):
        PiiScanner(["email", "passport"])
    with pytest.raises(ValueError):
        scanner_for(["nope"])


def test_scanner_for_reuses_the_compiled_scanner() -> None:
    a = scanner_for(["email", "card"])
    assert scanner_for(("card", "email", "card")) is a
    assert scanner_for(["email"]) is not a


def test_contains() -> None:
    assert SCANNER.contains("write to john@example.com")
    assert not SCANNER.contains("nothing to see here")


def test_declared_lengths_match_the_patterns() -> None:
    # sre measures the longest match of each expression (the syntax used is common to both).
    for pattern in _PATTERNS:
        longest = re._parser.parse(pattern.regex).getwidth()[1]  # type: ignore[attr-defined]
        if pattern.spaced:
            assert pattern.spaced == longest, pattern.regex
        elif longest < 10_000:  # bounded: the finding is no longer (a delimiter may follow)
            assert longest - pattern.regex.endswith("|$)") <= _MAX_CHARS[pattern.type]
    assert SCANNER.max_spaced_chars == max(p.spaced for p in _PATTERNS)
    assert SCANNER.max_match_chars == max(_MAX_CHARS.values())


def test_scans_from_two_threads_at_once() -> None:
    text = ("john@example.com 4111 1111 1111 1111 192.168.1.10 " * 2000)[:60_000]
    expected = SCANNER.scan(text)
    assert len(expected) > 3000
    results: list[bool] = []

    def work() -> None:
        results.extend(SCANNER.scan(text) == expected for _ in range(10))

    threads = [threading.Thread(target=work) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [True] * 30


def test_large_inputs_scan_in_bounded_time() -> None:
    prose = "The quick brown fox, version 1.2.3, order 1234567890 at 2024-01-15 12:30. " * 14_000
    text = (prose + "write to john@example.com ")[-1_000_000:]
    started = time.perf_counter()
    assert found(text)[-1] == ("email", "john@example.com")
    # Adversarial: a candidate at every label of a long domain.
    assert found("a@" + "b.cc" * 50_000) == []
    assert time.perf_counter() - started < 2.0


def test_luhn_and_mod97() -> None:
    assert luhn_ok("4111111111111111")
    assert not luhn_ok("4111111111111112")
    assert iban_ok("GB29NWBK60161331926819")
    assert not iban_ok("GB28NWBK60161331926819")


# --- masking -------------------------------------------------------------------------------


def test_label_masks() -> None:
    masker = Masker("label")
    text = "Mail john@example.com, card 4111 1111 1111 1111."
    assert masker.apply(text, SCANNER.scan(text)) == "Mail [EMAIL], card [CARD]."
    assert masker.mask("aws_access_key", "AKIAIOSFODNN7EXAMPLE") == "[AWS_ACCESS_KEY]"


def test_partial_masks_keep_only_safe_parts() -> None:
    masker = Masker("partial")
    assert masker.mask("card", "4111-1111-1111-1234") == "[CARD ****1234]"
    assert masker.mask("phone", "+1 (555) 123-4567") == "[PHONE ****4567]"
    assert masker.mask("iban", "DE89 3704 0044 0532 0130 00") == "[IBAN DE ****3000]"
    assert masker.mask("email", "john.doe@example.com") == "j***@example.com"
    # Secrets, SSNs and addresses show nothing of the value.
    for kind, value in [
        ("openai_key", "sk-proj-Abc123def456GHI789jkl012"),
        ("jwt", JWT),
        ("private_key", PEM),
        ("ssn", "123-45-6789"),
        ("ipv4", "10.0.0.1"),
    ]:
        assert masker.mask(kind, value) == f"[{PII_LABELS[kind]}]"


def test_hash_masks_are_keyed_stable_and_normalised() -> None:
    masker = Masker("hash", key=b"k" * 16)
    token = masker.mask("card", "4111 1111 1111 1111")
    assert re.fullmatch(r"\[CARD:[0-9a-f]{10}\]", token)
    assert masker.mask("card", "4111-1111-1111-1111") == token
    assert masker.mask("card", "4111111111111111") == token
    assert masker.mask("email", "John@Example.com") == masker.mask("email", "john@example.com")
    assert masker.mask("ipv6", "2001:0db8::0001") == masker.mask("ipv6", "2001:db8::1")
    assert masker.mask("card", "5555555555554444") != token
    assert Masker("hash", key=b"j" * 16).mask("card", "4111111111111111") != token
    # The type is part of the message: one string, two types, two tokens.
    assert masker.mask("ssn", "123-45-6789")[5:] != masker.mask("phone", "123-45-6789")[7:]
    assert masker.mask("email", "\ud800@x.com").startswith("[EMAIL:")


def test_hash_needs_a_long_enough_key() -> None:
    with pytest.raises(ValueError, match="16 bytes"):
        Masker("hash")
    with pytest.raises(ValueError):
        Masker("hash", key=b"short")
    with pytest.raises(ValueError, match="style"):
        Masker("blur")  # type: ignore[arg-type]


def test_apply_refuses_overlapping_findings() -> None:
    with pytest.raises(ValueError):
        Masker("label").apply("abcdef", [Finding("email", 0, 4), Finding("card", 2, 5)])
