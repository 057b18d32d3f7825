from __future__ import annotations

import base64
import struct
import time
import zlib
from io import BytesIO
from typing import Any

import pytest
from PIL import Image

from extproc.inspect.images import ImageInfo, ImageRules, check_image_url
from extproc.inspect.violation import MAX_QUOTED_CHARS, Violation

FIELD = "messages[0].content[1].image_url.url"
RULES = ImageRules()


def _encode(image_format: str, size: tuple[int, int] = (3, 2), **save: Any) -> bytes:
    out = BytesIO()
    mode = "RGBA" if save.pop("alpha", False) else "RGB"
    Image.new(mode, size, (10, 20, 30)).save(out, image_format, **save)
    return out.getvalue()


def _url(data: bytes, media_type: str = "image/png") -> str:
    return f"data:{media_type};base64," + base64.b64encode(data).decode()


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _png_declaring(width: int, height: int) -> bytes:
    """A tiny hand-made PNG whose header claims width x height (8-bit RGB)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return (
        b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")
    )


def _jpeg_with_size(data: bytes, width: int, height: int) -> bytes:
    """`data` (a baseline JPEG) with its SOF0 segment's dimensions rewritten."""
    at = data.index(b"\xff\xc0")
    return data[: at + 5] + struct.pack(">HH", height, width) + data[at + 9 :]


def _refused(result: object, status: int, code: str) -> Violation:
    assert isinstance(result, Violation), result
    assert (result.status, result.code, result.field) == (status, code, FIELD)
    return result


@pytest.mark.parametrize(
    ("pillow_format", "media_type", "expected", "save"),
    [
        ("PNG", "image/png", "png", {}),
        ("JPEG", "image/jpeg", "jpeg", {}),
        ("JPEG", "image/jpg", "jpeg", {"progressive": True}),
        ("WEBP", "image/webp", "webp", {}),  # lossy: VP8
        ("WEBP", "image/webp", "webp", {"lossless": True}),  # VP8L
        ("WEBP", "image/webp", "webp", {"alpha": True, "exif": b"Exif\x00\x00MM"}),  # VP8X
    ],
)
def test_real_images_are_accepted(
    pillow_format: str, media_type: str, expected: str, save: dict[str, Any]
) -> None:
    data = _encode(pillow_format, (37, 21), **save)
    result = check_image_url(_url(data, media_type), RULES, FIELD)
    assert result == ImageInfo(expected, 37, 21, len(data))


def test_media_type_and_base64_marker_are_case_insensitive() -> None:
    data = _encode("PNG")
    url = "DATA:Image/PNG;BASE64," + base64.b64encode(data).decode()
    assert check_image_url(url, RULES, FIELD) == ImageInfo("png", 3, 2, len(data))


def test_unpadded_base64_is_accepted() -> None:
    data = _encode("PNG")
    while len(data) % 3 == 0:
        data += b"\x00"  # trailing bytes after IEND: still a PNG, now with padding to drop
    url = _url(data).rstrip("=")
    assert check_image_url(url, RULES, FIELD) == ImageInfo("png", 3, 2, len(data))


def test_jpeg_header_beyond_the_first_read_is_found() -> None:
    # A 60 KB EXIF segment pushes the frame header well past the first kilobyte decoded.
    data = _encode("JPEG", (40, 30), exif=b"Exif\x00\x00" + b"x" * 60_000)
    assert data.index(b"\xff\xc0") > 60_000
    assert check_image_url(_url(data, "image/jpeg"), RULES, FIELD) == ImageInfo(
        "jpeg", 40, 30, len(data)
    )


def test_png_declaring_a_huge_image_is_refused_before_decoding() -> None:
    data = _png_declaring(100_000, 100_000)
    assert len(data) < 100
    start = time.perf_counter()
    result = check_image_url(_url(data), RULES, FIELD)
    assert time.perf_counter() - start < 0.05
    refused = _refused(result, 413, "image_too_large")
    assert "100000x100000" in refused.message


def test_png_over_pixel_budget_but_within_each_side() -> None:
    rules = ImageRules(max_width=4096, max_height=4096, max_pixels=1_000_000)
    _refused(
        check_image_url(_url(_png_declaring(2000, 1000)), rules, FIELD), 413, "image_too_large"
    )
    # Within every limit, the same hand-made header reads fine (Pillow agrees with it).
    assert check_image_url(_url(_png_declaring(1000, 1000)), rules, FIELD) == ImageInfo(
        "png", 1000, 1000, len(_png_declaring(1000, 1000))
    )


def test_jpeg_declaring_a_huge_image_is_refused() -> None:
    data = _jpeg_with_size(_encode("JPEG"), 65_000, 65_000)
    _refused(check_image_url(_url(data, "image/jpeg"), RULES, FIELD), 413, "image_too_large")
    # Oversized and truncated right after its frame header: still "too large", not "truncated".
    head = data[: data.index(b"\xff\xc0") + 12]
    _refused(check_image_url(_url(head, "image/jpeg"), RULES, FIELD), 413, "image_too_large")


def test_webp_declaring_a_huge_canvas_is_refused() -> None:
    data = bytearray(_encode("WEBP", alpha=True, exif=b"Exif\x00\x00MM"))
    assert data[12:16] == b"VP8X"
    data[24:30] = (16_383).to_bytes(3, "little") * 2  # canvas 16384 x 16384
    _refused(check_image_url(_url(bytes(data), "image/webp"), RULES, FIELD), 413, "image_too_large")


def test_decoded_size_is_checked_from_the_length_alone() -> None:
    url = "data:image/png;base64," + "A" * (8 * 1024 * 1024)  # not even a PNG
    refused = _refused(check_image_url(url, RULES, FIELD), 413, "image_too_large")
    assert str(6 * 1024 * 1024) in refused.message
    small = ImageRules(max_bytes=100)
    _refused(check_image_url(_url(_encode("PNG", (50, 50))), small, FIELD), 413, "image_too_large")


def test_magic_must_agree_with_the_media_type() -> None:
    jpeg = _encode("JPEG")
    refused = _refused(check_image_url(_url(jpeg, "image/png"), RULES, FIELD), 422, "invalid_image")
    assert "JPEG" in refused.message
    text = b"<svg xmlns='http://www.w3.org/2000/svg'></svg>"
    _refused(check_image_url(_url(text, "image/webp"), RULES, FIELD), 422, "invalid_image")


@pytest.mark.parametrize("pillow_format", ["PNG", "JPEG", "WEBP"])
def test_truncated_images_are_malformed(pillow_format: str) -> None:
    data = _encode(pillow_format, (64, 64))
    media_type = f"image/{pillow_format.lower()}"
    for cut in (4, 20, 31, len(data) // 2):
        result = check_image_url(_url(data[:cut], media_type), RULES, FIELD)
        if pillow_format == "PNG" and cut == len(data) // 2:
            # Everything Pillow reads (through the IDAT chunk's header) is present: a PNG's
            # missing pixel data is the model server's to find.
            assert isinstance(result, ImageInfo)
            continue
        _refused(result, 422, "invalid_image")


def test_header_pillow_rejects_is_malformed() -> None:
    png = _encode("PNG")
    # An ancillary chunk with a wrong checksum, before the pixel data: Pillow refuses it.
    bad = _chunk(b"tEXt", b"k\x00v")[:-4] + b"\x00\x00\x00\x00"
    data = png[:33] + bad + png[33:]
    refused = _refused(check_image_url(_url(data), RULES, FIELD), 422, "invalid_image")
    assert refused.message == "the image header is malformed"
    # A wrong IHDR checksum is our own parser's to find.
    broken = bytearray(png)
    broken[30] ^= 0xFF
    _refused(check_image_url(_url(bytes(broken)), RULES, FIELD), 422, "invalid_image")


@pytest.mark.parametrize(
    "payload",
    ["!!!!", "iVBO R==", "iVBORw0KGgo===", "iVBORw0KG", "iVBO=w0K", "iVBORw0K\u00e9gAA", ""],
)
def test_invalid_base64_is_malformed(payload: str) -> None:
    url = "data:image/png;base64," + payload
    _refused(check_image_url(url, RULES, FIELD), 422, "invalid_image")


@pytest.mark.parametrize(
    "url",
    [
        "data:image/gif;base64,R0lGODlhAQABAAAAACw=",
        "data:image/svg+xml;base64,PHN2Zz4=",
        "data:;base64,AAAA",
        "data:text/plain;base64,AAAA",
    ],
)
def test_unsupported_types(url: str) -> None:
    _refused(check_image_url(url, RULES, FIELD), 415, "unsupported_image_type")


def test_format_not_in_the_rules_is_unsupported() -> None:
    rules = ImageRules(formats=frozenset({"png"}))
    url = _url(_encode("JPEG"), "image/jpeg")
    refused = _refused(check_image_url(url, rules, FIELD), 415, "unsupported_image_type")
    assert "image/png" in refused.message


def test_data_url_must_be_base64() -> None:
    _refused(check_image_url("data:image/png,%89PNG", RULES, FIELD), 422, "invalid_image")
    _refused(check_image_url("data:image/png;base64", RULES, FIELD), 422, "invalid_image")


def test_remote_urls() -> None:
    for url in ("https://169.254.169.254/latest/meta-data", "HTTP://example.com/cat.png"):
        _refused(check_image_url(url, RULES, FIELD), 422, "remote_image_not_allowed")
        assert check_image_url(url, ImageRules(allow_remote=True), FIELD) is None
    for url in ("file:///etc/passwd", "ftp://example.com/a.png", "cat.png"):
        _refused(check_image_url(url, ImageRules(allow_remote=True), FIELD), 422, "invalid_image")


def test_messages_do_not_echo_client_input() -> None:
    url = "data:image/" + "x" * 200 + ";base64,AAAA"
    refused = _refused(check_image_url(url, RULES, FIELD), 415, "unsupported_image_type")
    assert "x" * (MAX_QUOTED_CHARS + 1) not in refused.message


def test_rules_are_validated() -> None:
    with pytest.raises(ValueError, match="gif"):
        ImageRules(formats=frozenset({"png", "gif"}))
    with pytest.raises(ValueError, match="max_pixels"):
        ImageRules(max_pixels=100_000_000)
    with pytest.raises(ValueError, match="max_width"):
        ImageRules(max_width=0)
