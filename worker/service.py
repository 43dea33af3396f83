"""The worker process: wires config -> mqtt -> pipeline -> recorder/store -> queries, and shuts down cleanly.

Frames are acknowledged to the broker (QoS 1, manual acks) only once they are in
our queue; during shutdown new frames are left unacknowledged, so the broker keeps
them in the persistent session for the next start instead of us dropping them.
"""

from __future__ import annotations

import json
import logging
import threading
import time

import paho.mqtt.client as mqtt

from bundle import BundleError
from worker.config import Config, QueuePolicy
from worker.evidence import EvidenceStore
from worker.labels import LabelService
from worker.metrics import Stats
from worker.models import DEFAULT, Models
from worker.mqtt import MqttLink, PacketTooLarge, publish_properties
from worker.pipeline import Pipeline, iso
from worker.query import QueryService
from worker.queueing import BoundedQueue, Closed
from worker.recorder import Recorder
from worker.store import VectorStore
from worker.topics import Topics

log = logging.getLogger(__name__)


class Worker:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.topics = Topics(cfg.topics.prefix, cfg.worker.id)
        self.models = Models(cfg)
        dim = self.models.embedding_dim
        self.evidence = EvidenceStore(cfg.evidence.path, cfg.evidence.max_frames, cfg.evidence.max_age_h)
        self.recorder = Recorder(lambda: VectorStore(cfg.store, dim), self.evidence, cfg.store, cfg.spool,
                                 cfg.evidence.thumbnail_size)
        self.stats = Stats()
        self.link = MqttLink(cfg.mqtt, cfg.mqtt.client_id or f"edge-inspect-{cfg.worker.id}",
                             subscriptions=[self.topics.shared(self.topics.frames, cfg.topics.share_group),
                                            self.topics.shared(self.topics.query, cfg.topics.share_group),
                                            self.topics.shared(self.topics.label, cfg.topics.share_group),
                                            self.topics.control],
                             will=(self.topics.availability, "offline"))
        self.link.client.manual_ack_set(True)
        self.pipeline = Pipeline(cfg, self.models, self.link, self.topics, self.recorder, self.stats)
        self.queries = QueryService(self.recorder.use_store, self.evidence, self.pipeline.embed, cfg.query.max_top_k)
        self.labels = LabelService(self.recorder.use_store)
        self.query_queue: BoundedQueue[mqtt.MQTTMessage] = BoundedQueue(16, QueuePolicy.DROP_NEWEST)
        self.query_thread = threading.Thread(target=self._serve_requests, name="requests", daemon=True)
        self.accepting = True
        self.link.on_message = self._route
        self.link.on_connected = self._announce

    def _announce(self) -> None:
        self.link.publish(self.topics.availability, "online", retain=True)
        self._publish_models()

    def _publish_models(self) -> None:
        scopes = {}
        for scope, model in self.models.scopes().items():
            scopes[scope] = {**model.info, "bundle": str(model.path),
                             "threshold": self.models.image_norm(model, "" if scope == DEFAULT else scope).threshold}
            self.stats.set_model(scope, model.info["name"], model.info["version"], model.info["precision"])
        body = {**scopes[DEFAULT], "scopes": scopes, "device": self.cfg.model.device,
                "device_name": self.models.default.bundle.device_name,
                "embedding_dim": self.models.embedding_dim}
        self.link.publish(self.topics.model, json.dumps(body), retain=True)

    def control(self, command: dict) -> dict:
        """reload {bundle?, camera?} | rollback {camera?} | status: the answer says which model now serves."""
        scope = command.get("camera") or DEFAULT
        action = command.get("command")
        try:
            if action == "reload":
                path = command.get("bundle") or self.models.scopes().get(scope, self.models.default).path
                model = self.models.load(scope, path)
                log.info("hot reload: %s now runs %s %s", scope, model.info["name"], model.info["version"])
            elif action == "rollback":
                model = self.models.rollback(scope)
                log.info("rollback: %s now runs %s %s", scope, model.info["name"], model.info["version"])
            elif action != "status":
                return {"ok": False, "error": {"code": "bad_request", "message": "command: reload | rollback | status"}}
        except (BundleError, OSError, RuntimeError) as exc:
            return {"ok": False, "error": {"code": "reload_failed", "message": str(exc)}}
        self._publish_models()
        return {"ok": True, "models": {s: m.info for s, m in self.models.scopes().items()}}

    def _route(self, msg: mqtt.MQTTMessage) -> None:
        if not self.accepting:
            return  # not acknowledged: the broker redelivers it to our next session
        if msg.topic in (self.topics.query, self.topics.label, self.topics.control):
            if self.query_queue.put(msg) is not None:
                self._respond(msg, {"ok": False, "error": {"code": "busy", "message": "too many queries waiting"}})
        else:
            self.pipeline.on_frame(msg)
        if msg.qos:
            self.link.client.ack(msg.mid, msg.qos)

    def _respond(self, msg: mqtt.MQTTMessage, answer: dict) -> None:
        props = getattr(msg, "properties", None)
        topic = getattr(props, "ResponseTopic", None)
        if not topic:
            log.log(logging.INFO if answer.get("ok") else logging.WARNING,
                    "request on %s without response_topic: %s", msg.topic, json.dumps(answer)[:300])
            return
        correlation = getattr(props, "CorrelationData", None)
        reply = publish_properties(content_type="application/json", correlation=correlation)
        try:
            self.link.publish(topic, json.dumps(answer), properties=reply, qos=1)
        except PacketTooLarge as exc:
            error = {"ok": False, "error": {"code": "response_too_large", "message": f"{exc}; ask for fewer hits"}}
            self.link.publish(topic, json.dumps(error), properties=reply, qos=1)

    def _serve_requests(self) -> None:
        """Queries, labels and control commands, one at a time, off the MQTT and inference threads."""
        while True:
            try:
                msg = self.query_queue.get(timeout=0.5)
            except Closed:
                return
            if msg is None:
                continue
            if msg.topic == self.topics.control:
                try:
                    command = json.loads(msg.payload)
                except (json.JSONDecodeError, UnicodeDecodeError):
                    command = {}
                self._respond(msg, self.control(command if isinstance(command, dict) else {}))
            elif msg.topic == self.topics.label:
                self._respond(msg, self.labels.answer_bytes(msg.payload))
            else:
                self._respond(msg, self.queries.answer_bytes(msg.payload))

    def stats_payload(self) -> dict:
        return {
            "worker": self.cfg.worker.id,
            "at": iso(time.time()),
            "uptime_s": round(time.time() - self.stats.started, 1),
            "queue": len(self.pipeline.queue),
            "store_pending": self.recorder.pending,
            "store_written": self.recorder.written,
            "store_available": self.recorder.store is not None,
            "spool_batches": len(self.recorder.spool),
            "spool_dropped_points": self.recorder.spool.dropped_points,
            "evidence_frames": len(self.evidence),
            "cameras": self.stats.snapshot(),
        }

    def run(self, stop: threading.Event) -> None:
        """Serve until ``stop`` is set, then shut down cleanly."""
        if self.cfg.metrics.enabled:
            try:
                self.stats.serve(self.cfg.metrics.host, self.cfg.metrics.port)
            except OSError as exc:  # e.g. a second worker on this box with the same metrics.port
                log.error("metrics: cannot listen on %s:%d (%s); /metrics is off, inspection goes on",
                          self.cfg.metrics.host, self.cfg.metrics.port, exc)
        self.recorder.start()
        self.pipeline.start()
        self.query_thread.start()
        self.link.start()
        now = time.monotonic()
        next_stats, next_watch = now + self.cfg.worker.stats_interval_s, now + self.cfg.model.watch_s
        while not stop.wait(0.2):
            now = time.monotonic()
            self.stats.queue_depth.set(len(self.pipeline.queue))
            self.stats.store_lag.set(self.recorder.pending + self.recorder.spool.points)
            self.stats.store_up.set(int(self.recorder.store is not None))
            if now >= next_stats and self.link.connected.is_set():
                self.link.publish(self.topics.stats, json.dumps(self.stats_payload()))
                next_stats = now + self.cfg.worker.stats_interval_s
            if self.cfg.model.watch_s and now >= next_watch:
                for scope, path in self.models.changed_on_disk():
                    answer = self.control({"command": "reload", "camera": None if scope == DEFAULT else scope,
                                           "bundle": str(path)})
                    if not answer["ok"]:
                        log.warning("bundle %s changed on disk but was not loaded: %s", path, answer["error"]["message"])
                next_watch = now + self.cfg.model.watch_s
        self.shutdown()

    def shutdown(self, timeout: float = 30) -> None:
        log.info("stopping: finishing %d queued frames", len(self.pipeline.queue))
        self.accepting = False
        left = self.pipeline.stop(timeout)
        self.query_queue.close()
        self.query_thread.join(5)
        flushed = self.recorder.flush(timeout)
        self.recorder.stop()
        if self.link.connected.is_set():
            self.link.publish(self.topics.stats, json.dumps(self.stats_payload()))
            info = self.link.publish(self.topics.availability, "stopped", retain=True)
            info.wait_for_publish(5)
        self.link.stop()
        log.info("stopped: %s; %d frames refused at shutdown; store flushed: %s",
                 json.dumps(self.stats.snapshot()), left, flushed)
