"""The worker process: wires config -> mqtt -> pipeline -> recorder/store -> queries, and shuts down cleanly.

Frames are acknowledged to the broker (QoS 1, manual acks, in the order they came) once
they are in our queue or answered, or under ``block`` once the broker has their answer
(worker/acks.py), exactly once whatever happens to them (an unacknowledged message
holds a slot of the broker's in-flight window for good); during shutdown new frames
are left unacknowledged, so the broker keeps them in the persistent session for the
next start instead of us dropping them.  Every thread is supervised
(worker/supervise.py); a stuck or dead one makes the worker exit with code 3.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import socket
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import IO

import paho.mqtt.client as mqtt
from paho.mqtt.properties import Properties

from bundle import DISK_FULL, tiling
from worker.acks import Ticket
from worker.capture import Capture, train_command, unwritable
from worker.config import Config, ConfigError, QueuePolicy
from worker.decode import use_opencv_threads
from worker.evidence import ANOMALOUS, LABELLED, NORMAL, Budget, EvidenceStore
from worker.labels import LabelService
from worker.learning import Learner, untaught
from worker.metrics import Stats
from worker.models import DEFAULT, RELOAD_ERRORS, Models
from worker.mqtt import MqttLink, PacketTooLarge, publish_properties
from worker.pipeline import Pipeline, receive_maximum
from worker.presence import ECHO_S, Presence
from worker.query import QueryService
from worker.queueing import BoundedQueue, Closed
from worker.recorder import Recorder
from worker.spaces import embedding_space_of
from worker.store import VectorStore
from worker.supervise import (
    DeadMansSwitch,
    Liveness,
    StopLoop,
    StopSignals,
    Throttle,
    off_the_main_thread,
    pause_after,
    supervised_loop,
    switch_timeout,
)
from worker.topics import Topics
from worker.transport import Inbound
from worker.wire import ControlRequest, ErrorCode, RequestError, decode_json, error_answer, iso, publishable, split_reply_to, validate

EXIT_STUCK = 3
LOOP_S = 0.2  # the main loop's period: the watchdog's check, the dead man's switch
GIVE_UP_ANSWER_S = 3.0  # at most this long answering the queued frames and requests before a watchdog exit
# The whole clean stop: deploy/systemd's TimeoutStopSec=120 leaves room for the exit after it. Each wait is bounded by
# its own limit too, and by what is left of this.
STOP_S = 110.0
STEP_S = 30.0  # the queued frames, the request in hand, the export in hand, the store's flush: each at most this
UNSUBSCRIBE_S = 5.0  # the broker's UNSUBACK (mqtt.session_expiry_s 0)
RECORDER_CLOSE_S = 10.0  # the recorder thread's end and the store's close
STOPPED_S = 5.0  # the broker's acknowledgement of 'stopped', kept back from the wait for unsent messages
EXPORTS_WAITING = 1  # capture exports waiting behind the one in hand (each copies up to capture.max_mb a camera)

log = logging.getLogger(__name__)


LOCK_NAME = ".worker.lock"


def check_folders(cfg: Config) -> list[IO[str]]:
    """Create the folders the worker writes and write a file in each, so that a path that is a file, lies on a
    read-only mount or is not the worker's to write stops the start naming its key (ConfigError), not with a
    traceback from whichever part opens it first.  The store's folder is not checked: it is an outage like any
    other (spooled, tried again).

    Each folder that is this worker's alone is claimed too: two workers started from one config (``worker.id`` set
    apart in the environment) would write one spool, one evidence index, one bank extension and one capture sample,
    and the second would find the embedded store locked and spool its history for ever.  The claims (held open
    file locks, which the OS releases when the process ends however it ends) are returned for the worker to keep."""
    folders = {"evidence.path": cfg.evidence.path, "spool.path": cfg.spool.path, "model.cache_dir": cfg.model.cache_dir,
               "model.rollout_path": cfg.model.rollout_path,
               "learning.path": cfg.learning.path if cfg.learning.enabled else None,
               "capture.path": cfg.capture.path if cfg.capture.enabled else None}
    session = cfg.mqtt.session_file
    # the session file's folder is written, not owned: it may hold the others (/var/lib/edge-inspect)
    for key, folder in {**folders, "mqtt.session_file": session.parent if session is not None else None}.items():
        if folder is None:
            continue
        probe = folder / f".write-check-{os.getpid()}"
        try:
            folder.mkdir(parents=True, exist_ok=True)
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            if exc.errno in DISK_FULL:  # not a wrong path: a full disk must not stop inspection (README)
                log.warning("%s: %s cannot be made or written (%s): nothing is kept there until the disk has room; "
                            "inspection goes on", key, folder, exc.strerror or exc)
                continue
            fix = {"model.cache_dir": "; set it to null to run without a model cache",
                   "mqtt.session_file": " (a relative path is in config.yaml's folder); give a file in the worker's "
                                        "state folder"}.get(key, "")
            raise ConfigError(f"{key}: the worker cannot write to {folder} ({exc.strerror or exc}){fix}") from None
    own = {**folders, "store.path": cfg.store.path if cfg.store.url is None else None}
    _apart({**own, "capture.export_path": cfg.capture.export_path if cfg.capture.enabled else None})
    del own["model.cache_dir"]  # compiled blobs are checked by their digests: workers may share them
    owner = f"worker {cfg.worker.id!r} (pid {os.getpid()} on {socket.gethostname()})"
    return [claim for key, folder in own.items()
            if folder is not None and (claim := _claim(key, folder, owner)) is not None]


def _apart(folders: dict[str, Path | None]) -> None:
    """ConfigError when two keys name one folder or one lies inside another: each part tidies its own folder (the
    evidence index takes every file two levels down as a frame's and deletes the oldest, the capture sample deletes
    files it did not keep), so one key's files would be taken, or deleted, as another's."""
    named = [(key, folder.resolve()) for key, folder in folders.items() if folder is not None]
    for i, (key, folder) in enumerate(named):
        for other, place in named[i + 1:]:
            if folder == place or folder in place.parents or place in folder.parents:
                raise ConfigError(f"{key} ({folder}) and {other} ({place}) overlap: give each its own folder, side by "
                                  "side (as the defaults under data/ are)")


def _claim(key: str, folder: Path, owner: str) -> IO[str] | None:
    """An exclusive lock on ``folder``'s lock file, or ConfigError naming the process that holds it."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        handle = (folder / LOCK_NAME).open("a+")
    except OSError as exc:
        if key == "store.path" or exc.errno in DISK_FULL:
            return None  # an outage of the store, as above; a folder a full disk cannot make is left unclaimed
        raise ConfigError(f"{key}: the worker cannot write to {folder} ({exc.strerror or exc})") from None
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise ConfigError(f"{key}: {folder} is in use by {holder}; give each worker on this box its own folder") from None
    except OSError as exc:  # a file system without locks (some network mounts): run, unguarded
        log.warning("%s: %s cannot be locked (%s); make sure no other worker writes to it", key, folder, exc)
        return handle
    try:  # the owner is only named for a second worker's error: the lock is the claim
        handle.seek(0)
        handle.truncate()
        handle.write(owner + "\n")
        handle.flush()
    except OSError as exc:  # a full disk at the first start: the lock holds, a second worker's error names no owner
        log.warning("%s: the owner line of %s cannot be written (%s); the folder is claimed all the same", key,
                    folder / LOCK_NAME, exc.strerror or exc)
    return handle


def _json() -> Properties:
    """The MQTT v5 content type every JSON message of the worker carries: a client that picks its parser by it (a
    Node-RED MQTT node set to auto-detect) reads the model and stats as it reads results, errors and answers."""
    return publish_properties(content_type="application/json")


def routed(msg: Inbound) -> Inbound:
    """The request with its body's ``reply_to`` taken out and made its answer route where MQTT v5 gave none (the
    property wins). RequestError for a ``reply_to`` that names no topic a reply can be published to."""
    body, reply_to = split_reply_to(msg.payload)
    return replace(msg, payload=body, response_topic=msg.response_topic or reply_to)


class ExportStopped(Exception):
    """The worker stops: the export in hand gives up at its next file (export_new then leaves nothing)."""


class Worker:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.claims = check_folders(cfg)  # held for the process's life
        use_opencv_threads(cfg.limits.opencv_threads)
        self.topics = Topics(cfg.topics.prefix, cfg.worker.id, cfg.camera_topics)
        self.models = off_the_main_thread(lambda: Models(cfg), "models")  # see there: OpenVINO's signal stacks
        dim = self.models.embedding_dim
        assert dim is not None  # set by Models(), which loads the default bundle or raises
        ev = cfg.evidence
        self.evidence = EvidenceStore(ev.path, ev.max_frames, ev.max_age_h, budgets={
            NORMAL: Budget.of(ev.max_frames, ev.max_mb, ev.max_age_h),
            ANOMALOUS: Budget.of(ev.anomalous.max_frames, ev.anomalous.max_mb, ev.anomalous.max_age_h),
            LABELLED: Budget.of(ev.labelled.max_frames, ev.labelled.max_mb, ev.labelled.max_age_h)})
        self.liveness = Liveness(cfg.worker.watchdog_s)
        self.recorder = Recorder(lambda: VectorStore(cfg.store, dim), self.evidence, cfg.store, cfg.spool,
                                 cfg.evidence.thumbnail_size, self.liveness, cfg.limits.recorder_max_records,
                                 cfg.limits.recorder_max_bytes)
        self.stats = Stats(self.liveness, cfg.metrics.max_cameras)
        # /metrics names the bundles served from the start: the model topic waits for the broker, /metrics must not
        self.stats.set_models({scope: m.info for scope, m in self.models.scopes().items()})
        client_id = cfg.mqtt.client_id or f"edge-inspect-{cfg.worker.id}"
        self.presence = Presence(cfg.worker.id, client_id)
        self.link = MqttLink(cfg.mqtt, client_id,
                             subscriptions=[*(self.topics.shared(f, cfg.topics.share_group) for f in self.topics.frame_filters),
                                            self.topics.shared(self.topics.query, cfg.topics.share_group),
                                            self.topics.shared(self.topics.label, cfg.topics.share_group),
                                            self.topics.control],
                             will=(self.topics.availability, "offline"), retained=False,
                             watch=[self.topics.availability],
                             # joining a group: the plain filters a persistent session kept would hand this worker
                             # every frame besides its share of the group's
                             stale=[*self.topics.frame_filters, self.topics.query, self.topics.label]
                             if cfg.topics.share_group else [], record=cfg.mqtt.session_file,
                             will_properties=self.presence.will_properties(), on_takeover=self.presence.takeover,
                             prefix=cfg.topics.prefix, receive_maximum=receive_maximum(cfg, self.models),
                             owner=str(cfg.spool.path))
        self.link.client.manual_ack_set(True)
        self.capture = (Capture(cfg.capture.path, cfg.capture.max_frames, cfg.capture.min_distance, max_mb=cfg.capture.max_mb,
                                max_cameras=cfg.capture.max_cameras)
                        if cfg.capture.enabled else None)
        self.pipeline = Pipeline(cfg, self.models, self.link, self.topics, self.recorder, self.stats, self.liveness,
                                 self.capture)
        self.queries = QueryService(self.recorder.use_store, self.evidence, self.pipeline.embed, cfg.query.max_top_k,
                                    self._settle)
        # Read at each scrape, not set by the main loop: during a stop (up to STOP_S, after the loop has ended) they
        # froze at its last turn, the broker connected after the link closed and the queue full while it drained.
        self.stats.queue_depth.set_function(lambda: len(self.pipeline.queue))
        self.stats.store_lag.set_function(lambda: self.recorder.pending + self.recorder.spool.points)
        self.stats.store_up.set_function(lambda: int(self.recorder.store_available))
        self.stats.broker_up.set_function(lambda: int(self.link.connected.is_set()))
        self.stats.refused.set_function(lambda: len(self.link.refused))
        self.stats.count_lost(lambda: {"recorder_dropped": self.recorder.dropped, "recorder_lost": self.recorder.lost,
                                       "spool_dropped_points": self.recorder.spool.dropped_points,
                                       "recorder_unrecorded": self.recorder.unrecorded})
        self.stats.count_refused(lambda: self.link.publishes_refused)
        self.learner = Learner(cfg, self.models, self.evidence, self.pipeline.stored_image, self._publish_models, self.capture)
        self.labels = LabelService(self.recorder.use_store, self.evidence, self.learner, self._settle, self.capture,
                                   self.pipeline.stored_image)
        # Policy: drop_newest (answered busy) past request_queue_size or request_queue_max_bytes.
        self.query_queue: BoundedQueue[Inbound] = BoundedQueue(
            cfg.limits.request_queue_size, QueuePolicy.DROP_NEWEST, cfg.limits.request_queue_max_bytes,
            size=lambda m: len(m.payload))
        self.query_thread = threading.Thread(target=self._serve_requests, name="requests", daemon=True)
        # Policy: drop_newest (answered busy): one export runs and at most EXPORTS_WAITING wait. Exports run on a thread
        # of their own: one of gigabytes takes minutes, and queries and labels (a false alarm absorbed in seconds) go on.
        self.export_queue: BoundedQueue[tuple[Inbound, str | None]] = BoundedQueue(EXPORTS_WAITING,
                                                                                   QueuePolicy.DROP_NEWEST)
        self.export_thread = threading.Thread(target=self._serve_exports, name="exports", daemon=True)
        self._stopping = threading.Event()  # an export in hand stops at its next file and leaves nothing
        # The stats' capture_export: the export in hand and the last one's answer, for whoever did not wait for it (a
        # console whose wait ran out, another operator), as one pair replaced whole: a stats message read between two
        # separate writes said an export was running whose answer it already showed as the last.
        self._exports: tuple[dict | None, dict | None] = (None, None)
        self.stats_thread: threading.Thread | None = None  # started by run(), which holds the stop event
        self._next_watch = time.monotonic() + cfg.model.watch_s
        self._unloaded: dict[str, str | None] = {}  # per scope, why its changed bundle was last refused (model.watch_s)
        self.accepting = True
        self._unanswerable = 0  # requests whose answer had no topic to go to (logged, the first few)
        # The model topic's readings, numbered as taken, and the newest published (:meth:`_publish_models`)
        self._models_said = threading.Lock()
        self._models_read = self._models_published = 0
        self._too_large = Throttle(3600)  # status messages over the broker's maximum packet size, said
        self._stats_reduced = Throttle(3600)  # ... and stats sent without their per-camera parts
        self.link.on_message = self._route
        self.link.on_connected = self._announce

    def _announce(self) -> None:
        self._announce_online()
        self._publish_models()

    def _announce_online(self) -> None:
        self._status(self.topics.availability, "online", properties=self.presence.online_properties(),
                     settled=self.presence.delivered)

    def _publish_stats(self) -> None:
        """The stats; past the broker's maximum packet size (they grow with every camera) without the per-camera
        parts, which /metrics and the console still have, rather than none."""
        stats = self.stats_payload()
        try:
            self.link.publish(self.topics.stats, json.dumps(stats), properties=_json())
        except PacketTooLarge as exc:
            if self._stats_reduced.ready():
                log.error("stats published without their per-camera parts: %s; raise the broker's maximum packet size "
                          "(mosquitto: max_packet_size)", exc)
            per_camera = ("cameras", "capture", "capture_export", "evidence")
            self._status(self.topics.stats, json.dumps({**{k: v for k, v in stats.items() if k not in per_camera},
                                                        "omitted": list(per_camera)}), retain=False,
                         properties=_json())

    def _status(self, topic: str, payload: str, retain: bool = True, **kw) -> None:
        """Publish one of the worker's own status messages; one the broker's maximum packet size refuses is said
        (once an hour) instead of raised: it would end the main loop, or paho's network thread on a connect."""
        try:
            self.link.publish(topic, payload, retain=retain, **kw)
        except PacketTooLarge as exc:
            if self._too_large.ready():
                log.error("not published: %s; raise the broker's maximum packet size (mosquitto: max_packet_size)", exc)

    def _publish_models(self) -> None:
        """The retained model topic and the models in /metrics.  Published by paho's network thread at each connect
        and by the request thread after each change: a reading taken before a newer one was published is dropped, so
        a connect's announcement that read the models before a reload never replaces the reload's."""
        with self._models_said:
            self._models_read += 1
            reading = self._models_read
        scopes = {}
        for scope, model in self.models.scopes().items():
            scopes[scope] = {**model.info, "bundle": str(model.path),
                             "embedding_space": embedding_space_of(model.bundle.manifest),
                             "input": [model.bundle.manifest.input.width, model.bundle.manifest.input.height],
                             "tiling": tiling.record(model.bundle.manifest.tiling),  # cuts cameras without their own
                             "threshold": self.models.image_norm(model, "" if scope == DEFAULT else scope).threshold}
        body = {**scopes[DEFAULT], "scopes": scopes, "pending": self.models.pending(), "device": self.cfg.model.device,
                "device_name": self.models.default.bundle.device_name,
                "embedding_dim": self.models.embedding_dim}
        with self._models_said:  # held over the publish: the broker gets the readings in the order they were taken
            if reading < self._models_published:
                return
            self._models_published = reading
            self.stats.set_models(scopes)
            self._status(self.topics.model, json.dumps(body), properties=_json())

    def control(self, command: ControlRequest) -> dict:
        """reload {bundle?, camera?} | rollback {camera?} | status: the answer says which model now serves
        (export_capture is the exports thread's: :meth:`_hand_export`)."""
        scope = command.camera or DEFAULT
        if command.camera == DEFAULT and command.command != "status":
            return error_answer(ErrorCode.BAD_REQUEST, f"{DEFAULT!r} names the model of every camera without one of its "
                                "own, so a camera of that id cannot be given its own: rename the camera; leave camera "
                                "out to reload or roll back that model")
        if command.command == "reload" and command.camera and not command.bundle \
                and command.camera not in self.models.scopes():
            return error_answer(ErrorCode.BAD_REQUEST, f"camera {command.camera!r} serves the model every camera without "
                                "one of its own serves: give a bundle for a canary on it, or leave camera out to read "
                                "that model's bundle again")
        if command.command == "reload" and command.camera and command.bundle and self.models.follows_default(scope) \
                and Path(command.bundle).resolve() != self.models.default.path.resolve():
            return error_answer(ErrorCode.BAD_REQUEST, f"camera {command.camera!r} sets only its own precision and serves "
                                "the bundle of every camera without one of its own: a bundle for it alone would not be "
                                f"kept over a restart nor by a roll-out to all; set cameras.{command.camera}.bundle in "
                                "config.yaml for a bundle of its own, or leave camera out to roll the bundle out to all")
        before = self.models.scopes().get(scope) or self.models.default
        try:
            if command.command == "reload":
                path = Path(command.bundle) if command.bundle else self.models.scopes().get(scope, self.models.default).path
                model = self.models.load(scope, path)
                log.info("hot reload: %s now runs %s %s", scope, model.info["name"], model.info["version"])
            elif command.command == "rollback":
                model = self.models.rollback(scope)
                log.info("rollback: %s now runs %s %s", scope, model.info["name"], model.info["version"])
        except RELOAD_ERRORS as exc:
            return error_answer(ErrorCode.RELOAD_FAILED, str(exc))
        self._publish_models()
        answer = {"ok": True, "models": {s: m.info for s, m in self.models.scopes().items()}}
        if pending := self.models.pending():
            answer["pending"] = pending
        if command.command in ("reload", "rollback") and (left := untaught(before, model)) is not None:
            answer["untaught"] = left
        if command.command == "reload" and command.camera and command.camera not in self.stats.snapshot() \
                and command.camera not in self.cfg.cameras:  # a typo's canary would wait, unseen, for a camera
            answer["note"] = (f"camera {command.camera!r} has sent this worker no frame since it started, and "
                              "config.yaml does not name it: check the camera id")
        if self.models.unrecorded is not None:  # serving, but a restart would not know it
            answer["warning"] = (f"not persisted: {self.models.unrecorded}; the worker serves it now, a restart would "
                                 "not until the file is written (retried every stats tick and at a clean stop)")
        return answer

    def _hand_export(self, msg: Inbound, camera: str | None) -> dict | None:
        """An export for the exports thread, which answers it (:meth:`export_capture`); the answer now (busy) where
        it is not taken, else None."""
        if self.export_queue.put((msg, camera)):
            return error_answer(ErrorCode.BUSY, f"an export is running and {EXPORTS_WAITING} more waiting: ask again once "
                                "one has answered")
        return None

    def _serve_exports(self) -> None:
        """Capture exports, one at a time, answered on their response topics."""
        current: list[tuple[Inbound, str | None]] = []

        def step() -> None:
            current.clear()
            try:
                item = self.export_queue.get(timeout=0.5)
            except Closed:
                raise StopLoop from None
            if item is not None:
                msg, camera = item
                current.append(item)
                self._exports = ({"camera": camera, "since": iso(time.time())}, self._exports[1])
                answer = self.export_capture(camera)
                self._export_done(camera, answer)
                self._respond(msg, answer)

        def answer_error(exc: BaseException) -> None:
            if current:
                (msg, camera), = current
                answer = error_answer(ErrorCode.INTERNAL_ERROR, f"{type(exc).__name__}: {exc}")
                self._export_done(camera, answer)
                self._respond(msg, answer)

        supervised_loop(self.liveness, self.export_thread.name, step, answer_error)

    def _export_done(self, camera: str | None, answer: dict) -> None:
        self._exports = (None, {"at": iso(time.time()), "camera": camera, **answer})

    def _export_progress(self) -> None:
        """After each file an export copies: progress for the watchdog, and the export's end at a stop."""
        self.liveness.progress(self.export_thread.name)
        if self._stopping.is_set():
            raise ExportStopped

    def export_capture(self, camera: str | None) -> dict:
        """Write the captured frames under capture.export_path/<UTC time>/ (never a path a client chose), a new folder
        each time (``-2``, ``-3``... after the time for a second export within the same second)."""
        if self.capture is None:
            return error_answer(ErrorCode.BAD_REQUEST, "capture is off (capture.enabled)")
        parent = self.cfg.capture.export_path
        try:
            folder, written = self.capture.export_new(
                parent, time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()), [camera] if camera else None,
                self.cfg.store.min_free_mb * 2**20, self._export_progress)
        except ExportStopped:
            return error_answer(ErrorCode.SHUTDOWN, "the worker stopped during the export; nothing was left (no "
                                "partial training folder): ask again")
        except OSError as exc:
            why = f"the export failed: {unwritable(exc, str(parent))}; nothing was left there (no partial training folder)"
            log.warning("export_capture: %s", why)
            return error_answer(ErrorCode.INTERNAL_ERROR, why)
        if not written:
            return error_answer(ErrorCode.BAD_REQUEST, f"nothing captured{f' for camera {camera}' if camera else ''} yet")
        return {"ok": True, "folder": str(folder), "cameras": written,
                "train": {c: train_command(folder, Path(w["folder"]).name,  # of the bundle served now
                                           self.models.for_camera(c).tiling(self.cfg.cameras.get(c)),
                                           self.models.for_camera(c).bundle.manifest)
                          for c, w in written.items()}}

    def _route(self, raw: mqtt.MQTTMessage) -> None:
        """paho's network thread: hand the message on, then acknowledge it (or, under block, a queued frame once the
        broker has its answer), exactly once, whatever happened.  Never waits: this thread also reads the broker's
        acknowledgements of what the worker publishes."""
        if not self.accepting:
            return  # not acknowledged: the broker redelivers it to our next session
        ticket = self.link.acks.open(raw.mid, raw.qos) if raw.qos else None
        kept = False
        try:
            with self.liveness.busy("mqtt"):
                kept = self.dispatch(Inbound.from_paho(raw), ticket)
        except Exception:
            self.liveness.failed("mqtt")
            log.exception("handling a message on %s failed", raw.topic)
        finally:
            if ticket is not None and not kept:
                ticket.release()

    def dispatch(self, msg: Inbound, ticket: Ticket | None = None) -> bool:
        """A request goes to the request queue (answered busy when it is full), our own availability to the
        presence check, a message no subscription of this configuration matches to the link to leave its filter,
        anything else to the pipeline; True when the pipeline keeps ``ticket`` (see there)."""
        if msg.topic == self.topics.availability:
            if self.presence.observe(msg.payload, msg.replayed or msg.retained, msg.user):
                self._announce_online()
        elif msg.topic in (self.topics.query, self.topics.label, self.topics.control):
            for refused in self.query_queue.put(msg):
                self._respond(refused, error_answer(ErrorCode.BUSY, "too many requests waiting"))
        elif not self.topics.reads(msg.topic):
            self.link.leftover(msg.topic, self.topics.earlier_filters(msg.topic))
        else:
            return self.pipeline.on_frame(msg, ticket)
        return False

    def _signed(self, answer: dict) -> dict:
        """An answer naming the worker that gave it: in a share group a request reaches one member, and with embedded
        stores that member knows only the frames it scored, which an unknown frame's message then says."""
        error, group = answer.get("error"), self.cfg.topics.share_group
        if group and self.cfg.store.url is None and isinstance(error, dict) \
                and error.get("code") == ErrorCode.UNKNOWN_FRAME.value:
            answer = {**answer, "error": {**error, "message": f"{error.get('message')} of worker {self.cfg.worker.id}, "
                                                              f"one of share group {group!r}, each of which keeps only "
                                                              "the frames it scored (deploy/README.md, Scale-out)"}}
        return {**answer, "worker": self.cfg.worker.id}

    def _respond(self, msg: Inbound, answer: dict) -> None:
        """Publish a request's answer on its response topic; one it cannot go to (none, a wildcard or ``$``-topic,
        one of the API's own topics) is logged instead, the first few and then every hundredth."""
        topic = msg.response_topic
        why = ("without a response topic" if not topic else
               f"naming response topic {topic[:200]!r}, which no answer can be published to" if not publishable(topic) else
               f"naming response topic {topic!r}, one of the API's own (frames, results, requests, workers)"
               if self.topics.of_the_api(topic) else None)
        if why is not None or topic is None:
            self._unanswerable += 1
            if self._unanswerable <= 3 or self._unanswerable % 100 == 0:
                log.log(logging.INFO if answer.get("ok") else logging.WARNING, "request on %s %s (%d such so far): %s",
                        msg.topic, why, self._unanswerable, json.dumps(answer)[:300])
            return
        reply = publish_properties(content_type="application/json", correlation=msg.correlation)
        answer = self._signed(answer)
        try:
            self.link.publish(topic, json.dumps(answer), properties=reply, qos=1)
        except PacketTooLarge as exc:
            # a query can ask for less; any other request cannot, and one that succeeded was carried out: a reload
            # or a label answered as if refused was asked again, or taken for undone
            advice = ("ask for fewer hits (top_k), or leave the images out (include_thumbnails, include_heatmaps: "
                      "false)" if msg.topic == self.topics.query else
                      f"{'it was served all the same (a reload, rollback or label is carried out): ' if answer.get('ok') else ''}"
                      "raise the broker's max_packet_size to read its answer")
            error = self._signed(error_answer(ErrorCode.RESPONSE_TOO_LARGE,
                                              f"the answer: {str(exc).removeprefix(f'{topic}: ')}; {advice}"))
            try:
                self.link.publish(topic, json.dumps(error), properties=reply, qos=1)
            except PacketTooLarge as again:  # its correlation data alone is too large: nothing can answer it
                log.warning("request on %s not answered: %s", msg.topic, again)

    def _watch_bundles(self) -> None:
        """``model.watch_s``: reload each scope whose bundle changed on disk.  On the request thread, so a watched
        reload never runs beside a label's or another reload (one racing a label could put a model with the label's
        old rows in service, and two compiles at once can deadlock: worker/models.py), nor holds up the main loop."""
        now = time.monotonic()
        if not self.cfg.model.watch_s or now < self._next_watch:
            return
        self._next_watch = now + self.cfg.model.watch_s
        for scope, path in self.models.changed_on_disk():
            # built, not validated: the scope is one this worker serves (a canary's id from before reloads were checked)
            answer = self.control(ControlRequest.model_construct(command="reload", bundle=str(path),
                                                                 camera=None if scope == DEFAULT else scope))
            said = None if answer["ok"] else answer["error"]["message"]
            if said is not None and said != self._unloaded.get(scope):  # a bundle being copied: said once, tried on
                log.warning("bundle %s changed on disk but was not loaded (tried again every %g s): %s", path,
                            self.cfg.model.watch_s, said)
            self._unloaded[scope] = said

    def _serve_requests(self) -> None:
        """Queries, labels and control commands, one at a time, off the MQTT and inference threads, and the
        bundles ``model.watch_s`` watches; while no request waits, the confirmed defects' guards a served model lacks
        are scored, one per turn."""
        current: list[Inbound] = []
        warming = [True]
        idle = min(0.5, self.cfg.model.watch_s or 0.5)

        def step() -> None:
            current.clear()
            self._watch_bundles()
            try:
                msg = self.query_queue.get(timeout=0 if warming[0] else idle)
            except Closed:
                raise StopLoop from None
            if msg is None:
                warming[0] = False  # after a failure (logged by the loop), the next try waits for an idle turn
                warming[0] = self.labels.warm()
                return
            try:
                msg = routed(msg)
            except RequestError as exc:  # answered on a v5 response topic if there is one, else logged
                self._respond(msg, error_answer(exc.code, exc.message))
                return
            current.append(msg)
            if msg.topic == self.topics.control:
                try:
                    command = validate(ControlRequest, decode_json(msg.payload))
                except RequestError as exc:
                    answer = error_answer(exc.code, f"{exc.message} (command: reload | rollback | status | "
                                          "export_capture)")
                else:
                    if command.command == "export_capture":
                        if (refused := self._hand_export(msg, command.camera)) is not None:
                            self._respond(msg, refused)
                        return
                    answer = self.control(command)
            elif msg.topic == self.topics.label:
                answer = self.labels.answer_bytes(msg.payload)
            else:
                answer = self.queries.answer_bytes(msg.payload)
            self._respond(msg, answer)

        def answer_error(exc: BaseException) -> None:
            if current:
                self._respond(current[0], error_answer(ErrorCode.INTERNAL_ERROR, f"{type(exc).__name__}: {exc}"))

        supervised_loop(self.liveness, self.query_thread.name, step, answer_error)

    def _settle(self) -> None:
        """Wait for the frames on their way to the store: one asked about as soon as its result arrived may wait in the
        recorder's batch for up to ``store.flush_s``.  The wait is the calling thread's progress: a worker.watchdog_s
        shorter than it took the request thread for stuck, and the worker exited for a restart."""
        caller = threading.current_thread().name
        self.recorder.flush(min(self.cfg.store.flush_s + 1, 5), lambda: self.liveness.progress(caller))

    def stats_payload(self) -> dict:
        running, last = self._exports
        return {
            "worker": self.cfg.worker.id,
            "at": iso(time.time()),
            "uptime_s": round(time.monotonic() - self.stats.started, 1),
            "queue": len(self.pipeline.queue),
            "unacknowledged": self.link.acks.unacknowledged,
            "receive_maximum": self.link.receive_maximum,
            "subscriptions_refused": self.link.refused,
            "publishes_refused": self.link.publishes_refused,
            "last_publish_refused": self.link.last_refused,
            "own_announcement_read_back": self.presence.read_back,
            "store_pending": self.recorder.pending,
            "store_written": self.recorder.written,
            "store_available": self.recorder.store_available,
            "store_error": self.recorder.store_error,
            "store_damaged": self.recorder.store_damaged,
            "spool_batches": len(self.recorder.spool),
            "spool_dropped_points": self.recorder.spool.dropped_points,
            "spool_corrupt_batches": self.recorder.spool.corrupt_batches,
            "spool_refused_batches": self.recorder.spool.refused_batches,
            "recorder_dropped": self.recorder.dropped,
            "recorder_lost": self.recorder.lost,
            "recorder_evidence_failed": self.recorder.evidence_failed,
            "recorder_unrecorded": self.recorder.unrecorded,
            "recorder_labelled_kept": self.recorder.labelled_kept,
            "evidence_frames": len(self.evidence),
            "evidence": self.evidence.counts(),
            "capture": self.capture.counts() if self.capture is not None else None,
            "capture_failed_writes": self.capture.failed_writes if self.capture is not None else None,
            "capture_skipped_frames": self.capture.skipped_frames if self.capture is not None else None,
            "capture_busy_skipped": self.capture.busy_skipped if self.capture is not None else None,
            "capture_export": {"running": running, "waiting": len(self.export_queue), "last": last},
            "extensions": [e.info() for e in self.models.extensions()],
            "cameras": self.stats.snapshot(),
            "threads": self.liveness.snapshot(),
            "healthy": not self.liveness.problems(),
            "process": self.presence.identity(),
            "other_process": self.presence.snapshot(),
        }

    def run(self, stop: threading.Event, signals: StopSignals) -> None:
        """Serve until a stop signal comes (``signals``), then set ``stop`` for the other loops and shut down cleanly."""
        if self.cfg.metrics.enabled:
            try:
                port = self.stats.serve(self.cfg.metrics.host, self.cfg.metrics.port)
            except OSError as exc:  # e.g. a second worker on this box with the same metrics.port
                # Not run on without it: /healthz is the service's health check, and a probe would reach the other
                # process's, which looks fine.  Nothing has started yet: the start stops with exit 2, as the console's.
                raise ConfigError(f"metrics.host/metrics.port: cannot listen on {self.cfg.metrics.host}:"
                                  f"{self.cfg.metrics.port} ({exc.strerror or exc}); give another metrics.port, or "
                                  "metrics.enabled: false to run without /metrics and /healthz") from None
            # metrics.port 0 takes a free port: the log is the only place that says which
            log.info("serving /metrics and /healthz on %s:%d", self.cfg.metrics.host, port)
        self.recorder.start()
        self.pipeline.start()
        self.liveness.register(self.query_thread.name, self.query_thread)
        self.query_thread.start()
        self.liveness.register(self.export_thread.name, self.export_thread)
        self.export_thread.start()
        self.link.start()
        self.stats_thread = threading.Thread(target=self._serve_stats, args=(stop,), name="stats", daemon=True)
        self.liveness.register(self.stats_thread.name, self.stats_thread)
        self.stats_thread.start()
        switch = DeadMansSwitch(switch_timeout(self.cfg.worker.watchdog_s))
        pause = pause_after(self.cfg.worker.watchdog_s)
        while True:
            asked = time.monotonic()
            time.sleep(LOOP_S)  # not stop.wait: see StopSignals (a signal ends the sleep's wait; PEP 475 resumes it)
            if signals.received is not None or stop.is_set():
                stop.set()
                break
            now = time.monotonic()
            gap = now - asked - LOOP_S
            if gap > pause:  # no thread of this process ran either: a freeze is not a stuck thread
                log.warning("the process did not run for %.0f s (stopped or paused: SIGSTOP, docker pause, a paused "
                            "VM, or starved of CPU); the watchdog does not count that time against its threads", gap)
                self.liveness.excuse(gap, now)
            switch.arm(force=gap > pause)
            problems = self.liveness.problems()
            if problems:
                self._give_up(problems)
            self.link.resubscribe_refused()
            if self.link.connected.is_set() and self.presence.owed():
                self._announce_online()
            if self.link.connected.is_set() and self.presence.unread():
                log.error("this worker's own 'online' on %s did not come back from the broker within %.0f s: the "
                          "broker does not let it read (or write) its own topics, and frames on topics it may not "
                          "read never reach it (mosquitto's acl_file takes such a subscription and drops the "
                          "messages); the broker's ACL must cover the prefix set in topics.prefix",
                          self.topics.availability, ECHO_S)
        self.stats_thread.join(LOOP_S * 5)  # between two steps (one in hand is finished: it may publish once more)
        # A shutdown that hangs must end too: the switch stays armed, with room for the stop's own bound.
        DeadMansSwitch(self.cfg.worker.watchdog_s and STOP_S + STOPPED_S).arm()
        self.shutdown()
        switch.disarm()

    def _serve_stats(self, stop: threading.Event) -> None:
        """The stats topic every ``worker.stats_interval_s``, and rollout.json again where a full disk refused it.  On
        a thread of its own: building the stats reads parts whose locks are held while they write files (evidence,
        extensions, capture), and the main loop, which must see a stuck thread, must never wait behind one."""
        next_stats = [time.monotonic() + self.cfg.worker.stats_interval_s]

        def step() -> None:
            if stop.wait(min(0.5, self.cfg.worker.stats_interval_s)):
                raise StopLoop
            now = time.monotonic()
            if now < next_stats[0]:
                return
            self.models.record_again(quiet=True)  # a rollout.json a full disk refused, once there is space
            if self.link.connected.is_set():
                self._publish_stats()
                next_stats[0] = now + self.cfg.worker.stats_interval_s

        supervised_loop(self.liveness, "stats", step)

    def _give_up(self, problems: list[str]) -> None:
        """A thread is dead or stuck: nothing in-process can be trusted to recover it, so exit for the
        service manager (the systemd unit's Restart=) to start a fresh worker.  What the broker still holds
        (unacknowledged) comes to the next start; the frames and requests in our queues were acknowledged, so each
        is answered ``shutdown`` first, on a thread of its own and for at most ``GIVE_UP_ANSWER_S``: the exit must
        not wait behind whatever made a thread stuck."""
        reason = "; ".join(problems)
        log.critical("watchdog: %s; exiting with code %d for a restart", reason, EXIT_STUCK)
        answering = threading.Thread(target=self._answer_before_exit, args=(f"worker restarting: {reason}",),
                                     name="give-up", daemon=True)
        answering.start()
        answering.join(GIVE_UP_ANSWER_S + 1)
        logging.shutdown()
        os._exit(EXIT_STUCK)

    def _answer_before_exit(self, message: str) -> None:
        """Answer ``shutdown`` with ``message`` to every queued frame and waiting request (the inference threads that
        still run finish the frame in hand first), and wait, bounded, until the broker has taken what was published
        last: it acknowledges in order, so it then has every answer before it.  New frames are left unacknowledged,
        for the broker to hand to the next start."""
        deadline = time.monotonic() + GIVE_UP_ANSWER_S
        self.accepting = False
        self.query_queue.close()
        self.export_queue.close()
        frames = self.pipeline.abandon(message, GIVE_UP_ANSWER_S / 2)
        requests = self._refuse_waiting_requests(message)
        log.warning("watchdog: %d queued frame(s) and %d waiting request(s) answered shutdown before the exit", frames,
                    requests)
        last = self.link.last_sent
        if last is not None:
            with contextlib.suppress(RuntimeError, ValueError):  # not connected: what is unsent is lost with the process
                last.wait_for_publish(max(0.0, deadline - time.monotonic()))

    def shutdown(self, budget: float = STOP_S) -> None:
        """Finish what was taken, within ``budget`` seconds in all (each step within its own limit and what is left):
        the queued frames, the requests, the store's flush, and the results and answers the broker has not taken."""
        deadline = time.monotonic() + budget

        def left(limit: float) -> float:
            return max(0.0, min(limit, deadline - time.monotonic()))

        self._stopping.set()  # an export in hand ends at its next file (answered shutdown): it may take minutes
        log.info("stopping: finishing %d queued frames", len(self.pipeline.queue))
        # No session outlives this connection: a frame or request the broker sends from now on and we leave
        # unacknowledged is lost with it (in a group, the other members would have served it). Leave the
        # subscriptions first; what came before the broker's UNSUBACK is taken and finished like the rest.
        if self.cfg.mqtt.session_expiry_s == 0 and self.link.connected.is_set() \
                and not self.link.unsubscribe(left(UNSUBSCRIBE_S)):
            log.warning("the broker did not confirm the unsubscribe at the stop: frames it sends meanwhile are lost")
        self.accepting = False
        refused = self.pipeline.stop(left(STEP_S))
        self.query_queue.close()
        self.export_queue.close()
        unanswered = self._refuse_waiting_requests("the worker stopped before this request was served; ask again")
        self.query_thread.join(left(STEP_S))  # the request in hand is answered (a reload's compile can take seconds)
        self.export_thread.join(left(STEP_S))
        self.models.record_again()  # what serves now is what the next start serves, where rollout.json was refused
        flushed = self.recorder.flush(left(STEP_S))
        self.recorder.stop(left(RECORDER_CLOSE_S))
        if self.capture is not None:
            self.capture.flush()
        unsent = self._deliver(max(0.0, left(self.cfg.worker.stop_wait_s + STOPPED_S) - STOPPED_S))
        if self.link.connected.is_set():
            self._publish_stats()
            info = self.link.publish(self.topics.availability, "stopped", retain=True,
                                     properties=self.presence.stopped_properties())
            try:
                info.wait_for_publish(left(STOPPED_S))
            except RuntimeError as exc:  # the link dropped since the check (a twin took the session): still a clean stop
                log.warning("could not publish 'stopped' on %s (%s); availability is left to the broker and the last will",
                            self.topics.availability, exc)
        self.link.stop()
        log.info("stopped: %s; %d frames and %d requests refused at shutdown; unsent_at_stop: %d; store flushed: %s",
                 json.dumps(self.stats.snapshot()), refused, unanswered, unsent, flushed)

    def _deliver(self, wait: float) -> int:
        """Wait up to ``wait`` for the broker to take the messages published and not yet acknowledged (results,
        errors, heatmaps, answers; it may be away: paho sends them again once it is back); returns how many are left,
        lost with the process."""
        if self.link.unsent and not self.link.connected.is_set():
            log.warning("stopping with %d published messages (results, errors, heatmaps, answers) the broker has not "
                        "taken (it is away): waiting up to %.0f s for it to come back (worker.stop_wait_s)",
                        self.link.unsent, wait)
        if self.link.wait_delivered(wait):
            return 0
        unsent = self.link.unsent
        log.error("%d published messages (results, errors, heatmaps, answers) were never taken by the broker (%s) and "
                  "are lost with this process: the requests and, but under limits.queue_policy block, the frames they "
                  "answer were acknowledged on arrival, so nothing answers them again; counted as unsent_at_stop",
                  unsent, self.link.problem or "not acknowledged in time")
        return unsent

    def _refuse_waiting_requests(self, message: str) -> int:
        """Answer ``shutdown`` (``message``) to the requests waiting at the stop: they were acknowledged to the broker,
        so nothing else would answer them, and serving them (reloads, labels) would hold the stop up; returns how
        many."""
        waiting = [*self.query_queue.drain(), *(msg for msg, _ in self.export_queue.drain())]
        for msg in waiting:
            with contextlib.suppress(RequestError):  # no body topic to answer on: the v5 one if any, else logged
                msg = routed(msg)
            try:
                self._respond(msg, error_answer(ErrorCode.SHUTDOWN, message))
            except Exception:  # the stop goes on whatever one answer does
                log.exception("answering a request waiting at the stop failed")
        return len(waiting)
