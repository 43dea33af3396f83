"""Frame admission and decoding: every check that can be made before decoding is made first.

A frame is refused with a :class:`FrameError` (a stable ``code`` plus a human
message) when its payload is too large, not a JPEG/PNG/BMP, larger than the pixel
limit according to its header (decompression bombs never reach the decoder),
truncated, or not decodable.  Pillow reads only the header; OpenCV decodes.
"""

from __future__ import annotations

import io
import warnings

import cv2
import numpy as np
from PIL import Image

from worker.wire import ErrorCode

# Our own pixel limit applies; Pillow's global bomb check would otherwise warn or raise on open.
Image.MAX_IMAGE_PIXELS = None

FORMATS = {"JPEG": "jpeg", "PNG": "png", "BMP": "bmp"}


class FrameError(Exception):
    """A frame the worker will not process; ``code`` is part of the published error API."""

    def __init__(self, code: ErrorCode | str, message: str) -> None:
        super().__init__(message)
        self.code = ErrorCode(code)
        self.message = message


def use_opencv_threads(n: int) -> None:
    """OpenCV's threads per call, process-wide: ``n`` (1 = the calling thread), or 0 for OpenCV's own pool.

    OpenCV's own ``setNumThreads(0)`` would mean "no threading", so 0 is passed on as its "default" (-1).
    """
    cv2.setNumThreads(n or -1)


def probe(data: bytes, max_bytes: int, max_pixels: int) -> str:
    """Check size, format and dimensions from the header only; returns the format name."""
    if not data:
        raise FrameError("empty_payload", "the frame payload is empty")
    if len(data) > max_bytes:
        raise FrameError("payload_too_large", f"payload is {len(data)} bytes, limit is {max_bytes}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            header = Image.open(io.BytesIO(data))
            fmt, (width, height) = header.format, header.size
    except Exception as exc:  # Pillow raises many types for garbage; all mean the same here
        raise FrameError("not_an_image", f"payload is not a recognised image ({type(exc).__name__})") from None
    if fmt not in FORMATS:
        raise FrameError("unsupported_format", f"image format {fmt} is not accepted (JPEG, PNG or BMP)")
    if width <= 0 or height <= 0:
        raise FrameError("bad_dimensions", f"image header says {width}x{height}")
    if width * height > max_pixels:
        raise FrameError("image_too_large", f"image is {width}x{height} = {width * height} pixels, limit is {max_pixels}")
    if fmt == "JPEG" and not data.rstrip(b"\x00").endswith(b"\xff\xd9"):
        raise FrameError("truncated_image", "JPEG has no end-of-image marker (truncated)")
    return FORMATS[fmt]


def decode(data: bytes) -> np.ndarray:
    """Decode an admitted frame to 8-bit BGR."""
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if image is None:
        raise FrameError("corrupt_image", "the image header is valid but its data cannot be decoded")
    return image
