"""Images sent inline in a request (`data:image/png;base64,...`): format and size, header only.

A tiny file can declare a huge image (a PNG header saying 100000x100000 is 33 bytes), and the
model server would allocate its pixels. So the width and height are read from the header here,
by a small parser of our own, and checked before anything else reads the image. Only the header
is decoded from base64: the first kilobyte, and more only when metadata (EXIF, ICC profiles, text
chunks) before the pixel data is longer. Pillow then reads the same header (`Image.open` is lazy;
`.load()` is never called) and must agree, for PNG and JPEG. WebP is not given to Pillow: its
WebP plugin creates libwebp's animation decoder on open, which allocates the whole canvas.

The decoded size comes from the payload's length, and the payload's alphabet is checked in one
pass without decoding it.
"""

from __future__ import annotations

import binascii
import struct
import zlib
from dataclasses import dataclass
from io import BytesIO
from typing import Literal

from PIL import Image

from extproc.inspect.violation import Violation, quoted

ImageFormat = Literal["png", "jpeg", "webp"]

# Pillow's own warning threshold: a higher configured limit would let Pillow warn (or, with
# warnings as errors, raise) on images we meant to accept. No model input is that large.
PILLOW_MAX_PIXELS = 89_478_485
_MEDIA_TYPES: dict[str, ImageFormat] = {
    "image/png": "png",
    "image/jpeg": "jpeg",
    "image/jpg": "jpeg",  # not registered, but common
    "image/webp": "webp",
}
_PILLOW_FORMATS: dict[str, str] = {"png": "PNG", "jpeg": "JPEG"}
_DATA_URL_HEADER_MAX = 256
_B64_ALPHABET = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
# Decoded bytes looked at first; JPEG headers (EXIF, ICC profiles) may need more, read in
# growing steps up to the whole image (whose size is already within max_bytes).
_FIRST_READ = 1024
_SCAN_CHARS = 1 << 16
# Segments or chunks in a header before the pixel data: real files have a handful.
_MAX_HEADER_PARTS = 1024

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Start-of-frame markers, which carry the dimensions: C0-CF but DHT (C4), JPG (C8), DAC (CC).
_JPEG_SOF = frozenset(
    {*range(0xC0, 0xC4), *range(0xC5, 0xC8), *range(0xC9, 0xCC), 0xCD, 0xCE, 0xCF}
)
_JPEG_STANDALONE = frozenset({0x01, *range(0xD0, 0xD8)})


@dataclass(frozen=True, slots=True)
class ImageRules:
    """What an inline image may be. Sizes are decoded bytes and pixels."""

    formats: frozenset[str] = frozenset({"png", "jpeg", "webp"})
    max_bytes: int = 5 * 1024 * 1024
    max_width: int = 4096
    max_height: int = 4096
    max_pixels: int = 16_777_216
    # An http(s) URL is fetched by the model server, from inside the network: SSRF.
    allow_remote: bool = False

    def __post_init__(self) -> None:
        unknown = self.formats - set(_MEDIA_TYPES.values())
        if unknown:
            raise ValueError(f"unknown image formats {sorted(unknown)}; known: png, jpeg, webp")
        for name in ("max_bytes", "max_width", "max_height", "max_pixels"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        if self.max_pixels > PILLOW_MAX_PIXELS:
            raise ValueError(f"max_pixels must be at most {PILLOW_MAX_PIXELS}")


@dataclass(frozen=True, slots=True)
class ImageInfo:
    """An accepted inline image: its format, dimensions and decoded size."""

    format: str
    width: int
    height: int
    bytes: int


@dataclass(frozen=True, slots=True)
class _Header:
    """What a parser learnt from a decoded prefix.

    `size` is set as soon as the dimensions are known (even alongside an error: a header that
    is too large is refused as such); `end` once the prefix holds the whole header Pillow reads
    (0 for a format Pillow is not given); `error` when it is malformed.
    """

    size: tuple[int, int] | None = None
    end: int | None = None
    error: str | None = None


def check_image_url(url: str, rules: ImageRules, field: str) -> ImageInfo | Violation | None:
    """Check one `image_url.url` of a request. None: a remote URL, allowed, so not inspected."""
    scheme = url[:8].lower()
    if scheme.startswith(("http://", "https://")):
        if rules.allow_remote:
            return None
        return Violation(
            422, "remote_image_not_allowed", field, "images must be sent inline as data: URLs"
        )
    if not scheme.startswith("data:"):
        return _invalid(field, "an image URL must be a data: URL")
    comma = url.find(",", 5, 5 + _DATA_URL_HEADER_MAX)
    if comma < 0:
        return _invalid(field, "not a data: URL (no comma in its header)")
    params = [part.strip().lower() for part in url[5:comma].split(";")]
    media_type = params[0]
    image_format = _MEDIA_TYPES.get(media_type)
    if image_format is None or image_format not in rules.formats:
        allowed = ", ".join(f"image/{name}" for name in sorted(rules.formats))
        return Violation(
            415,
            "unsupported_image_type",
            field,
            f"images of type {quoted(media_type)} are not accepted (allowed: {allowed})",
        )
    if len(params) < 2 or params[-1] != "base64":
        return _invalid(field, "an inline image must be base64-encoded")

    # The payload is read in place: a copy of a 7 MB string costs more than checking it.
    start = comma + 1
    end = len(url) - (2 if url.endswith("==") else 1 if url.endswith("=") else 0)
    size = (end - start) * 3 // 4
    if size > rules.max_bytes:
        return _too_large(field, f"the image is {size} bytes; at most {rules.max_bytes} allowed")
    if (end - start) % 4 == 1 or not url.isascii() or not _is_base64(url, start, end):
        return _invalid(field, "the image is not valid base64")
    return _check_header(_Payload(url, start, end), image_format, size, rules, field)


def _is_base64(text: str, start: int, end: int) -> bool:
    """Whether text[start:end] is all base64 digits; in slices, which stay in the CPU cache."""
    for at in range(start, end, _SCAN_CHARS):
        if text[at : min(at + _SCAN_CHARS, end)].encode("ascii").translate(None, _B64_ALPHABET):
            return False
    return True


@dataclass(frozen=True, slots=True)
class _Payload:
    """The base64 digits of a data: URL, text[start:end], padding excluded."""

    text: str
    start: int
    end: int

    def decode(self, wanted: int) -> bytes:
        """The first `wanted` decoded bytes, or all of them: whole groups of 4 digits only."""
        stop = self.start + -(-wanted // 3) * 4
        if stop < self.end:
            chunk = self.text[self.start : stop]
        else:
            chunk = self.text[self.start : self.end] + "=" * (-(self.end - self.start) % 4)
        return binascii.a2b_base64(chunk, strict_mode=True)  # the alphabet is already checked


def _check_header(
    payload: _Payload, image_format: ImageFormat, size: int, rules: ImageRules, field: str
) -> ImageInfo | Violation:
    if size == 0:
        return _invalid(field, "the image is empty")
    wanted = _FIRST_READ
    data = payload.decode(wanted)
    actual = _sniff(data)
    if actual != image_format:
        what = f"a {actual.upper()} image" if actual else "not an image we can read"
        return _invalid(field, f"the data is {what}, but is declared image/{image_format}")
    parse = _PARSERS[image_format]
    checked = False
    while True:
        header = parse(data, size)
        if header.size is not None and not checked:
            # Before any more is decoded, and before Pillow sees it.
            too_large = _check_dimensions(*header.size, rules, field)
            if too_large is not None:
                return too_large
            checked = True
        if header.error is not None:
            return _invalid(field, header.error)
        if header.size is not None and header.end is not None:
            if image_format in _PILLOW_FORMATS:
                problem = _pillow_agrees(data[: header.end], image_format, header.size)
                if problem is not None:
                    return _invalid(field, problem)
            return ImageInfo(image_format, *header.size, size)
        if len(data) >= size:
            return _invalid(field, "the image is truncated")
        wanted *= 8
        data = payload.decode(wanted)


def _sniff(data: bytes) -> ImageFormat | None:
    """The format the data's magic signature says."""
    if data.startswith(_PNG_SIGNATURE):
        return "png"
    if data.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return None


def _check_dimensions(width: int, height: int, rules: ImageRules, field: str) -> Violation | None:
    if width < 1 or height < 1:
        return _invalid(field, f"the image header declares {width}x{height} pixels")
    if width > rules.max_width or height > rules.max_height:
        return _too_large(
            field,
            f"the image is {width}x{height} pixels; "
            f"at most {rules.max_width}x{rules.max_height} allowed",
        )
    if width * height > rules.max_pixels:
        return _too_large(
            field, f"the image has {width * height} pixels; at most {rules.max_pixels} allowed"
        )
    return None


def _pillow_agrees(header: bytes, image_format: str, size: tuple[int, int]) -> str | None:
    """Pillow's reading of the header: None when it agrees with ours, else what is wrong."""
    pillow_format = _PILLOW_FORMATS[image_format]
    try:
        with Image.open(BytesIO(header), formats=[pillow_format]) as image:
            seen = (image.format, image.size)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        # Unreachable while max_pixels <= PILLOW_MAX_PIXELS (ImageRules ensures it).
        return "the image is too large for the image reader"
    except Exception:  # Pillow raises many types on malformed input: all mean "malformed"
        return "the image header is malformed"
    if seen != (pillow_format, size):
        return "the image header is inconsistent"
    return None


def _png_header(data: bytes, total: int) -> _Header:
    if len(data) < 33:
        return _Header()
    length, kind, width, height = struct.unpack(">I4sII", data[8:24])
    if kind != b"IHDR" or length != 13:
        return _Header(error="the PNG file does not start with its IHDR chunk")
    if zlib.crc32(data[12:29]) != struct.unpack(">I", data[29:33])[0]:
        return _Header(error="the PNG header's checksum is wrong")
    # Pillow reads every chunk up to the first IDAT's length and type.
    offset = 33
    for _ in range(_MAX_HEADER_PARTS):
        if offset + 8 > len(data):
            return _Header(size=(width, height))
        length, kind = struct.unpack(">I4s", data[offset : offset + 8])
        if kind == b"IDAT":
            return _Header(size=(width, height), end=offset + 8)
        if kind == b"IEND":
            return _Header(error="the PNG file has no image data")
        offset += 12 + length
        if offset > total:
            return _Header(error="the image is truncated")
    return _Header(error="the PNG file has too many chunks before its image data")


def _jpeg_header(data: bytes, total: int) -> _Header:
    if len(data) < 4:
        return _Header()
    size: tuple[int, int] | None = None
    offset = 2
    for _ in range(_MAX_HEADER_PARTS):
        while offset + 1 < len(data) and data[offset] == data[offset + 1] == 0xFF:
            offset += 1  # fill bytes before a marker
        if offset + 4 > len(data):
            return _Header(size=size)
        if data[offset] != 0xFF:
            return _Header(error="the JPEG header is malformed")
        marker = data[offset + 1]
        if marker in _JPEG_STANDALONE:
            offset += 2
            continue
        if marker == 0xD9:
            return _Header(error="the JPEG file has no image data")
        (length,) = struct.unpack(">H", data[offset + 2 : offset + 4])
        end = offset + 2 + length
        if marker in _JPEG_SOF and size is None:
            if offset + 9 > len(data):
                return _Header()
            height, width = struct.unpack(">HH", data[offset + 5 : offset + 9])
            size = (width, height)
        if length < 2 or end > total:
            return _Header(size=size, error="the image is truncated")
        if marker == 0xDA:  # start of scan: the header ends with this segment
            if size is None:
                return _Header(error="the JPEG file has no frame header")
            return _Header(size=size, end=end) if end <= len(data) else _Header(size=size)
        offset = end
    return _Header(error="the JPEG file has too many segments before its image data")


def _webp_header(data: bytes, total: int) -> _Header:
    if len(data) < 30:
        return _Header()
    (riff_size,) = struct.unpack("<I", data[4:8])
    if riff_size + 8 > total:
        return _Header(error="the image is truncated")
    chunk = data[12:16]
    if chunk == b"VP8 " and data[23:26] == b"\x9d\x01\x2a":
        width, height = struct.unpack("<HH", data[26:30])
        return _Header(size=(width & 0x3FFF, height & 0x3FFF), end=0)
    if chunk == b"VP8L" and data[20] == 0x2F:
        (bits,) = struct.unpack("<I", data[21:25])
        return _Header(size=((bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1), end=0)
    if chunk == b"VP8X":
        width = int.from_bytes(data[24:27], "little") + 1
        height = int.from_bytes(data[27:30], "little") + 1
        return _Header(size=(width, height), end=0)
    return _Header(error="the WebP header is malformed")


_PARSERS = {"png": _png_header, "jpeg": _jpeg_header, "webp": _webp_header}


def _invalid(field: str, message: str) -> Violation:
    return Violation(422, "invalid_image", field, message)


def _too_large(field: str, message: str) -> Violation:
    return Violation(413, "image_too_large", field, message)
