"""Raw pixel buffers, as machine-vision cameras deliver them (GigE Vision, USB3 Vision), for bridges that publish a
camera's buffer as it is instead of encoding it to a file.

A frame says what it is: ``pixel_format`` (a GenICam PFNC name, :data:`worker.wire.PIXEL_FORMATS`), ``width`` and
``height``, as user properties, envelope fields or ``cameras.<id>.pixels``.  Admission checks the declaration against
the payload's length and the pixel limit, allocating nothing; the conversion to 8-bit BGR runs on the inference
thread, where a file would be decoded.  What the worker keeps of such a frame (evidence, the capture sample) is a
TIFF that decodes to the same pixels, so a label or an export reads back what was scored.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import cv2
import numpy as np

from worker.decode import FrameError, Header, check_area, check_payload
from worker.wire import PIXEL_FIELDS, PIXEL_FORMATS, ErrorCode, PixelFormat

if TYPE_CHECKING:
    from worker.config import PixelsConfig

RAW = "raw"  # Header.format of a raw buffer: no file format, never decoded smaller
_TO_BGR = {"mono": cv2.COLOR_GRAY2BGR, "RGB": cv2.COLOR_RGB2BGR, "BGR": None,
           # edge-aware demosaicing: fewer false colours along edges than bilinear
           "RGGB": cv2.COLOR_BayerRGGB2BGR_EA, "GBRG": cv2.COLOR_BayerGBRG2BGR_EA,
           "GRBG": cv2.COLOR_BayerGRBG2BGR_EA, "BGGR": cv2.COLOR_BayerBGGR2BGR_EA}
_SIDE = re.compile(r"[0-9]{1,9}")
# How image files begin (JPEG, PNG, BMP, TIFF, WebP): named when a declared buffer's length does not fit.
_FILE_SIGNATURES = (b"\xff\xd8\xff", b"\x89PNG", b"BM", b"II*\x00", b"MM\x00*", b"RIFF")


@dataclass(frozen=True)
class Pixels:
    """A frame's declared raw layout: rows of ``width`` pixels, ``height`` of them, unpadded."""

    format: str
    width: int
    height: int

    @property
    def spec(self) -> PixelFormat:
        return PIXEL_FORMATS[self.format]

    @property
    def nbytes(self) -> int:
        return -(-self.width * self.height * self.spec.bits_per_pixel // 8)  # a packed buffer's last byte may be part-filled

    def header(self) -> Header:
        return Header(RAW, self.width, self.height)


def _said(fields: Mapping[str, str], default: PixelsConfig | None) -> dict[str, str | None]:
    """A frame's pixel fields (user properties or envelope fields), each over the camera's ``pixels``."""
    said = {name: fields.get(name) or None for name in PIXEL_FIELDS}
    if default is None:
        return said
    return {"pixel_format": said["pixel_format"] or default.format, "width": said["width"] or str(default.width),
            "height": said["height"] or str(default.height)}


def is_buffer(fields: Mapping[str, str], default: PixelsConfig | None) -> bool:
    """Whether the payload is a raw buffer (its declaration read later, by :func:`declared`), not an image file."""
    return _said(fields, default)["pixel_format"] is not None


def declared(fields: Mapping[str, str], default: PixelsConfig | None) -> Pixels | None:
    """The layout a frame's fields declare, each over the camera's ``pixels``; None for an image file."""
    said = _said(fields, default)
    return declare(said["pixel_format"], said["width"], said["height"])


def declare(pixel_format: str | None, width: str | None, height: str | None) -> Pixels | None:
    """The layout a frame declares, or None where it names no pixel format (the payload is an image file).
    FrameError for a declaration that cannot be read."""
    if pixel_format is None:
        return None
    if pixel_format not in PIXEL_FORMATS:
        raise FrameError(ErrorCode.UNSUPPORTED_FORMAT, f"pixel format {pixel_format[:40]!r} is not accepted "
                                                       f"({', '.join(PIXEL_FORMATS)}; not other packed formats or YUV)")
    missing = [name for name, value in (("width", width), ("height", height)) if value is None]
    if missing:
        raise FrameError(ErrorCode.MISSING_METADATA, f"pixel_format {pixel_format} needs {' and '.join(missing)} (user "
                                                     "properties, envelope fields or cameras.<id>.pixels)")
    sides = []
    for name, value in (("width", width), ("height", height)):
        text = str(value).strip()
        if not _SIDE.fullmatch(text):
            raise FrameError(ErrorCode.BAD_METADATA, f"{name} {text[:40]!r} is not a whole number of pixels")
        sides.append(int(text))
    if 0 in sides:
        raise FrameError(ErrorCode.BAD_DIMENSIONS, f"pixel_format {pixel_format} of {sides[0]}x{sides[1]} pixels")
    return Pixels(pixel_format, sides[0], sides[1])


def check(data: bytes, pixels: Pixels, max_bytes: int, max_pixels: int) -> Header:
    """What :func:`worker.decode.probe` checks of a file, for a raw buffer: its size against the limits and its
    length against the declaration (a row more or less is a declaration or a bridge that is wrong, not a frame)."""
    check_payload(data, max_bytes)
    check_area(pixels.width, pixels.height, max_pixels)
    if len(data) != pixels.nbytes:
        said = (f"payload is {len(data)} bytes; a {pixels.format} frame of {pixels.width}x{pixels.height} is "
                f"{pixels.nbytes}")
        if data.startswith(_FILE_SIGNATURES):
            said += " (the payload begins like an image file: a camera that sends files declares no pixel_format)"
        if len(data) < pixels.nbytes:
            raise FrameError(ErrorCode.TRUNCATED_IMAGE, said)
        raise FrameError(ErrorCode.BAD_DIMENSIONS, said + ": width, height or pixel_format is wrong, or the rows are "
                                                          "padded (send them unpadded)")
    return pixels.header()


def _samples(data: bytes, pixels: Pixels) -> np.ndarray:
    """A deep format's samples (grey, or a Bayer mosaic), one uint16 each (packed ones unpacked), in rows."""
    spec, count = pixels.spec, pixels.width * pixels.height
    if spec.packing == "none":
        return np.frombuffer(data, "<u2").reshape(pixels.height, pixels.width)
    group = 5 if spec.bits == 10 else 3  # the bytes that hold a whole number of samples: 4 of 10 bits, 2 of 12
    raw = np.zeros(-(-len(data) // group) * group, np.uint8)
    raw[: len(data)] = np.frombuffer(data, np.uint8)
    b = raw.reshape(-1, group).T.astype(np.uint16)
    if spec.packing == "gige":  # 12Packed: pixel 0's bits 11-4, both pixels' bits 3-0, pixel 1's bits 11-4
        unpacked = [b[0] << 4 | b[1] & 0xF, b[2] << 4 | b[1] >> 4]
    elif spec.bits == 12:  # 12p
        unpacked = [b[0] | (b[1] & 0xF) << 8, b[1] >> 4 | b[2] << 4]
    else:  # 10p
        unpacked = [b[0] | (b[1] & 0x3) << 8, b[1] >> 2 | (b[2] & 0xF) << 6, b[2] >> 4 | (b[3] & 0x3F) << 4,
                    b[3] >> 6 | b[4] << 2]
    return np.stack(unpacked, axis=1).ravel()[:count].reshape(pixels.height, pixels.width)


def _full_scale(data: bytes, pixels: Pixels) -> np.ndarray:
    """A deep format's samples moved to the top of 16 bits (Mono12's 4095 becomes 65520), as a 16-bit file
    holds them; samples above the format's range are clipped."""
    bits = pixels.spec.bits
    return (np.minimum(_samples(data, pixels), (1 << bits) - 1) << (16 - bits)).astype(np.uint16)


def to_bgr(data: bytes, pixels: Pixels) -> np.ndarray:
    """8-bit BGR, as :func:`worker.decode.decode` makes of a file: 16-bit samples become their top 8 bits, as OpenCV
    reads a 16-bit file, so the frame and its kept TIFF (:func:`lossless_file`) give the same pixels."""
    spec = pixels.spec
    if spec.bits > 8:
        image = (_full_scale(data, pixels) >> 8).astype(np.uint8)
    else:
        image = np.frombuffer(data, np.uint8).reshape(pixels.height, pixels.width, spec.bits_per_pixel // 8)
    conversion = _TO_BGR[spec.colour]
    return image.copy() if conversion is None else cv2.cvtColor(image, conversion)  # a copy: the payload is read-only


def image_file(data: bytes, fmt: str, pixels: Pixels | None) -> tuple[bytes, str]:
    """A frame as the image file the worker keeps (evidence, the capture sample) and its extension: as sent (``fmt``),
    or a raw buffer's TIFF."""
    return (data, fmt) if pixels is None else (lossless_file(data, pixels), "tiff")


def lossless_file(data: bytes, pixels: Pixels) -> bytes:
    """The frame as an uncompressed TIFF (grey, 16-bit grey at full scale, or the demosaiced colour as scored): what the
    worker keeps of it and the exporter trains on."""
    spec = pixels.spec
    if spec.colour == "mono" and spec.bits > 8:
        image = _full_scale(data, pixels)
    elif spec.colour == "mono":
        image = np.frombuffer(data, np.uint8).reshape(pixels.height, pixels.width)
    else:
        image = to_bgr(data, pixels)
    ok, encoded = cv2.imencode(".tiff", image, [cv2.IMWRITE_TIFF_COMPRESSION, 1])
    if not ok:
        raise FrameError(ErrorCode.CORRUPT_IMAGE, f"a {pixels.format} frame of {pixels.width}x{pixels.height} "
                                                  "could not be written as a TIFF")
    return encoded.tobytes()
