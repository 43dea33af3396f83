"""Frame admission and decoding: every check that can be made before decoding is made first.

A frame is refused with a :class:`FrameError` (a stable ``code`` plus a human
message) when its payload is too large, not a JPEG/PNG/BMP/TIFF/WebP, larger than the pixel
limit according to its header (decompression bombs never reach the decoder),
truncated (a JPEG or PNG cut short), or not decodable.  Pillow reads only the header; simplejpeg (libjpeg-turbo)
decodes a JPEG, OpenCV every other format and the JPEGs simplejpeg does not take.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Mapping
from typing import NamedTuple

import cv2
import numpy as np
from PIL import Image

from bundle import (
    FRAME_FORMATS,
    TIFF_LAYOUT_FIX,
    JpegCutShort,
    decode_jpeg,
    jpeg_cut_short,
    jpeg_segments,
    png_cut_short,
    png_damaged,
    quiet_png,
    tiff_layout,
    tiff_samples,
)
from worker.wire import ErrorCode

# Our own pixel limit applies; Pillow's global bomb check would otherwise warn or raise on open.
Image.MAX_IMAGE_PIXELS = None
# OpenCV logs libtiff's complaints about a damaged TIFF (two lines or more per frame, and none names the frame):
# a camera on a bad link would fill the journal.  The worker answers every frame it cannot decode itself (error
# topic, counter, its own log line), so OpenCV keeps only fatal messages.
cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_FATAL)

# A progressive JPEG's scans each pass over the whole picture again, and the format does not bound their number: a
# small file of thousands of repeated scans would hold an inference thread for minutes.  Encoders write about ten
# (libjpeg's progression: 6 for grey, 10 for colour), so a frame of more is refused before decoding.
MAX_JPEG_SCANS = 100
REDUCED_HEADROOM = 2.0  # a frame decoded smaller still has twice the model's input on its shorter side
# OpenCV decodes no image of more pixels or longer sides than its defaults (CV_IO_MAX_IMAGE_PIXELS, _WIDTH,
# _HEIGHT), nor libpng, as OpenCV builds it, a PNG of a side over its default user limit: such a frame is refused
# from its header, whatever limits.max_pixels allows, instead of failing in the decoder.
DECODE_MAX_PIXELS = 1 << 30
DECODE_MAX_SIDE = 1 << 20
PNG_MAX_SIDE = 1_000_000
_REDUCED = {2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4, 8: cv2.IMREAD_REDUCED_COLOR_8}


class Header(NamedTuple):
    """What a frame's header says: its format name (a value of bundle.FRAME_FORMATS) and size."""

    format: str
    width: int
    height: int


class FrameError(Exception):
    """A frame the worker will not process; ``code`` is part of the published error API."""

    def __init__(self, code: ErrorCode | str, message: str) -> None:
        super().__init__(message)
        self.code = ErrorCode(code)
        self.message = message
        self.frame_id: str | None = None  # the frame's id where only the refused payload held it (a JSON envelope)


def use_opencv_threads(n: int) -> None:
    """OpenCV's threads per call, process-wide: ``n`` (1 = the calling thread), or 0 for OpenCV's own pool.

    OpenCV's own ``setNumThreads(0)`` would mean "no threading", so 0 is passed on as its "default" (-1).
    """
    cv2.setNumThreads(n or -1)


def check_payload(data: bytes, max_bytes: int) -> None:
    """A frame's bytes against the byte limit, before anything reads them (a file or a raw buffer)."""
    if not data:
        raise FrameError("empty_payload", "the frame payload is empty")
    if len(data) > max_bytes:
        raise FrameError("payload_too_large", f"payload is {len(data)} bytes, limit is {max_bytes}")


def check_area(width: int, height: int, max_pixels: int) -> None:
    """A frame's size, as its header or its declaration says, against the pixel limit: nothing past it is decoded."""
    if width * height > max_pixels:
        raise FrameError("image_too_large", f"image is {width}x{height} = {width * height} pixels, limit is {max_pixels}")


def _opened(data: bytes) -> Image.Image:
    """Pillow's header of ``data``; of a PNG Pillow refuses whole for a damaged ancillary chunk, the header of what
    is decoded (:func:`bundle.quiet_png`).  Tried as it is first: a PNG with a colour profile is not copied for it."""
    try:
        return Image.open(io.BytesIO(data))
    except Exception:
        if (quiet := quiet_png(data)) is data:
            raise
        return Image.open(io.BytesIO(quiet))


def probe(data: bytes, max_bytes: int, max_pixels: int) -> Header:
    """Check size, format and dimensions from the header only."""
    check_payload(data, max_bytes)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            header = _opened(data)
            fmt, (width, height), mode = header.format, header.size, header.mode
    except Exception as exc:  # Pillow raises many types for garbage; all mean the same here
        if (samples := tiff_samples(data)) is not None:
            raise FrameError("unsupported_format", f"TIFF with {samples} samples is not accepted (8- or 16-bit "
                                                   "unsigned samples)") from None
        if (layout := tiff_layout(data)) is not None:  # 16-bit grey and alpha: was not_an_image
            raise FrameError("unsupported_format", f"TIFF of {layout} is not accepted (its header is not read in "
                                                   f"that layout): {TIFF_LAYOUT_FIX}") from None
        raise FrameError("not_an_image", f"payload is not a recognised image ({type(exc).__name__})") from None
    if fmt not in FRAME_FORMATS:
        raise FrameError("unsupported_format", f"image format {fmt} is not accepted (JPEG, PNG, BMP, TIFF or WebP)")
    tags = getattr(header, "tag_v2", {}) if fmt == "TIFF" else {}  # a TIFF's header fields, by tag number
    if fmt == "TIFF" and (mode in ("F", "I") or _signed(tags)):  # no fixed way to 8 bits (was: corrupt_image)
        raise FrameError("unsupported_format", f"TIFF with {'32-bit floating-point' if mode == 'F' else '32-bit or signed integer'} "
                                               "samples is not accepted (8- or 16-bit unsigned samples)")
    if fmt == "TIFF" and (samples := tiff_samples(data)) is not None:  # 12-bit: was corrupt_image or not_an_image
        raise FrameError("unsupported_format", f"TIFF with {samples} samples is not accepted (8- or 16-bit unsigned "
                                               "samples)")
    if width <= 0 or height <= 0:
        raise FrameError("bad_dimensions", f"image header says {width}x{height}")
    check_area(width, height, max_pixels)
    side = PNG_MAX_SIDE if FRAME_FORMATS[fmt] == "png" else DECODE_MAX_SIDE
    if width * height > DECODE_MAX_PIXELS or max(width, height) > side:
        raise FrameError("image_too_large", f"image is {width}x{height}: the decoder takes at most {DECODE_MAX_PIXELS} "
                                            f"pixels and {side} on a side")
    # libtiff inflates a whole tile, whatever the picture's size: a tile is checked as a picture
    tile_width, tile_length = tags.get(322), tags.get(323)  # TileWidth, TileLength: absent in a TIFF of strips
    if isinstance(tile_width, int) and isinstance(tile_length, int) and tile_width * tile_length > max_pixels:
        raise FrameError("image_too_large", f"TIFF tiles are {tile_width}x{tile_length} = {tile_width * tile_length} "
                                            f"pixels (in a {width}x{height} image), limit is {max_pixels}")
    if FRAME_FORMATS[fmt] == "png" and png_cut_short(data):
        raise FrameError("truncated_image", "PNG ends before its IEND chunk (truncated)")
    if FRAME_FORMATS[fmt] == "png" and (chunk := png_damaged(data)) is not None:
        raise FrameError("corrupt_image", f"PNG chunk {chunk} does not match its CRC (damaged on its way)")
    if FRAME_FORMATS[fmt] == "jpeg":
        if jpeg_cut_short(data):
            raise FrameError("truncated_image", "JPEG has no end-of-image marker after its last scan (truncated)")
        if (scans := jpeg_scans(data)) > MAX_JPEG_SCANS:
            raise FrameError("unsupported_format", f"JPEG of {scans} scans is not accepted (at most {MAX_JPEG_SCANS}: "
                                                   "each is one more pass over the whole picture)")
    return Header(FRAME_FORMATS[fmt], width, height)


def _signed(tags: Mapping[int, object]) -> bool:
    """Whether a TIFF's SampleFormat tag (339) says signed integer or floating-point samples: Pillow opens 8-bit
    signed ones as unsigned, and OpenCV would wrap -1 to 255."""
    formats = tags.get(339)
    values = formats if isinstance(formats, tuple) else (formats,)
    return any(v not in (None, 1) for v in values)


def jpeg_scans(data: bytes, limit: int = MAX_JPEG_SCANS) -> int:
    """How many scans the first picture of a JPEG has, where that can be more than ``limit``; else a bound of at
    most ``limit``.  Inside a scan's coded data a 0xFF byte is always followed by 0x00 or a restart marker, so the
    scan marker FF DA appears only as a marker or inside a marker segment's payload (an EXIF thumbnail, a maker
    note): its count over the bytes is a bound, and the segments are walked (:func:`bundle.jpeg_segments`) only where
    the bound passes ``limit``."""
    if (bound := data.count(b"\xff\xda")) <= limit:
        return bound
    return sum(segment.marker == 0xDA for segment in jpeg_segments(data))


def reduction(header: Header, width: int, height: int, headroom: float = REDUCED_HEADROOM) -> int:
    """The largest of 2, 4 and 8 by which a JPEG frame can be decoded and still cover ``headroom`` times ``width`` x
    ``height`` (the model's input) on both sides, else 1.  libjpeg then scales while decoding, in the DCT domain, at
    a fraction of a full decode's cost, and the smaller image needs a smaller resize; other formats decode in full.
    The headroom keeps the last resize an average over several pixels, as from the full frame: resized from just
    above the input's size, the model's input took another grid of pixels and scores moved with a direction
    (docs/benchmarks.md, "Large frames decoded smaller").  The shorter side must cover the longer one: the header's
    sides are before any EXIF rotation the decoder applies."""
    if header.format != "jpeg":
        return 1
    need = headroom * max(width, height)
    return max((f for f in _REDUCED if min(header.width, header.height) // f >= need), default=1)


def decode(data: bytes, reduce: int = 1) -> np.ndarray:
    """Decode an admitted frame to 8-bit BGR, at 1/``reduce`` of its size (a :func:`reduction`; 1 = full size)."""
    if data.startswith(b"\xff\xd8") and (image := _jpeg(data, reduce)) is not None:
        return image
    data = quiet_png(data)
    image = cv2.imdecode(np.frombuffer(data, np.uint8), _REDUCED[reduce] if reduce > 1 else cv2.IMREAD_COLOR)
    if image is None:
        raise FrameError("corrupt_image", "the image header is valid but its data cannot be decoded")
    return image


def _jpeg(data: bytes, reduce: int) -> np.ndarray | None:
    """:func:`bundle.decode_jpeg`, a JPEG cut short refused as a frame."""
    try:
        return decode_jpeg(data, reduce)
    except JpegCutShort as exc:
        raise FrameError("truncated_image", f"JPEG's coded data ends before its picture does ({exc}): cut short on "
                                            "its way") from None
