"""Body limits: declared and actual size, media type, gzip caps and bombs, strict JSON."""

from __future__ import annotations

import dataclasses
import gzip

import orjson
import pytest

from extproc.inspect.body import (
    BodyLimits,
    check_headers,
    content_encoding,
    decode_body,
    gunzip,
    parse_json,
)
from extproc.inspect.violation import Violation

JSON_ONLY = BodyLimits(max_body_bytes=100, content_types=frozenset({"application/json"}))
GZIP = BodyLimits(
    max_body_bytes=10_000, encodings=frozenset({"gzip"}), max_decoded_bytes=1000, max_ratio=20
)


def headers(**values: str) -> dict[str, str]:
    return {k.replace("_", "-"): v for k, v in values.items()}


@pytest.mark.parametrize(
    ("given", "status", "code"),
    [
        (headers(content_length="101", content_type="application/json"), 413, "body_too_large"),
        (headers(content_length="5", content_type="text/plain"), 415, "unsupported_media_type"),
        (headers(transfer_encoding="chunked"), 415, "unsupported_media_type"),
        (
            headers(content_length="5", content_type="application/json; charset=latin-1"),
            415,
            "unsupported_charset",
        ),
        (
            headers(content_length="5", content_type="application/json", content_encoding="br"),
            415,
            "unsupported_content_encoding",
        ),
        (
            headers(
                content_length="5", content_type="application/json", content_encoding="gzip, gzip"
            ),
            415,
            "unsupported_content_encoding",
        ),
    ],
)
def test_headers_refused(given: dict[str, str], status: int, code: str) -> None:
    violation = check_headers(given, JSON_ONLY)
    assert isinstance(violation, Violation)
    assert (violation.status, violation.code) == (status, code)


@pytest.mark.parametrize(
    "given",
    [
        headers(content_length="100", content_type="application/json"),  # exactly at the limit
        headers(content_length="5", content_type="Application/JSON; charset=UTF-8"),
        headers(content_length="0"),  # no body: no type needed
        {},
    ],
)
def test_headers_accepted(given: dict[str, str]) -> None:
    assert check_headers(given, JSON_ONLY) is None


def test_size_at_and_over_the_limit() -> None:
    assert decode_body(b"x" * 100, None, JSON_ONLY) == b"x" * 100
    over = decode_body(b"x" * 101, None, JSON_ONLY)
    assert isinstance(over, Violation) and over.status == 413


def test_content_encoding_names() -> None:
    assert content_encoding({}) is None
    assert content_encoding({"content-encoding": "identity"}) is None
    assert content_encoding({"content-encoding": "X-GZIP"}) == "gzip"


def test_gzip_within_caps_is_decoded() -> None:
    body = b'{"a": "' + b"x" * 500 + b'"}'
    assert decode_body(gzip.compress(body), "gzip", GZIP) == body


def test_gzip_bomb_refused_without_inflating_it() -> None:
    bomb = gzip.compress(b"\0" * 50_000_000)  # about 49 KB that would decode to 50 MB
    refused = decode_body(bomb, "gzip", dataclasses.replace(GZIP, max_body_bytes=100_000))
    assert isinstance(refused, Violation)
    assert (refused.status, refused.code) == (415, "unsupported_content_encoding")


def test_gzip_ratio_cap() -> None:
    # 900 bytes (under max_decoded_bytes) from a few dozen: over the 20x ratio.
    assert gunzip(gzip.compress(b"a" * 900), 1000, 20) is None
    assert gunzip(gzip.compress(b"a" * 900), 1000, 100) == b"a" * 900


@pytest.mark.parametrize(
    "data",
    [
        b"not gzip at all",
        gzip.compress(b"{}")[:-4],  # truncated
        gzip.compress(b"{}") + gzip.compress(b"{}"),  # a second member is not read
        gzip.compress(b"{}") + b"trailing",
    ],
)
def test_invalid_gzip(data: bytes) -> None:
    assert gunzip(data, 1000, 100) is None


def test_gzip_not_accepted_by_policy() -> None:
    refused = decode_body(gzip.compress(b"{}"), "gzip", JSON_ONLY)
    assert isinstance(refused, Violation) and refused.status == 415


@pytest.mark.parametrize(
    ("body", "code", "message_part"),
    [
        (b'{"model": "a", "model": "b"}', "duplicate_key", "'model'"),
        (b'{"x": {"y": 1, "z": 2, "y": 3}}', "duplicate_key", "'y'"),
        (b'[{"k": 1}, {"k": 2, "k": 2}]', "duplicate_key", "'k'"),
        # A colon written as an escape must not hide a repeated key from the count.
        (b'{"a\\u003a": 1, "b": "x", "b": "y"}', "duplicate_key", "'b'"),
        (b'{"a": NaN}', "invalid_json", ""),
        (b'{"a": Infinity}', "invalid_json", ""),
        (b'{"a": "\\ud800"}', "invalid_json", ""),
        (b'{"a": "\xff"}', "invalid_json", ""),
        (b'{"a": 1', "invalid_json", ""),
        (b"[" * 17 + b"]" * 17, "invalid_json", "deeper than 16"),
        (b"[" * 5000, "invalid_json", ""),
    ],
)
def test_json_refused(body: bytes, code: str, message_part: str) -> None:
    refused = parse_json(body, max_depth=16)
    assert isinstance(refused, Violation)
    assert (refused.status, refused.code) == (400, code)
    assert message_part in refused.message


@pytest.mark.parametrize(
    "doc",
    [
        {"model": "m", "messages": [{"role": "user", "content": "a: b :: c"}]},
        {"k:1": ["::", {"k:2": "x:y"}], "n": None, "t": True},
        {"same": {"same": {"same": 1}}},  # one key in different objects is not a duplicate
        "a string: with colons",
        [],
        {},
    ],
)
def test_json_accepted(doc: object) -> None:
    assert parse_json(orjson.dumps(doc), max_depth=16) == doc


def test_depth_exactly_at_cap() -> None:
    assert parse_json(b"[" * 16 + b"]" * 16, max_depth=16) == [[[[[[[[[[[[[[[[]]]]]]]]]]]]]]]]


def test_escaped_key_characters_still_compare_equal() -> None:
    # "\u006dodel" is "model": the same key twice, as any parser reads it.
    refused = parse_json(b'{"model": "a", "\\u006dodel": "b"}')
    assert isinstance(refused, Violation) and refused.code == "duplicate_key"
