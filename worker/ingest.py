"""What a camera sends, turned into one frame's fields and image bytes before admission.

Cameras as they are: tools such as Node-RED flows publish a JSON envelope (base64 image plus fields) or the
image as base64 text instead of raw image bytes, and cameras or MQTT 3.1.1 clients cannot send MQTT v5 user
properties at all.  Base64 text is read on any raw camera; envelopes and generated metadata are opt-in per camera.
What comes out goes through the same admission (worker/pipeline.py) as a raw frame with user properties, so the
checks and error codes are the same.
"""

from __future__ import annotations

import itertools
import json
import logging
import secrets
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from worker.config import Config
from worker.decode import FrameError
from worker.pixels import is_buffer
from worker.wire import CLOCK_FLOOR, PIXEL_FIELDS, ErrorCode, b64_image, clock_set, iso, number_text, parse_timestamp, valid_id

log = logging.getLogger(__name__)

# Envelope keys by the frame field they carry.  The first of each row is ours; the others are what
# other publishers name them: ``image``/``data`` (Node-RED flows after a base64 node, plain base64 or a
# ``data:image/...;base64,`` URL), ``id`` and ``frame_time`` (Frigate's event id and epoch seconds),
# ``timestamp``.  A document naming one field twice is refused rather than guessed.
ENVELOPE_KEYS: dict[str, tuple[str, ...]] = {
    "image": ("image_b64", "image", "data"),
    "frame_id": ("frame_id", "id"),
    "captured_at": ("captured_at", "timestamp", "frame_time"),
    "camera_id": ("camera_id", "camera"),
    **{field: (field,) for field in PIXEL_FIELDS},  # a raw pixel buffer's layout (worker/pixels.py)
}
_FIELD_OF = {key: field for field, keys in ENVELOPE_KEYS.items() for key in keys}
# Slack over the image limit for base64 (4/3) and an envelope's other fields.
_ENVELOPE_SLACK = 65_536
# How base64 text of an accepted image begins (JPEG's FF D8 FF, in either alphabet, PNG's signature, BMP's "BM",
# TIFF's "II*\0" or "MM\0*", WebP's "RIFF"): raw image bytes never begin so, so such a payload on a raw camera is text
# to decode, not a frame to refuse.
_BASE64_IMAGE = (b"/9j/", b"_9j_", b"iVBORw0KGgo", b"Qk", b"SUkqA", b"TU0AK", b"UklGR")


class FrameIds:
    """Generated frame ids ``g-<boot>-<n>``: 48 random bits drawn at process start, then a counter.

    Unique across restarts without trusting the clock (edge boxes often boot before NTP has set it,
    so a time-based UUID can repeat after the clock steps back), ordered within one run, short in logs.
    One counter for all cameras: unique per camera too, and no state per camera name.
    """

    def __init__(self) -> None:
        self.boot = secrets.token_hex(6)
        self._count = itertools.count(1)
        self._lock = threading.Lock()

    def next(self) -> str:
        with self._lock:
            n = next(self._count)
        return f"g-{self.boot}-{n}"


@dataclass(frozen=True)
class Arrival:
    """A frame as admission sees it: fields (user properties or envelope), image bytes (a file, or a raw pixel buffer
    its fields or its camera declare), generated fields."""

    fields: dict[str, str]
    data: bytes
    generated: tuple[str, ...] = ()


def _text(field: str, value: object) -> str | None:
    """An envelope value as the user-property string it stands for (numbers allowed; null = absent)."""
    if value is None:
        return None
    if isinstance(text := number_text(value), str):
        return text
    raise FrameError(ErrorCode.BAD_METADATA, f"envelope field for {field} is a {type(value).__name__}, not a string or number")


def open_envelope(payload: bytes, max_image_bytes: int) -> Arrival:
    """Parse a JSON envelope; ``bad_envelope`` for anything that is not one object with one base64 image."""
    if not payload:
        raise FrameError(ErrorCode.EMPTY_PAYLOAD, "the frame payload is empty")
    limit = max_image_bytes * 4 // 3 + _ENVELOPE_SLACK
    if len(payload) > limit:
        raise FrameError(ErrorCode.PAYLOAD_TOO_LARGE, f"envelope is {len(payload)} bytes, limit is {limit}")
    try:
        doc = json.loads(payload)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise FrameError(ErrorCode.BAD_ENVELOPE, f"envelope is not JSON ({type(exc).__name__})") from None
    if not isinstance(doc, dict):
        raise FrameError(ErrorCode.BAD_ENVELOPE, f"envelope is a JSON {type(doc).__name__}, not an object")
    sent_id = next((value for key, value in doc.items() if _FIELD_OF.get(key) == "frame_id"), None)
    try:
        return _read_envelope(doc)
    except FrameError as exc:  # the error answer names the frame as its result would, for its publisher to match it
        exc.frame_id = named if valid_id(named := number_text(sent_id)) else None
        raise


def _read_envelope(doc: dict) -> Arrival:
    """The fields and the image of a JSON object (:func:`open_envelope`)."""
    found: dict[str, tuple[str, object]] = {}
    for key, value in doc.items():
        field = _FIELD_OF.get(key)
        if field is None:
            continue  # publishers add fields of their own
        if field in found:
            raise FrameError(ErrorCode.BAD_ENVELOPE, f"envelope has both {found[field][0]!r} and {key!r} for {field}")
        found[field] = (key, value)
    if "image" not in found:
        raise FrameError(ErrorCode.BAD_ENVELOPE, f"envelope has no image ({', '.join(ENVELOPE_KEYS['image'])})")
    key, image = found.pop("image")
    if not isinstance(image, str):
        raise FrameError(ErrorCode.BAD_ENVELOPE, f"envelope field {key!r} is not a base64 string")
    try:
        data = b64_image(image)
    except ValueError:  # binascii.Error, or a character base64 has not
        raise FrameError(ErrorCode.BAD_ENVELOPE, f"envelope field {key!r} is not valid base64") from None
    fields = {field: text for field, (_, value) in found.items() if (text := _text(field, value)) is not None}
    return Arrival(fields, data)


def open_raw(payload: bytes, camera: str, max_image_bytes: int) -> bytes:
    """A raw camera's image bytes: as sent, or decoded where the publisher sent the image as base64 text (Home
    Assistant's MQTT camera with ``image_encoding: b64``, Node-RED after a base64 node; a ``data:`` URL too).
    JSON is refused with the setting that reads it."""
    head = payload[:64].lstrip()
    if head.startswith(b"data:"):  # of any media type: application/octet-stream from a browser's FileReader
        payload = payload.partition(b",")[2]
        head = payload[:64].lstrip()
    if head.startswith(_BASE64_IMAGE):
        limit = max_image_bytes * 4 // 3 + _ENVELOPE_SLACK
        if len(payload) > limit:
            raise FrameError(ErrorCode.PAYLOAD_TOO_LARGE, f"base64 payload is {len(payload)} bytes, limit is {limit}")
        try:
            return b64_image(payload)
        except ValueError:
            raise FrameError(ErrorCode.NOT_AN_IMAGE, "payload begins like base64 text of an image but is not valid "
                                                     "base64") from None
    if head.startswith((b"{", b"[")):
        raise FrameError(ErrorCode.NOT_AN_IMAGE, f"payload is JSON, not an image: for a JSON envelope set "
                                                 f"cameras.{camera}.payload: json_envelope (README, Worker API)")
    return payload


AHEAD_S = 300.0  # a captured_at this far past the worker's clock is no backlog: a time zone or a clock is wrong
BEHIND_S = 7 * 24 * 3600.0  # ... and this far before it no broker's queue either: a clock never set, or reset
WARNED_KEYS = 10_000  # (camera bucket, what) pairs first_time remembers


class Ingest:
    """Per camera: unwrap its payload (raw or json_envelope) and fill missing metadata when it is optional."""

    def __init__(self, cfg: Config, bucket: Callable[[str], str] = str) -> None:
        self.cfg = cfg
        self.ids = FrameIds()
        self.bucket = bucket  # a camera's key in what was said: itself, or one shared by cameras past a bound
        # (bucket, what) said once (first_time); policy past WARNED_KEYS: the least recently asked is forgotten
        self._warned: OrderedDict[tuple[str, str], None] = OrderedDict()
        self._warned_lock = threading.Lock()  # asked from paho's thread and the inference threads

    def arrive(self, camera: str, user: dict[str, str], payload: bytes) -> Arrival:
        """User properties win over envelope fields; generated fields are named in the result.  A generated
        ``captured_at`` is left out of the fields: admission stamps the frame with its receive time, unchecked."""
        override = self.cfg.cameras.get(camera)
        fields, data = user, payload
        enveloped = override is not None and override.payload == "json_envelope"
        if enveloped:
            envelope = open_envelope(payload, self.cfg.limits.max_frame_bytes)
            fields, data = {**envelope.fields, **user}, envelope.data
        if not enveloped and not is_buffer(fields, override.pixels if override is not None else None):
            # a raw pixel buffer's bytes are pixels, never base64 text or JSON
            data = open_raw(payload, camera, self.cfg.limits.max_frame_bytes)
        policy = (override.metadata if override is not None and override.metadata else None) or self.cfg.topics.metadata
        if policy == "required":
            return Arrival(fields, data)
        # Missing, or sent but unusable (a camera whose clock was never set says 1970): made up, and named.
        generated = []
        if not valid_id(fields.get("frame_id")):
            self._unusable(camera, "frame_id", fields)
            fields = {**fields, "frame_id": self.ids.next()}
            generated.append("frame_id")
        if not _usable_time(fields.get("captured_at")):
            self._unusable(camera, "captured_at", fields)
            fields = {key: value for key, value in fields.items() if key != "captured_at"}
            generated.append("captured_at")
        return Arrival(fields, data, tuple(generated))

    def first_time(self, camera: str, what: str) -> bool:
        """True the first time ``what`` is asked about ``camera``: a camera's problem is said once, not per frame.  Cameras
        past the stats' ``metrics.max_cameras`` share one key (``bucket``), so a publisher that invents a camera name per
        frame gets one line, not one per name; the memory is bounded, the least recently asked forgotten (said again)."""
        key = (self.bucket(camera) if camera else camera, what)
        with self._warned_lock:
            if key in self._warned:
                self._warned.move_to_end(key)
                return False
            self._warned[key] = None
            if len(self._warned) > WARNED_KEYS:
                self._warned.popitem(last=False)
            return True

    def check_box_clock(self, received_ts: float) -> None:
        """Say once that this box's own clock is not set (it reads a time before ``wire.CLOCK_FLOOR``: a box
        without a battery-backed clock boots at 1970 until NTP steps it).  Frames are still served; what is off is
        the box, not its cameras."""
        if not clock_set(received_ts) and self.first_time("", "box clock"):
            log.warning("this box's clock is not set (it reads %s, before %s): frames are inspected and stamped with "
                        "it (received_at, and captured_at where the worker stamps it), and every camera's time looks "
                        "far ahead of it; the history ages such frames from when the clock is set. Give the box a "
                        "time source (NTP, or a battery-backed clock)", iso(received_ts), iso(CLOCK_FLOOR)[:10])

    def check_clock(self, camera: str, captured_ts: float, received_ts: float) -> None:
        """Say once per camera and direction that its frames are stamped in this box's future, or far in its past.  A
        camera that sends its local time without a UTC offset (Python's ``datetime.now().isoformat()``) is hours off,
        read as UTC, and retention (``store.max_age_h``), the history's time filters and the defect feed then place
        its frames hours away.  A frame stamped in the past may be a backlog (a broker's queue after an outage), so
        only a week behind is.  While this box's clock is not set the skew is its own (:meth:`check_box_clock`)."""
        if not clock_set(received_ts):
            return
        ahead = captured_ts - received_ts
        if ahead > AHEAD_S and self.first_time(camera, "clock ahead"):
            log.warning("camera %s stamps its frames %.2f h ahead of this box's clock: a local time sent without its UTC "
                        "offset (ISO-8601 without one is read as UTC), or a clock set wrong here or there; the "
                        "history's time filters and the defect feed use captured_at as sent (retention goes by when "
                        "frames arrive)", camera, ahead / 3600)
        elif -ahead > BEHIND_S and self.first_time(camera, "clock behind"):
            log.warning("camera %s stamps its frames %.1f days before this box's clock: a clock never set, or reset at a "
                        "reboot; the history's time filters place its frames at captured_at as sent (retention goes "
                        "by when frames arrive)", camera, -ahead / 86400)

    def _unusable(self, camera: str, field: str, fields: dict[str, str]) -> None:
        """Say once per camera and field that a value it sent is replaced (absent values are the policy's point)."""
        if field in fields and self.first_time(camera, field):
            log.warning("camera %s sends %s %r, which cannot be used: replaced by the worker's own (metadata: optional); "
                        "its results list it under generated", camera, field, str(fields[field])[:64])


def _usable_time(value: str | None) -> bool:
    """Whether ``value`` is a ``captured_at`` admission accepts (:func:`parse_timestamp`)."""
    if value is None:
        return False
    try:
        parse_timestamp(value)
    except ValueError:
        return False
    return True
