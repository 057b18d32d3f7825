"""The first checks on a request body: size, media type, content encoding, well-formed JSON.

What can be decided from the headers is decided there (`check_headers`: a declared length over
the limit, a media type or encoding the model does not take), so such a request is refused before
its body is even sent. The rest needs the body (`decode_body`, `parse_json`).

JSON is parsed strictly, because the gateway and the model must read the same document:
duplicate keys are refused (parsers disagree on which one wins: `{"model": "a", "model": "b"}`
could be judged as one model and served as another), so are NaN and Infinity (not JSON), invalid
UTF-8 (including lone surrogate escapes) and nesting deeper than the policy's cap. The stdlib
check costs one walk of the parsed document (see `parse_json`).
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Mapping
from dataclasses import dataclass

import orjson

from extproc.inspect.violation import Violation, quoted

# zlib's wbits for "gzip wrapper only" (not zlib's own, not raw deflate).
_GZIP_WBITS = 16 + zlib.MAX_WBITS


@dataclass(frozen=True, slots=True)
class BodyLimits:
    max_body_bytes: int = 1024 * 1024
    # Media types the model takes (parameters such as charset ignored); None: any.
    content_types: frozenset[str] | None = None
    # Content-Encoding values accepted besides identity: only "gzip" is supported.
    encodings: frozenset[str] = frozenset()
    max_decoded_bytes: int = 1024 * 1024
    max_ratio: int = 100
    max_depth: int = 64


DEFAULT_LIMITS = BodyLimits()


def media_type(content_type: str) -> str:
    return content_type.partition(";")[0].strip().lower()


def _charset(content_type: str) -> str | None:
    for param in content_type.split(";")[1:]:
        name, _, value = param.partition("=")
        if name.strip().lower() == "charset":
            return value.strip().strip('"').lower()
    return None


def has_body(headers: Mapping[str, str]) -> bool:
    length = headers.get("content-length")
    if length is not None:
        return length.strip() not in ("", "0")
    return "transfer-encoding" in headers


def check_headers(headers: Mapping[str, str], limits: BodyLimits) -> Violation | None:
    """What the request headers alone decide: 413 by declared length, 415 by type or encoding."""
    length = headers.get("content-length")
    if length is not None and length.strip().isdigit() and int(length) > limits.max_body_bytes:
        return too_large(limits.max_body_bytes)
    if not has_body(headers):
        return None
    content_type = headers.get("content-type", "")
    if limits.content_types is not None:
        if media_type(content_type) not in limits.content_types:
            allowed = ", ".join(sorted(limits.content_types))
            return Violation(
                415, "unsupported_media_type", "", f"Content-Type must be one of: {allowed}"
            )
        charset = _charset(content_type)
        if charset not in (None, "utf-8", "utf8"):
            return Violation(415, "unsupported_charset", "", "the body must be UTF-8")
    encoding = content_encoding(headers)
    if encoding is not None and encoding not in limits.encodings:
        return Violation(
            415, "unsupported_content_encoding", "",
            f"Content-Encoding {quoted(encoding)} is not accepted here",
        )  # fmt: skip
    return None


def content_encoding(headers: Mapping[str, str]) -> str | None:
    """The one Content-Encoding applied, or None for identity; a list of codings (`gzip, gzip`)
    comes back whole, so it matches no accepted value."""
    value = headers.get("content-encoding", "").strip().lower()
    if value in ("", "identity"):
        return None
    return "gzip" if value == "x-gzip" else value


def too_large(limit: int) -> Violation:
    return Violation(413, "body_too_large", "", f"the request body exceeds {limit} bytes")


def decode_body(body: bytes, encoding: str | None, limits: BodyLimits) -> bytes | Violation:
    """The body as the model would read it: size-checked, gunzipped under the caps."""
    if len(body) > limits.max_body_bytes:
        return too_large(limits.max_body_bytes)
    if encoding is None:
        return body
    if encoding != "gzip" or encoding not in limits.encodings:
        return Violation(415, "unsupported_content_encoding", "", "this encoding is not accepted")
    decoded = gunzip(body, limits.max_decoded_bytes, limits.max_ratio)
    if decoded is None:
        return Violation(
            415, "unsupported_content_encoding", "",
            "the gzip body is invalid, or decodes beyond the size or ratio allowed",
        )  # fmt: skip
    return decoded


def gunzip(data: bytes, max_bytes: int, max_ratio: int) -> bytes | None:
    """One gzip member, decoded only up to the caps (a bomb costs at most max_bytes of output);
    None when invalid, truncated, followed by more data, or over a cap."""
    cap = min(max_bytes, max(len(data), 1) * max_ratio)
    inflater = zlib.decompressobj(_GZIP_WBITS)
    try:
        out = inflater.decompress(data, cap + 1)
    except zlib.error:
        return None
    if len(out) > cap or not inflater.eof or inflater.unused_data:
        return None
    return out


class _DuplicateKey(ValueError):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _unique_pairs(pairs: list[tuple[str, object]]) -> dict[str, object]:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise _DuplicateKey(key)
            seen.add(key)
    return out


_PAIRS_DECODER = json.JSONDecoder(object_pairs_hook=_unique_pairs)
_ESCAPED_COLON = (b"\\u003a", b"\\u003A")


def invalid_json(message: str = "the request body is not valid JSON") -> Violation:
    return Violation(400, "invalid_json", "", message)


def parse_json(body: bytes, max_depth: int = DEFAULT_LIMITS.max_depth) -> object:
    """The document, or a Violation (400) saying what is wrong with it.

    orjson parses (it refuses invalid UTF-8, lone surrogates, NaN and nesting over 1024); one
    walk then measures depth and counts object members and the colons inside strings. Every
    member has exactly one colon outside strings, so unless a colon was written as an escape,
    the body's colons equal members plus string colons exactly when no key was repeated (a
    repeated key is dropped by the parser, so the parsed side comes up short).
    """
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        if "depth" in str(exc):
            return too_deep(max_depth)
        return invalid_json()
    depth, members, string_colons = _shape(doc, max_depth)
    if depth > max_depth:
        return too_deep(max_depth)
    colons = body.count(b":")
    if colons != members + string_colons or any(e in body for e in _ESCAPED_COLON):
        duplicate = _duplicate_key(body)
        if duplicate is not None:
            return Violation(
                400, "duplicate_key", "", f"duplicate key {quoted(duplicate)} in the body"
            )
    return doc


def too_deep(max_depth: int) -> Violation:
    return invalid_json(f"the JSON nests deeper than {max_depth} levels")


def _duplicate_key(body: bytes) -> str | None:
    """The first repeated key, by the slower parser that reports every object's pairs."""
    try:
        _PAIRS_DECODER.decode(body.decode("utf-8"))
    except _DuplicateKey as exc:
        return exc.key
    except (ValueError, RecursionError):
        return None  # orjson accepted it; nothing more to learn here
    return None


def _shape(doc: object, cap: int) -> tuple[int, int, int]:
    """(nesting depth, object members, colons inside keys and strings); stops past cap."""
    if type(doc) is not dict and type(doc) is not list:
        return 0, 0, doc.count(":") if isinstance(doc, str) else 0
    deepest = members = colons = 0
    stack: list[tuple[object, int]] = [(doc, 1)]
    pop, push = stack.pop, stack.append
    while stack:
        node, depth = pop()
        if depth > deepest:
            deepest = depth
            if deepest > cap:
                break
        if type(node) is dict:
            members += len(node)
            for key in node:
                if ":" in key:
                    colons += key.count(":")
            values: object = node.values()
        else:
            values = node
        for child in values:  # type: ignore[attr-defined]
            kind = type(child)
            if kind is str:
                if ":" in child:
                    colons += child.count(":")
            elif kind is dict or kind is list:
                push((child, depth + 1))
    return deepest, members, colons
