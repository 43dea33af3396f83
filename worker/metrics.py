"""Counters the worker keeps, published two ways: the stats topic (JSON) and Prometheus ``/metrics``.

One :class:`Stats` object is updated on every frame; it feeds both, so the two views
never disagree.  Each worker has its own Prometheus registry (no global state).
"""

from __future__ import annotations

import threading
import time
from collections import Counter, defaultdict

from prometheus_client import CollectorRegistry
from prometheus_client import Counter as PromCounter
from prometheus_client import Gauge, Histogram, start_http_server

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1, 2.5, 5, 10)


class Stats:
    """Per-camera counters; ``received == processed + errored + dropped + duplicates + in flight`` at all times."""

    FIELDS = ("received", "processed", "anomalous", "errored", "dropped", "duplicates")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: dict[str, Counter] = defaultdict(Counter)
        self.started = time.time()
        self.registry = CollectorRegistry()
        self._frames = PromCounter("edge_inspect_frames", "Frames by camera and outcome.", ["camera", "outcome"],
                                   registry=self.registry)
        self._errors = PromCounter("edge_inspect_frame_errors", "Refused frames by camera and error code.",
                                   ["camera", "code"], registry=self.registry)
        self._latency = Histogram("edge_inspect_latency_seconds", "Per-frame latency by stage.", ["stage"],
                                  buckets=LATENCY_BUCKETS, registry=self.registry)
        self.queue_depth = Gauge("edge_inspect_queue_depth", "Frames waiting for inference.", registry=self.registry)
        self.store_lag = Gauge("edge_inspect_store_pending", "Logged frames not yet written to the vector store "
                               "(recorder backlog + spooled points).", registry=self.registry)
        self.store_up = Gauge("edge_inspect_store_available", "1 when the vector store answers.", registry=self.registry)
        self.model = Gauge("edge_inspect_model_info", "The bundle serving each camera group (value 1).",
                           ["scope", "name", "version", "precision"], registry=self.registry)

    def add(self, camera: str, field: str, n: int = 1, code: str | None = None) -> None:
        with self._lock:
            self._counts[camera][field] += n
        self._frames.labels(camera, field).inc(n)
        if code is not None:
            self._errors.labels(camera, code).inc(n)

    def observe(self, latency_ms: dict[str, float]) -> None:
        for stage in ("queue", "infer", "total"):
            self._latency.labels(stage).observe(latency_ms[stage] / 1000)

    def set_model(self, scope: str, name: str, version: str, precision: str) -> None:
        for sample in list(self.model.collect()[0].samples):
            if sample.labels["scope"] == scope:
                self.model.remove(scope, sample.labels["name"], sample.labels["version"], sample.labels["precision"])
        self.model.labels(scope, name, version, precision).set(1)

    def snapshot(self) -> dict[str, dict[str, int]]:
        with self._lock:
            return {cam: {f: c[f] for f in self.FIELDS} for cam, c in self._counts.items()}

    def serve(self, host: str, port: int) -> None:
        """Expose ``/metrics`` over HTTP (prometheus-client's own server, on a daemon thread)."""
        start_http_server(port, addr=host, registry=self.registry)
