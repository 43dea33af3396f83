"""Frames in, results out: admission on the MQTT thread, then decode -> infer -> publish on inference threads.

Admission (topic, metadata, size, header) is cheap and runs on paho's network
thread, so a refused frame is answered at once and never queues.  Each inference
thread owns one OpenVINO infer request and runs decode, resize, inference, the
heatmap and publishing for its frame; OpenCV and OpenVINO release the GIL, so the
threads overlap.  Storage is handed to the recorder thread.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
import zlib
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from pydantic import ValidationError

from bundle import tiling
from bundle.runtime import OutputError
from worker import heatmap
from worker.acks import Ticket
from worker.capture import Capture
from worker.config import CameraConfig, Config, HeatmapConfig, QueuePolicy
from worker.decode import FrameError, Header, decode, probe, reduction
from worker.ingest import Ingest
from worker.metrics import OTHER, Stats
from worker.models import Model, Models
from worker.mqtt import PacketTooLarge, publish_properties
from worker.pixels import Pixels, declared, image_file, to_bgr
from worker.pixels import check as check_pixels
from worker.queueing import BoundedQueue, Closed
from worker.recorder import Record, Recorder
from worker.spaces import embedding_space_of
from worker.store import point_id
from worker.supervise import Liveness, Repeats, StopLoop, Throttle, supervised_loop
from worker.topics import Topics
from worker.transport import Inbound, Transport
from worker.wire import PIXEL_FIELDS, ErrorCode, FrameMetadata, clock_set, iso, publishable, valid_id, whole_ms

_UNSEEN = object()  # no frame remembered under this (camera, frame_id)
_SENT_ONCE = frozenset(FrameMetadata.model_fields) | frozenset(PIXEL_FIELDS)  # user properties that may not repeat
# A normal frame for the capture sample: camera, point id, the image as the model saw it, its file bytes and extension
Offer = tuple[str, str, np.ndarray, Callable[[], tuple[bytes, str]]]
CAPTURE_QUEUE = (8, 256_000_000)  # frames and bytes (decoded images) waiting for the capture thread
REFUSAL_LOG_S = 60.0  # a camera's refusals of one code after its first: one log line per this, with their count
REFUSAL_LOG_KEYS = 1024  # (camera, code) pairs remembered for that; the least recently refused is forgotten
Mark = tuple[str | None, int]  # a delivery's captured_at as sent (None: stamped here) and its bytes' CRC-32
log = logging.getLogger(__name__)

__all__ = ["Frame", "Pipeline", "iso", "receive_maximum"]


def inference_threads(cfg: Config, models: Models) -> int:
    return cfg.limits.inference_threads or max(1, models.default.bundle.optimal_requests)


def receive_maximum(cfg: Config, models: Models) -> int | None:
    """Under ``block``: how many frames the broker may hand the worker before it has answered them (MQTT v5 Receive
    Maximum), as many as the other policies hold at most: a full queue (``limits.queue_size`` frames, and
    ``limits.queue_max_bytes`` of frames as large as ``limits.max_frame_bytes``) and one frame in each inference
    thread.  None for the drop policies, which take every frame and answer those they drop."""
    limits = cfg.limits
    if limits.queue_policy is not QueuePolicy.BLOCK:
        return None
    queued = max(1, min(limits.queue_size, limits.queue_max_bytes // limits.max_frame_bytes))
    return min(queued + inference_threads(cfg, models), 0xFFFF)


@dataclass
class Frame:
    camera: str
    frame_id: str
    captured_at: str
    captured_ts: float
    data: bytes
    header: Header
    received_ts: float
    received_mono: float
    generated: tuple[str, ...] = ()  # fields the worker made up (metadata: optional)
    ticket: Ticket | None = None  # under block: its acknowledgement, released once the broker has its answer
    pixels: Pixels | None = None  # a raw pixel buffer's layout; None: ``data`` is an image file

    def file(self) -> tuple[bytes, str]:
        """The frame as an image file, for the capture sample: as sent, or a raw buffer's TIFF."""
        return image_file(self.data, self.fmt, self.pixels)

    @property
    def fmt(self) -> str:
        return self.header.format


class Pipeline:
    def __init__(self, cfg: Config, models: Models, link: Transport, topics: Topics, recorder: Recorder,
                 stats: Stats, liveness: Liveness, capture: Capture | None = None) -> None:
        """``capture`` is offered every normal frame (worker/capture.py keeps a bounded sample)."""
        self.cfg = cfg
        self.capture = capture
        self.models = models
        self.link = link
        self.topics = topics
        self.recorder = recorder
        self.stats = stats
        self.liveness = liveness
        self.allowed = set(cfg.topics.cameras) | set(cfg.cameras) if cfg.topics.cameras else set()
        self.ingest = Ingest(cfg, lambda camera: stats.bucket(self._counted(camera)))
        # Policy: limits.queue_policy when full in frames (limits.queue_size) or bytes (limits.queue_max_bytes);
        # a drop evicts a frame of the camera holding the most, so a flooding camera pays for its own flood.  Under
        # block the broker's window (receive_maximum) bounds the frames held, so the queue never fills and put never
        # waits on paho's network thread, except with a broker that sends past the window (mosquitto 2.0.11 does):
        # then the thread waits, and the broker's socket with it, as before the window.
        self.window = receive_maximum(cfg, models)
        # Under block a frame is acknowledged once answered: at a stop, one not yet answered can stay with the broker
        # for the next start instead of being answered shutdown, where the session outlives the connection.
        self.hand_back = self.window is not None and cfg.mqtt.session_expiry_s > 0
        self.queue: BoundedQueue[Frame] = BoundedQueue(
            self.window or cfg.limits.queue_size, cfg.limits.queue_policy,
            None if self.window else cfg.limits.queue_max_bytes, size=lambda f: len(f.data), key=lambda f: f.camera)
        self._holding: dict[tuple[str, str], Ticket] = {}  # under block: (camera, id) of a frame held -> its ticket
        n = inference_threads(cfg, models)
        self.threads = [threading.Thread(target=self._run, name=f"infer-{i}", daemon=True) for i in range(n)]
        # The capture sample writes files: on a thread of its own, so a slow or stalled disk costs the sample
        # frames, never inspection.  Policy: drop_newest past CAPTURE_QUEUE frames or bytes, counted.
        self.offers: BoundedQueue[Offer] = BoundedQueue(CAPTURE_QUEUE[0], QueuePolicy.DROP_NEWEST, CAPTURE_QUEUE[1],
                                                        size=lambda o: o[2].nbytes)
        if capture is not None:
            self.threads.append(threading.Thread(target=self._offer_loop, name="capture", daemon=True))
        self._normal_seen: Counter = Counter()
        self.bad_camera_frames = 0  # frames refused for their camera id (see _bad_camera)
        self._bad_camera_log, self._cleared_log = Throttle(60), Throttle(60)
        self._refusals_said = Repeats(REFUSAL_LOG_S, REFUSAL_LOG_KEYS)  # per (camera, code): see _fail
        self._empty_level_said = False  # a frame topic without a camera level was reported (once: a misconfigured camera)
        self._recent: OrderedDict[tuple[str, str], Mark] = OrderedDict()  # (camera, id): its mark
        self._lock = threading.Lock()
        self._query_lock = threading.Lock()
        self._query_requests: dict[Model, object] = {}
        self._shape_notes: dict[tuple[int, int, str, str, bool], str | None] = {}  # see _unlike_training
        base = cfg.heatmap
        self._heatmap_by_camera = {
            camera: (o.heatmap or base.publish,
                     base.model_copy(update={"format": o.heatmap_format or base.format, "size": o.heatmap_size or base.size}))
            for camera, o in cfg.cameras.items()
        }

    # --- MQTT thread -------------------------------------------------------------------------
    def on_frame(self, msg: Inbound, ticket: Ticket | None = None) -> bool:
        """Admit or refuse one frame message; every frame on a camera topic gets exactly one outcome.  ``ticket``:
        its acknowledgement; True when the pipeline keeps it to release once the frame is answered (under block),
        False when the caller releases it now (each answer given meanwhile holds it until the broker has it)."""
        camera = self.topics.camera_of(msg.topic)
        if camera is None:  # the subscription matched an empty camera level (<prefix>//frame): nobody to answer
            if not self._empty_level_said:
                self._empty_level_said = True
                log.warning("frames on %s are ignored: its camera level is empty (frames go to %s)", msg.topic,
                            self.topics.frame("<camera>"))
            return False
        if not msg.payload and msg.retained:  # how a client clears a retained frame: no frame, nothing to answer
            if self._cleared_log.ready():
                log.info("an empty retained message on %s is ignored (a retained frame cleared; said at most once a "
                         "minute)", msg.topic[:200])
            return False
        if not valid_id(camera):
            self._bad_camera(camera, msg.user, ticket)
            return False
        props = msg.user
        if ambiguous := sorted(msg.repeated & _SENT_ONCE):
            self.stats.add(self._counted(camera), "received")
            self._fail(camera, None, ErrorCode.BAD_METADATA, f"user propert{'ies' if len(ambiguous) > 1 else 'y'} "
                       f"{', '.join(ambiguous)} given more than once: which is meant cannot be told", ticket=ticket)
            return False
        try:
            return self._on_frame(camera, props, msg.payload, ticket, msg.replayed)
        except Exception as exc:  # a bug in admission must cost this frame only
            log.exception("admission of a frame from %s failed", camera)
            self._fail(camera, props.get("frame_id"), ErrorCode.INTERNAL_ERROR, f"{type(exc).__name__}: {exc}",
                       ticket=ticket)
            return False

    def _on_frame(self, camera: str, props: dict[str, str], payload: bytes, ticket: Ticket | None,
                  replayed: bool = False) -> bool:
        received_ts, received_mono = time.time(), time.monotonic()
        self.stats.add(self._counted(camera), "received")
        self.ingest.check_box_clock(received_ts)
        try:
            arrival = self.ingest.arrive(camera, props, payload)
        except FrameError as exc:
            self._fail(camera, props.get("frame_id") or exc.frame_id, exc.code, exc.message, ticket=ticket)
            return False
        props, payload = arrival.fields, arrival.data
        delivery = self._delivery(camera, props, payload, arrival.generated)
        own_id = "frame_id" not in arrival.generated
        # A frame without an id (an MQTT 3.1.1 camera) is told from a redelivery of one only by its bytes, which a
        # still scene repeats: only the broker's redelivery (DUP) of the same bytes is one.
        if (replayed or own_id) and self._seen(*delivery):
            # A QoS 1 redelivery (e.g. after a broker restart): already accepted once, so not again.
            self.stats.add(camera, "duplicates")
            log.debug("duplicate frame %s/%s ignored", camera, props.get("frame_id"))
            with self._lock:
                held = self._holding.get(delivery[0])
            if held is None or ticket is None:
                return False
            held.then(ticket.release)  # acknowledged with the first copy, once it is answered
            return True
        try:
            frame = self._admit(camera, props, payload, received_ts, received_mono, arrival.generated)
        except FrameError as exc:
            self._fail(camera, props.get("frame_id"), exc.code, exc.message, ticket=ticket)
            return False
        self._remember(*delivery, own_id)
        if self.window is not None:
            frame.ticket = ticket
        dropped = self.queue.put(frame)
        if dropped == [frame] and self.queue.closed and self.hand_back and not self._hand_back([frame]):
            return True  # it waited for room while the stop began: left with the broker for the next start
        for lost in dropped:
            if self.queue.closed:
                self._fail(lost.camera, lost.frame_id, ErrorCode.SHUTDOWN, "the worker is stopping", ticket=ticket)
            else:
                self._fail(lost.camera, lost.frame_id, ErrorCode.DROPPED,
                           f"queue full ({self.queue.maxsize} frames or {self.queue.max_bytes} bytes); "
                           f"policy {self.queue.policy.value}", counter="dropped")
        if frame.ticket is None or dropped:
            return False
        key, held = delivery[0], frame.ticket
        with self._lock:
            self._holding[key] = held
        held.then(lambda: self._unhold(key, held))
        return True

    def _counted(self, camera: str) -> str:
        """The camera's key in the stats: :data:`OTHER` for one that topics.cameras does not list, whose frames are
        refused; it would otherwise hold one of the metrics.max_cameras slots for good, and a listed camera that came
        after it would be counted as /other."""
        return OTHER if self.allowed and camera not in self.allowed else camera

    def _unhold(self, key: tuple[str, str], ticket: Ticket) -> None:
        with self._lock:
            if self._holding.get(key) is ticket:
                del self._holding[key]

    @staticmethod
    def _delivery(camera: str, props: dict[str, str], payload: bytes,
                  generated: tuple[str, ...]) -> tuple[tuple[str, str], Mark]:
        """What tells a QoS 1 redelivery of a frame from another frame: its (camera, frame_id) and a mark, the
        ``captured_at`` as sent (none where the worker stamps the time) and the bytes' checksum, all of which a
        redelivery repeats.  The time alone is not enough: a camera whose clock and frame counter both start again
        at a reboot (a clock reset to 2000, a 1 s resolution) repeats both.  Without an id of its own, the checksum
        stands in for it (``\0`` and the checksum: no id a camera can send)."""
        sent = None if "captured_at" in generated else props.get("captured_at")
        crc = zlib.crc32(payload)
        frame_id = f"\0{crc:08x}" if "frame_id" in generated else str(props.get("frame_id"))
        return (camera, frame_id), (sent, crc)

    def _seen(self, key: tuple[str, str], mark: Mark) -> bool:
        """Whether this delivery is one of the last ``limits.dedupe_window`` frames accepted."""
        with self._lock:
            return self._recent.get(key, _UNSEEN) == mark

    def _remember(self, key: tuple[str, str], mark: Mark, own_id: bool = True) -> None:
        """Remember an accepted frame.  The same id with another mark is a camera that reuses ids (a frame counter
        that starts again at a reboot): a new frame, said once per camera since a frame id names one stored frame
        (not for a frame without an ``own_id``, whose key its bytes make)."""
        with self._lock:
            earlier = self._recent.pop(key, _UNSEEN)
            self._recent[key] = mark
            if len(self._recent) > self.cfg.limits.dedupe_window:
                self._recent.popitem(last=False)
        camera, frame_id = key
        if own_id and earlier is not _UNSEEN and self.ingest.first_time(camera, "frame_id reuse"):
            log.warning("camera %s reuses frame ids (%r again, another frame): each is scored, but the history keeps "
                        "one frame per camera and id, so the earlier frame's record is replaced (one an operator "
                        "labelled is kept, and the new frame not recorded); give frames ids that do not repeat (e.g. "
                        "with the camera's boot time)", camera, frame_id)

    def _admit(self, camera: str, props: dict[str, str], data: bytes, received_ts: float, received_mono: float,
               generated: tuple[str, ...] = ()) -> Frame:
        if self.allowed and camera not in self.allowed:
            raise FrameError(ErrorCode.UNKNOWN_CAMERA, f"camera {camera!r} is not in topics.cameras")
        claimed = props.get("camera_id")
        if claimed is not None and claimed != camera:
            raise FrameError(ErrorCode.CAMERA_MISMATCH, f"user property camera_id {claimed!r} differs from the topic's camera {camera!r}")
        missing = [k for k in ("frame_id", "captured_at") if k not in props and k not in generated]
        if missing:
            raise FrameError(ErrorCode.MISSING_METADATA, f"{', '.join(missing)} required (MQTT v5 user properties or "
                             "envelope fields), or set metadata: optional for this camera")
        try:
            meta = FrameMetadata.model_validate(props)
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
            raise FrameError(ErrorCode.BAD_METADATA, problems[:500]) from None
        override = self.cfg.cameras.get(camera)
        pixels = declared(props, override.pixels if override is not None else None)
        limits = self.cfg.limits
        header = (probe(data, limits.max_frame_bytes, limits.max_pixels) if pixels is None
                  else check_pixels(data, pixels, limits.max_frame_bytes, limits.max_pixels))
        ts = meta.captured_ts
        if ts is None:  # the worker's own receive time (metadata: optional): never refused, even on an unset clock
            ts = received_ts
        else:
            self.ingest.check_clock(camera, ts, received_ts)
            self._check_age(ts, received_ts)
        ts = whole_ms(ts)
        return Frame(camera, meta.frame_id, iso(ts), ts, data, header, received_ts, received_mono, generated,
                     pixels=pixels)

    def _check_age(self, captured_ts: float, received_ts: float) -> None:
        """Refuse a frame captured longer before it arrived than ``limits.max_frame_age_s``: a broker hands a worker
        back from an outage every frame its persistent session kept, which would be scored and answered as if live.
        Not while this box's clock is not set: every age read from it is wrong."""
        limit = self.cfg.limits.max_frame_age_s
        if limit is None or not clock_set(received_ts) or received_ts - captured_ts <= limit:
            return
        raise FrameError(ErrorCode.STALE_FRAME, f"captured {received_ts - captured_ts:.1f} s before it arrived, more "
                         f"than limits.max_frame_age_s ({limit:g} s): not scored (a frame the broker kept while the "
                         "worker was away; or the camera's clock is behind this box's, or it sends its local time "
                         "without a UTC offset, read as UTC)")

    def _bad_camera(self, camera: str, props: dict[str, str], ticket: Ticket | None) -> None:
        """A frame from a camera id no label, query or console can name (over 128 characters, not printable, '.' or
        '..'): it was scored and stored, and then could never be labelled, asked about or seen.  Refused before any
        decoding, answered where its error topic can be published to (a topic over MQTT's 64 KiB cannot, nor an answer
        over the broker's maximum packet size), counted
        in the stats' overflow bucket (an id invented per frame must not grow them), logged once a minute."""
        self.bad_camera_frames += 1
        message = ("camera ids (the topic level before /frame) are 1 to 128 printable characters without '/', and "
                   "not '.' or '..': frames of this one could never be labelled, asked about or shown on the console")
        self.stats.add(OTHER, "received")
        self.stats.add(OTHER, "errored", code=ErrorCode.BAD_CAMERA.value)
        if self._bad_camera_log.ready():
            log.warning("frames refused (bad_camera) from camera %r%s: %s (%d so far; said at most once a minute)",
                        camera[:64], "..." if len(camera) > 64 else "", message, self.bad_camera_frames)
        topic = self.topics.error(camera)
        if publishable(topic):
            frame_id = props.get("frame_id")
            body = {"code": ErrorCode.BAD_CAMERA.value, "message": message,
                    "frame_id": frame_id if valid_id(frame_id) else None, "camera": camera,
                    "worker": self.cfg.worker.id, "at": iso(time.time())}
            with contextlib.suppress(PacketTooLarge):  # the id in the topic and the body: past what the broker takes
                self.link.publish(topic, json.dumps(body), properties=publish_properties(content_type="application/json"),
                                  settled=ticket.hold() if ticket is not None else None)

    def _fail(self, camera: str, frame_id: str | None, code: ErrorCode | str, message: str, counter: str = "errored",
              ticket: Ticket | None = None) -> None:
        """Answer a frame that is not processed, and forget it was accepted: sent again (mended), it is served.
        ``ticket``: its acknowledgement, held until the broker has the answer."""
        if frame_id is not None:
            with self._lock:
                self._recent.pop((camera, frame_id), None)
        code = ErrorCode(code).value
        counted = self._counted(camera)
        self.stats.add(counted, counter, code=code)
        body = {"code": code, "message": message, "frame_id": frame_id if valid_id(frame_id) else None,
                "camera": camera, "worker": self.cfg.worker.id, "at": iso(time.time())}
        # every one is on the error topic and in the stats; the log says a camera's first and then one line a minute,
        # cameras past metrics.max_cameras together (a publisher inventing a camera per frame would flood it)
        bucket = self.stats.bucket(counted)
        passed = self._refusals_said.ready((bucket, code))
        if passed is not None:
            who = (camera if bucket == camera else "cameras past metrics.max_cameras" if counted == camera
                   else "cameras outside topics.cameras")
            log.info("frame %s/%s refused: %s: %s (%s)", camera, body["frame_id"], code, message,
                     f"and {passed} more since the last line" if passed else
                     f"more {code} refusals of {who}: one line a minute")
        self.link.publish(self.topics.error(camera), json.dumps(body),
                          properties=publish_properties(content_type="application/json"),
                          settled=ticket.hold() if ticket is not None else None)

    # --- inference threads -------------------------------------------------------------------
    def start(self) -> None:
        for t in self.threads:
            self.liveness.register(t.name, t)
            t.start()

    def stop(self, timeout: float) -> int:
        """Stop after the queued frames (bounded by ``timeout``); returns how many were left and refused."""
        self.queue.close()
        deadline = time.monotonic() + timeout
        for t in self.threads:
            if t.name == "capture":
                self.offers.close()  # after the inference threads: their last offers are taken
            t.join(max(0.0, deadline - time.monotonic()))
        left = self._hand_back(self.queue.drain())
        for frame in left:
            self._fail(frame.camera, frame.frame_id, ErrorCode.SHUTDOWN, "worker stopped before this frame was processed",
                       ticket=frame.ticket)
            if frame.ticket is not None:
                frame.ticket.release()
        return len(left)

    def _hand_back(self, frames: list[Frame]) -> list[Frame]:
        """At a stop, under :attr:`hand_back`: leave the frames that no other message followed unanswered and their
        tickets unreleased, so they are never acknowledged and the broker hands them to the next start (counted
        ``handed_back``); returns the frames to answer ``shutdown`` instead (acknowledged in order, a request after
        them needs them answered)."""
        tickets = [f.ticket for f in frames if f.ticket is not None]
        if not self.hand_back or not tickets:
            return frames
        tail = tickets[0].ledger.tail(tickets)  # only those no other message follows: see Acks.tail
        for frame in frames:
            if frame.ticket in tail:
                self.stats.add(frame.camera, "handed_back")
        if tail:
            log.info("%d frame(s) not processed before the stop are left unacknowledged with the broker for the next "
                     "start", len(tail))
        return [f for f in frames if f.ticket not in tail]

    def abandon(self, message: str, timeout: float) -> int:
        """A watchdog exit: close the queue, let the inference threads that still run finish the frame in hand
        (bounded by ``timeout``: a stuck one keeps its frame), then answer each frame left in the queue ``shutdown``
        with ``message`` (acknowledged to the broker, nothing else would answer them; under :attr:`hand_back` they are
        left to the next start); returns how many answered.  A frame that arrives meanwhile is refused by the closed
        queue, and answered too (or left)."""
        self.queue.close()
        left = self._hand_back(self.queue.drain())
        deadline = time.monotonic() + timeout
        for t in self.threads:
            if t.name != "capture":
                t.join(max(0.0, deadline - time.monotonic()))
        for frame in left:
            self._fail(frame.camera, frame.frame_id, ErrorCode.SHUTDOWN, message, ticket=frame.ticket)
            if frame.ticket is not None:
                frame.ticket.release()
        return len(left)

    def _run(self) -> None:
        name = threading.current_thread().name
        requests: dict[Model, object] = {}  # one infer request per model this thread has served (keeps it alive)

        def step() -> None:
            nonlocal requests
            try:
                frame = self.queue.get(timeout=0.5)
            except Closed:
                raise StopLoop from None
            if frame is None:
                return
            try:
                model = self.models.for_camera(frame.camera)
                request = requests.get(model)
                if request is None:  # first frame on a (re)loaded model: forget requests of replaced ones
                    live = set(self.models.scopes().values())
                    requests = {m: r for m, r in requests.items() if m in live}
                    request = requests[model] = model.bundle.create_request()
                self._process(frame, model, request)
            except FrameError as exc:
                self._fail(frame.camera, frame.frame_id, exc.code, exc.message, ticket=frame.ticket)
            except PacketTooLarge as exc:
                self._fail(frame.camera, frame.frame_id, ErrorCode.RESULT_TOO_LARGE, str(exc), ticket=frame.ticket)
            except OutputError as exc:  # no verdict, rather than a NaN that compares as normal
                self._fail(frame.camera, frame.frame_id, ErrorCode.INVALID_OUTPUT, f"{exc} for this frame "
                           f"({model.bundle.manifest.name} {model.bundle.manifest.version} at "
                           f"{model.bundle.precision}): no verdict", ticket=frame.ticket)
            except Exception as exc:  # keep serving; the frame still gets its error message
                log.exception("frame %s/%s failed", frame.camera, frame.frame_id)
                self._fail(frame.camera, frame.frame_id, ErrorCode.INTERNAL_ERROR, f"{type(exc).__name__}: {exc}",
                           ticket=frame.ticket)
            finally:  # the frame's own hold: its answer's, taken above, keeps the acknowledgement until the broker has it
                if frame.ticket is not None:
                    frame.ticket.release()

        supervised_loop(self.liveness, name, step)

    def _should_log(self, camera: str, anomalous: bool) -> bool:
        every = self.cfg.store.log_normal_every
        if anomalous:
            return True
        if every <= 1:
            return every == 1
        with self._lock:  # bounded as the stats are: a camera id invented per frame must not grow it for good
            key = camera if camera in self._normal_seen or len(self._normal_seen) < self.cfg.metrics.max_cameras else OTHER
            seen = self._normal_seen[key]
            self._normal_seen[key] = seen + 1
        return seen % every == 0

    def _heatmap_settings(self, camera: str) -> tuple[str, HeatmapConfig]:
        """(publish policy, encoding settings) for a camera: its overrides, merged once at start, else the global."""
        return self._heatmap_by_camera.get(camera, (self.cfg.heatmap.publish, self.cfg.heatmap))

    def _crop(self, image: np.ndarray, camera: str) -> np.ndarray:
        override = self.cfg.cameras.get(camera)
        if override is None or override.roi is None:
            return image
        x, y, w, h = override.roi
        height, width = image.shape[:2]
        if x + w > width or y + h > height:  # cut off, the rest would be stretched to the input: another picture
            raise FrameError("roi_outside_frame", f"roi {override.roi} does not fit in the {width}x{height} frame "
                                                  "(did the camera's resolution change?)")
        return image[y : y + h, x : x + w]

    def frame_image(self, data: bytes, camera: str, reduce: int = 1, pixels: Pixels | None = None) -> np.ndarray:
        """A camera's frame as inference sees it: decoded (at 1/``reduce`` of its size; a raw buffer of ``pixels``
        converted) and cropped to its roi (tiling comes after)."""
        return self._crop(decode(data, reduce) if pixels is None else to_bgr(data, pixels), camera)

    def stored_image(self, data: bytes, camera: str, model: Model | None = None) -> np.ndarray:
        """A stored frame (evidence) decoded and cropped as :meth:`_process` did for ``model``, at the same reduction,
        so a label or a confirmed defect is scored as its frame was; None: in full (the capture's resolution)."""
        # A file damaged on disk; its bytes were held to the limit when it came (a raw buffer's TIFF is a little larger).
        header = probe(data, max(len(data), self.cfg.limits.max_frame_bytes), self.cfg.limits.max_pixels)
        if model is None:
            return self.frame_image(data, camera)
        return self.frame_image(data, camera, self._reduction(header, model, self.cfg.cameras.get(camera)))

    def _reduction(self, header: Header, model: Model, override: CameraConfig | None) -> int:
        """How much smaller a frame (or a query's image, ``override`` None) may be decoded (limits.reduced_decode):
        never for a camera with an roi (its rectangle is in the frame's pixels) or tiles (they are cut at full
        resolution)."""
        if not self.cfg.limits.reduced_decode or (override is not None and override.roi is not None) or model.tiling(override) is not None:
            return 1
        spec = model.bundle.manifest.input
        return reduction(header, spec.width, spec.height)

    def _unlike_training(self, frame: Frame, model: Model, override: CameraConfig | None,
                         size: tuple[int, int], image: np.ndarray) -> str | None:
        """Why this frame (``size``: its roi, or the whole frame as decoded, EXIF rotation applied as training
        did; its tiles for a camera that tiles a whole-picture model; ``image``: as the graph was fed) is not the kind
        of picture the model was trained on (another shape, smaller than the input, grey where the model learned
        colour), or None; logged once per camera, size and bundle (the colour once per camera and bundle).
        Nothing refuses it: a camera moved to another resolution still gets scores, and its results say why they
        are off."""
        width, height = size
        manifest, grid = model.bundle.manifest, model.tiling(override)
        if grid is not None and manifest.tiling is None:  # a whole-picture model on a camera's tiles: each tile is one
            cols, rows = grid.grid
            width = round(width / (cols - (cols - 1) * grid.overlap))
            height = round(height / (rows - (rows - 1) * grid.overlap))
        key = (width, height, manifest.name, manifest.version, manifest.tiling is not None)
        try:  # one read, the note kept in hand: another inference thread may clear the table after it
            shape = self._shape_notes[key]
        except KeyError:
            shape = manifest.unlike_training(width, height, tiled=key[4])
            if len(self._shape_notes) >= 1000:  # sizes x bundles seen: a bound, not a working set
                self._shape_notes.clear()
            self._shape_notes[key] = shape
        colour = manifest.unlike_training_colour(image)
        for note, what, once in ((shape, f"shape {key}", "camera, size and bundle"),
                                 (colour, f"colour {manifest.name} {manifest.version}", "camera and bundle")):
            if note and self.ingest.first_time(frame.camera, what):
                log.warning("camera %s sends frames that %s %s does not expect: %s (said once per %s; each result "
                            "carries it as unlike_training)", frame.camera, manifest.name, manifest.version, note, once)
        return "; ".join(note for note in (shape, colour) if note) or None

    def _process(self, frame: Frame, model: Model, request) -> None:
        t_start = time.monotonic()
        manifest = model.bundle.manifest
        override = self.cfg.cameras.get(frame.camera)
        reduce = self._reduction(frame.header, model, override)
        cropped = self.frame_image(frame.data, frame.camera, reduce, frame.pixels)
        t_decoded = time.monotonic()
        seen = tiling.see(model.bundle, request, cropped, model.tiling(override))
        t_inferred = time.monotonic()
        raw = seen.score
        norm = self.models.image_norm(model, frame.camera)
        anomalous = raw >= norm.threshold
        policy, look = self._heatmap_settings(frame.camera)
        publish_heat = policy == "always" or (policy == "anomalous" and anomalous)
        logged = self._should_log(frame.camera, anomalous)
        heat = (heatmap.render(seen.image, seen.anomaly_map, model.bundle.thresholds.pixel, look)
                if publish_heat or (anomalous and logged) else None)
        result = {
            "frame_id": frame.frame_id,
            "camera": frame.camera,
            "captured_at": frame.captured_at,
            "received_at": iso(frame.received_ts),
            "score": round(float(norm(raw)), 4),
            "raw_score": round(raw, 5),
            "threshold": round(norm.threshold, 5),
            "verdict": "anomalous" if anomalous else "normal",
            "model": model.scored_by(seen.extension_revision),
            "heatmap": {"topic": self.topics.heatmap(frame.camera), "format": look.format} if publish_heat else None,
            "logged": logged,
            "worker": self.cfg.worker.id,
            "generated": list(frame.generated),
        }
        if seen.tiles is not None:
            result["tiles"] = seen.tiles
        if note := self._unlike_training(frame, model, override, (cropped.shape[1] * reduce, cropped.shape[0] * reduce),
                                         seen.image):
            result["unlike_training"] = note
        if publish_heat and heat is not None:  # rendered whenever it is published
            try:
                self.link.publish(self.topics.heatmap(frame.camera), heat, properties=publish_properties(
                    {"frame_id": frame.frame_id, "camera_id": frame.camera}, heatmap.CONTENT_TYPES[look.format]))
            except PacketTooLarge as exc:
                result["heatmap"] = None
                result["heatmap_error"] = str(exc)
        t_post = time.monotonic()
        latency_ms = {
            "queue": round((t_start - frame.received_mono) * 1000, 2),
            "decode": round((t_decoded - t_start) * 1000, 2),
            "infer": round((t_inferred - t_decoded) * 1000, 2),
            "post": round((t_post - t_inferred) * 1000, 2),
            "total": round((t_post - frame.received_mono) * 1000, 2),
        }
        result["latency_ms"] = latency_ms
        result["published_at"] = iso(time.time())

        def accepted() -> None:  # before the result leaves: whoever has seen it sees it counted, and timed
            self.stats.add(frame.camera, "processed")
            self.stats.observe(latency_ms)
            if anomalous:
                self.stats.add(frame.camera, "anomalous")
            # and a label or query sent on seeing it finds the frame on its way (settle); only once it will leave: a
            # frame answered with an error (result_too_large) is not recorded, as no other errored frame is
            if logged:
                self.recorder.submit(record())

        def record() -> Record:
            files = {}
            if anomalous:
                files["frame"] = (frame.fmt, frame.data)  # a raw buffer's TIFF is made by the recorder
                if heat is not None:  # rendered for every logged anomalous frame
                    files["heatmap"] = ("jpg" if look.format == "jpeg" else "png", heat)
            payload = {k: result[k] for k in ("frame_id", "camera", "captured_at", "score", "raw_score", "verdict")}
            payload.update(captured_ts=frame.captured_ts, received_ts=frame.received_ts, anomalous=anomalous,
                           model_name=manifest.name,
                           model_version=manifest.version, embedding_space=embedding_space_of(manifest))
            return Record(point_id(frame.camera, frame.frame_id), seen.embedding, payload, seen.image, files,
                          frame.pixels)

        self.link.publish(self.topics.result(frame.camera), json.dumps(result),
                          properties=publish_properties({"frame_id": frame.frame_id}, "application/json"),
                          accepted=accepted, settled=frame.ticket.hold() if frame.ticket is not None else None)
        if self.capture is not None and not anomalous:  # the frame as the model sees it: cropped to the roi
            cropped_by_roi = override is not None and override.roi is not None
            offer: Offer = (frame.camera, point_id(frame.camera, frame.frame_id), cropped,
                            lambda: (heatmap.encode(cropped, "png"), "png") if cropped_by_roi else frame.file())
            if self.offers.put(offer):  # the capture thread is behind (a slow disk): the sample skips this one
                with self._lock:  # inference threads count it together
                    self.capture.busy_skipped += 1

    def _offer_loop(self) -> None:
        """The capture thread: offers normal frames to the sample (which may write a file)."""
        assert self.capture is not None
        capture = self.capture

        def step() -> None:
            try:
                offer = self.offers.get(timeout=0.5)
            except Closed:
                raise StopLoop from None
            if offer is not None:
                capture.offer(*offer)

        supervised_loop(self.liveness, "capture", step)

    def embed(self, data: bytes, camera: str | None = None) -> tuple[np.ndarray, str]:
        """Embedding of an image sent with a query (same checks as a frame; its own infer request) as the model that
        serves ``camera`` (None: the default) embeds its frames, tiles included (the most anomalous tile's), and the
        name of that model's space: a canary camera's history is in its canary's space.  For a camera with an roi,
        an image its rectangle fits in is one of its frames (its evidence file, say), cropped as they are; a smaller
        one is taken as the region itself."""
        header = probe(data, self.cfg.limits.max_frame_bytes, self.cfg.limits.max_pixels)
        override = self.cfg.cameras.get(camera) if camera is not None else None
        model = self.models.for_camera(camera) if camera is not None else self.models.default
        grid = model.tiling(override) if camera is not None else model.bundle.manifest.tiling
        image = decode(data, self._reduction(header, model, override))  # tiles and an roi: at full size
        if camera is not None:
            with contextlib.suppress(FrameError):  # the rectangle does not fit: the image is the region
                image = self._crop(image, camera)
        with self._query_lock:
            request = self._query_requests.get(model)
            if request is None:
                self._query_requests = {**{m: r for m, r in self._query_requests.items()
                                           if m in self.models.scopes().values()}, model: model.bundle.create_request()}
                request = self._query_requests[model]
            return tiling.see(model.bundle, request, image, grid).embedding, embedding_space_of(model.bundle.manifest)
