"""Wire formats shared by every channel: error codes, timestamps, ids, request models.

A leaf module (standard library and pydantic only) so that the pipeline, the
request server, the console and tests all import the same definitions downward
and no channel can invent a code or a timestamp rule of its own.
"""

from __future__ import annotations

import base64
import json
import math
import re
import time
from datetime import UTC, date, datetime
from enum import StrEnum
from typing import Annotated, Any, Literal, NamedTuple, TypeGuard, TypeVar

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator, model_validator

MAX_ID_LENGTH = 128
# Timestamps outside [2000-01-01, 2100-01-01) are refused: no camera clock is right there, and
# datetime cannot represent some of them (NaN, inf, 1e15) at all.
MIN_TS = 946_684_800.0
MAX_TS = 4_102_444_800.0
# This box's own clock reads "not set" before this date: an edge box without a battery-backed clock boots at 1970 (a
# dead RTC battery: its reset value, often 2000) until NTP steps it.  No correct clock reads a time before the software
# reading it was written, so the floor is this worker's first release (2026-11-29), the rule systemd applies at boot
# with its own build date (TIME_EPOCH).  MIN_TS cannot serve: 2000 is a reset RTC's own reading.
CLOCK_FLOOR = 1_795_910_400.0
# A stamp this far past the box's clock was made while the clock ran ahead: it has stepped back since.
AHEAD_MARGIN_S = 60.0
# Requests (query, label, control) are small JSON documents; anything larger or deeper is refused unread.
MAX_REQUEST_BYTES = 4_000_000
MAX_JSON_DEPTH = 8


Colour = Literal["mono", "RGB", "BGR", "RGGB", "GBRG", "GRBG", "BGGR"]  # Bayer: the sensor's top-left 2 x 2


class PixelFormat(NamedTuple):
    """A raw pixel buffer's layout, as GenICam's Pixel Format Naming Convention names it."""

    bits_per_pixel: int  # in the buffer: Mono12 takes 16 (a little-endian sample), Mono12p 12
    bits: int  # significant bits of a sample
    colour: Colour
    # "lsb": PFNC's "p" formats, samples packed one after the other, least significant bit first, across the whole
    # buffer; "gige": GigE Vision's 12Packed formats, two samples in 3 bytes, each sample's high bits in a byte of its own
    packing: Literal["none", "lsb", "gige"] = "none"


# Raw pixel buffers a frame may be (worker/pixels.py): machine-vision cameras' grey, colour and Bayer formats. Other
# packed ones (Mono14p, Mono10Packed, BayerRG10Packed) and YUV are not among them.
_BAYER: dict[str, Colour] = {"RG": "RGGB", "GB": "GBRG", "GR": "GRBG", "BG": "BGGR"}  # PFNC's names of the patterns
PIXEL_FORMATS: dict[str, PixelFormat] = {
    "Mono8": PixelFormat(8, 8, "mono"),
    **{f"Mono{bits}": PixelFormat(16, bits, "mono") for bits in (10, 12, 14, 16)},
    "Mono10p": PixelFormat(10, 10, "mono", "lsb"),
    "Mono12p": PixelFormat(12, 12, "mono", "lsb"),
    "Mono12Packed": PixelFormat(12, 12, "mono", "gige"),
    "RGB8": PixelFormat(24, 8, "RGB"),
    "BGR8": PixelFormat(24, 8, "BGR"),
    **{f"Bayer{name}8": PixelFormat(8, 8, pattern) for name, pattern in _BAYER.items()},
    **{f"Bayer{name}{bits}": PixelFormat(16, bits, pattern) for name, pattern in _BAYER.items()
       for bits in (10, 12, 16)},
    **{f"Bayer{name}10p": PixelFormat(10, 10, pattern, "lsb") for name, pattern in _BAYER.items()},
    **{f"Bayer{name}12p": PixelFormat(12, 12, pattern, "lsb") for name, pattern in _BAYER.items()},
    **{f"Bayer{name}12Packed": PixelFormat(12, 12, pattern, "gige") for name, pattern in _BAYER.items()},
}
PIXEL_FIELDS = ("pixel_format", "width", "height")  # a raw buffer's user properties (or envelope fields)


class ErrorCode(StrEnum):
    """Every error code the worker publishes: frame errors (``<prefix>/<camera>/error``) and request errors."""

    # frames
    EMPTY_PAYLOAD = "empty_payload"
    PAYLOAD_TOO_LARGE = "payload_too_large"
    NOT_AN_IMAGE = "not_an_image"
    UNSUPPORTED_FORMAT = "unsupported_format"
    BAD_DIMENSIONS = "bad_dimensions"
    IMAGE_TOO_LARGE = "image_too_large"
    TRUNCATED_IMAGE = "truncated_image"
    CORRUPT_IMAGE = "corrupt_image"
    MISSING_METADATA = "missing_metadata"
    BAD_ENVELOPE = "bad_envelope"
    BAD_METADATA = "bad_metadata"
    UNKNOWN_CAMERA = "unknown_camera"
    BAD_CAMERA = "bad_camera"
    CAMERA_MISMATCH = "camera_mismatch"
    ROI_OUTSIDE_FRAME = "roi_outside_frame"
    STALE_FRAME = "stale_frame"
    DROPPED = "dropped"
    SHUTDOWN = "shutdown"
    RESULT_TOO_LARGE = "result_too_large"
    # requests (query, label, control)
    BAD_REQUEST = "bad_request"
    UNKNOWN_FRAME = "unknown_frame"
    BAD_IMAGE = "bad_image"
    EMPTY_STORE = "empty_store"
    STORE_UNAVAILABLE = "store_unavailable"
    BUSY = "busy"
    RESPONSE_TOO_LARGE = "response_too_large"
    RELOAD_FAILED = "reload_failed"
    # both
    INVALID_OUTPUT = "invalid_output"
    INTERNAL_ERROR = "internal_error"


def iso(ts: float) -> str:
    """Epoch seconds -> ISO-8601 UTC with milliseconds (only for timestamps that passed :func:`parse_timestamp`
    or came from the local clock)."""
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds")


def whole_ms(ts: float) -> float:
    """``ts`` cut to the millisecond that :func:`iso` writes: a frame's stored capture time is the one its result
    says, so a time range that ends at (or starts from) a frame's ``captured_at`` includes it."""
    stamp = datetime.fromtimestamp(ts, UTC)
    return stamp.replace(microsecond=stamp.microsecond // 1000 * 1000).timestamp()


def clock_set(ts: float) -> bool:
    """Whether a reading of this box's wall clock can be the real time (:data:`CLOCK_FLOOR`)."""
    return ts >= CLOCK_FLOOR


class Restamp:
    """The time a retention pass gives stamps it cannot age: made while this box's clock was not set, or ahead of it.

    The clock was set (or stepped back) since the previous pass: such stamps were made before that step, every stamp
    made after it reads at least the clock's reading at the previous pass (now less the monotonic time since).  Stamped
    so, those frames age from then and keep their place before the frames received since, for retention's order."""

    def __init__(self) -> None:
        self._last = time.monotonic()

    def start(self, now: float) -> float:
        """Begin a pass at wall time ``now`` (every pass, the clock set or not); the time to give such stamps."""
        mono = time.monotonic()
        since, self._last = mono - self._last, mono
        return max(now - since, CLOCK_FLOOR)

    @staticmethod
    def trusted(ts: float, now: float) -> bool:
        """Whether a stamp ``ts`` can be aged at ``now`` (a set clock's): neither unset nor in the future."""
        return clock_set(ts) and ts <= now + AHEAD_MARGIN_S


def parse_timestamp(value: str | float | int) -> float:
    """ISO-8601 (naive means UTC) or an epoch number -> epoch seconds; ValueError unless finite and in range.

    Epoch numbers may be seconds, milliseconds (JavaScript's ``Date.now()``, Java's ``currentTimeMillis``),
    microseconds or nanoseconds: between 2000 and 2100 the four ranges do not overlap, so the size tells the unit.
    """
    if isinstance(value, bool):
        raise ValueError("a timestamp is not a boolean")
    if isinstance(value, (int, float)):
        ts = _epoch_seconds(float(value))
    else:
        text = str(value).strip()
        try:
            ts = _epoch_seconds(float(text))
        except ValueError:
            try:
                # RFC 3339 allows a lower-case "z" (and "t", which Python reads)
                stamp = datetime.fromisoformat(text[:-1] + "+00:00" if text[-1:] in ("Z", "z") else text)
            except (ValueError, OverflowError) as exc:
                raise ValueError(f"{text[:64]!r} is not ISO-8601 or an epoch number") from exc
            if stamp.tzinfo is None:
                stamp = stamp.replace(tzinfo=UTC)
            ts = stamp.timestamp()
    if not math.isfinite(ts) or not MIN_TS <= ts < MAX_TS:
        raise ValueError(f"{str(value)[:64]!r} is not a time between 2000-01-01 and 2100-01-01")
    return ts


def parse_until(value: str | float | int) -> float:
    """The end of a time range, inclusive: :func:`parse_timestamp`, except that a date alone (``2026-12-04``, or a
    week date ``2026-W49-5``) means the whole of that day (UTC), and a week alone (``2026-W49``) the whole week, not
    their first instant: the last time before the next day or week."""
    ts = parse_timestamp(value)
    if isinstance(value, str):
        text = value.strip()
        try:
            date.fromisoformat(text)
        except ValueError:
            return ts
        days = 7 if re.fullmatch(r"\d{4}-?W\d{2}", text) else 1
        return math.nextafter(ts + 86_400 * days, -math.inf)
    return ts


def _epoch_seconds(number: float) -> float:
    """``number`` in seconds, read as seconds, milliseconds, microseconds or nanoseconds by the range it lies in
    (unchanged when it lies in none, for the range check to refuse)."""
    for per_second in (1.0, 1e3, 1e6, 1e9):
        if MIN_TS * per_second <= number < MAX_TS * per_second:
            return number / per_second
    return number


def number_text(value: object) -> object:
    """A JSON number as the text a frame id sent as one becomes (``repr``: 42 -> "42"), anything else as it is.

    An envelope may carry its frame id as a number (Frigate's, a PLC's counter); the result then says it as text,
    and a label or query that names the same frame by the same number finds it.  A boolean is not a number here.
    """
    return repr(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else value


# A request's frame id: text, or a JSON number read as :func:`number_text` reads it.
FrameIdField = Annotated[str, BeforeValidator(number_text)]
# A request's captured_at of the frame it names, as the frame's result said it: a camera that reused the id since (a
# counter that restarts at a reboot) has another frame under it, which the id alone would name.
CapturedAtField = Annotated[float, BeforeValidator(parse_timestamp)]


def check_same_capture(payload: dict, frame_id: str, camera: str, captured_ts: float | None, outcome: str = "") -> None:
    """Refuse (``unknown_frame``) a request for frame ``frame_id`` whose ``captured_ts`` (as its result said it; None:
    named none) is not the stored frame's: the history keeps one frame per camera and id, and a camera that reused the
    id since (a counter that restarts at a reboot) has another frame under it.  ``outcome``: what was therefore not
    done.  Results give the time to the millisecond; a record without a readable time has nothing to tell it by."""
    if captured_ts is None:
        return
    try:
        stored = parse_timestamp(payload.get("captured_at") or "")
    except ValueError:
        return
    if abs(stored - captured_ts) >= 0.0005:
        raise RequestError(ErrorCode.UNKNOWN_FRAME, f"frame {frame_id!r} from camera {camera} captured at "
                           f"{iso(captured_ts)} is not in the history: the camera sent another frame under this id "
                           f"(captured at {payload.get('captured_at')}), and the history keeps one frame per camera "
                           f"and id{'; ' + outcome if outcome else ''}")


ID_RULE = f"1..{MAX_ID_LENGTH} printable characters without '/', not '.' or '..'"  # what valid_id takes, said


def valid_id(value: object) -> TypeGuard[str]:
    """A frame or camera id we can echo and use in keys and URLs: 1..128 printable characters without '/', and not
    '.' or '..', which browsers and HTTP clients fold away as path steps (the console's image URLs)."""
    return (isinstance(value, str) and 0 < len(value) <= MAX_ID_LENGTH and value.isprintable()
            and "/" not in value and value not in (".", ".."))


class RequestError(Exception):
    """A request the worker answers with ``{"ok": false, "error": {code, message}}``."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = ErrorCode(code)
        self.message = message


def error_answer(code: ErrorCode, message: str) -> dict:
    return {"ok": False, "error": {"code": ErrorCode(code).value, "message": message}}


def _depth(node: Any, limit: int) -> int:
    """Nesting depth of decoded JSON, stopping once past ``limit`` (iterative: no recursion on hostile input)."""
    deepest, stack = 0, [(node, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            deepest = max(deepest, depth)
            if deepest > limit:
                return deepest
            stack.extend((child, depth + 1) for child in (item.values() if isinstance(item, dict) else item))
    return deepest


def _nesting_bound(payload: bytes, limit: int) -> int:
    """Upper bound of bracket nesting in raw bytes, so deep payloads are refused before the parser recurses."""
    depth = deepest = 0
    for byte in payload:
        if byte in (0x5B, 0x7B):
            depth += 1
            deepest = max(deepest, depth)
            if deepest > limit:
                return deepest
        elif byte in (0x5D, 0x7D):
            depth -= 1
    return deepest


def _not_a_number(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text[:40]} is past a finite number's range")
    return value


def strict_json(payload: bytes | bytearray | str) -> Any:
    """JSON as RFC 8259 has it: Python's parser also takes NaN and Infinity, and reads 1e999 as infinity, which no
    strict JSON writer (a browser's, starlette's) can write back, so one such value in a kept message broke every
    answer that carried it.  ValueError (JSONDecodeError, UnicodeDecodeError among them) or RecursionError else."""
    return json.loads(payload, parse_constant=_not_a_number, parse_float=_finite)


def parsed_json(payload: bytes | bytearray) -> tuple[Any, str | None]:
    """A message's :func:`strict_json`, or None and why it is none (anyone may publish under the prefix: bytes, text,
    nesting past the parser's depth)."""
    try:
        return strict_json(payload), None
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        return None, f"not JSON ({type(exc).__name__})"


def decode_json(payload: bytes) -> Any:
    """Parse a request body with size and depth limits; RequestError(bad_request) on anything else."""
    if len(payload) > MAX_REQUEST_BYTES:
        raise RequestError(ErrorCode.BAD_REQUEST, f"request is {len(payload)} bytes, limit {MAX_REQUEST_BYTES}")
    if not payload or payload.isspace():  # mosquitto_rr 2.0's -f and -s send nothing: say so, not a parser's message
        raise RequestError(ErrorCode.BAD_REQUEST, f"request is empty ({len(payload)} bytes): send one JSON object")
    if _nesting_bound(payload, MAX_JSON_DEPTH) > MAX_JSON_DEPTH:
        raise RequestError(ErrorCode.BAD_REQUEST, f"request is nested deeper than {MAX_JSON_DEPTH}")
    try:
        raw = strict_json(payload)
    except (ValueError, RecursionError) as exc:  # an integer past Python's digit limit is a ValueError too
        raise RequestError(ErrorCode.BAD_REQUEST, f"request is not JSON: {exc}") from None
    if _depth(raw, MAX_JSON_DEPTH) > MAX_JSON_DEPTH:
        raise RequestError(ErrorCode.BAD_REQUEST, f"request is nested deeper than {MAX_JSON_DEPTH}")
    return raw


_URL_SAFE = bytes.maketrans(b"-_", b"+/")  # base64url's two characters (RFC 4648 section 5) as base64's


def b64_image(text: str | bytes) -> bytes:
    """Image bytes from base64 text as publishers write it: a ``data:...;base64,`` URL or plain base64, wrapped in
    lines or not (RFC 2045, the ``base64`` CLI), in the URL-safe alphabet (``-_``, as browsers' and JWT-style
    encoders write it) or without its ``=`` padding (RFC 4648 section 3.2).  ``binascii.Error`` (a ``ValueError``)
    for anything else, text that mixes both alphabets too."""
    if isinstance(text, str):
        text = text.encode("ascii")  # a non-ASCII character: UnicodeEncodeError, a ValueError too
    head = text[:64].lstrip()
    if head.startswith(b"data:"):
        text = text.partition(b",")[2]
    text = b"".join(text.split())
    if b"+" not in text and b"/" not in text:
        text = text.translate(_URL_SAFE)
    return base64.b64decode(text + b"=" * (-len(text) % 4), validate=True)


REPLY_TO = "reply_to"  # a request's answer topic, for MQTT 3.1.1 clients: they cannot set v5's response topic
MAX_TOPIC_BYTES = 65535  # MQTT's limit on a topic name


# What MQTT (v5 1.5.4, 3.1.1 1.5.3) lets a server refuse in a topic or client id, and mosquitto refuses by closing the
# connection that sent it: control characters, surrogates (no UTF-8 encodes them) and noncharacters.
_REFUSED = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff\ufdd0-\ufdef"
                      + "".join(f"{chr(plane << 16 | 0xFFFE)}{chr(plane << 16 | 0xFFFF)}" for plane in range(17)) + "]")


def refused_character(text: str) -> str | None:
    """The first character of ``text`` a broker refuses in a topic or client id (:data:`_REFUSED`), or None.  A
    publish with one made mosquitto close the worker's connection, and paho sent that message again at every
    reconnect: the worker was cut off until restarted."""
    found = _REFUSED.search(text)
    return None if found is None else found.group()


def said(character: str) -> str:
    """A refused character as a message names it: ``'\\x01' (U+0001)``."""
    return f"{character!r} (U+{ord(character):04X})"


def publishable(topic: object) -> TypeGuard[str]:
    """A topic name a message can be published to: UTF-8, no wildcard, not a broker ``$``-topic, no character a broker
    refuses (:func:`refused_character`: NUL, control characters, noncharacters)."""
    if not (isinstance(topic, str) and topic and not topic.startswith("$") and not set(topic) & {"+", "#"}
            and refused_character(topic) is None):
        return False
    return len(topic.encode()) <= MAX_TOPIC_BYTES  # encodable: a lone surrogate, which JSON can carry, is refused above


def split_reply_to(payload: bytes) -> tuple[bytes, str | None]:
    """A request body without its ``reply_to`` field, and the topic that field names (``None`` without one).

    A body that is not a JSON object comes back as it is, for the request's own checks to refuse. RequestError
    when ``reply_to`` is no topic a reply can be published to (not a string, empty, a wildcard, ``$``-topics, a
    character a broker refuses).
    """
    if REPLY_TO.encode() not in payload:
        return payload, None
    try:
        raw = decode_json(payload)
    except RequestError:  # too large, too deep or not JSON: its refusal is answered where the body asks, if it can say
        return payload, _scanned_reply_to(payload)
    if not isinstance(raw, dict) or REPLY_TO not in raw:
        return payload, None
    topic = raw.pop(REPLY_TO)
    if not publishable(topic):
        raise RequestError(ErrorCode.BAD_REQUEST, f"{REPLY_TO} must be a topic to publish to (no wildcards, no "
                                                  "$-topic, no control characters or noncharacters), not "
                                                  f"{json.dumps(topic)[:200]}")
    return json.dumps(raw).encode(), topic


_REPLY_TO_FIELD = re.compile(rb'"reply_to"\s*:\s*("(?:[^"\\]|\\.)*")')


def _scanned_reply_to(payload: bytes) -> str | None:
    """The first ``"reply_to": "..."`` string of a body that cannot be parsed (one linear scan of the bytes), if it
    names a topic a reply can be published to."""
    found = _REPLY_TO_FIELD.search(payload)
    if found is None:
        return None
    try:
        topic = json.loads(found.group(1))
    except ValueError:  # bad escapes or bytes that are not UTF-8
        return None
    return topic if publishable(topic) else None


M = TypeVar("M", bound=BaseModel)


def validate(model: type[M], raw: Any) -> M:
    """``model.model_validate(raw)`` with validation problems as one bad_request message."""
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or '(request)'}: {e['msg']}"
                             for e in exc.errors()[:10])
        raise RequestError(ErrorCode.BAD_REQUEST, problems[:2000]) from None


class ControlRequest(BaseModel):
    """``<prefix>/workers/<id>/control``: reload {bundle?, camera?} | rollback {camera?} | status |
    export_capture {camera?} (the captured frames as a training folder under capture.export_path)."""

    model_config = ConfigDict(extra="forbid", strict=True)
    command: Literal["reload", "rollback", "status", "export_capture"]
    bundle: str | None = Field(None, min_length=1, max_length=4096)
    camera: str | None = Field(None, min_length=1, max_length=MAX_ID_LENGTH)

    @model_validator(mode="after")
    def _fields_of_its_command(self) -> ControlRequest:
        """Only the fields its command takes: a rollback given a bundle went back to the model served before, not to
        that bundle, and answered ok; a status given a camera said every scope's model.  A reload's camera is one a
        frame's topic level can carry: one naming another ("a/b", a control character) made a canary no frame could
        reach, kept in the roll-out record and compiled again at every start (a rollback still drops such a one)."""
        camera = self.camera
        if self.command == "reload" and camera is not None and not (valid_id(camera) and not set(camera) & {"+", "#"}):
            raise ValueError(f"camera {camera[:64]!r} is no camera id: {ID_RULE}, without '+' or '#'")
        if self.bundle is not None and self.command != "reload":
            raise ValueError(f"bundle is for reload, not {self.command}" + (
                " (a rollback goes back one bundle, once: reload the bundle you want)" if self.command == "rollback"
                else ""))
        if self.camera is not None and self.command == "status":
            raise ValueError("status takes no camera: it says what every camera's scope serves")
        return self


class FrameMetadata(BaseModel):
    """A frame's MQTT v5 user properties, validated; other user properties are ignored."""

    model_config = ConfigDict(extra="ignore", frozen=True)
    frame_id: str
    captured_at: str | None = None  # None: the worker stamps the frame itself (metadata: optional)
    camera_id: str | None = None

    @field_validator("frame_id")
    @classmethod
    def _id(cls, v: str) -> str:
        if not valid_id(v):
            raise ValueError(f"must be {ID_RULE}")
        return v

    @field_validator("captured_at")
    @classmethod
    def _timestamp(cls, v: str | None) -> str | None:
        if v is not None:
            parse_timestamp(v)
        return v

    @property
    def captured_ts(self) -> float | None:
        return None if self.captured_at is None else parse_timestamp(self.captured_at)
