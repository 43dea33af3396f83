"""Supervision, bounds and validation in-process: the queue's policies, the spool's tolerance, /healthz, config.

The worker-level versions (real broker, real worker process) are in tests/test_stall.py and
tests/test_reliability.py; these pin the mechanisms down one by one.
"""

from __future__ import annotations

import http.client
import json
import logging
import socket
import struct
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from prometheus_client.registry import Collector

from worker.config import ConfigError, QueuePolicy, SpoolConfig, StoreConfig, load_config
from worker.evidence import EvidenceStore
from worker.metrics import OTHER, Stats
from worker.queueing import BoundedQueue
from worker.recorder import Record, Recorder, Spool
from worker.store import StoreError, VectorStore
from worker.supervise import Liveness, StopLoop, os_thread_named, supervised_loop
from worker.wire import ControlRequest, ErrorCode, FrameMetadata, RequestError, decode_json, parse_timestamp, validate


# Queues --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("policy", [QueuePolicy.DROP_OLDEST, QueuePolicy.DROP_NEWEST])
def test_a_flooding_key_never_evicts_another_keys_items(policy):
    q: BoundedQueue[tuple[str, int]] = BoundedQueue(8, policy, key=lambda item: item[0])
    dropped = []
    for i in range(40):  # camera A at 10x camera B's rate, nothing consumed
        dropped += q.put(("A", i))
        if i % 10 == 0:
            dropped += q.put(("B", i))
    assert [d for d in dropped if d[0] == "B"] == []
    assert sum(1 for d in dropped if d[0] == "A") == 40 + 4 - 8
    kept_a = [i for k, i in q._items if k == "A"]
    assert kept_a == (list(range(36, 40)) if policy is QueuePolicy.DROP_OLDEST else list(range(4)))


def test_the_queue_is_bounded_in_bytes_and_refuses_after_close():
    q: BoundedQueue[bytes] = BoundedQueue(100, QueuePolicy.DROP_OLDEST, max_bytes=10, size=len)
    assert q.put(b"12345") == [] and q.put(b"6789") == []
    assert q.put(b"abc") == [b"12345"]  # 5 + 4 + 3 > 10: the oldest goes
    assert q.bytes == 7 and len(q) == 2
    assert q.put(b"x" * 50) == [b"6789", b"abc"]  # one item is always taken, alone, however large
    q.close()
    assert q.put(b"late") == [b"late"] and len(q) == 1


def test_a_blocked_put_is_released_by_close():
    q: BoundedQueue[int] = BoundedQueue(1, QueuePolicy.BLOCK)
    q.put(1)
    answer = []
    t = threading.Thread(target=lambda: answer.append(q.put(2)))
    t.start()
    q.close()
    t.join(10)
    assert answer == [[2]]


# Supervision -----------------------------------------------------------------------------------------

def test_the_loop_goes_on_after_an_exception_and_counts_it():
    liveness = Liveness(0)
    items = iter([1, "boom", 2, None])
    done, errors = [], []

    def step() -> None:
        item = next(items)
        if item is None:
            raise StopLoop
        if item == "boom":
            raise RuntimeError("boom")
        done.append(item)

    supervised_loop(liveness, "t", step, errors.append)
    assert done == [1, 2] and [str(e) for e in errors] == ["boom"]
    assert liveness.snapshot()["t"]["restarts"] == 1 and liveness.problems() == []


def _damaged_shard(folder: Path) -> Path:
    """A qdrant-edge shard with one point whose status file is left empty, as a power cut while it wrote can."""
    store = VectorStore(StoreConfig(path=folder), 4)
    store.upsert([(str(uuid.uuid4()), np.ones(4, np.float32), {"frame_id": "f", "camera": "c"})])
    store.close()
    status = sorted(folder.rglob("vector_storage/deleted/status.dat"))
    assert status, "the engine's file layout changed: pick another file that a power cut can leave empty"
    status[0].write_bytes(b"")
    return folder / StoreConfig().collection


def test_a_panic_in_a_compiled_library_is_a_loop_error_not_the_end_of_the_thread(tmp_path):
    """qdrant-edge panics on damaged files, and pyo3 raises a panic as a BaseException, which ``except Exception``
    would let through to end the loop's thread; a KeyboardInterrupt still ends it."""
    import qdrant_edge as edge

    shard = _damaged_shard(tmp_path / "store")
    liveness = Liveness(0)
    first = iter([True, False])
    errors: list[BaseException] = []

    def step() -> None:  # loads the damaged shard once, then stops the loop
        if not next(first):
            raise StopLoop
        edge.EdgeShard.load(str(shard))

    supervised_loop(liveness, "t", step, errors.append)
    assert [type(e).__name__ for e in errors] == ["PanicException"]
    assert liveness.snapshot()["t"]["restarts"] == 1
    with pytest.raises(StoreError, match="panicked.*damaged.*Move the folder aside"):
        VectorStore(StoreConfig(path=tmp_path / "store"), 4)

    def interrupted() -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        supervised_loop(Liveness(0), "u", interrupted)


def _os_name() -> str:
    return Path(f"/proc/self/task/{threading.get_native_id()}/comm").read_text().strip()


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="OS thread names are read from Linux's /proc")
def test_loops_and_the_threads_a_compile_starts_carry_their_names_for_the_os():
    seen: dict[str, str] = {}

    def loop() -> None:
        def step() -> None:
            seen["loop"] = _os_name()
            with os_thread_named("openvino"):  # as worker.models compiles: threads started here inherit the name
                seen["inside"] = _os_name()
                child = threading.Thread(target=lambda: seen.setdefault("child", _os_name()))
                child.start()
                child.join()
            seen["after"] = _os_name()
            raise StopLoop

        supervised_loop(Liveness(0), "requests", step)

    thread = threading.Thread(target=loop)
    thread.start()
    thread.join()
    assert seen == {"loop": "requests", "inside": "openvino", "child": "openvino", "after": "requests"}


def test_healthz_fails_while_a_thread_is_stuck_or_dead():
    liveness = Liveness(stuck_after_s=0.3)
    stats = Stats(liveness)
    port = stats.serve("127.0.0.1", 0)
    release = threading.Event()

    def stuck() -> None:
        with liveness.busy("worker-a"):
            release.wait(30)

    t = threading.Thread(target=stuck)
    liveness.register("worker-a", t)
    t.start()
    try:
        deadline = time.monotonic() + 10
        while not liveness.problems() and time.monotonic() < deadline:
            release.wait(0.05)
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5)
        assert err.value.code == 503
        assert json.loads(err.value.read())["problems"][0].startswith("worker-a: stuck")
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        assert 'edge_inspect_thread_up{thread="worker-a"} 0.0' in metrics
        release.set()
        t.join(10)
        # it ended without saying it was done: dead
        with pytest.raises(urllib.error.HTTPError):
            urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5)
        liveness.finished("worker-a")
        assert json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5).read())["ok"]
    finally:
        release.set()
        stats.close()


def test_a_head_probe_is_answered_as_get_without_a_body():
    """HEAD /healthz and HEAD /metrics were answered 501: probes that send HEAD (wget --spider, uptime monitors)
    reported a healthy worker down.  HEAD answers as GET does, without the body; a dead thread still fails it."""

    def ask(method: str, path: str) -> tuple[int, str, bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        try:
            conn.request(method, path)
            answer = conn.getresponse()
            return answer.status, answer.getheader("Content-Type", ""), answer.read()
        finally:
            conn.close()

    liveness = Liveness(0)
    stats = Stats(liveness)
    port = stats.serve("127.0.0.1", 0)
    try:
        for path, status in (("/healthz", 200), ("/metrics", 200), ("/nothing", 404)):
            get_status, get_type, get_body = ask("GET", path)
            assert (get_status, get_body != b"") == (status, True)
            assert ask("HEAD", path) == (status, get_type, b"")
        liveness.register("worker-a", threading.Thread(target=lambda: None))  # registered, never started: dead
        assert ask("HEAD", "/healthz")[0] == 503
    finally:
        stats.close()


class _SlowScrape(Collector):
    """A metric that takes its time (a scrape on a starved or paused box), and one that fails, on cue."""

    def __init__(self) -> None:
        self.scraping, self.release, self.fail = threading.Event(), threading.Event(), False

    def describe(self) -> list:
        return []

    def collect(self) -> Iterator:
        if self.fail:
            raise ValueError("a collector's own bug")
        self.scraping.set()
        self.release.wait(30)
        return iter(())


def test_clients_holding_connections_open_cannot_grow_the_metrics_servers_threads(caplog):
    """The metrics server ran a thread per connection for as long as the client kept it open: clients that connect
    and send nothing (metrics.host on the line's network) grew the worker's threads until it could start none. Now
    at most max_connections are served at once (a new one past them is answered 503 and closed) and a connection
    silent for timeout_s is closed."""
    import select

    held: list[socket.socket] = []
    stats = Stats(Liveness(0))
    port = stats.serve("127.0.0.1", 0, max_connections=4, timeout_s=60.0)
    base = threading.active_count()
    try:
        for _ in range(20):
            held.append(socket.create_connection(("127.0.0.1", port), timeout=30))
            held[-1].sendall(b"GET /metr")  # a request that never ends
        replies: dict[int, bytes] = {}
        deadline = time.monotonic() + 30
        while len(replies) < 16 and time.monotonic() < deadline:  # the 16 past the 4 served are answered at once
            ready, _, _ = select.select([s for s in held if s.fileno() not in replies], [], [], 1.0)
            replies.update({s.fileno(): s.recv(200) for s in ready})
        assert len(replies) == 16 and all(r.startswith(b"HTTP/1.0 503 ") for r in replies.values()), replies
        assert threading.active_count() - base <= 4  # the 4 served, each waiting for the rest of its request
        assert caplog.text.count("connection(s) refused so far") == 1  # said once a minute, with the count so far
    finally:
        for sock in held:
            sock.close()
        stats.close()
    stats = Stats(Liveness(0))
    port = stats.serve("127.0.0.1", 0, max_connections=4, timeout_s=0.5)
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=30) as silent:
            silent.sendall(b"GET /metr")
            assert silent.recv(200) == b""  # closed by the worker after its silence, without an answer
        assert urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=10).status == 200
    finally:
        stats.close()


def test_a_metrics_client_that_gives_up_leaves_no_traceback_but_a_failing_scrape_does(capfd, caplog):
    """A /metrics or /healthz client that closed before its answer (its timeout) put http.server's full traceback
    (BrokenPipeError, ConnectionResetError) in the worker's log, which reads as a worker error: now one DEBUG line."""
    caplog.set_level(logging.DEBUG, logger="worker.metrics")
    stats = Stats(Liveness(0))
    slow = _SlowScrape()
    stats.registry.register(slow)
    port = stats.serve("127.0.0.1", 0)
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: worker\r\n\r\n")
            assert slow.scraping.wait(10)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # closed with a reset
        slow.release.set()
        err = ""
        deadline = time.monotonic() + 10
        while "went away" not in caplog.text and "Traceback" not in err and time.monotonic() < deadline:
            err += capfd.readouterr().err
            slow.scraping.wait(0.05)  # poll interval of this observer (already set: returns at once)
        err += capfd.readouterr().err
        assert "Traceback" not in err and "Traceback" not in caplog.text, err
        assert "went away before its answer" in caplog.text
        assert [r.levelno for r in caplog.records if r.name == "worker.metrics"] == [logging.DEBUG]
        slow.fail = True  # a real error is still shown, with its traceback
        with pytest.raises((urllib.error.URLError, ConnectionError, http.client.HTTPException)):
            urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5)
        deadline = time.monotonic() + 10
        while "a collector's own bug" not in caplog.text and time.monotonic() < deadline:
            slow.scraping.wait(0.05)
        failed = [r for r in caplog.records if r.levelno == logging.ERROR]
        assert failed and failed[0].exc_info and "a collector's own bug" in caplog.text
    finally:
        slow.release.set()
        stats.close()


def test_camera_labels_in_metrics_are_bounded():
    stats = Stats(max_cameras=3)
    for i in range(50):
        stats.add(f"cam{i}", "received")
    labels = {s.labels["camera"] for s in stats._frames.collect()[0].samples}
    assert labels == {"cam0", "cam1", "cam2", OTHER}
    assert stats.snapshot()[OTHER]["received"] == 47 and len(stats.snapshot()) == 4



def test_the_bucket_of_other_cameras_takes_none_of_the_camera_slots():
    """Frames refused for their camera level (bad_camera) count in the /other bucket: it took one of the
    metrics.max_cameras slots, and the last real camera was counted as /other."""
    stats = Stats(max_cameras=2)
    stats.add(OTHER, "received")
    stats.add("cam0", "received")
    stats.add("cam1", "received")
    labels = {s.labels["camera"] for s in stats._frames.collect()[0].samples}
    assert labels == {"cam0", "cam1", OTHER}
    assert set(stats.snapshot()) == {"cam0", "cam1", OTHER} and stats.snapshot()[OTHER]["received"] == 1


def test_a_metrics_client_trickling_bytes_is_closed_at_its_deadline():
    """Clients sending a byte now and then held every slot of the metrics server (each read had its own timeout), and
    /healthz answered 503 "too many connections".  A connection now has timeout_s in all to send its request and
    take its answer."""
    stats = Stats(Liveness(0))
    port = stats.serve("127.0.0.1", 0, max_connections=1, timeout_s=1.0)
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=30) as slow:
            slow.sendall(b"GET /metrics HTTP/1.1\r\n")
            slow.settimeout(0.2)  # the trickle's pace: one byte per read that times out
            started, closed = time.monotonic(), False
            while not closed and time.monotonic() - started < 10:
                try:
                    slow.sendall(b"X")
                    closed = slow.recv(200) == b""
                except TimeoutError:
                    continue
                except OSError:  # reset by the server's close
                    closed = True
            assert closed and time.monotonic() - started < 5
        # Its slot is free once its handler's thread has ended, just after the close the client saw: a probe gets in.
        deadline, status = time.monotonic() + 10, None
        while status != 200 and time.monotonic() < deadline:
            try:
                status = urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=10).status
            except urllib.error.HTTPError as exc:
                status = exc.code
        assert status == 200
    finally:
        stats.close()


# Spool and recorder -----------------------------------------------------------------------------------

def _points(n: int, start: int = 0) -> list:
    return [(f"00000000-0000-0000-0000-{i:012d}", np.full(4, 0.5, np.float32), {"frame_id": f"f{i}", "captured_ts": 1.8e9 + i})
            for i in range(start, start + n)]


def test_a_truncated_or_corrupt_spool_file_is_moved_aside_not_fatal(tmp_path):
    spool = Spool(tmp_path, 10_000_000)
    for k in range(3):
        spool.push(_points(2, 2 * k))
    files = sorted(tmp_path.glob("*.json"))
    files[1].write_bytes(files[1].read_bytes()[:17])  # a kill -9 during a write leaves a prefix
    files[2].write_text('{"points": [{"id": 1}]}')  # valid JSON, not a batch
    again = Spool(tmp_path, 10_000_000)  # start-up must not raise
    assert len(again) == 2 and again.corrupt_batches == 1
    first = again.oldest()
    assert first is not None and [p[0] for p in first[1]] == [p[0] for p in _points(2)]
    again.remove(first[0])
    assert again.oldest() is None and again.corrupt_batches == 2
    assert len(list(tmp_path.glob("*.corrupt"))) == 2
    again.push(_points(1, 10))  # numbering goes on past the quarantined files
    assert len(again) == 1 and not (tmp_path / files[1].name).exists()


def test_recorder_survives_an_oserror_in_retention_and_flush_waits_for_the_batch(tmp_path):
    cfg = StoreConfig(path=tmp_path / "store", flush_s=0.05, batch_size=4, retention_every_s=0.01, max_points=3)
    store = VectorStore(cfg, 4)
    evidence = EvidenceStore(tmp_path / "evidence", max_frames=1000)
    liveness = Liveness(0)
    recorder = Recorder(lambda: store, evidence, cfg, SpoolConfig(path=tmp_path / "spool"), 16, liveness)
    recorder.start()
    try:
        first = _points(3)
        for pid, vec, payload in first:
            recorder.submit(Record(pid, vec, payload, np.zeros((32, 32, 3), np.uint8)))
        assert recorder.flush(30)
        assert store.count() == 3  # flush returned only once every record was written
        # Retention will delete the oldest frame's evidence; its thumbnail is now a folder: unlink raises OSError.
        thumb = tmp_path / "evidence" / store.find("f0", None)[2]["evidence"]["thumbnail"]
        thumb.unlink()
        thumb.mkdir()
        for pid, vec, payload in _points(5, 100):
            recorder.submit(Record(pid, vec, payload, np.zeros((32, 32, 3), np.uint8)))
        assert recorder.flush(30)
        deadline = time.monotonic() + 20
        while liveness.snapshot()["recorder"]["restarts"] == 0 and time.monotonic() < deadline:
            time.sleep(0.05)  # poll interval while waiting for the retention pass, with a deadline
        assert liveness.snapshot()["recorder"]["restarts"] >= 1
        assert liveness.problems() == []  # the thread is alive and going on
        for pid, vec, payload in _points(2, 200):
            recorder.submit(Record(pid, vec, payload, np.zeros((32, 32, 3), np.uint8)))
        assert recorder.flush(30)
        assert store.find("f201") is not None  # written after the failure
    finally:
        recorder.stop()


def test_the_recorders_stop_is_bounded_while_the_store_is_held(tmp_path, caplog):
    """recorder.stop() waited for the store's lock without a limit after its thread's 10 s join: a reader or a write
    that does not return (a hung disk or server) held the clean stop past the service manager's kill. Here a reader
    holds the store through the stop."""
    cfg = StoreConfig(path=tmp_path / "store")
    recorder = Recorder(lambda: VectorStore(cfg, 4), EvidenceStore(tmp_path / "e", 100), cfg,
                        SpoolConfig(path=tmp_path / "spool"), 16, Liveness(0))
    recorder.start()
    holding, release = threading.Event(), threading.Event()

    def reader() -> None:
        with recorder.use_store():
            holding.set()
            release.wait(60)

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        assert holding.wait(30)
        started = time.monotonic()
        with caplog.at_level(logging.ERROR, logger="worker.recorder"):
            recorder.stop(1)
        assert time.monotonic() - started < 10
        assert "the store is left unclosed at the stop: a thread still holds it" in caplog.text
    finally:
        release.set()
        thread.join(60)


def test_recorder_backlog_is_bounded_in_bytes(tmp_path):
    cfg = StoreConfig(path=tmp_path / "store")
    recorder = Recorder(lambda: VectorStore(cfg, 4), EvidenceStore(tmp_path / "e", 100), cfg,
                        SpoolConfig(path=tmp_path / "spool"), 16, Liveness(0), max_records=1000,
                        max_bytes=3 * 32 * 32 * 3 + 100)
    for pid, vec, payload in _points(10):  # not started: nothing is consumed
        recorder.submit(Record(pid, vec, payload, np.zeros((32, 32, 3), np.uint8)))
    assert recorder.pending == 3 and recorder.dropped == 7
    assert recorder.flush(0) is False


# Validation ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("value", ["nan", "NaN", "inf", "-inf", "1e25", "-1e20", "1e308", "0", "9999-12-31T23:59:59", "5e9", "5e12",
                                   "", "now", "2026-13-01T00:00:00"])
def test_timestamps_must_be_finite_and_in_range(value):
    with pytest.raises(ValueError):
        parse_timestamp(value)


@pytest.mark.parametrize("value", ["1795996800", "1795996800000", "1795996800000000", "1795996800000000000",
                                   "1795996800.25", 1795996800000, 1.7959968e12, "2026-11-30T00:00:00Z",
                                   "2026-11-30t00:00:00z", "2026-11-30T01:00:00+01:00"])
def test_epoch_numbers_in_seconds_milliseconds_microseconds_or_nanoseconds_are_told_apart_by_size(value):
    """Between 2000 and 2100 an epoch number in each unit lies in a range no other unit reaches, so a camera gateway
    that sends JavaScript's Date.now() (milliseconds) or a nanosecond clock gets its frame's time, not an error."""
    assert parse_timestamp(value) == pytest.approx(1795996800.0, abs=0.3)


def test_frame_metadata_and_control_models():
    meta = FrameMetadata.model_validate({"frame_id": "a", "captured_at": "2026-11-30T00:00:00Z", "other": "x"})
    assert meta.captured_ts == 1795996800.0
    for bad in ({"frame_id": "a/b", "captured_at": "1800000000"}, {"frame_id": "a", "captured_at": "nan"}):
        with pytest.raises(ValueError):
            FrameMetadata.model_validate(bad)
    with pytest.raises(RequestError) as err:
        validate(ControlRequest, {"command": "reload", "bundle": 5})
    assert err.value.code is ErrorCode.BAD_REQUEST and "bundle" in err.value.message
    with pytest.raises(RequestError):
        decode_json(b'{"a":' * 20 + b"1" + b"}" * 20)
    for not_json in (b'{"top_k": NaN}', b'{"top_k": Infinity}', b'{"top_k": -Infinity}', b'{"x": 1e999}',
                     b'{"x": ' + b"1" * 5000 + b"}"):  # Python's parser takes them; no strict writer writes them back
        with pytest.raises(RequestError, match="not JSON"):
            decode_json(not_json)


def test_readme_lists_every_error_code():
    from conftest import ROOT

    readme = (ROOT / "README.md").read_text()
    assert [c.value for c in ErrorCode if f"`{c.value}`" not in readme] == []


# Configuration from the environment ------------------------------------------------------------------------

@pytest.mark.parametrize("password", ["123456", "*secret", "&anchor", "[1, 2]", "null", "yes", "0x1F"])
def test_environment_passwords_are_taken_verbatim(tmp_path, password):
    path = tmp_path / "c.yaml"
    path.write_text("model: {bundle: b}\n")
    cfg = load_config(path, environ={"EDGE_INSPECT__MQTT__PASSWORD": password, "EDGE_INSPECT__MQTT__USERNAME": "007",
                                     "EDGE_INSPECT__MQTT__PORT": "8883",
                                     "EDGE_INSPECT__TOPICS__CAMERAS": "[a, b]"})
    assert cfg.mqtt.secret() == password and cfg.mqtt.username == "007"
    assert cfg.mqtt.port == 8883 and cfg.topics.cameras == ["a", "b"]
    with pytest.raises(ConfigError, match="EDGE_INSPECT__MQTT__PORT"):
        load_config(path, environ={"EDGE_INSPECT__MQTT__PORT": "*x"})


def test_the_console_hub_survives_messages_it_cannot_read():
    import paho.mqtt.client as mqtt

    from worker.config import ConsoleConfig
    from worker.console.hub import HUB, Hub
    from worker.topics import Topics

    hub = Hub(Topics("inspect", "w"), ConsoleConfig())

    def msg(topic: str, payload: bytes) -> mqtt.MQTTMessage:
        m = mqtt.MQTTMessage(topic=topic.encode())
        m.payload = payload
        return m

    for bad in (b"{", b"[1]", b"\xff", b'{"frame_id": 5}'):
        hub.on_message(msg("inspect/cam/result", bad))
        hub.on_message(msg("inspect/cam/error", bad))
    state = hub.snapshot()  # each dropped whole and counted: none is a failure of the hub's loop
    assert state["dropped"] == {"bad_result": 4, "bad_error": 4} and state["threads"][HUB]["restarts"] == 0, state
    good = {"frame_id": "f1", "camera": "cam", "captured_at": "2026-11-30T00:00:00+00:00", "score": 0.1,
            "verdict": "normal", "threshold": 1.0, "model": {"version": "v"}}
    hub.on_message(msg("inspect/cam/result", json.dumps(good).encode()))
    assert "cam" in hub.snapshot()["cameras"]
    # a stats message with no counts (null is allowed) made every later one fail: the worker's state stayed frozen
    stats = "inspect/workers/w1/stats"
    hub.on_message(msg(stats, json.dumps({"cameras": None}).encode()))
    for at, processed in (("2026-11-30T00:00:00+00:00", 10), ("2026-11-30T00:00:10+00:00", 30)):
        hub.on_message(msg(stats, json.dumps({"at": at, "cameras": {"cam": {"processed": processed}}}).encode()))
    state = hub.snapshot()
    assert state["threads"][HUB]["restarts"] == 0 and state["workers"]["w1"]["rates"] == {"cam": 2.0}, state


def test_the_console_hub_keeps_the_most_recently_active_cameras_only():
    """Where any topic level is a camera, invented camera ids must not grow the console's memory: its tiles, score
    series and error counts keep the ``console.max_cameras`` most recently active cameras."""
    import paho.mqtt.client as mqtt

    from worker.config import ConsoleConfig
    from worker.console.hub import Hub
    from worker.topics import Topics

    hub = Hub(Topics("inspect", "w"), ConsoleConfig(max_cameras=3))

    def send(camera: str, kind: str, body: dict) -> None:
        m = mqtt.MQTTMessage(topic=f"inspect/{camera}/{kind}".encode())
        m.payload = json.dumps(body).encode()
        hub.on_message(m)

    def result(camera: str, n: int) -> None:
        send(camera, "result", {"frame_id": f"f{n}", "camera": camera, "captured_at": "2026-11-30T00:00:00+00:00",
                                "score": 0.1, "verdict": "normal", "threshold": 1.0, "model": {"version": "v"}})

    for n, camera in enumerate(["a", "b", "c", "a", "d"]):  # a is active again before d arrives: b goes
        result(camera, n)
        send(camera, "error", {"code": "not_an_image", "message": "x"})
    state = hub.snapshot()
    assert sorted(state["cameras"]) == ["a", "c", "d"] and sorted(state["errors"]) == ["a", "c", "d"]
    assert state["errors"]["a"]["count"] == 2
    assert sorted(hub.score_series()) == ["a", "c", "d"]


def test_a_new_frame_under_a_reused_id_is_a_new_result_on_the_console_not_the_earlier_one_again():
    """A camera whose counter restarted sends an id again: the hub took the new result for a repeat of the earlier
    frame, gave it that frame's label, kept the earlier place in the feed and no new point (a helper's probe).  A
    result is the same frame again only with the same capture time."""
    import paho.mqtt.client as mqtt

    from worker.config import ConsoleConfig
    from worker.console.hub import Hub
    from worker.topics import Topics

    hub = Hub(Topics("inspect", "w"), ConsoleConfig())
    events: list[tuple[str, dict]] = []
    hub.subscribe(lambda event, data: events.append((event, data)))

    def result(frame_id: str, captured_at: str, score: float) -> dict:
        m = mqtt.MQTTMessage(topic=b"inspect/cam/result")
        m.payload = json.dumps({"frame_id": frame_id, "camera": "cam", "captured_at": captured_at, "score": score,
                                "verdict": "anomalous", "threshold": 0.5, "model": {"version": "v"}}).encode()
        hub.on_message(m)
        return [data for event, data in events if event == "frame"][-1]

    first = result("part-7", "2026-12-06T08:00:00+00:00", 0.9)
    hub.set_label("cam", "part-7", "false_alarm", None)
    result("part-8", "2026-12-06T08:00:01+00:00", 0.8)
    again = result("part-7", "2026-12-06T08:00:00+00:00", 0.9)  # the same frame again (a redelivery)
    assert not again["first"] and again["label"] == "false_alarm" and again["seen_at"] == first["seen_at"]
    reused = result("part-7", "2026-12-06T09:30:00+00:00", 0.95)  # a new frame under the id
    assert reused["first"] and reused.get("label") is None and reused["score"] == 0.95
    feed = hub.defect_feed(None, None, None, 10)
    assert [(r["frame_id"], r["score"]) for r in feed] == [("part-7", 0.95), ("part-8", 0.8)], feed


def test_a_quiet_cameras_tile_keeps_its_heatmap_after_busier_cameras_fill_the_recent_frames():
    """The page's state said a quiet camera's tile had a heatmap, but the image was answered 404 once busier cameras
    had pushed its result out of the recent frames (a helper's probe): a page loaded then showed a blank tile."""
    import cv2

    from worker.config import ConsoleConfig
    from worker.console.hub import Hub
    from worker.topics import Topics

    hub = Hub(Topics("inspect", "w"), ConsoleConfig(recent_frames=8))
    heatmap = cv2.imencode(".jpg", np.zeros((8, 8, 3), np.uint8))[1].tobytes()
    send = _hub_sender(hub)

    def result(camera: str, frame_id: str) -> None:
        send(camera, "heatmap", heatmap, frame_id)
        send(camera, "result", json.dumps({"frame_id": frame_id, "camera": camera, "score": 0.1, "verdict": "normal",
                                           "captured_at": "2026-12-06T00:00:00+00:00"}).encode())

    result("quiet", "q1")
    for i in range(20):
        result("busy", f"b{i}")
    tile = hub.snapshot()["cameras"]["quiet"]
    assert tile["frame_id"] == "q1" and tile["has_heatmap"]
    assert hub.image("quiet", "q1", "heatmap") == heatmap


def _hub_sender(hub):
    """``send(camera, leaf, payload, frame_id=None)``: a message on the hub's MQTT thread, as paho hands it over."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    def send(camera: str, leaf: str, payload: bytes, frame_id: str | None = None) -> None:
        m = mqtt.MQTTMessage(topic=f"inspect/{camera}/{leaf}".encode())
        m.payload = payload
        if frame_id is not None:
            m.properties = Properties(PacketTypes.PUBLISH)
            m.properties.UserProperty = [("frame_id", frame_id)]
        hub.on_message(m)
    return send


def test_a_quiet_cameras_tile_keeps_its_frame_after_busier_cameras_fill_the_recent_frames():
    """A quiet camera's frame was forgotten once busier cameras pushed its result out of the recent frames, though
    the tile still showed that result: a page loaded then (or the heatmap slider moved) had no frame to show. A
    tile's frame is kept (and counted in console.recent_max_bytes); a tile the camera moved past is not."""
    import cv2

    from worker.config import ConsoleConfig
    from worker.console.hub import Hub
    from worker.topics import Topics

    frames = [cv2.imencode(".png", np.full((8, 8, 3), k, np.uint8))[1].tobytes() for k in range(3)]
    hub = Hub(Topics("inspect", "w"), ConsoleConfig(recent_frames=8, recent_max_bytes=sum(map(len, frames)) * 8))
    send = _hub_sender(hub)

    def result(camera: str, frame_id: str, frame: bytes) -> None:
        send(camera, "frame", frame, frame_id)
        send(camera, "result", json.dumps({"frame_id": frame_id, "camera": camera, "score": 0.1, "verdict": "normal",
                                           "captured_at": "2026-12-06T00:00:00+00:00"}).encode())

    result("quiet", "q0", frames[0])
    result("quiet", "q1", frames[1])
    for i in range(20):
        result("busy", f"b{i}", frames[2])
    tile = hub.snapshot()["cameras"]["quiet"]
    assert tile["frame_id"] == "q1" and tile["has_frame"], tile
    assert hub.image("quiet", "q1", "frame") == frames[1]
    assert hub.image("quiet", "q0", "frame") is None  # not the tile: gone with the recent frames
    assert hub.image("busy", "b0", "frame") is None and hub.image("busy", "b19", "frame") == frames[2]


def test_a_result_past_its_bound_is_dropped_and_only_the_fields_the_console_reads_are_kept():
    """A result was kept whole, any size and with any fields, in the recent frames and the defect feed: anyone who
    may publish under the prefix grew the console's memory and every /api/state and /api/defects answer with it."""
    from worker.config import ConsoleConfig
    from worker.console.hub import Hub
    from worker.topics import Topics

    hub = Hub(Topics("inspect", "w"), ConsoleConfig())
    send = _hub_sender(hub)
    good = {"frame_id": "f1", "camera": "cam", "captured_at": "2026-12-06T00:00:00+00:00", "score": 0.9,
            "verdict": "anomalous", "threshold": 0.5, "unlike_training": "grey frames",
            "model": {"name": "m", "version": "v", "precision": "f16", "blob": "x" * 1000}, "junk": ["y" * 1000] * 8}
    send("cam", "result", json.dumps({**good, "junk": "z" * 1_000_000}).encode())
    assert hub.snapshot()["dropped"] == {"bad_result": 1} and hub.snapshot()["cameras"] == {}
    send("cam", "result", json.dumps(good).encode())
    tile = hub.snapshot()["cameras"]["cam"]
    assert "junk" not in tile and tile["model"] == {"name": "m", "version": "v", "precision": "f16"}, tile
    assert tile["unlike_training"] == "grey frames" and tile["score"] == 0.9
    [listed] = hub.defect_feed(None, None, None, 10)
    assert "junk" not in listed and listed["model"] == {"name": "m", "version": "v", "precision": "f16"}


def test_no_frame_rate_is_said_across_a_worker_restart():
    """A worker restarted between two stats messages counts from zero again: the console said a negative frames/s
    (the new count less the old one over the time between)."""
    from worker.config import ConsoleConfig
    from worker.console.hub import Hub
    from worker.topics import Topics

    hub = Hub(Topics("inspect", "w"), ConsoleConfig())
    send = _hub_sender(hub)

    def stats(at: str, uptime: float, counts: dict[str, int]) -> dict:
        send("workers/w1", "stats", json.dumps({"at": at, "uptime_s": uptime, "cameras": {
            cam: {"processed": n} for cam, n in counts.items()}}).encode())
        return hub.snapshot()["workers"]["w1"]["rates"]

    stats("2026-12-06T00:00:00+00:00", 100.0, {"a": 500, "b": 500})
    assert stats("2026-12-06T00:00:10+00:00", 110.0, {"a": 600, "b": 520}) == {"a": 10.0, "b": 2.0}
    assert stats("2026-12-06T00:00:20+00:00", 5.0, {"a": 40, "b": 30}) == {}  # restarted: its uptime went down
    assert stats("2026-12-06T00:00:30+00:00", 15.0, {"a": 140, "b": 50}) == {"a": 10.0, "b": 2.0}
    assert stats("2026-12-06T00:00:40+00:00", 25.0, {"a": 240, "b": 10}) == {"a": 10.0}  # b's count went down


def test_the_console_hub_keeps_a_cameras_scores_in_buckets_whatever_its_frame_rate():
    """Every result's score was kept for the whole plot window (series_minutes) and summed into buckets under the
    hub's lock at each /api/state: a camera at 30 frames/s held 108,000 points an hour, and each page load held
    up the console's MQTT thread while it read them. Now at most SERIES_BUCKETS + 1 buckets per camera."""
    import paho.mqtt.client as mqtt

    from worker.config import ConsoleConfig
    from worker.console.hub import SERIES_BUCKETS, Hub
    from worker.topics import Topics

    hub = Hub(Topics("inspect", "w"), ConsoleConfig(series_minutes=0.002))  # a 0.12 s window: buckets of 1/3 ms
    scores = [0.1 * (k % 9) for k in range(9)]
    started, k = time.time(), 0
    while time.time() - started < 0.36:  # results for three windows' time: the oldest buckets must be pruned
        m = mqtt.MQTTMessage(topic=b"inspect/cam/result")
        m.payload = json.dumps({"camera": "cam", "frame_id": f"f{k}", "score": scores[k % 9], "verdict": "normal",
                                "captured_at": "2026-12-06T00:00:00+00:00"}).encode()
        hub.on_message(m)
        k += 1
    buckets = hub.score_series()["cam"]
    assert 0 < len(buckets) <= SERIES_BUCKETS + 1 and len(hub.series["cam"]) == len(buckets) < k  # what is kept
    starts = [start for start, _ in buckets]
    assert starts == sorted(set(starts)) and starts[0] > started + 0.12  # the first window's buckets went
    assert {score for _, score in buckets} <= set(scores)


def test_a_request_names_its_reply_topic_for_clients_without_mqtt_v5():
    """``reply_to`` is taken out of the body (the request's own schema stays strict) and checked as a topic."""
    from worker.wire import RequestError, split_reply_to

    body, topic = split_reply_to(json.dumps({"action": "extensions", "reply_to": "plc/7/answers"}).encode())
    assert json.loads(body) == {"action": "extensions"} and topic == "plc/7/answers"
    for payload in (b'{"action": "extensions"}', b"not json reply_to", b'["reply_to"]', b"[" * 50 + b'"reply_to"'):
        assert split_reply_to(payload) == (payload, None)  # left to the request's own checks
    for bad in ("a/#", "a/+/b", "$SYS/x", "", 7, None, "a\0b", "x" * 70000, "a/\ud800"):
        with pytest.raises(RequestError, match="reply_to must be a topic to publish to"):
            split_reply_to(json.dumps({"action": "extensions", "reply_to": bad}).encode())



def test_a_request_refused_before_parsing_is_still_answered_where_its_body_asks():
    """A 3.1.1 client's request over the size limit, nested too deep or not JSON was logged "without a response
    topic" though its body named one (a helper's probe with mqtt.js): the topic is read by a scan of the bytes, so
    the refusal is answered there; a scanned topic that is no topic to publish to is not taken."""
    from worker.wire import MAX_REQUEST_BYTES, RequestError, decode_json, split_reply_to

    big = json.dumps({"reply_to": "plc/7/answers", "image_b64": "A" * MAX_REQUEST_BYTES}).encode()
    deep = b'{"reply_to": "plc/7/answers", "a": ' + b"[" * 9 + b"]" * 9 + b"}"
    broken = b'{"reply_to": "plc/\\u00e9", "top_k": }'
    for payload, topic in ((big, "plc/7/answers"), (deep, "plc/7/answers"), (broken, "plc/\u00e9"),
                           (b'{"reply_to": "plc/#", "top_k": }', None), (b'{"reply_to": 7, }', None)):
        assert split_reply_to(payload) == (payload, topic)
        with pytest.raises(RequestError):
            decode_json(payload)  # the request's own check then refuses it, and the answer goes to ``topic``
    for empty in (b"", b" \r\n"):  # mosquitto_rr 2.0's -f and -s send nothing
        with pytest.raises(RequestError, match=r"request is empty \(\d bytes\): send one JSON object"):
            decode_json(empty)


_SIGNAL_IN_LOCKED_WAIT = """
import signal, threading
from worker.supervise import StopSignals
stop = threading.Event()
{install}
with stop._cond:  # where the main thread is inside its own stop.wait() when a signal's handler runs
    signal.raise_signal(signal.SIGTERM)
print("noted")
"""


def test_a_stop_signal_that_lands_inside_the_main_threads_wait_is_noted_not_deadlocked():
    """The worker's main loop waited on its stop Event, and SIGTERM's handler set that Event: Python runs a handler in
    the main thread between two bytecodes, so one landing while the main thread held the Event's lock (inside its
    wait) waited for that lock forever, and the worker never stopped (a test run saw a worker ignore SIGTERM for 60 s).
    The handler only notes the signal now (StopSignals); the main loop sets the Event.  The first run shows the hazard
    with the earlier handler; the second, that StopSignals' handler returns."""
    import signal
    import subprocess
    import sys

    from conftest import ROOT

    earlier = _SIGNAL_IN_LOCKED_WAIT.format(install="signal.signal(signal.SIGTERM, lambda *_: stop.set())")
    with pytest.raises(subprocess.TimeoutExpired):
        subprocess.run([sys.executable, "-c", earlier], capture_output=True, timeout=5, cwd=ROOT)
    now = _SIGNAL_IN_LOCKED_WAIT.format(install="signals = StopSignals().install()") + "print(signals.received)\n"
    done = subprocess.run([sys.executable, "-c", now], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert done.returncode == 0 and done.stdout.split() == ["noted", str(int(signal.SIGTERM))], done


@pytest.mark.parametrize("stop_signal", ["SIGTERM", "SIGINT", "SIGHUP"])
def test_a_stop_signal_during_the_start_stops_it_cleanly_before_serving(stop_signal, broker, bundle_dir, tmp_path):
    """The stop signals' handler was installed only once the worker was built (OpenVINO imported, the bundle compiled,
    the folders claimed): SIGTERM then ended the start at once without a word (-15), SIGHUP likewise (-1), SIGINT with
    a KeyboardInterrupt traceback from an import, exit 130, or an abort (-6) with the compile thread still running.
    The signal is sent at the worker's first log line, before the imports and the compile."""
    import signal

    from conftest import WorkerProcess, write_config

    config = write_config(tmp_path / "w", broker.port, bundle_dir)
    worker = WorkerProcess(config, tmp_path / "worker.log")
    try:
        deadline = time.monotonic() + 60
        while not worker.output().strip() and worker.proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)  # poll interval for the first log line, with a deadline
        code = worker.stop(getattr(signal, stop_signal))
    finally:
        if worker.proc.poll() is None:
            worker.proc.kill()
    out = worker.output()
    assert code == 0, out[-3000:]
    assert f"INFO worker: stopped by {stop_signal} during the start, before serving" in out, out[-3000:]
    assert "connected to" not in out and "Traceback" not in out, out[-3000:]
