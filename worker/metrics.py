"""Counters the worker keeps, published two ways: the stats topic (JSON) and Prometheus ``/metrics``.

One :class:`Stats` object is updated on every frame; it feeds both, so the two views
never disagree.  Each worker has its own Prometheus registry (no global state).  The
same HTTP server answers ``/healthz`` from the thread liveness registry.  Camera ids
come from topic levels, so at most ``metrics.max_cameras`` of them become labels.
"""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import sys
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Gauge, Histogram, generate_latest
from prometheus_client import Counter as PromCounter
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from worker.supervise import Liveness, Throttle

# The stats' and /metrics' bucket of frames from cameras past metrics.max_cameras and from camera levels refused
# (bad_camera): no camera is named so, since "/" separates topic levels.
OTHER = "/other"
log = logging.getLogger(__name__)

# The HTTP server runs a thread per connection: without bounds, clients that open connections and send nothing (on a
# metrics.host reachable from the line's network) grew the worker's threads without limit, until the process could
# start no thread at all.  Scrapers and health probes open one connection each.
HTTP_MAX_CONNECTIONS = 32  # connections served at once; past them a new one is answered 503 and closed
# A connection is closed this long after it was taken, whether its request is read and its answer written or not:
# a deadline for each read alone let clients that send a byte now and then hold every slot for as long as they liked.
HTTP_TIMEOUT_S = 10.0
HTTP_REFUSED_LOG_EVERY_S = 60.0
HISTORY_LOST_HELP = ("Scored frames the history (the vector store) lacks for good, by the stats field that counts them: "
                     "recorder_dropped (the recorder's backlog full), recorder_lost (neither the store nor the spool "
                     "took them, e.g. a full disk), spool_dropped_points (the spool past spool.max_mb), "
                     "recorder_unrecorded (store_error).")
PUBLISHES_REFUSED_HELP = ("Messages the broker refused to take from the worker, lost: results, heatmaps, errors, "
                          "answers or the worker's own status (the stats' last_publish_refused names the topic).")
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1, 2.5, 5, 10)


class Stats:
    """Per-camera counters; ``received == processed + errored + dropped + duplicates + handed_back + in flight`` at
    all times (``handed_back``: left unacknowledged at a stop for the next start, see worker/pipeline.py)."""

    FIELDS = ("received", "processed", "anomalous", "errored", "dropped", "duplicates", "handed_back")

    def __init__(self, liveness: Liveness | None = None, max_cameras: int = 64) -> None:
        self._lock = threading.Lock()
        self.liveness = liveness or Liveness(0)
        self.max_cameras = max_cameras
        self._labelled: set[str] = set()
        self._server: ThreadingHTTPServer | None = None
        self._counts: dict[str, Counter] = defaultdict(Counter)
        self.started = time.monotonic()  # for uptime: a wall clock set by NTP after boot jumps decades
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
        self.store_up = Gauge("edge_inspect_store_available", "1 when the vector store takes writes (0 while it cannot "
                              "be opened or refuses them, e.g. below store.min_free_mb: frames are spooled, or lost "
                              "where the spool cannot take them either: edge_inspect_history_lost_total).",
                              registry=self.registry)
        self.broker_up = Gauge("edge_inspect_broker_connected", "1 while the MQTT broker connection is up (frames can "
                               "arrive).", registry=self.registry)
        self.refused = Gauge("edge_inspect_subscriptions_refused", "Topics the broker refuses to subscribe the worker "
                             "to (its ACL): nothing published there arrives.", registry=self.registry)
        self.model = Gauge("edge_inspect_model_info", "The bundle serving each camera group (value 1).",
                           ["scope", "name", "version", "precision"], registry=self.registry)
        self.registry.register(_LivenessCollector(self.liveness))

    def bucket(self, camera: str) -> str:
        """The camera's Prometheus label: itself for the first ``max_cameras`` cameras, then :data:`OTHER`; also what
        the log's once-per-camera lines are keyed by, so a publisher inventing camera names does not flood it."""
        with self._lock:
            if camera in self._labelled or camera == OTHER:  # the bucket takes none of the cameras' slots
                return camera
            if len(self._labelled) < self.max_cameras:
                self._labelled.add(camera)
                return camera
        return OTHER

    def add(self, camera: str, field: str, n: int = 1, code: str | None = None) -> None:
        with self._lock:
            if camera in self._counts or len(self._counts.keys() - {OTHER}) < self.max_cameras:
                self._counts[camera][field] += n
            else:
                self._counts[OTHER][field] += n
        label = self.bucket(camera)
        self._frames.labels(label, field).inc(n)
        if code is not None:
            self._errors.labels(label, code).inc(n)

    def observe(self, latency_ms: dict[str, float]) -> None:
        for stage in ("queue", "infer", "total"):
            self._latency.labels(stage).observe(latency_ms[stage] / 1000)

    def set_models(self, served: Mapping[str, Mapping[str, Any]]) -> None:
        """The bundle serving each scope, by its model info (name, version, precision), and no other: a canary ended
        by a rollback or a roll-out leaves.  Called from the MQTT thread (on connect), the request thread (reload)
        and the worker's start: serialised."""
        with self._lock:
            self.model.clear()
            for scope, info in served.items():
                self.model.labels(scope, info["name"], info["version"], info["precision"]).set(1)

    def count_lost(self, totals: Callable[[], dict[str, int]]) -> None:
        """Export ``edge_inspect_history_lost_total`` by reason from ``totals``, read at each scrape: the recorder's
        and the spool's own counts of frames the history lacks (they only grow), the last flush of a stop's included."""
        self.registry.register(_Totals("edge_inspect_history_lost", HISTORY_LOST_HELP, "reason", totals))

    def count_refused(self, total: Callable[[], int]) -> None:
        """Export ``edge_inspect_publishes_refused_total`` from ``total``, read at each scrape: the link's own count.
        Added to by the main loop, it missed the refusals of a clean stop (its last results, its ``stopped``)."""
        self.registry.register(_Total("edge_inspect_publishes_refused", PUBLISHES_REFUSED_HELP, total))

    def snapshot(self) -> dict[str, dict[str, int]]:
        with self._lock:
            return {cam: {f: c[f] for f in self.FIELDS} for cam, c in self._counts.items()}

    def serve(self, host: str, port: int, max_connections: int = HTTP_MAX_CONNECTIONS,
              timeout_s: float = HTTP_TIMEOUT_S) -> int:
        """Serve ``/metrics`` and ``/healthz`` over HTTP on a daemon thread, at most ``max_connections`` at once, each
        closed ``timeout_s`` after it was taken; returns the bound port."""
        registry, liveness = self.registry, self.liveness

        class Handler(BaseHTTPRequestHandler):
            timeout = timeout_s  # socketserver.StreamRequestHandler sets it on the connection: bounds each read

            def do_GET(self) -> None:  # (http.server's names)
                self._send(*self._answer())

            def do_HEAD(self) -> None:
                """GET's status and headers without the body: probes that send HEAD (wget --spider, uptime
                monitors) were answered 501 and reported a healthy worker down."""
                self._send(*self._answer(), with_body=False)

            def _answer(self) -> tuple[int, str, bytes]:
                path = self.path.split("?")[0]
                if path == "/metrics":
                    return 200, CONTENT_TYPE_LATEST, generate_latest(registry)
                if path == "/healthz":
                    problems = liveness.problems()
                    body = {"ok": not problems, "problems": problems, "threads": liveness.snapshot()}
                    return 503 if problems else 200, "application/json", json.dumps(body).encode()
                return 404, "text/plain", b"not found: /metrics, /healthz\n"

            def _send(self, status: int, content_type: str, body: bytes, with_body: bool = True) -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if with_body:
                    self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:  # scrapes are not log lines
                return

        self._server = _Server((host, port), Handler, max_connections, timeout_s)
        threading.Thread(target=self._server.serve_forever, name="metrics-http", daemon=True).start()
        threading.Thread(target=self._server.reap, name="metrics-deadlines", daemon=True).start()
        return self._server.server_address[1]

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 64  # the listen backlog: a burst of connections is accepted (and answered) rather than dropped
    BUSY = (b"HTTP/1.0 503 Service Unavailable\r\nContent-Type: text/plain\r\nConnection: close\r\n\r\n"
            b"too many connections to the worker's metrics server\n")

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler], max_connections: int,
                 timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self._deadlines: dict[socket.socket, float] = {}  # each connection served (at most max_connections): its end
        self._deadline_changed = threading.Condition()  # set before the bind: a port in use closes the server at once
        self._closing = False
        self._slots = threading.BoundedSemaphore(max_connections)
        self.max_connections = max_connections
        self.refused = 0  # connections answered BUSY
        self._refused_log = Throttle(HTTP_REFUSED_LOG_EVERY_S)
        super().__init__(address, handler)

    def process_request(self, request: Any, client_address: Any) -> None:  # socketserver's types
        """A thread for the connection while a slot is free; else 503 at once, on this (the accepting) thread."""
        if not self._slots.acquire(blocking=False):
            self.refused += 1
            if self._refused_log.ready():
                log.warning("metrics: %d connection(s) refused so far: %d already open (the most served at once)",
                            self.refused, self.max_connections)
            with contextlib.suppress(OSError):  # a few bytes into a new connection's empty send buffer: never blocks
                request.sendall(self.BUSY)
            self.shutdown_request(request)
            return
        with self._deadline_changed:
            self._deadlines[request] = time.monotonic() + self.timeout_s
            self._deadline_changed.notify()
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._served(request)
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._served(request)

    def _served(self, request: socket.socket) -> None:
        with self._deadline_changed:
            self._deadlines.pop(request, None)
        self._slots.release()

    def reap(self) -> None:
        """Shut each connection still open ``timeout_s`` after it was taken, whatever it sends: the handler's read or
        write under way then ends, and the connection is closed (a timeout per read let a client that sends a byte
        now and then hold its slot for as long as it liked).  One thread for all connections."""
        with self._deadline_changed:
            while not self._closing:
                now = time.monotonic()
                for request, deadline in list(self._deadlines.items()):
                    if deadline <= now:
                        del self._deadlines[request]
                        with contextlib.suppress(OSError):
                            request.shutdown(socket.SHUT_RDWR)
                self._deadline_changed.wait(min(self._deadlines.values(), default=now + 60) - now)

    def server_close(self) -> None:
        with self._deadline_changed:
            self._closing = True
            self._deadline_changed.notify()
        super().server_close()

    def handle_error(self, request: object, client_address: tuple) -> None:
        """A client that gave up before its answer (a probe's timeout on a starved or paused box) is no error of the
        worker: said at DEBUG, without a traceback; anything else is logged with its traceback (the default prints
        it to stderr, outside the log's format)."""
        exc = sys.exc_info()[1]
        if isinstance(exc, (BrokenPipeError, ConnectionResetError)):
            log.debug("metrics: client %s:%s went away before its answer (%s)", *client_address[:2], exc)
            return
        log.exception("metrics: a request from %s:%s failed", *client_address[:2])


class _LivenessCollector(Collector):
    """Thread liveness, read at scrape time from the registry the threads update."""

    def __init__(self, liveness: Liveness) -> None:
        self.liveness = liveness

    def collect(self) -> Iterator:
        since = GaugeMetricFamily("edge_inspect_thread_since_progress_seconds",
                                  "Seconds since each supervised thread last made progress.", labels=["thread"])
        up = GaugeMetricFamily("edge_inspect_thread_up", "1 when the thread is alive and not stuck.", labels=["thread"])
        restarts = CounterMetricFamily("edge_inspect_thread_restarts",
                                       "Times a thread's loop went on after an unexpected exception.", labels=["thread"])
        problems = " ".join(self.liveness.problems())
        for name, s in self.liveness.snapshot().items():
            since.add_metric([name], s["since_progress_s"])
            up.add_metric([name], 0 if f"{name}:" in problems else 1)
            restarts.add_metric([name], s["restarts"])
        yield from (since, up, restarts)


class _Totals(Collector):
    """A counter by one label, read at scrape time from totals kept elsewhere that only grow."""

    def __init__(self, name: str, documentation: str, label: str, totals: Callable[[], dict[str, int]]) -> None:
        self.name, self.documentation, self.label, self.totals = name, documentation, label, totals

    def collect(self) -> Iterator:
        family = CounterMetricFamily(self.name, self.documentation, labels=[self.label])
        for value, total in self.totals().items():
            family.add_metric([value], total)
        yield family


class _Total(Collector):
    """A counter read at scrape time from a total kept elsewhere that only grows."""

    def __init__(self, name: str, documentation: str, total: Callable[[], int]) -> None:
        self.name, self.documentation, self.total = name, documentation, total

    def collect(self) -> Iterator:
        yield CounterMetricFamily(self.name, self.documentation, value=self.total())
