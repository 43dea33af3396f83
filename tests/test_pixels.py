"""Raw pixel buffers (worker/pixels.py): what a machine-vision camera's bridge publishes when it does not encode the
buffer.  The conversion is checked against real images and OpenCV's own decoder; the end-to-end path through a
worker is in tests/test_cameras.py."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from worker.decode import FrameError, decode, probe
from worker.pixels import Pixels, check, declare, lossless_file, to_bgr
from worker.wire import PIXEL_FORMATS, ErrorCode

# BGR colours, far apart, and the Bayer patterns by the PFNC name of the sensor's top-left 2 x 2
COLOURS = [(40, 90, 200), (230, 20, 60), (10, 250, 30)]
CHANNEL = {"B": 0, "G": 1, "R": 2}


def _buffer(image: np.ndarray, pixel_format: str) -> bytes:
    """A BGR image as a camera would send it in ``pixel_format`` (made independently of worker/pixels.py)."""
    spec = PIXEL_FORMATS[pixel_format]
    if spec.colour == "RGB":
        return np.ascontiguousarray(image[..., ::-1]).tobytes()
    if spec.colour == "BGR":
        return image.tobytes()
    if spec.colour == "mono":
        grey = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)
        if spec.bits == 8:
            return grey.tobytes()
        return _packed((grey.astype(np.uint16) << (spec.bits - 8)).ravel().tolist(), pixel_format)
    mosaic = np.empty(image.shape[:2], np.uint8)
    for (dy, dx), colour in zip([(0, 0), (0, 1), (1, 0), (1, 1)], spec.colour, strict=True):
        mosaic[dy::2, dx::2] = image[dy::2, dx::2, CHANNEL[colour]]
    if spec.bits == 8:
        return mosaic.tobytes()
    return _packed((mosaic.astype(np.uint16) << (spec.bits - 8)).ravel().tolist(), pixel_format)


def _packed(samples: list[int], pixel_format: str) -> bytes:
    """Deep samples (grey, or a Bayer mosaic) laid out as the format says, bit by bit (independently of worker/pixels.py)."""
    spec = PIXEL_FORMATS[pixel_format]
    if spec.packing == "none":
        return np.array(samples, "<u2").tobytes()
    if spec.packing == "lsb":  # PFNC "p": one stream of samples, least significant bit first
        stream = sum(v << (spec.bits * i) for i, v in enumerate(samples))
        return stream.to_bytes(-(-len(samples) * spec.bits // 8), "little")
    out = bytearray()  # GigE Vision Mono12Packed: high bits of pixel 0, both low nibbles, high bits of pixel 1
    for i in range(0, len(samples), 2):
        first, second = samples[i], samples[i + 1] if i + 1 < len(samples) else 0
        out += bytes([first >> 4, (first & 0xF) | (second & 0xF) << 4, second >> 4])
    return bytes(out[: -(-len(samples) * 12 // 8)])


@pytest.mark.parametrize("pixel_format", list(PIXEL_FORMATS))
def test_each_format_converts_to_the_colours_sent_and_its_kept_file_reads_back_the_same(pixel_format, dataset):
    """A flat colour arrives as that colour (Bayer: inside, where demosaicing has neighbours of every colour; grey
    formats: its grey, whatever their depth), a real image the same way, and the TIFF the worker keeps (evidence, the
    capture sample) decodes to exactly the pixels that were scored."""
    spec = PIXEL_FORMATS[pixel_format]
    for colour in COLOURS:
        flat = np.full((24, 30, 3), colour, np.uint8)
        pixels = Pixels(pixel_format, 30, 24)
        seen = to_bgr(_buffer(flat, pixel_format), pixels)
        expected = cv2.cvtColor(cv2.cvtColor(flat, cv2.COLOR_BGR2GRAY), cv2.COLOR_GRAY2BGR) if spec.colour == "mono" else flat
        assert seen.shape == (24, 30, 3) and seen.dtype == np.uint8
        assert np.array_equal(seen[4:-4, 4:-4], expected[4:-4, 4:-4]), (colour, seen[12, 15])
    image = cv2.imread(str(min((dataset / "weave" / "test" / "good").glob("*.png"))))
    height, width = image.shape[:2]
    pixels = Pixels(pixel_format, width, height)
    data = _buffer(image, pixel_format)
    assert check(data, pixels, len(data), width * height) == pixels.header()
    scored = to_bgr(data, pixels)
    if spec.colour in ("RGB", "BGR"):
        assert np.array_equal(scored, image)
    kept = lossless_file(data, pixels)
    header = probe(kept, len(kept), width * height)
    assert (header.format, header.width, header.height) == ("tiff", width, height)
    assert np.array_equal(decode(kept), scored)


def test_deep_grey_samples_keep_their_top_eight_bits_as_a_16_bit_file_does():
    """Mono12's 4095 is white and 2048 mid-grey; a sample past the format's range is clipped, not wrapped; the kept
    16-bit TIFF holds them at full scale, so the exporter trains on what the worker scored. Packed, the same samples
    read the same, an odd count too (the last byte part-filled)."""
    samples = np.array([[0, 2048, 4095, 4096, 65535, 15]], "<u2")
    pixels = Pixels("Mono12", 6, 1)
    scored = to_bgr(samples.tobytes(), pixels)[0, :, 0]
    assert scored.tolist() == [0, 128, 255, 255, 255, 0]
    kept = cv2.imdecode(np.frombuffer(lossless_file(samples.tobytes(), pixels), np.uint8), cv2.IMREAD_UNCHANGED)
    assert kept.dtype == np.uint16 and kept[0].tolist() == [0, 32768, 65520, 65520, 65520, 240]
    in_range = [0, 2048, 4095, 1, 4094, 15, 300]
    for packed in ("Mono12p", "Mono12Packed"):
        data = _packed(in_range, packed)
        assert len(data) == Pixels(packed, 7, 1).nbytes == 11
        assert np.array_equal(to_bgr(data, Pixels(packed, 7, 1)), to_bgr(_packed(in_range, "Mono12"), Pixels("Mono12", 7, 1)))
    # Known answers, as the formats' documents lay the bytes out (GigE Vision: pixel 0's bits 11-4, then pixel 1's low
    # nibble above pixel 0's, then pixel 1's bits 11-4; PFNC's Mono12p: least significant bits first)
    for packed, data in (("Mono12Packed", bytes([0xAB, 0xFC, 0xDE])), ("Mono12p", bytes([0xBC, 0xFA, 0xDE]))):
        kept = cv2.imdecode(np.frombuffer(lossless_file(data, Pixels(packed, 2, 1)), np.uint8), cv2.IMREAD_UNCHANGED)
        assert kept[0].tolist() == [0xABC0, 0xDEF0], (packed, kept)
    tens = [0, 512, 1023, 1, 1022, 3, 300]
    assert len(_packed(tens, "Mono10p")) == Pixels("Mono10p", 7, 1).nbytes == 9
    assert to_bgr(_packed(tens, "Mono10p"), Pixels("Mono10p", 7, 1))[0, :, 0].tolist() == [v >> 2 for v in tens]


@pytest.mark.parametrize(("said", "code", "words"), [
    (("Mono14p", "4", "4"), ErrorCode.UNSUPPORTED_FORMAT, "not other packed formats or YUV"),
    (("YUV422_8", "4", "4"), ErrorCode.UNSUPPORTED_FORMAT, "Mono8, Mono10"),
    (("Mono8", None, "4"), ErrorCode.MISSING_METADATA, "needs width"),
    (("Mono8", None, None), ErrorCode.MISSING_METADATA, "needs width and height"),
    (("Mono8", "4.5", "4"), ErrorCode.BAD_METADATA, "width '4.5' is not a whole number"),
    (("Mono8", "4", "-4"), ErrorCode.BAD_METADATA, "height '-4'"),
    (("Mono8", "٤", "4"), ErrorCode.BAD_METADATA, "width"),  # a digit Python's int() reads, no camera sends
    (("Mono8", "0", "4"), ErrorCode.BAD_DIMENSIONS, "0x4"),
])
def test_a_declaration_that_cannot_be_read_is_refused_saying_what_is_wrong(said, code, words):
    with pytest.raises(FrameError) as refused:
        declare(*said)
    assert refused.value.code == code and words in refused.value.message


def test_no_pixel_format_means_an_image_file():
    assert declare(None, "640", "480") is None


@pytest.mark.parametrize(("data", "code", "words"), [
    (b"", ErrorCode.EMPTY_PAYLOAD, "empty"),
    (bytes(4 * 3 - 4), ErrorCode.TRUNCATED_IMAGE, "payload is 8 bytes; a Mono8 frame of 4x3 is 12"),
    (bytes(4 * 3 + 4), ErrorCode.BAD_DIMENSIONS, "or the rows are padded"),
    (b"\xff\xd8\xff\xe0" + bytes(20), ErrorCode.BAD_DIMENSIONS, "begins like an image file"),
    (bytes(101), ErrorCode.PAYLOAD_TOO_LARGE, "limit is 100"),
])
def test_a_buffer_that_does_not_fit_its_declaration_or_the_limits_is_refused(data, code, words):
    with pytest.raises(FrameError) as refused:
        check(data, Pixels("Mono8", 4, 3), max_bytes=100, max_pixels=12)
    assert refused.value.code == code and words in refused.value.message


def test_the_pixel_limit_is_checked_from_the_declaration_before_the_length():
    """A declaration past ``limits.max_pixels`` is refused as such, whatever the payload: nothing is allocated."""
    with pytest.raises(FrameError) as refused:
        check(bytes(10), Pixels("RGB8", 5000, 5000), max_bytes=100, max_pixels=16_000_000)
    assert refused.value.code == ErrorCode.IMAGE_TOO_LARGE


FRAME_CODES = {ErrorCode.EMPTY_PAYLOAD, ErrorCode.PAYLOAD_TOO_LARGE, ErrorCode.IMAGE_TOO_LARGE, ErrorCode.TRUNCATED_IMAGE,
               ErrorCode.BAD_DIMENSIONS, ErrorCode.BAD_METADATA, ErrorCode.MISSING_METADATA, ErrorCode.UNSUPPORTED_FORMAT}


@settings(max_examples=150, deadline=None)
@given(pixel_format=st.sampled_from([*PIXEL_FORMATS, "Mono14p", "mono8", ""]),
       width=st.one_of(st.none(), st.integers(-2, 40).map(str), st.text(max_size=6)),
       height=st.one_of(st.none(), st.integers(-2, 40).map(str), st.text(max_size=6)),
       length=st.integers(0, 40 * 40 * 3 + 8))
def test_any_declaration_and_length_is_a_frame_of_its_size_or_a_frame_error(pixel_format, width, height, length):
    """Whatever a bridge declares and sends: a BGR image of the declared size, or a FrameError with a frame code."""
    data = bytes(range(256)) * (length // 256) + bytes(range(length % 256))
    try:
        pixels = declare(pixel_format, width, height)
        assert pixels is not None
        check(data, pixels, max_bytes=40 * 40 * 3, max_pixels=40 * 40)
    except FrameError as exc:
        assert exc.code in FRAME_CODES
        return
    image = to_bgr(data, pixels)
    assert image.shape == (pixels.height, pixels.width, 3) and image.dtype == np.uint8
