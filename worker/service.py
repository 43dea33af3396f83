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

from bundle.runtime import CompiledBundle
from worker.config import Config, QueuePolicy
from worker.evidence import EvidenceStore
from worker.mqtt import MqttLink, PacketTooLarge, publish_properties
from worker.pipeline import Pipeline, Stats, iso
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
        started = time.monotonic()
        self.bundle = CompiledBundle(cfg.model.bundle, cfg.model.device, cfg.model.cache_dir)
        manifest = self.bundle.manifest
        log.info("bundle %s %s (%s) compiled on %s in %.2f s, %d infer requests", manifest.name, manifest.version,
                 manifest.family, cfg.model.device, time.monotonic() - started, self.bundle.optimal_requests)
        self.store = VectorStore(cfg.store, manifest.embedding_dim)
        self.evidence = EvidenceStore(cfg.evidence.path, cfg.evidence.max_frames, cfg.evidence.max_age_h)
        self.recorder = Recorder(self.store, self.evidence, cfg.store, cfg.evidence.thumbnail_size)
        self.stats = Stats()
        self.link = MqttLink(cfg.mqtt, cfg.mqtt.client_id or f"edge-inspect-{cfg.worker.id}",
                             subscriptions=[self.topics.frames, self.topics.query],
                             will=(self.topics.availability, "offline"))
        self.link.client.manual_ack_set(True)
        self.pipeline = Pipeline(cfg, self.bundle, self.link, self.topics, self.recorder, self.stats)
        self.queries = QueryService(self.store, self.evidence, self.pipeline.embed, cfg.query.max_top_k)
        self.query_queue: BoundedQueue[mqtt.MQTTMessage] = BoundedQueue(16, QueuePolicy.DROP_NEWEST)
        self.query_thread = threading.Thread(target=self._serve_queries, name="queries", daemon=True)
        self.accepting = True
        self.link.on_message = self._route
        self.link.on_connected = self._announce

    def _announce(self) -> None:
        self.link.publish(self.topics.availability, "online", retain=True)
        model = {**self.pipeline.model_info, "bundle": str(self.cfg.model.bundle), "device": self.cfg.model.device,
                 "threshold": self.pipeline.image_norm.threshold, "embedding_dim": self.bundle.manifest.embedding_dim}
        self.link.publish(self.topics.model, json.dumps(model), retain=True)

    def _route(self, msg: mqtt.MQTTMessage) -> None:
        if not self.accepting:
            return  # not acknowledged: the broker redelivers it to our next session
        if msg.topic == self.topics.query:
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
            log.warning("query without response_topic ignored (MQTT v5 request/response required)")
            return
        correlation = getattr(props, "CorrelationData", None)
        reply = publish_properties(content_type="application/json", correlation=correlation)
        try:
            self.link.publish(topic, json.dumps(answer), properties=reply, qos=1)
        except PacketTooLarge as exc:
            error = {"ok": False, "error": {"code": "response_too_large", "message": f"{exc}; ask for fewer hits"}}
            self.link.publish(topic, json.dumps(error), properties=reply, qos=1)

    def _serve_queries(self) -> None:
        while True:
            try:
                msg = self.query_queue.get(timeout=0.5)
            except Closed:
                return
            if msg is not None:
                self._respond(msg, self.queries.answer_bytes(msg.payload))

    def stats_payload(self) -> dict:
        return {
            "worker": self.cfg.worker.id,
            "at": iso(time.time()),
            "uptime_s": round(time.time() - self.stats.started, 1),
            "queue": len(self.pipeline.queue),
            "store_pending": self.recorder.pending,
            "store_written": self.recorder.written,
            "evidence_frames": len(self.evidence),
            "cameras": self.stats.snapshot(),
        }

    def run(self, stop: threading.Event) -> None:
        """Serve until ``stop`` is set, then shut down cleanly."""
        self.recorder.start()
        self.pipeline.start()
        self.query_thread.start()
        self.link.start()
        next_stats = time.monotonic() + self.cfg.worker.stats_interval_s
        while not stop.wait(0.2):
            if time.monotonic() >= next_stats and self.link.connected.is_set():
                self.link.publish(self.topics.stats, json.dumps(self.stats_payload()))
                next_stats = time.monotonic() + self.cfg.worker.stats_interval_s
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
        self.store.close()
        log.info("stopped: %s; %d frames refused at shutdown; store flushed: %s",
                 json.dumps(self.stats.snapshot()), left, flushed)
