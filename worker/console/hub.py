"""What the console knows: the worker's MQTT output since the console started, bounded, in memory.

The worker lists only the frames it logged (the defect feed starts with them: :meth:`Hub.backfill`), so the
console builds its live view from the topics it subscribes to (frames, results, heatmaps, errors, worker status).  MQTT
callbacks (paho's thread) update it; the web app reads it and gets every change pushed
through :meth:`Hub.subscribe` listeners.  The costliest step, an anomalous frame's thumbnail (a full decode of a
PNG of many megapixels), runs on a thread of its own, so that paho's thread (which also carries the worker's answers
to the console's requests) never waits behind image decodes; a raw pixel buffer is made a picture only when a page
or a thumbnail asks for it.  Nothing here talks to the vector store.
"""

from __future__ import annotations

import base64
import logging
import math
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Sized
from dataclasses import dataclass, field
from datetime import datetime
from functools import cached_property
from typing import Generic, TypeVar, cast

import paho.mqtt.client as mqtt
from pydantic import BaseModel, ConfigDict, ValidationError

from worker.config import CameraConfig, ConsoleConfig, LimitsConfig, QueuePolicy
from worker.decode import FrameError, Header, decode, probe, reduction
from worker.heatmap import encode, fit_size
from worker.ingest import open_envelope, open_raw
from worker.mqtt import user_properties
from worker.pixels import Pixels, check, declared, is_buffer, to_bgr
from worker.queueing import BoundedQueue, Closed
from worker.supervise import Liveness, StopLoop, Throttle, supervised_loop
from worker.topics import Topics
from worker.wire import parsed_json, valid_id

log = logging.getLogger(__name__)
BAD_MESSAGE_LOG_EVERY_S = 60.0  # messages not understood: one warning with a count at most this often
AVAILABILITY_MAX_CHARS = 64  # a worker's availability as the console keeps it: "online", "offline", "stopped"
# A worker's result is a small object: one far larger is no worker's (anyone may publish on an open broker), and the
# console keeps console.history of them.
RESULT_MAX_BYTES = 16 * 1024
# The fields of a result the console and its page read: only these are kept (with the model's name, version and
# precision: two cameras on one bundle at different precisions score by different thresholds).
RESULT_FIELDS = ("camera", "frame_id", "captured_at", "received_at", "published_at", "score", "raw_score", "threshold",
                 "verdict", "model", "label", "defect_type", "unlike_training")
MODEL_FIELDS = ("name", "version", "precision")

HUB = "console-hub"
THUMBNAILER = "console-thumbnails"

THUMBNAIL_QUEUE = 16  # anomalous frames waiting for their thumbnail (and within console.pending_max_bytes)
# A defect storm (a lens covered: every frame anomalous) outruns any thumbnail rate: the newest frames are what an
# operator looks at, so the frame waiting the longest goes without a thumbnail (counted as "thumbnail_skipped").
THUMBNAIL_POLICY = QueuePolicy.DROP_OLDEST

THUMBNAIL_SIZE = 160
BROWSER_JPEG_QUALITY = 90  # a frame a browser cannot show (TIFF, a raw buffer), as the page gets it
SERIES_BUCKETS = 360  # score-over-time resolution: one point per window/360 (10 s for an hour)
# Results of parallel infer requests finish out of capture order, close together in both times: only then does capture
# order keep a tile on the frame it shows. Beyond it a capture time older than the shown one is a camera clock step.
REORDER_WINDOW_S = 5.0
# A frame captured longer than this before the worker answered it is late (the camera publisher's message expiry):
# one the broker kept while the worker was away, delivered in a burst, which the page marks so as not to show it as new.
LATE_AFTER_S = 60.0
_MAGIC = ((b"\xff\xd8", "image/jpeg"), (b"\x89PNG", "image/png"), (b"BM", "image/bmp"))


# What a worker's retained availability other than "online" means, for the operator told why nothing was sent.
AWAY = {"offline": "its last will: it crashed or lost its link to the broker", "stopped": "it was shut down"}


@dataclass(frozen=True)
class RawFrame:
    """A raw pixel buffer as the camera sent it, checked against its declaration: turned into a picture only when a
    page or a thumbnail asks (a 5 MP buffer's JPEG is tens of milliseconds of a core, on whichever thread makes it)."""

    data: bytes
    pixels: Pixels

    def __len__(self) -> int:
        return len(self.data)


Image = bytes | RawFrame  # a camera frame as the console holds it


def content_type(data: bytes) -> str:
    """The type of an image a browser can show, else ``application/octet-stream``."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return next((ct for magic, ct in _MAGIC if data.startswith(magic)), "application/octet-stream")


def for_browser(data: Image, limits: LimitsConfig) -> tuple[bytes, str]:
    """An image and its content type as a browser can show it: a frame browsers cannot decode (TIFF, which the
    worker accepts, or a raw buffer) as a JPEG; anything else as it is. JPEG rather than PNG: a page asks for every new frame of a
    tile, and a multi-megapixel PNG costs the edge box's cores many times what the JPEG does. Every image is first
    checked from its header within the worker's limits (anyone may publish a frame): FrameError says why not, and
    nothing past them is decoded or handed to a browser (a raw buffer was checked when it came)."""
    if isinstance(data, RawFrame):
        return encode(to_bgr(data.data, data.pixels), "jpeg", BROWSER_JPEG_QUALITY), "image/jpeg"
    probe(data, limits.max_frame_bytes, limits.max_pixels)
    kind = content_type(data)
    if kind != "application/octet-stream":
        return data, kind
    return encode(decode(data), "jpeg", BROWSER_JPEG_QUALITY), "image/jpeg"


def _number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


class _Read(BaseModel):
    """The fields of a worker's message that the console and its page read, checked; the rest goes as it came."""

    model_config = ConfigDict(extra="allow", strict=True)


class _CameraCounts(_Read):
    received: int = 0
    processed: int = 0
    anomalous: int = 0
    dropped: int = 0
    errored: int = 0


class _OtherProcess(_Read):
    host: str
    pid: int


class _Stats(_Read):
    at: str | None = None
    queue: int | None = None
    cameras: dict[str, _CameraCounts] | None = None
    capture: dict[str, dict] | None = None
    capture_export: dict | None = None
    other_process: _OtherProcess | None = None


class _Scope(_Read):
    name: str | None = None
    version: str | None = None
    precision: str | None = None
    bundle: str | None = None
    extension: dict | None = None


class _Model(_Read):
    name: str | None = None
    version: str | None = None
    precision: str | None = None
    bundle: str | None = None
    scopes: dict[str, _Scope] | None = None


class _Error(_Read):
    code: str
    message: str | None = None
    frame_id: str | None = None


def _schema_problem(schema: type[_Read], message: object) -> str | None:
    """The first field of ``message`` that ``schema`` refuses, or None."""
    if not isinstance(message, dict):
        return "not a JSON object"
    try:
        schema.model_validate(message)
    except ValidationError as exc:
        first = exc.errors()[0]
        return f"{'.'.join(map(str, first['loc'])) or 'the message'}: {first['msg']}"
    return None


def result_problem(result: object) -> str | None:
    """What makes a result unusable for the console's state and pages, or None. Anyone may publish under the prefix
    on an open broker: a result is checked whole before any state changes."""
    if not isinstance(result, dict):
        return "not a JSON object"
    for key in ("camera", "frame_id"):
        if not valid_id(result.get(key)):
            return f"{key} is not an id"
    if not _number(result.get("score")):
        return "score is not a finite number"
    for key in ("raw_score", "threshold"):
        if result.get(key) is not None and not _number(result[key]):
            return f"{key} is not a finite number"
    if result.get("verdict") not in ("normal", "anomalous"):
        return "verdict is neither normal nor anomalous"
    model = result.get("model")
    if model is not None and not (isinstance(model, dict) and all(
            isinstance(model.get(k), str | None) for k in MODEL_FIELDS)):
        return "model is not an object with a name, version and precision"
    for key in ("captured_at", "received_at", "published_at", "label", "defect_type", "unlike_training"):
        if result.get(key) is not None and not isinstance(result[key], str):
            return f"{key} is not a string"
    return None


def _unb64(text: object) -> bytes | None:
    """A hit's base64 image; b"" where it has none (null), None where it is not base64."""
    if text is None:
        return b""
    try:
        return base64.b64decode(str(text), validate=True)
    except ValueError:
        return None


def epoch(stamp: str | None) -> float | None:
    try:
        return datetime.fromisoformat(str(stamp).replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


@dataclass
class Entry:
    """One processed frame: the worker's result and the images the console has for it."""

    result: dict
    heatmap: bytes | None = None
    frame: Image | None = None  # the camera's; only while the entry is among the recent frames
    thumbnail: bytes | None = None  # JPEG of the frame; anomalous frames only (kept in the defect feed), made after
    # When the console got the result, on its own clocks: cameras' clocks can be years off or step back an hour.
    seen_at: float = field(default_factory=time.time)  # epoch seconds: the feed's filter, the score plot
    arrived: float = field(default_factory=time.monotonic)  # the tile's reorder window

    @cached_property
    def captured(self) -> float | None:
        """The result's capture time in epoch seconds, parsed once (the tile, the plot and the feed all read it)."""
        return epoch(self.result.get("captured_at"))

    @cached_property
    def late_s(self) -> float | None:
        """How long before the worker answered it (or received it, a backfilled hit) the frame was captured, where
        that is past LATE_AFTER_S, else None: a frame the broker kept while the worker was away reaches the console
        an hour late, and must not read as a current one. A camera whose clock is behind the worker's reads late too."""
        answered = epoch(self.result.get("published_at")) or epoch(self.result.get("received_at"))
        if answered is None or self.captured is None or answered - self.captured <= LATE_AFTER_S:
            return None
        return answered - self.captured

    def view(self) -> dict:
        """The result as the browser gets it, with which images exist, when the console got it and how late."""
        late = self.late_s
        return {**self.result, "has_heatmap": self.heatmap is not None, "has_frame": self.frame is not None,
                "has_thumbnail": self.thumbnail is not None, "seen_at": round(self.seen_at, 3),
                "late_s": None if late is None else round(late, 3)}


def _replaces(entry: Entry, shown: Entry) -> bool:
    """Whether a camera's tile moves from ``shown`` to ``entry``, which arrived after it: it follows arrival, except
    for a late result of a slightly older frame (two infer requests finishing out of order). Capture order alone froze
    a tile on a frame stamped in the future until the console restarted. A time that cannot be read counts as new."""
    if entry.result.get("frame_id") == shown.result.get("frame_id") or entry.captured is None or shown.captured is None:
        return True
    return not (0 < shown.captured - entry.captured <= REORDER_WINDOW_S
                and entry.arrived - shown.arrived <= REORDER_WINDOW_S)


_Held = TypeVar("_Held", bound=Sized)


class Pending(Generic[_Held]):
    """Images waiting for their frame's result, bounded by count and by bytes; past either bound ``policy`` says
    which goes: ``drop_oldest`` forgets the image waiting the longest, ``drop_newest`` refuses the new one. The
    first image under a key stays: a second one under the same key is refused, so the console never shows bytes
    other than those it held when the worker's result came (a camera may send another frame under the same id)."""

    def __init__(self, limit: int, max_bytes: int, policy: str) -> None:
        self.items: OrderedDict[tuple[str, str], _Held] = OrderedDict()
        self.limit, self.max_bytes, self.policy = limit, max_bytes, policy
        self.bytes = 0
        self.evicted = 0  # images forgotten by drop_oldest

    def put(self, key: tuple[str, str], data: _Held) -> str | None:
        """Keeps ``data`` under ``key``, or says why not ("duplicate_id", "pending_full")."""
        if key in self.items:
            return "duplicate_id"
        if len(data) > self.max_bytes:
            return "pending_full"
        while self.items and (len(self.items) >= self.limit or self.bytes + len(data) > self.max_bytes):
            if self.policy == "drop_newest":
                return "pending_full"
            self.bytes -= len(self.items.popitem(last=False)[1])
            self.evicted += 1
        self.items[key] = data
        self.bytes += len(data)
        return None

    def take(self, key: tuple[str, str]) -> _Held | None:
        data = self.items.pop(key, None)
        if data is not None:
            self.bytes -= len(data)
        return data

    def __len__(self) -> int:
        return len(self.items)


_K = TypeVar("_K")
_V = TypeVar("_V")


class Bounded(OrderedDict[_K, _V]):
    """Insertion-ordered dict that forgets its oldest items past ``limit``; calls ``evicted`` on each."""

    def __init__(self, limit: int, evicted: Callable[[_V], None] | None = None) -> None:
        super().__init__()
        self.limit = limit
        self.evicted = evicted

    def __setitem__(self, key: _K, value: _V) -> None:
        super().__setitem__(key, value)
        while len(self) > self.limit:
            _, old = self.popitem(last=False)
            if self.evicted:
                self.evicted(old)


class Hub:
    """Live state for the console; every mutation happens under one lock and is pushed to listeners."""

    def __init__(self, topics: Topics, cfg: ConsoleConfig, limits: LimitsConfig | None = None,
                 cameras: dict[str, CameraConfig] | None = None) -> None:
        """``cameras``: the worker's per-camera settings (those whose frames are raw pixel buffers)."""
        self.topics = topics
        self.cfg = cfg
        self.limits = limits or LimitsConfig()
        self.cameras = cameras or {}
        self.lock = threading.Lock()
        # (camera, frame_id) -> the image, before its result
        self.pending_frames: Pending[Image] = Pending(cfg.recent_frames, cfg.pending_max_bytes, cfg.pending_policy)
        self.pending_heatmaps: Pending[bytes] = Pending(cfg.recent_frames, cfg.pending_max_bytes, cfg.pending_policy)
        self.dropped: dict[str, int] = {}  # why -> images and results the console did not keep
        self._bad_log, self._bad_since_log = Throttle(BAD_MESSAGE_LOG_EVERY_S), 0
        # every camera's latest frames
        self.recent: Bounded[tuple[str, str], Entry] = Bounded(cfg.recent_frames, self._forget_frame)
        self.defects: Bounded[tuple[str, str], Entry] = Bounded(cfg.history)  # anomalous frames, oldest first
        # per camera, the most recently active cfg.max_cameras (see _touch)
        self.latest: Bounded[str, Entry] = Bounded(cfg.max_cameras, self._forget_frame)
        # per camera, [bucket_start, max_score] of each SERIES_BUCKETS-th of the window, oldest first
        self.series: Bounded[str, deque[list[float]]] = Bounded(cfg.max_cameras)
        self.errors: Bounded[str, dict] = Bounded(cfg.max_cameras)  # camera -> {"count", "last"}
        # per worker id, the most recently active cfg.max_workers (anyone may publish under workers/<id>/)
        self.workers: Bounded[str, dict] = Bounded(cfg.max_workers)
        self._listeners: list[Callable[[str, dict], None]] = []
        self.liveness = Liveness(0)  # the hub runs on the console's MQTT thread, its thumbnails on their own
        self._thumbnails: BoundedQueue[tuple[Entry, Image]] = BoundedQueue(
            THUMBNAIL_QUEUE, THUMBNAIL_POLICY, cfg.pending_max_bytes, size=lambda item: len(item[1]))
        self._thumbnailer = threading.Thread(target=supervised_loop, name=THUMBNAILER, daemon=True,
                                             args=(self.liveness, THUMBNAILER, self._thumbnail_step))

    def start(self) -> None:
        self._thumbnailer.start()

    def stop(self) -> None:
        """Frames still waiting for a thumbnail go without: nobody is left to see them."""
        self._thumbnails.drain()
        self._thumbnails.close()
        if self._thumbnailer.is_alive():
            self._thumbnailer.join()

    @staticmethod
    def _touch(table: Bounded[str, _V], camera: str, value: Callable[[], _V]) -> _V:
        """The camera's item (``value()`` when it has none), moved to the newest end: the table then forgets the
        camera quiet the longest."""
        item = table.pop(camera) if camera in table else value()
        table[camera] = item
        return item

    def _forget_frame(self, entry: Entry) -> None:
        """Raw frames can be large: only the recent ones are kept, and each camera's tile (a quiet camera's tile,
        pushed out of the recent frames by busier cameras, still shows its frame); with the lock held."""
        camera, frame_id = entry.result["camera"], entry.result["frame_id"]
        if self.recent.get((camera, frame_id)) is not entry and self.latest.get(camera) is not entry:
            entry.frame = None

    def _frames_within_budget(self, newest: Entry) -> None:
        """The frames held (the recent ones and the tiles') brought within console.recent_max_bytes, the oldest
        forgotten first (with the lock held): 64 frames of a few megapixels each would otherwise hold hundreds of
        megabytes. The tiles out of the recent frames are older than any of them."""
        recent = set(map(id, self.recent.values()))
        held = [*(e for e in self.latest.values() if id(e) not in recent), *self.recent.values()]
        total = sum(len(e.frame) for e in held if e.frame is not None)
        for entry in held:
            if total <= self.cfg.recent_max_bytes:
                return
            if entry is not newest and entry.frame is not None:
                total -= len(entry.frame)
                entry.frame = None

    def subscribe(self, listener: Callable[[str, dict], None]) -> None:
        """``listener(event, data)`` is called for every change, on the MQTT thread (on the thumbnail thread for
        ``thumbnail``)."""
        self._listeners.append(listener)

    def _emit(self, event: str, data: dict) -> None:
        for listener in self._listeners:
            listener(event, data)

    @property
    def subscriptions(self) -> list[str]:
        p = self.topics.prefix
        return [*self.topics.frame_filters, f"{p}/+/heatmap", f"{p}/+/result", f"{p}/+/error", f"{p}/workers/+/+"]

    def on_message(self, msg: mqtt.MQTTMessage) -> None:
        """Anyone may publish under the prefix: a message the hub cannot read is logged and counted, never fatal."""
        with self.liveness.busy(HUB):
            try:
                self._on_message(msg)
            except Exception:
                self.liveness.failed(HUB)
                log.exception("console: message on %s not understood", msg.topic)

    def _on_message(self, msg: mqtt.MQTTMessage) -> None:
        parts = msg.topic.split("/")
        prefix_len = len(self.topics.prefix.split("/"))
        own = self.topics.sources.get(msg.topic)  # a camera's own frame topic (cameras.<id>.topic)
        rest = [own, "frame"] if own is not None else parts[prefix_len:]
        # paho annotates payload bytes | bytearray (what may be published); a received message's payload is bytes.
        payload = cast(bytes, msg.payload)
        if len(rest) == 3 and rest[0] == "workers":
            self._on_worker(rest[1], rest[2], payload)
        elif len(rest) == 2:
            camera, leaf = rest
            if leaf == "result":
                self._on_result(camera, payload)
            elif leaf in ("frame", "heatmap"):
                user = user_properties(msg)
                if leaf == "frame":
                    try:
                        user, payload = self._unwrapped(camera, user, payload)
                    except FrameError as exc:
                        self._drop(exc.code.value)
                        return
                if user.get("camera_id", camera) != camera:  # the worker refuses such a frame (camera_mismatch)
                    self._bad("camera_mismatch", f"a {leaf} on {camera}'s topic says it is camera "
                                                 f"{user['camera_id'][:64]!r}")
                    return
                if frame_id := user.get("frame_id"):
                    self._on_image(leaf, camera, frame_id, payload, user)
            elif leaf == "error":
                self._on_error(camera, payload)

    def _unwrapped(self, camera: str, user: dict[str, str], payload: bytes) -> tuple[dict[str, str], bytes]:
        """A camera frame's fields and image bytes as the worker reads them (worker/ingest.py): a JSON envelope's
        fields under the user properties and its image, or a raw camera's base64 text decoded, so the console keeps
        the picture the worker scored under the frame id its result names.  FrameError where the worker refuses it."""
        override = self.cameras.get(camera)
        if override is not None and override.payload == "json_envelope":
            envelope = open_envelope(payload, self.limits.max_frame_bytes)
            return {**envelope.fields, **user}, envelope.data
        if not user.get("frame_id") or is_buffer(user, override.pixels if override is not None else None):
            return user, payload  # a frame without an id is not kept: its text is not decoded
        return user, open_raw(payload, camera, self.limits.max_frame_bytes)

    def _drop(self, why: str) -> None:
        with self.lock:
            self.dropped[why] = self.dropped.get(why, 0) + 1

    def _on_image(self, kind: str, camera: str, frame_id: str, data: bytes, user: dict[str, str]) -> None:
        """An image is kept only within the worker's limits (its header checked, never decoded here), and only the
        first under its (camera, frame_id): a camera frame only before the frame's result, so the console shows the
        bytes the worker scored or none. A raw pixel buffer is checked against its declaration as the worker checks
        it and kept as it came (:class:`RawFrame`)."""
        image: Image = data
        try:
            camera_cfg = self.cameras.get(camera)
            pixels = declared(user, camera_cfg.pixels if camera_cfg is not None else None) if kind == "frame" else None
            if pixels is None:
                probe(data, self.limits.max_frame_bytes, self.limits.max_pixels)
            else:
                check(data, pixels, self.limits.max_frame_bytes, self.limits.max_pixels)
                image = RawFrame(data, pixels)
        except FrameError as exc:
            self._drop(exc.code.value)
            return
        key = (camera, frame_id)
        with self.lock:
            entry = self.recent.get(key)
            if entry is None:  # the usual order: frame, heatmap, then the result
                refused = (self.pending_frames.put(key, image) if kind == "frame"
                           else self.pending_heatmaps.put(key, data))
                if refused:
                    self.dropped[refused] = self.dropped.get(refused, 0) + 1
                return
            if kind == "frame" or getattr(entry, kind) is not None:  # after its result: not what the worker scored
                self.dropped["after_result"] = self.dropped.get("after_result", 0) + 1
                return
            setattr(entry, kind, image)
            view = {**entry.view(), "first": False, "tile": self.latest.get(camera) is entry}
        self._emit("frame", view)

    def _bad(self, why: str, problem: str) -> None:
        """A message dropped whole: counted in ``dropped`` under ``why``; logged with the count at most once every
        BAD_MESSAGE_LOG_EVERY_S (a client publishing garbage must not flood the log)."""
        self._drop(why)
        self._bad_since_log += 1
        if self._bad_log.ready():
            log.warning("console: %d message(s) not understood and dropped (last: %s, %s)", self._bad_since_log, why,
                        problem)
            self._bad_since_log = 0

    def _on_result(self, camera: str, payload: bytes) -> None:
        """A result is the camera's of its topic, the level the broker's ACL grants (the worker publishes each on its
        frame's camera): one naming another camera is dropped (``camera_mismatch``), as it would show on that camera's
        tile and in its feed and plot."""
        if len(payload) > RESULT_MAX_BYTES:
            self._bad("bad_result", f"{len(payload)} bytes, over the {RESULT_MAX_BYTES} a result may have")
            return
        parsed, problem = parsed_json(payload)
        problem = problem or result_problem(parsed)
        if problem is not None:
            self._bad("bad_result", problem)
            return
        result = {k: v for k, v in cast(dict, parsed).items() if k in RESULT_FIELDS}
        if result["camera"] != camera:
            self._bad("camera_mismatch", f"a result on {camera}'s topic names camera {result['camera'][:64]!r}")
            return
        if isinstance(result.get("model"), dict):
            result["model"] = {k: result["model"].get(k) for k in MODEL_FIELDS}
        key = (result["camera"], result["frame_id"])
        with self.lock:
            entry = Entry(result, self.pending_heatmaps.take(key), self.pending_frames.take(key))
            previous = self.recent.pop(key, None) or self.defects.get(key)
            if previous is not None and previous.result.get("captured_at") != result.get("captured_at"):
                # a new frame under the id (a camera whose counter restarted): its own place, not the earlier's label
                self.defects.pop(key, None)
                previous = None
            if previous is not None:  # the same frame again: keep its label and its place in the feed
                entry.result.update({k: previous.result[k] for k in ("label", "defect_type") if k in previous.result})
                entry.seen_at = previous.seen_at
            self.recent[key] = entry
            self._frames_within_budget(entry)
            shown = self._touch(self.latest, key[0], lambda: entry)
            if shown is not entry and _replaces(entry, shown):
                self.latest[key[0]] = entry
                self._forget_frame(shown)
            tile = self.latest[key[0]] is entry
            if previous is None:
                self._add_point(key[0], entry)
        anomalous = result.get("verdict") == "anomalous"
        if anomalous:
            with self.lock:
                self.defects[key] = entry
        # The page follows the hub: "tile" (this frame is the camera's tile now), "first" (a new point and feed item).
        self._emit("frame", {**entry.view(), "first": previous is None, "tile": tile})
        if anomalous and entry.frame is not None:  # queued after the frame event, so a page gets the thumbnail's after
            for _ in self._thumbnails.put((entry, entry.frame)):
                self._drop("thumbnail_skipped")

    def backfill(self, hits: list[dict]) -> int:
        """The defects a worker logged before the console started (its answer to a query for the latest anomalous
        frames, the last received first), put in the feed behind those the console has seen since, each with the
        thumbnail and heatmap the worker kept; returns how many. A hit is checked as a live result is (any client may
        answer on the console's response topic); one the console already has is left as it is."""
        entries: list[tuple[tuple[str, str], Entry]] = []
        for hit in reversed(hits):  # the oldest first, the feed's order
            result = {k: hit.get(k) for k in ("camera", "frame_id", "score", "raw_score", "verdict", "captured_at",
                                              "received_at", "label", "defect_type")}
            result["model"] = {"name": hit.get("model_name"), "version": hit.get("model_version")}
            images = [_unb64(hit.get(k)) for k in ("heatmap_b64", "thumbnail_b64")]
            problem = result_problem(result) or (None if result["verdict"] == "anomalous" and None not in images
                                                 else "not an anomalous frame with its images")
            if problem is not None:
                self._bad("bad_result", problem)
                continue
            entry = Entry(result, images[0] or None, thumbnail=images[1] or None,
                          seen_at=epoch(hit.get("received_at")) or time.time())
            entries.append(((result["camera"], result["frame_id"]), entry))
        with self.lock:
            live = list(self.defects.items())
            known = {key for key, _ in live} | set(self.recent)
            added = [(key, entry) for key, entry in entries if key not in known]
            self.defects.clear()
            for key, entry in [*added, *live]:  # past console.history, the oldest of the worker's go first
                self.defects[key] = entry
        if added:
            self._emit("feed", {"backfilled": len(added)})
        return len(added)

    def _thumbnail_step(self) -> None:
        """One anomalous frame's thumbnail, announced to the pages as a ``thumbnail`` event (its result went before)."""
        try:
            item = self._thumbnails.get(timeout=1.0)
        except Closed:
            raise StopLoop from None
        if item is None:
            return
        entry, frame = item
        thumbnail = self._thumbnail(frame)
        if thumbnail is None:
            return
        with self.lock:
            entry.thumbnail = thumbnail
        self._emit("thumbnail", {"camera": entry.result["camera"], "frame_id": entry.result["frame_id"],
                                 "seen_at": round(entry.seen_at, 3)})

    def _thumbnail(self, frame: Image) -> bytes | None:
        """A JPEG of the frame within THUMBNAIL_SIZE, decoded only within the worker's limits (a JPEG at a reduced
        size where that still covers the thumbnail)."""
        try:
            if isinstance(frame, RawFrame):
                image = to_bgr(frame.data, frame.pixels)
            else:
                header: Header = probe(frame, self.limits.max_frame_bytes, self.limits.max_pixels)
                image = decode(frame, reduction(header, THUMBNAIL_SIZE, THUMBNAIL_SIZE, headroom=1.0))
            return encode(fit_size(image, THUMBNAIL_SIZE), "jpeg", 80)
        except FrameError:
            return None

    def _add_point(self, camera: str, entry: Entry) -> None:
        """The score into its time bucket: a camera keeps at most SERIES_BUCKETS + 1 of them, whatever its frame rate
        (every point of the window was kept, and summed into buckets under the lock at each /api/state)."""
        # the camera's clock may be years off: the plot's "last hour" is the console's, a late frame placed back on it
        # by how long before the worker answered it the frame was captured (past the window: not plotted)
        at = entry.seen_at - (entry.late_s or 0.0)
        step = self.cfg.series_minutes * 60 / SERIES_BUCKETS
        start, score = at - at % step, max(float(entry.result["score"]), 0.0)
        buckets = self._touch(self.series, camera, deque)
        if not buckets or start > buckets[-1][0]:
            buckets.append([start, score])
        else:  # this bucket, or an earlier one (the console's clock stepped back): found from the newest end
            at_or_before = next((i for i in range(len(buckets) - 1, -1, -1) if buckets[i][0] <= start), None)
            if at_or_before is not None and buckets[at_or_before][0] == start:
                buckets[at_or_before][1] = max(buckets[at_or_before][1], score)
            else:
                buckets.insert(0 if at_or_before is None else at_or_before + 1, [start, score])
        horizon = time.time() - self.cfg.series_minutes * 60
        while buckets and buckets[0][0] + step <= horizon:
            buckets.popleft()

    def _on_error(self, camera: str, payload: bytes) -> None:
        error, problem = parsed_json(payload)
        problem = problem or _schema_problem(_Error, error)
        if problem is not None:
            self._bad("bad_error", problem)
            return
        error = cast(dict, error)
        with self.lock:
            if error.get("frame_id") is not None:  # the worker refused that frame: its bytes get no result
                self.pending_frames.take((camera, error["frame_id"]))
            record = self._touch(self.errors, camera, lambda: {"count": 0, "last": None})
            record["count"] += 1
            record["last"] = error
            data = {"camera": camera, **record}
        self._emit("camera_error", data)

    def _on_worker(self, worker: str, leaf: str, payload: bytes) -> None:
        """A worker's availability, model or stats, each checked whole before it changes anything: one a worker
        could not have sent is dropped (``bad_worker_status``), and the worker's state stays as it was."""
        if leaf not in ("availability", "model", "stats"):
            return
        value: object
        if leaf == "availability":
            value = payload.decode("utf-8", errors="replace")
            said = value == "" or (valid_id(value) and len(value) <= AVAILABILITY_MAX_CHARS and "\ufffd" not in value)
            problem = None if said else f"not a word of at most {AVAILABILITY_MAX_CHARS} characters"
        else:
            value, problem = parsed_json(payload)
            problem = problem or _schema_problem(_Model if leaf == "model" else _Stats, value)
        if not valid_id(worker):
            problem = "the worker id is not an id"
        if problem is not None:
            self._bad("bad_worker_status", f"{leaf} of {worker[:64]!r}: {problem}")
            return
        with self.lock:
            state = self._touch(self.workers, worker, lambda: {"id": worker, "availability": None, "model": None,
                                                               "stats": None, "rates": {}})
            if leaf == "stats":
                state["rates"] = self._rates(state["stats"], cast(dict, value))
            elif leaf == "availability" and value != "online" and state["stats"]:
                # Its queue and frame rates were its last stats', no longer true: unknown until its next stats (a
                # pill back online showed the queue of before it went away).
                state["stats"] = {k: v for k, v in state["stats"].items() if k != "queue"}
                state["rates"] = {}
            state[leaf] = None if value == "" else value  # an empty availability: its retained message cleared
            data = dict(state)
        self._emit("worker", data)

    @staticmethod
    def _rates(before: dict | None, after: dict) -> dict[str, float]:
        """Frames processed per second and camera between two stats messages; none across a restart of the worker
        (its uptime went down) nor for a camera whose count went down: its counts start again from zero."""
        if not before:
            return {}
        dt = (epoch(after.get("at")) or 0) - (epoch(before.get("at")) or 0)
        was, now = before.get("uptime_s"), after.get("uptime_s")
        if dt <= 0 or (isinstance(was, int | float) and isinstance(now, int | float) and now < was):
            return {}
        old = before.get("cameras") or {}  # null in a message is allowed, as no counts
        rates = {cam: (c.get("processed", 0) - (old.get(cam) or {}).get("processed", 0)) / dt
                 for cam, c in (after.get("cameras") or {}).items()}
        return {cam: round(rate, 2) for cam, rate in rates.items() if rate >= 0}

    def away(self, only: str | None = None) -> tuple[str, str] | None:
        """Why no worker would take a request now (an error code and its message), by the availability each worker
        retains: worker ``only``'s (a control command goes to one worker) or every worker's seen (a query or label
        goes to any). None while one is online or has not said (the console has just started): the request is then
        sent and waited for."""
        with self.lock:
            known = {w: s["availability"] for w, s in self.workers.items()}
        said = {w: a for w, a in known.items() if only is None or w == only}
        if only is not None and not said and any(a is not None for a in known.values()):
            seen = ", ".join(f"{w} ({a})" for w, a in sorted(known.items()) if a is not None)
            return "unknown_worker", (f"no worker {only} has been seen on this broker (workers seen: {seen}): the console "
                                      "sends control commands to the worker.id of its own config")
        if not said or any(a in (None, "online") for a in said.values()):
            return None
        return "worker_offline", "; ".join(f"worker {w} is {a}" + (f" ({AWAY[a]})" if a in AWAY else "")
                                           for w, a in sorted(said.items()))

    def set_label(self, camera: str, frame_id: str, label: str | None, defect_type: str | None,
                  learned: str | None = None) -> None:
        """Show a label the worker accepted on the frame, if the console still has it, and on every open page
        what the model learned from it (``learned``: the worker's absorbed/released message)."""
        with self.lock:
            entry = self.recent.get((camera, frame_id)) or self.defects.get((camera, frame_id))
            if entry is not None:
                entry.result.update(label=label, defect_type=defect_type)
        self._emit("label", {"camera": camera, "frame_id": frame_id, "label": label, "defect_type": defect_type,
                             "learned": learned})

    def image(self, camera: str, frame_id: str, kind: str) -> Image | None:
        with self.lock:
            entry = self.recent.get((camera, frame_id)) or self.defects.get((camera, frame_id))
            if entry is None and (shown := self.latest.get(camera)) is not None and shown.result["frame_id"] == frame_id:
                entry = shown  # a quiet camera's tile, its frame pushed out of the recent ones by busier cameras
            return getattr(entry, kind, None) if entry is not None else None

    def shown_as(self, camera: str, frame_id: str, held: Image, shown: bytes) -> None:
        """Keep the picture a page was served in place of the frame it was made of (a raw buffer, a TIFF): the next
        page gets it without a conversion, and it is smaller. Nothing changes if the frame has gone meanwhile."""
        with self.lock:
            entry = self.recent.get((camera, frame_id)) or self.latest.get(camera)
            if entry is not None and entry.frame is held:
                entry.frame = shown

    def defect_feed(self, camera: str | None, since: float | None, until: float | None, limit: int,
                    before: tuple[str, str] | None = None) -> list[dict]:
        """Anomalous frames seen since the console started, the last received first; ``since``/``until`` bound the
        console's receive time. Capture times would put a camera whose clock runs ahead on top for good, and leave
        one whose clock runs behind out of every recent window. ``before``: the (camera, frame_id) of the last item a
        page lists, to page on to older ones (none once the console has forgotten it: the older ones went first)."""
        found: list[dict] = []
        with self.lock:  # viewing only the page's entries: a long console.history held the lock for all of them
            if before is not None and before not in self.defects:
                return found
            started = before is None
            for key, e in reversed(self.defects.items()):
                if len(found) >= limit:
                    break
                if not started:
                    started = key == before
                elif ((not camera or e.result["camera"] == camera) and (not since or e.seen_at >= since)
                      and (not until or e.seen_at <= until)):
                    found.append(e.view())
        return found

    def score_series(self) -> dict[str, list[list[float]]]:
        """Per camera, the highest score in each time bucket of the window: ``[[bucket_start, max_score], ...]``."""
        with self.lock:
            return {camera: [list(b) for b in buckets] for camera, buckets in self.series.items()}

    def snapshot(self) -> dict:
        with self.lock:
            return {
                # the quiet the longest first, as the console forgets them: a page loaded takes them in this order
                "cameras": {cam: e.view() for cam, e in self.latest.items()},
                "errors": dict(self.errors),
                "workers": {w: dict(s) for w, s in self.workers.items()},
                "threads": self.liveness.snapshot(),
                "dropped": {**self.dropped, **({"pending_evicted": evicted} if (
                    evicted := self.pending_frames.evicted + self.pending_heatmaps.evicted) else {})},
            }
