"""Reliability promises, each against the real components (mosquitto, OpenVINO, embedded Qdrant).

See docs/reliability.md for the promises, their limits and the figures these tests produce.
"""

from __future__ import annotations

import base64
import contextlib
import json
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import openvino as ov
import openvino.opset13 as ops
import paho.mqtt.client as mqtt
import psutil
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from benchmarks.fuzz import fitted
from bundle import write_manifest
from conftest import ROOT, Client, fill_disk, good_png, start_on_embedded_store, user_props, wait_online, write_config
from scripts.broker import Broker, broker_readable_dir, free_port
from worker.api_client import ApiClient
from worker.config import StoreConfig, load_config
from worker.store import StoreError, VectorStore
from worker.wire import PIXEL_FORMATS

ERROR_CODES = {"empty_payload", "payload_too_large", "not_an_image", "unsupported_format", "bad_dimensions",
               "image_too_large", "truncated_image", "corrupt_image", "missing_metadata", "bad_metadata",
               "unknown_camera", "camera_mismatch"}


def _good_png(dataset: Path) -> bytes:
    return good_png(dataset).read_bytes()


def _png_header(width: int, height: int, depth: int = 8, colour: int = 0) -> bytes:
    """A PNG signature + IHDR (correct CRC) + an empty IEND: a header that claims any size."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def _outcomes(client: Client, prefix: str, camera: str) -> dict[str, list[str]]:
    """frame_id -> list of outcomes ('result' or an error code) seen so far."""
    out: dict[str, list[str]] = {}
    with client.lock:
        for m in client.messages:
            if m.topic == f"{prefix}/{camera}/result":
                out.setdefault(json.loads(m.payload)["frame_id"], []).append("result")
            elif m.topic == f"{prefix}/{camera}/error":
                e = json.loads(m.payload)
                out.setdefault(e["frame_id"], []).append(e["code"])
    return out


# 1. Bad input never crashes the worker -----------------------------------------------------------

# MQTT strings may not contain U+0000 or surrogates (the broker closes the connection): valid UTF-8 only.
# mosquitto also refuses control characters and non-characters in them.
_TEXT = st.characters(blacklist_categories=("Cs", "Cc", "Cn"))


def _mutations(base: bytes):
    """Corrupted and truncated variants of a valid image."""
    return st.one_of(
        st.integers(0, len(base) - 1).map(lambda n: base[:n]),
        st.lists(st.tuples(st.integers(0, len(base) - 1), st.integers(0, 255)), min_size=1, max_size=20).map(
            lambda flips: bytes(b if i not in dict(flips) else dict(flips)[i] for i, b in enumerate(base))),
        st.binary(max_size=64).map(lambda tail: base + tail),
    )


def _payloads(dataset: Path):
    png = _good_png(dataset)
    image = cv2.imread(str(good_png(dataset)))
    jpeg = cv2.imencode(".jpg", image)[1].tobytes()
    tiff = cv2.imencode(".tiff", image)[1].tobytes()
    variants = [
        cv2.imencode(".png", image.astype(np.uint16) * 257)[1].tobytes(),  # 16-bit
        cv2.imencode(".png", cv2.cvtColor(image, cv2.COLOR_BGR2BGRA))[1].tobytes(),  # RGBA
        cv2.imencode(".jpg", cv2.cvtColor(image, cv2.COLOR_BGR2GRAY))[1].tobytes(),  # grey JPEG
        cv2.imencode(".bmp", image)[1].tobytes(),
        cv2.imencode(".png", np.zeros((1, 1, 3), np.uint8))[1].tobytes(),  # 1x1
        cv2.imencode(".png", np.zeros((5000, 5000), np.uint8))[1].tobytes(),  # decompression bomb
        cv2.imencode(".tiff", cv2.cvtColor(image, cv2.COLOR_BGR2GRAY).astype(np.uint16) * 257)[1].tobytes(),
        cv2.imencode(".webp", image)[1].tobytes(),
        cv2.imencode(".ppm", image)[1].tobytes(),  # a format we do not accept
    ]
    return st.one_of(
        st.binary(max_size=4096),
        _mutations(png),
        _mutations(jpeg),
        _mutations(tiff),
        st.sampled_from(variants),
        st.tuples(st.integers(0, 2**31 - 1), st.integers(0, 2**31 - 1), st.sampled_from([1, 8, 16]),
                  st.sampled_from([0, 2, 3, 4, 6])).map(lambda t: _png_header(*t)),
    )


@pytest.fixture(scope="module")
def fuzz_worker(broker, bundle_dir, tmp_path_factory):
    from conftest import WorkerProcess

    folder = tmp_path_factory.mktemp("fuzz")
    prefix = f"f{uuid.uuid4().hex[:8]}"
    config = write_config(folder, broker.port, bundle_dir, topics={"prefix": prefix, "cameras": ["fuzz", "meta"]},
                          limits={"max_frame_bytes": 200_000, "max_pixels": 4_000_000, "queue_policy": "block"},
                          store={"log_normal_every": 0})
    client = Client(broker.port, prefix)
    worker = WorkerProcess(config, folder / "worker.log")
    wait_online(client, prefix)
    yield prefix, client, worker
    client.close()
    worker.stop(signal.SIGKILL)


_sent: dict[str, int] = {"payloads": 0, "good": 0}


@settings(max_examples=30, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=st.data())
def test_fuzzed_frames_each_get_exactly_one_answer(fuzz_worker, dataset, data):
    prefix, client, worker = fuzz_worker
    payloads = data.draw(st.lists(_payloads(dataset), min_size=10, max_size=30), label="payloads")
    captured = data.draw(st.lists(st.one_of(st.just("now"), st.text(_TEXT, max_size=40)), min_size=len(payloads),
                                  max_size=len(payloads)), label="captured_at")
    # Some declare a raw pixel buffer (worker/pixels.py): any format name and sides, the payload sized to fit or not.
    sides = st.one_of(st.integers(0, 70).map(str), st.text(_TEXT, max_size=6))
    buffers = data.draw(st.lists(st.one_of(st.none(), st.tuples(st.sampled_from([*PIXEL_FORMATS, "Mono14p", ""]), sides,
                                                                  sides, st.booleans())),
                                 min_size=len(payloads), max_size=len(payloads)), label="pixel declarations")
    extras = [{} if b is None else {"pixel_format": b[0], "width": b[1], "height": b[2]} for b in buffers]
    payloads = [payload if b is None or not b[3] else fitted(payload, *b[:3]) for payload, b in zip(payloads, buffers)]
    # Metadata that cannot be correlated (bad frame ids) and an unknown camera.
    bad_ids = data.draw(st.lists(st.one_of(st.text(_TEXT, min_size=129, max_size=200), st.text(_TEXT, max_size=10).map(
        lambda t: t + "/x"), st.just("")), max_size=3), label="bad frame ids")
    # Every draw is made before the first publish, and each frame is counted as it goes out: Hypothesis may abandon
    # an example at a draw (its data exhausted), and frames already published must still be counted.
    good_id = f"good-{uuid.uuid4().hex[:10]}"
    ids = [f"z-{uuid.uuid4().hex[:10]}" for _ in payloads]
    for frame_id, payload, when, extra in zip(ids, payloads, captured, extras):
        _sent["payloads"] += 1
        client.publish_frame("fuzz", payload, frame_id, captured_at=when, extra=extra)
    for bad in bad_ids:
        client.publish_frame("meta", _good_png(dataset), bad)
    client.publish_frame("intruder", _good_png(dataset), f"i-{uuid.uuid4().hex[:8]}")
    _sent["good"] += 1
    client.publish_frame("fuzz", _good_png(dataset), good_id)

    wanted = set(ids) | {good_id}
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        outcomes = _outcomes(client, prefix, "fuzz")
        if wanted <= set(outcomes):
            break
        time.sleep(0.05)
    time.sleep(0.2)  # a second answer to the same frame would arrive right behind the first
    outcomes = _outcomes(client, prefix, "fuzz")
    for frame_id in wanted:
        assert len(outcomes.get(frame_id, [])) == 1, (frame_id, outcomes.get(frame_id))
        (outcome,) = outcomes[frame_id]
        assert outcome == "result" or outcome in ERROR_CODES, outcome
    assert outcomes[good_id] == ["result"], "a good frame among garbage must be processed"
    assert worker.proc.poll() is None, worker.output()[-3000:]


def test_fuzzing_left_the_worker_up_bounded_and_counted(fuzz_worker):
    prefix, client, worker = fuzz_worker
    assert _sent["payloads"] >= 300, "the fuzz test above must have run first"
    rss_mb = psutil.Process(worker.proc.pid).memory_info().rss / 1e6
    assert rss_mb < 1500, f"worker RSS {rss_mb:.0f} MB after fuzzing"
    errors = [m for m in client.messages if m.topic in (f"{prefix}/meta/error", f"{prefix}/intruder/error")]
    assert errors and {json.loads(m.payload)["code"] for m in errors} <= {"bad_metadata", "missing_metadata",
                                                                          "unknown_camera"}
    client.messages.clear()
    # The first stats message from here may have been computed just before the last answer was counted (and sent
    # just after it); the second was computed a stats interval later, after every answer above.
    stats = client.json_on(f"{prefix}/workers/w-test/stats", timeout=45, count=2)[-1]["cameras"]["fuzz"]
    assert stats["received"] == stats["processed"] + stats["errored"] + stats["dropped"] + stats["duplicates"]
    assert stats["received"] == _sent["payloads"] + _sent["good"]
    codes = {}
    for m in client.messages:
        if m.topic == f"{prefix}/fuzz/error":
            codes[json.loads(m.payload)["code"]] = codes.get(json.loads(m.payload)["code"], 0) + 1
    print(f"\nFIGURES fuzz: sent {_sent['payloads']} fuzzed + {_sent['good']} good; worker counters {stats}; "
          f"RSS {rss_mb:.0f} MB")


# 2. Broker restart loses nothing the protocol promised ------------------------------------------

class PersistentClient(Client):
    """A client whose session (subscriptions, queued QoS 1 messages) survives broker restarts."""

    def __init__(self, port: int, prefix: str, client_id: str) -> None:
        self.prefix = prefix
        self.messages = []
        self.lock = threading.Condition()
        self.client = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2, client_id=client_id,
                                  protocol=mqtt.MQTTv5)
        self.client.on_message = self._on_message
        self.client.reconnect_delay_set(1, 2)
        self.client.on_connect = lambda c, *_: c.subscribe(f"{prefix}/#", qos=1)
        subscribed = threading.Event()
        self.client.on_subscribe = lambda *args: subscribed.set()
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 3600
        self.client.connect("127.0.0.1", port, clean_start=False, properties=props)
        self.client.loop_start()
        assert subscribed.wait(30), "no SUBACK from the broker"


def test_broker_restart_mid_stream_loses_no_frame_and_no_result(bundle_dir, dataset, tmp_path, worker_factory):
    store_dir = broker_readable_dir()
    port = free_port()
    broker = Broker(tmp_path / "b1", port=port, persistence_dir=store_dir)
    prefix = f"r{uuid.uuid4().hex[:6]}"
    config = write_config(tmp_path, port, bundle_dir, topics={"prefix": prefix},
                          mqtt={"reconnect_min_s": 1, "reconnect_max_s": 2, "session_expiry_s": 3600})
    observer = PersistentClient(port, prefix, f"observer-{prefix}")
    camera = PersistentClient(port, prefix, f"camera-{prefix}")
    worker = worker_factory(config)
    wait_online(observer, prefix)
    frame = _good_png(dataset)
    n = 40
    ids = [f"r{i:03d}" for i in range(n)]
    try:
        for i, frame_id in enumerate(ids):
            if i == n // 2:  # mid-stream: the broker goes down (saving its state) and comes back
                broker.stop()
                time.sleep(2)
                broker = Broker(tmp_path / "b2", port=port, persistence_dir=store_dir)
            camera.publish_frame("cam", frame, frame_id, wait=False)  # paho queues QoS 1 while disconnected
            time.sleep(0.05)
        # Results are QoS 1 too: one can arrive twice across the restart, so wait for each frame's, not for n.
        topic = f"{prefix}/cam/result"
        deadline = time.monotonic() + 180
        for frame_id in ids:
            observer.wait_for(lambda m, f=frame_id: m.topic == topic and json.loads(m.payload)["frame_id"] == f,
                              timeout=max(1.0, deadline - time.monotonic()))
        results = [m for m in observer.messages if m.topic == topic]
        assert {json.loads(m.payload)["frame_id"] for m in results} == set(ids)
        assert worker.stop() == 0
        stopped = worker.output()
        final = json.loads(stopped.split("stopped: ", 1)[1].split("; ", 1)[0])["cam"]
        assert final["processed"] == n, final  # each frame processed exactly once (redeliveries deduplicated)
        assert final["received"] == n + final["duplicates"]
        print(f"\nFIGURES broker restart: sent {n}, results {len({json.loads(m.payload)['frame_id'] for m in results})}"
              f" distinct, worker counters {final}")
    finally:
        camera.close()
        observer.close()
        broker.stop()
        shutil.rmtree(store_dir, ignore_errors=True)  # outside pytest's tmp_path (see broker_readable_dir)


def test_a_worker_started_before_its_broker_says_so_then_serves_when_it_comes(bundle_dir, dataset, tmp_path,
                                                                             worker_factory):
    """paho retries a broker it cannot reach without a word: a worker started before its broker, or pointed at the
    wrong host, logged nothing and looked idle. It names the address it tries, and /metrics says it is not connected."""
    port, metrics_port, prefix = free_port(), free_port(), f"p{uuid.uuid4().hex[:6]}"
    config = write_config(tmp_path / "w", port, bundle_dir, topics={"prefix": prefix}, mqtt={"reconnect_max_s": 1},
                          metrics={"enabled": True, "port": metrics_port})
    worker = worker_factory(config)

    def connected() -> str | None:
        try:
            text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode()
        except OSError:
            return None  # not serving yet
        return next(line.split()[1] for line in text.splitlines() if line.startswith("edge_inspect_broker_connected "))

    deadline = time.monotonic() + 120
    while f"cannot reach the broker at 127.0.0.1:{port} (mqtt.host, mqtt.port)" not in worker.output() \
            or connected() is None:
        assert time.monotonic() < deadline and worker.proc.poll() is None, worker.output()[-2000:]
        time.sleep(0.1)
    assert connected() == "0.0"
    broker = Broker(tmp_path / "b", port=port)
    try:
        client = Client(port, prefix)
        wait_online(client, prefix)
        client.publish_frame("cam", _good_png(dataset), "late")
        assert client.json_on(f"{prefix}/cam/result")[0]["frame_id"] == "late"
        while connected() != "1.0":  # the main loop sets the gauge
            assert time.monotonic() < deadline, "the gauge never said connected"
            time.sleep(0.1)
        assert worker.stop() == 0
        client.close()
    finally:
        broker.stop()


def test_a_broker_that_hangs_is_said_once_as_such_and_served_again_when_it_answers(bundle_dir, dataset, tmp_path,
                                                                                    worker_factory):
    """A broker that stops answering (hung, its host frozen) ends the link by the keep-alive: paho reports that loss
    twice, and the second report was logged as a failed connection attempt with a TLS hint. The loss is said once, each
    attempt the hung broker takes but does not answer is named as that, and frames are served once it answers."""
    prefix = f"h{uuid.uuid4().hex[:6]}"
    broker = Broker(tmp_path / "b")
    config = write_config(tmp_path / "w", broker.port, bundle_dir, topics={"prefix": prefix},
                          mqtt={"keepalive_s": 5, "reconnect_max_s": 1})
    try:
        client = Client(broker.port, prefix)
        worker = worker_factory(config)
        wait_online(client, prefix)
        client.close()
        broker.proc.send_signal(signal.SIGSTOP)
        deadline = time.monotonic() + 120
        while "did not answer it within mqtt.keepalive_s (5 s): a hung or overloaded broker" not in worker.output():
            assert time.monotonic() < deadline and worker.proc.poll() is None, worker.output()[-2000:]
            time.sleep(0.1)
        broker.proc.send_signal(signal.SIGCONT)
        client = Client(broker.port, prefix)
        wait_online(client, prefix)
        client.publish_frame("cam", _good_png(dataset), "after")
        assert client.json_on(f"{prefix}/cam/result")[0]["frame_id"] == "after"
        client.close()
        assert worker.stop() == 0
        log = worker.output()
        assert log.count("disconnected from broker (Keep alive timeout)") == 1, log[-3000:]
        assert "TLS listener" not in log, log[-3000:]
    finally:
        broker.proc.send_signal(signal.SIGCONT)
        broker.stop()


def test_retained_frames_and_requests_are_not_replayed_to_the_worker(broker, bundle_dir, dataset, tmp_path,
                                                                     worker_factory):
    """A camera or a tool that publishes with the retain flag leaves its last message on the broker, which hands it to
    every new subscription: at each start and reconnect the worker would score that stale frame again and run that
    stale command again.  It subscribes without retained messages; what is published while it listens arrives."""
    prefix = f"r{uuid.uuid4().hex[:6]}"
    client = Client(broker.port, prefix)
    frame = _good_png(dataset)
    stale = Properties(PacketTypes.PUBLISH)
    stale.UserProperty = [("frame_id", "stale"), ("captured_at", str(time.time()))]
    client.client.publish(f"{prefix}/cam/frame", frame, qos=1, retain=True, properties=stale).wait_for_publish(5)
    control = f"{prefix}/workers/w-test/control"

    def status(token: bytes, retain: bool) -> None:
        props = Properties(PacketTypes.PUBLISH)
        props.ResponseTopic, props.CorrelationData = f"{prefix}/query/response/test", token
        client.client.publish(control, json.dumps({"command": "status"}), qos=1, retain=retain,
                              properties=props).wait_for_publish(5)

    status(b"stale", retain=True)
    worker = worker_factory(write_config(tmp_path, broker.port, bundle_dir, topics={"prefix": prefix}))
    try:
        wait_online(client, prefix)
        client.publish_frame("cam", frame, "live")
        status(b"live", retain=False)
        client.json_on(f"{prefix}/cam/result")
        replies = client.wait_for(lambda m: m.topic == f"{prefix}/query/response/test"
                                  and m.properties.CorrelationData == b"live")  # one request at a time, in order
        assert [m.properties.CorrelationData for m in client.messages if m.topic == replies[0].topic] == [b"live"]
        assert worker.stop() == 0
        final = json.loads(worker.output().split("stopped: ", 1)[1].split("; ", 1)[0])["cam"]
        assert final["received"] == final["processed"] == 1, final
        assert [json.loads(m.payload)["frame_id"] for m in client.messages if m.topic == f"{prefix}/cam/result"] == ["live"]
    finally:
        for topic in (f"{prefix}/cam/frame", control):  # an empty retained message clears the broker's copy
            client.client.publish(topic, b"", qos=1, retain=True).wait_for_publish(5)
        client.close()


def test_frames_the_broker_kept_while_the_worker_was_away_past_the_age_limit_are_answered_stale(
        broker, bundle_dir, dataset, tmp_path, worker_factory):
    """A worker away on its persistent session (stopped, crashed, cut off) gets every frame the broker kept for it when
    it is back, in a burst: an outage's frames were scored and their results published as if live, a defect that
    left the line long ago raised as a current one, with nothing to refuse them.  ``limits.max_frame_age_s`` answers
    those captured longer before they arrived ``stale_frame`` (counted), and scores the live ones."""
    prefix = f"a{uuid.uuid4().hex[:6]}"
    client = Client(broker.port, prefix)
    frame = _good_png(dataset)
    config = write_config(tmp_path, broker.port, bundle_dir, topics={"prefix": prefix},
                          limits={"max_frame_age_s": 5})
    try:
        first = worker_factory(config)
        wait_online(client, prefix)
        assert first.stop() == 0  # a clean stop keeps the session (mqtt.session_expiry_s): the broker queues for it
        for name in ("away1", "away2"):  # captured while it is away, a minute before the worker will get them
            client.publish_frame("cam", frame, name, captured_at=str(time.time() - 60))
        client.messages.clear()
        worker = worker_factory(config)
        errors = client.json_on(f"{prefix}/cam/error", count=2)
        assert [e["frame_id"] for e in errors] == ["away1", "away2"], errors
        assert all(e["code"] == "stale_frame" and "limits.max_frame_age_s (5 s)" in e["message"] for e in errors), errors
        client.publish_frame("cam", frame, "live")
        results = client.json_on(f"{prefix}/cam/result")
        assert [r["frame_id"] for r in results] == ["live"], results
        assert worker.stop() == 0
        final = json.loads(worker.output().split("stopped: ", 1)[1].split("; ", 1)[0])["cam"]
        assert (final["received"], final["processed"], final["errored"]) == (3, 1, 2), final
        assert "stale_frame" in worker.output()  # named in the log, not only on the error topic
    finally:
        client.close()


def test_a_camera_publishing_retained_frames_without_ids_gets_each_answered(broker, bundle_dir, dataset, tmp_path,
                                                                          worker_factory):
    """An MQTT 3.1.1 camera (no frame ids, ``metadata: optional``) that publishes with the retain flag: frames are read
    retain-as-published, so each live frame carried the flag, was taken for a replay, and a still scene's repeated
    bytes were dropped as duplicates (one result of three).  Only the broker's redelivery (DUP) is a replay."""
    prefix = f"r{uuid.uuid4().hex[:6]}"
    client = Client(broker.port, prefix)
    camera = Client(broker.port, prefix, protocol=mqtt.MQTTv311)
    frame = _good_png(dataset)
    worker = worker_factory(write_config(tmp_path, broker.port, bundle_dir,
                                         topics={"prefix": prefix, "metadata": "optional"}))
    try:
        wait_online(client, prefix)
        for sent in range(1, 4):
            camera.client.publish(f"{prefix}/cam/frame", frame, qos=1, retain=True).wait_for_publish(5)
            client.wait_for(lambda m: m.topic == f"{prefix}/cam/result", timeout=30, count=sent)
        assert worker.stop() == 0
        final = json.loads(worker.output().split("stopped: ", 1)[1].split("; ", 1)[0])["cam"]
        assert final["processed"] == 3 and final["duplicates"] == 0, final
    finally:
        client.client.publish(f"{prefix}/cam/frame", b"", qos=1, retain=True).wait_for_publish(5)
        camera.close()
        client.close()


def test_a_reply_to_with_a_character_the_broker_refuses_is_refused_not_published(broker, bundle_dir, dataset,
                                                                                 tmp_path, worker_factory):
    """A request whose ``reply_to`` held a control character or a noncharacter: the worker published its answer
    there, mosquitto closed the worker's connection as malformed, and paho sent that answer again at every reconnect:
    frames went unanswered until a restart.  Such a ``reply_to`` is refused (bad_request where a v5 response topic
    can take the answer) and the worker stays connected."""
    prefix = f"c{uuid.uuid4().hex[:6]}"
    client = Client(broker.port, prefix)
    v311 = Client(broker.port, prefix, protocol=mqtt.MQTTv311)
    worker = worker_factory(write_config(tmp_path, broker.port, bundle_dir, topics={"prefix": prefix}))
    try:
        wait_online(client, prefix)
        for topic, body, character in (("workers/w-test/control", {"command": "status"}, "\u0001"),
                                       ("query", {"frame_id": "x"}, "\uffff"),
                                       ("label", {"action": "extensions"}, "\ufdd0")):
            v311.client.publish(f"{prefix}/{topic}", json.dumps({**body, "reply_to": f"{prefix}/a/x{character}"}),
                                qos=1).wait_for_publish(5)
        props = Properties(PacketTypes.PUBLISH)
        props.ResponseTopic, props.CorrelationData = f"{prefix}/answers/v5", b"v5"
        client.client.publish(f"{prefix}/workers/w-test/control",
                              json.dumps({"command": "status", "reply_to": f"{prefix}/a/\x85"}), qos=1,
                              properties=props).wait_for_publish(5)
        answer = client.json_on(f"{prefix}/answers/v5", timeout=30)[0]
        assert answer["error"]["code"] == "bad_request" and "reply_to" in answer["error"]["message"], answer
        client.publish_frame("cam", _good_png(dataset), "after")
        assert client.json_on(f"{prefix}/cam/result", timeout=30)[0]["frame_id"] == "after"
        assert "disconnected from broker" not in worker.output(), worker.output()[-3000:]
        assert worker.stop() == 0
        assert worker.output().count("reply_to must be a topic to publish to") == 3, worker.output()[-3000:]  # logged
    finally:
        v311.close()
        client.close()


def test_a_second_worker_on_the_same_folders_is_refused_and_a_killed_one_leaves_them_free(broker, bundle_dir, tmp_path,
                                                                                           worker_factory):
    """Two workers started from one config on one box (worker.id set apart in the environment) wrote one spool, one
    evidence index, one extension and one capture sample, and the second spooled its history for ever against the
    embedded store's lock. The second now stops at once naming the folder and its holder; the claim is an OS lock,
    so a worker killed without a word leaves nothing behind that blocks the next start."""
    prefix = f"p{uuid.uuid4().hex[:6]}"
    client = Client(broker.port, prefix)
    first = write_config(tmp_path / "w", broker.port, bundle_dir, topics={"prefix": prefix})
    second = tmp_path / "second.yaml"
    second.write_text(first.read_text().replace("id: w-test", "id: w-other"))
    worker = worker_factory(first)
    wait_online(client, prefix)
    twin = worker_factory(second)
    assert twin.proc.wait(120) == 2
    assert (f"error: evidence.path: {tmp_path / 'w' / 'evidence'} is in use by worker 'w-test' (pid {worker.proc.pid} "
            in twin.output()), twin.output()[-2000:]
    worker.stop(signal.SIGKILL)
    successor = worker_factory(second)
    wait_online(client, prefix, "w-other")
    assert successor.stop() == 0, successor.output()[-2000:]
    client.close()


def test_a_second_process_under_the_same_worker_id_is_named(broker, bundle_dir, tmp_path, worker_factory):
    """Two boxes installed from one config share worker.id and so the MQTT client id: the broker hands the session
    from one to the other every second, and each log only said "disconnected".  Each process now announces itself
    in its retained ``online`` and names the other in its log and stats.  A predecessor that froze without its last
    will (the service manager started a new one) leaves its ``online`` behind: that alone is no proof of a second
    live process."""
    prefix = f"p{uuid.uuid4().hex[:6]}"
    client = Client(broker.port, prefix)
    same = {"client_id": f"twin-{uuid.uuid4().hex[:6]}"}
    configs = [write_config(tmp_path / name, broker.port, bundle_dir, topics={"prefix": prefix}, mqtt=same)
               for name in ("frozen", "second", "third")]
    own_id = write_config(tmp_path / "fourth", broker.port, bundle_dir, topics={"prefix": prefix},
                          mqtt={"client_id": f"own-{uuid.uuid4().hex[:6]}"})
    stats_topic = f"{prefix}/workers/w-test/stats"

    def stats_of(pid: int, after: int = 0, count: int = 1) -> list[dict]:
        """Stats messages of the process ``pid`` among those received after the first ``after`` messages."""
        found = client.wait_for(lambda m: m.topic == stats_topic and client.messages.index(m) >= after
                                and json.loads(m.payload)["process"]["pid"] == str(pid), count=count)
        return [json.loads(m.payload) for m in found]

    frozen = worker_factory(configs[0])
    try:
        wait_online(client, prefix)
        frozen.proc.send_signal(signal.SIGSTOP)  # hung: no last will is sent, its retained online stays
        second = worker_factory(configs[1])
        stats_of(second.proc.pid)  # connected, subscribed: the frozen one's retained online has reached it
        props = Properties(PacketTypes.PUBLISH)
        props.ResponseTopic, props.CorrelationData = f"{prefix}/query/response/test", b"barrier"
        client.client.publish(f"{prefix}/workers/w-test/control", json.dumps({"command": "status"}), qos=1,
                              properties=props).wait_for_publish(5)
        answered = client.wait_for(lambda m: m.topic == f"{prefix}/query/response/test")[0]
        later = stats_of(second.proc.pid, after=client.messages.index(answered) + 1)[0]
        assert later["other_process"] is None, later  # the retained online of a dead predecessor proves nothing
        frozen.stop(signal.SIGKILL)

        third = worker_factory(configs[2])  # a live twin: same worker.id, same client id
        def named_by(one, other) -> None:
            """Wait until ``one`` names ``other`` in its stats."""
            client.wait_for(lambda m: m.topic == stats_topic and json.loads(m.payload)["process"]["pid"] == str(one.proc.pid)
                            and (json.loads(m.payload)["other_process"] or {}).get("pid") == str(other.proc.pid))

        named_by(second, third)
        named_by(third, second)
        assert third.stop() == 0
        for log, other in ((second.output(), third), (third.output(), second)):
            assert "another worker process runs as worker.id 'w-test' on this broker: host" in log
            assert f"pid {other.proc.pid} (this one" in log
            assert "Both connect as MQTT client" in log

        fourth = worker_factory(own_id)  # the same worker.id with its own client id: both stay connected
        named_by(second, fourth)
        named_by(fourth, second)  # it found only the second's retained online at start: the second announced again
        assert second.stop() == 0 and fourth.stop() == 0
        assert "Both publish under the same worker topics" in fourth.output()
    finally:
        client.client.publish(f"{prefix}/workers/w-test/availability", b"", qos=1, retain=True).wait_for_publish(5)
        client.close()


def test_the_process_left_running_under_a_worker_id_reads_online_when_the_other_stops_or_dies(
        broker, bundle_dir, tmp_path, worker_factory):
    """Two processes under one worker.id with their own client ids: when one stopped (its ``stopped``) or died (its
    last will ``offline``), the retained availability said so for as long as the other ran.  The one left announces
    itself again, and ``stopped`` says who sent it, as ``online`` and the will do."""
    prefix = f"p{uuid.uuid4().hex[:6]}"
    client = Client(broker.port, prefix)
    topic = f"{prefix}/workers/w-test/availability"

    def config(name: str) -> Path:
        return write_config(tmp_path / name, broker.port, bundle_dir, topics={"prefix": prefix},
                            mqtt={"client_id": f"{name}-{uuid.uuid4().hex[:6]}"})

    def retained_becomes(payload: bytes, pid: int) -> None:
        """Poll the retained availability (a new subscriber each time) until it is ``payload`` from ``pid``."""
        deadline, seen = time.monotonic() + 30, None
        while True:
            reader = Client(broker.port, prefix)
            try:
                msg = reader.wait_for(lambda m: m.topic == topic and m.retain, timeout=10)[0]
            finally:
                reader.close()
            seen = (msg.payload, user_props(msg).get("pid"))
            if seen == (payload, str(pid)):
                return
            assert time.monotonic() < deadline, seen
            time.sleep(0.2)  # poll interval of this observer

    try:
        left = worker_factory(config("left"))
        wait_online(client, prefix)
        stopping = worker_factory(config("stopping"))
        client.wait_for(lambda m: m.topic == topic and m.payload == b"online"
                        and user_props(m).get("pid") == str(stopping.proc.pid))
        assert stopping.stop() == 0
        stopped = client.wait_for(lambda m: m.topic == topic and m.payload == b"stopped")[0]
        assert user_props(stopped)["pid"] == str(stopping.proc.pid)  # says who stopped
        retained_becomes(b"online", left.proc.pid)

        dying = worker_factory(config("dying"))
        client.wait_for(lambda m: m.topic == topic and m.payload == b"online"
                        and user_props(m).get("pid") == str(dying.proc.pid))
        dying.stop(signal.SIGKILL)
        client.wait_for(lambda m: m.topic == topic and m.payload == b"offline")
        retained_becomes(b"online", left.proc.pid)
        assert left.stop() == 0
    finally:
        client.client.publish(topic, b"", qos=1, retain=True).wait_for_publish(5)
        client.close()


def test_twins_on_one_client_id_without_a_persistent_session_are_named(broker, bundle_dir, tmp_path, worker_factory):
    """With ``mqtt.session_expiry_s: 0`` each takeover ends the session: neither twin ever saw the other's ``online``
    live, only its retained last will or ``online`` at its own next connect, so the stats and the console never named
    the other process while the worker went offline and online every second.  The will now carries the process's
    identity, and the broker closing the connection again and again names the process found at two connects."""
    prefix = f"p{uuid.uuid4().hex[:6]}"
    client = Client(broker.port, prefix)
    same = {"client_id": f"twin-{uuid.uuid4().hex[:6]}", "session_expiry_s": 0}
    configs = [write_config(tmp_path / name, broker.port, bundle_dir, topics={"prefix": prefix}, mqtt=same)
               for name in ("one", "two")]
    stats_topic = f"{prefix}/workers/w-test/stats"
    try:
        one = worker_factory(configs[0])
        wait_online(client, prefix)
        two = worker_factory(configs[1])
        for named, other in ((one, two), (two, one)):
            client.wait_for(lambda m, n=named, o=other: m.topic == stats_topic
                            and json.loads(m.payload)["process"]["pid"] == str(n.proc.pid)
                            and (json.loads(m.payload)["other_process"] or {}).get("pid") == str(o.proc.pid),
                            timeout=120)
        two.stop()
        one.stop()
        for log, other in ((one.output(), two), (two.output(), one)):
            assert "another worker process runs as worker.id 'w-test' on this broker: host" in log, log[-3000:]
            assert f"pid {other.proc.pid} (this one" in log and "Both connect as MQTT client" in log
    finally:
        client.client.publish(f"{prefix}/workers/w-test/availability", b"", qos=1, retain=True).wait_for_publish(5)
        client.close()


def test_a_full_disk_costs_the_history_not_the_results(broker, bundle_dir, dataset, tmp_path, small_disk, worker_factory):
    """The store, evidence, spool and capture sample share a disk that fills up while the worker runs: every frame
    still gets exactly one answer, the losses are counted, the worker stops cleanly (qdrant-edge's own flush fails
    then), and once space is freed the history is written again.  The embedded store maps its files into memory,
    where a write to a full disk kills the process, so it is not written below ``store.min_free_mb``."""
    prefix = f"d{uuid.uuid4().hex[:6]}"
    config = write_config(tmp_path / "w", broker.port, bundle_dir, topics={"prefix": prefix},
                          store={"path": str(small_disk / "qdrant"), "flush_s": 0.1},
                          evidence={"path": str(small_disk / "evidence"), "max_frames": 1000},
                          spool={"path": str(small_disk / "spool")},
                          capture={"path": str(small_disk / "capture"), "export_path": str(tmp_path / "training")})
    client = Client(broker.port, prefix)
    worker = worker_factory(config)
    frames = [f.read_bytes() for f in sorted((dataset / "weave" / "train" / "good").glob("*.png"))]  # each its own
    stats_topic = f"{prefix}/workers/w-test/stats"
    answer_topics = (f"{prefix}/cam/result", f"{prefix}/cam/error")

    def send(tag: str, n: int) -> None:
        ids = [f"{tag}{i}" for i in range(n)]
        for i, frame_id in enumerate(ids):
            client.publish_frame("cam", frames[(len(tag) * 7 + i) % len(frames)], frame_id)
        for frame_id in ids:
            client.wait_for(lambda m, f=frame_id: m.topic in answer_topics and json.loads(m.payload)["frame_id"] == f)

    def stats(predicate) -> dict:
        return json.loads(client.wait_for(lambda m: m.topic == stats_topic and predicate(json.loads(m.payload)),
                                          timeout=60)[-1].payload)

    try:
        wait_online(client, prefix)
        send("before", 5)
        written = stats(lambda s: s["store_written"] >= 5)["store_written"]
        filler = fill_disk(small_disk)
        send("full", 20)
        full = stats(lambda s: s["recorder_lost"] > 0 and s["cameras"]["cam"]["processed"] == 25)
        assert full["capture_failed_writes"] > 0 and full["store_written"] == written, full
        filler.unlink()
        send("after", 5)
        stats(lambda s: s["store_written"] > written)
        answers = [json.loads(m.payload) for m in client.messages if m.topic in answer_topics]
        assert sorted(a["frame_id"] for a in answers) == sorted(
            [f"before{i}" for i in range(5)] + [f"full{i}" for i in range(20)] + [f"after{i}" for i in range(5)])
        assert not [m for m in client.messages if m.topic == f"{prefix}/cam/error"]
        fill_disk(small_disk)  # full again for the stop: the store's flush at close fails
        assert worker.stop() == 0, worker.output()[-3000:]
    finally:
        client.close()


def test_metrics_count_the_history_a_full_disk_loses(broker, bundle_dir, dataset, tmp_path, small_disk, worker_factory):
    """On a full disk the store refuses writes and the spool cannot take the batches: the frames are answered and
    their records lost (the stats' ``recorder_lost``).  /metrics said only ``edge_inspect_store_available`` 0, whose
    help promised the frames were spooled, and ``edge_inspect_store_pending`` 0: a Prometheus reader took the history
    to be safe.  ``edge_inspect_history_lost_total`` counts them, by the stats field that does."""
    prefix, metrics_port = f"l{uuid.uuid4().hex[:6]}", free_port()
    config = write_config(tmp_path / "w", broker.port, bundle_dir, topics={"prefix": prefix},
                          store={"path": str(small_disk / "qdrant"), "flush_s": 0.1},
                          spool={"path": str(small_disk / "spool")}, metrics={"enabled": True, "port": metrics_port})
    client = Client(broker.port, prefix)
    worker_factory(config)
    stats_topic = f"{prefix}/workers/w-test/stats"

    def lost() -> dict[str, float]:
        text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
        return {line.split('reason="')[1].split('"')[0]: float(line.split()[-1]) for line in text.splitlines()
                if line.startswith("edge_inspect_history_lost_total{")}

    try:
        wait_online(client, prefix)
        fill_disk(small_disk)
        frames = sorted((dataset / "weave" / "train" / "good").glob("*.png"))[:4]
        for i, frame in enumerate(frames):
            client.publish_frame("cam", frame.read_bytes(), f"full{i}")
        client.json_on(f"{prefix}/cam/result", count=len(frames))
        stats = json.loads(client.wait_for(lambda m: m.topic == stats_topic
                                           and json.loads(m.payload)["recorder_lost"] == len(frames),
                                           timeout=60)[-1].payload)
        assert stats["store_written"] == 0 and stats["spool_batches"] == 0, stats
        assert lost() == {"recorder_dropped": 0, "recorder_lost": len(frames), "spool_dropped_points": 0,
                          "recorder_unrecorded": 0}
    finally:
        client.close()


def _first_start_on_a_full_disk(disk: Path, store: dict[str, Any], broker, bundle_dir, dataset,
                                worker_factory) -> tuple[dict[str, Any], str]:
    """A worker's first start with every folder on ``disk``, filled first: its result for one frame (it must come
    online and answer) and its log."""
    prefix = f"f{uuid.uuid4().hex[:6]}"
    config = write_config(disk / "w", broker.port, bundle_dir, topics={"prefix": prefix},
                          store={"path": str(disk / "w" / "qdrant"), **store},
                          mqtt={"session_file": str(disk / "w" / "mqtt-session.json")})
    fill_disk(disk)
    client = Client(broker.port, prefix)
    worker = worker_factory(config)
    try:
        online = f"{prefix}/workers/w-test/availability"
        deadline = time.monotonic() + 120
        while not [m for m in client.messages if m.topic == online and m.payload == b"online"]:
            assert worker.proc.poll() is None, f"exit {worker.proc.returncode}: {worker.output()[-3000:]}"
            assert time.monotonic() < deadline, worker.output()[-3000:]
            time.sleep(0.1)  # poll interval: the process's exit or its announcement, with a deadline
        client.publish_frame("cam", good_png(dataset).read_bytes(), "on-a-full-disk")
        [result] = client.json_on(f"{prefix}/cam/result")
        assert worker.stop() == 0, worker.output()[-3000:]
    finally:
        client.close()
    return result, worker.output()


@pytest.mark.parametrize("floor", [64, 0])
def test_a_first_start_on_a_full_disk_claims_its_folders_and_serves(floor, broker, bundle_dir, dataset, tmp_path,
                                                                    small_disk, worker_factory):
    """A first start on a full disk ended in a traceback (exit 1): the claim's owner line, written into each new
    folder's lock file, was not guarded. The lock is the claim; its owner line is said as not written.  With
    ``store.min_free_mb: 0`` the worker was killed by SIGBUS opening the embedded store (the engine writes a whole
    log segment there) before it came online; the engine's own need is now the floor's least value."""
    _, output = _first_start_on_a_full_disk(small_disk, {"min_free_mb": floor}, broker, bundle_dir, dataset,
                                            worker_factory)
    assert (f"WARNING worker.service: evidence.path: the owner line of {small_disk / 'w' / 'evidence' / '.worker.lock'} "
            "cannot be written (No space left on device); the folder is claimed all the same") in output
    assert "vector store unavailable (not starting the store's open: 0 MB free on the disk of" in output


def test_a_first_start_on_a_full_ext4_disk_without_its_folders_serves(broker, bundle_dir, dataset, small_ext4_disk,
                                                                     worker_factory):
    """A first start on a full ext4 disk, none of the worker's folders made yet, stopped with exit 2 naming
    ``model.cache_dir: ... (No space left on device)``: ext4 needs a block for a new folder, where tmpfs needs none.
    A full disk must not stop inspection: what cannot be made is said in the log, and the worker comes online and
    answers frames, as on a full tmpfs."""
    result, output = _first_start_on_a_full_disk(small_ext4_disk, {}, broker, bundle_dir, dataset, worker_factory)
    assert result["frame_id"] == "on-a-full-disk" and result["verdict"] in {"normal", "anomalous"}, result
    assert "model.cache_dir" in output and "No space left on device" in output


# 3. Overload is handled by policy -------------------------------------------------------------

@pytest.mark.parametrize("policy", ["drop_oldest", "drop_newest", "block"])
def test_flood_is_handled_by_the_queue_policy(policy, broker, bundle_dir, dataset, tmp_path, worker_factory):
    prefix = f"o{uuid.uuid4().hex[:6]}"
    config = write_config(tmp_path, broker.port, bundle_dir, topics={"prefix": prefix},
                          limits={"queue_size": 4, "queue_policy": policy, "inference_threads": 1},
                          store={"log_normal_every": 0})
    client = Client(broker.port, prefix)
    worker = worker_factory(config)
    wait_online(client, prefix)
    frame = _good_png(dataset)
    n = 150
    for i in range(n):  # as fast as the broker takes them: far above the sustainable rate
        props = Properties(PacketTypes.PUBLISH)
        props.UserProperty = [("frame_id", f"o{i:04d}"), ("captured_at", str(time.time()))]
        client.client.publish(f"{prefix}/cam/frame", frame, qos=1, properties=props)
    outcomes = {}
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and len(outcomes) < n:
        outcomes = _outcomes(client, prefix, "cam")
        time.sleep(0.1)
    assert len(outcomes) == n and all(len(v) == 1 for v in outcomes.values())
    results = [json.loads(m.payload) for m in client.messages if m.topic == f"{prefix}/cam/result"]
    dropped = [k for k, v in outcomes.items() if v == ["dropped"]]
    assert len(results) + len(dropped) == n
    client.messages.clear()
    # the first stats message from here may have been computed just before the last answer was counted (and sent
    # just after it); the second was computed a stats interval later, after every answer above
    stats = client.json_on(f"{prefix}/workers/w-test/stats", timeout=30, count=2)[-1]["cameras"]["cam"]
    assert stats["dropped"] == len(dropped) == n - len(results)
    rss_mb = psutil.Process(worker.proc.pid).memory_info().rss / 1e6
    assert rss_mb < 1500
    print(f"\nFIGURES flood {policy}: sent {n}, results {len(results)}, dropped {len(dropped)}, "
          f"max queue wait {max(r['latency_ms']['queue'] for r in results):.0f} ms, RSS {rss_mb:.0f} MB")
    if policy == "block":
        assert not dropped
    else:
        assert dropped, "a flood far above the sustainable rate must drop by policy"
        infer = np.median([r["latency_ms"]["infer"] + r["latency_ms"]["decode"] for r in results])
        worst_queue = max(r["latency_ms"]["queue"] for r in results)
        # Bounded by the queue: never more than queue_size frames ahead of any processed frame.
        assert worst_queue < 6 * 4 * infer + 2000, (worst_queue, infer)
        if policy == "drop_oldest":
            assert f"o{n - 1:04d}" in {r["frame_id"] for r in results}, "the newest frame is kept"
        else:
            assert "o0000" in {r["frame_id"] for r in results}, "the first frame is kept"
    assert worker.stop() == 0


def _burst(client: Client, prefix: str, frame: bytes, n: int, tag: str) -> None:
    """``n`` frames on camera ``cam`` as fast as the broker takes them (QoS 1)."""
    for i in range(n):
        props = Properties(PacketTypes.PUBLISH)
        props.UserProperty = [("frame_id", f"{tag}{i:04d}"), ("captured_at", str(time.time()))]
        client.client.publish(f"{prefix}/cam/frame", frame, qos=1, properties=props)


def _worker_traffic(log: str, client_id: str) -> tuple[int, int]:
    """From a mosquitto log (log_type all): the most frames the broker had sent the worker and the worker had not
    acknowledged, and the most frames the worker had acknowledged beyond the answers (results, errors) it had
    published, each at any point of the log."""
    sent = acked = answered = 0
    window = ahead = 0
    for line in log.splitlines():
        if f"Sending PUBLISH to {client_id} " in line and "/frame'" in line:
            sent += 1
        elif f"Received PUBACK from {client_id} " in line:
            acked += 1
        elif f"Received PUBLISH from {client_id} " in line and ("/result'" in line or "/error'" in line):
            answered += 1
        window, ahead = max(window, sent - acked), max(ahead, acked - answered)
    return window, ahead


def _under_block(port: int, bundle_dir: Path, tmp_path: Path, worker_factory, tag: str, queue_size: int):
    """A worker online under ``queue_policy: block`` (one inference thread, a persistent session of its own client id,
    normal frames not logged): (prefix, config, client, worker)."""
    prefix = f"{tag}{uuid.uuid4().hex[:6]}"
    config = write_config(tmp_path, port, bundle_dir, topics={"prefix": prefix},
                          mqtt={"client_id": f"w-{prefix}"}, store={"log_normal_every": 0},
                          limits={"queue_size": queue_size, "queue_policy": "block", "inference_threads": 1})
    client = Client(port, prefix)
    worker = worker_factory(config)
    wait_online(client, prefix)
    return prefix, config, client, worker


def test_block_leaves_the_surge_with_the_broker_and_acknowledges_only_answered_frames(bundle_dir, dataset, tmp_path,
                                                                                       worker_factory):
    """``block`` waited for room in the queue on paho's network thread, which also reads the broker's PUBACKs of the
    worker's results: results piled up inside the worker while it went on acknowledging frames (a probe: 401 taken,
    20 answers out), so a surge moved from the broker into the worker's memory.  Now the worker asks the broker for at
    most queue + threads unanswered frames (MQTT v5 Receive Maximum) and acknowledges each once the broker has its
    answer (a broker that sends past the window, as mosquitto 2.0.11 does, is no longer read from until there is
    room)."""
    broker = Broker(tmp_path / "broker", extra="log_type all\n")
    try:
        prefix, config, client, worker = _under_block(broker.port, bundle_dir, tmp_path, worker_factory, "b", 4)
        n = 300
        _burst(client, prefix, _good_png(dataset), n, "b")
        outcomes: dict[str, list[str]] = {}
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and len(outcomes) < n:
            outcomes = _outcomes(client, prefix, "cam")
            time.sleep(0.1)  # poll interval, with a deadline
        assert outcomes == {f"b{i:04d}": ["result"] for i in range(n)}, {k: v for k, v in outcomes.items() if v != ["result"]}
        window, ahead = _worker_traffic(broker.log_path.read_text(errors="replace"), f"w-{prefix}")
        print(f"\nFIGURES block burst: {n} answered; at most {window} frames unacknowledged at the broker, "
              f"acknowledged beyond the answers: {ahead}")
        # mosquitto 2.0.11 sends past the Receive Maximum (eclipse/mosquitto#2301): the window is not asserted here
        assert ahead <= 0, f"the worker acknowledged {ahead} frames before the broker had their answers"
        client.messages.clear()
        stats = client.json_on(f"{prefix}/workers/w-test/stats", timeout=30)[-1]
        assert stats["receive_maximum"] == 5 and stats["cameras"]["cam"]["dropped"] == 0, stats
        assert worker.stop() == 0
        client.close()
    finally:
        broker.stop()


def test_a_worker_killed_in_a_burst_under_block_loses_no_frame(broker, bundle_dir, dataset, tmp_path,
                                                               worker_factory):
    """SIGKILL in a burst under ``block``: the frames the broker handed over and the worker had not answered (and
    not acknowledged) come to the next start in the persistent session, so every frame is answered; those answered
    but not yet acknowledged at the kill (about the Receive Maximum: mosquitto 2.0.11 sends past it) are answered
    twice.  A probe lost 223-438 of 600 this way."""
    prefix, config, client, worker = _under_block(broker.port, bundle_dir, tmp_path, worker_factory, "k", 8)
    n = 400
    _burst(client, prefix, _good_png(dataset), n, "k")
    client.wait_for(lambda m: m.topic == f"{prefix}/cam/result", count=20)
    worker.stop(signal.SIGKILL)
    # The broker reads the dead worker's connection in order and publishes its last will at the end: once the will is
    # here, so is every answer the broker took before the kill (a snapshot taken at once missed some still on the way).
    client.wait_for(lambda m: m.topic == f"{prefix}/workers/w-test/availability" and m.payload == b"offline",
                    timeout=60)
    first = set(_outcomes(client, prefix, "cam"))
    worker_factory(config)  # same client id: the broker hands over what was not acknowledged
    outcomes: dict[str, list[str]] = {}
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and len(outcomes) < n:
        outcomes = _outcomes(client, prefix, "cam")
        time.sleep(0.1)  # poll interval, with a deadline
    lost = [f"k{i:04d}" for i in range(n) if f"k{i:04d}" not in outcomes]
    twice = [k for k, v in outcomes.items() if len(v) > 1]
    print(f"\nFIGURES SIGKILL under block: sent {n}, answered before the kill {len(first)}, never answered {len(lost)}, "
          f"answered twice {len(twice)}")
    assert not lost, f"{len(lost)} frames never answered: {lost[:5]}"
    assert all(set(v) == {"result"} for v in outcomes.values())
    assert set(twice) <= first, "only an answer whose acknowledgement the kill cut off is given again"
    client.close()


# 4. Vector store outage loses no embedding -------------------------------------------------------

def _scored_while_the_store_is_down(store: dict, frames: int, broker, bundle_dir, dataset, tmp_path, worker_factory):
    """A worker on a store it cannot open (``store``: that config section), spooling and trying again every 0.5 s,
    scores ``frames`` test images of camera ``cam``: its prefix, client, process, the results, and the first stats
    that count a spooled batch."""
    prefix = f"s{uuid.uuid4().hex[:6]}"
    config = write_config(tmp_path / "a", broker.port, bundle_dir, topics={"prefix": prefix}, store=store,
                          spool={"path": str(tmp_path / "spool"), "retry_s": 0.5})
    client = Client(broker.port, prefix)
    worker = worker_factory(config)
    wait_online(client, prefix)
    for i, path in enumerate(sorted((dataset / "weave" / "test").glob("*/*.png"))[:frames]):
        client.publish_frame("cam", path.read_bytes(), f"s{i}")
    results = client.json_on(f"{prefix}/cam/result", count=frames)
    spooled = client.wait_for(lambda m: m.topic == f"{prefix}/workers/w-test/stats"
                              and json.loads(m.payload)["spool_batches"] >= 1, timeout=60)
    return prefix, client, worker, results, json.loads(spooled[-1].payload)


def test_store_outage_spools_and_replays_in_order(broker, bundle_dir, dataset, tmp_path, worker_factory):
    spool = tmp_path / "spool"
    prefix, client, worker, results, stats = _scored_while_the_store_is_down(
        {"url": f"http://127.0.0.1:{free_port()}", "path": None}, 8, broker, bundle_dir, dataset, tmp_path, worker_factory)
    assert all(r["logged"] for r in results)
    assert stats["store_available"] is False
    assert worker.stop() == 0
    assert list(spool.glob("*.json")), "embeddings must wait on disk"
    print(f"\nFIGURES store outage: {len(results)} results while the store was down, "
          f"{len(list(spool.glob('*.json')))} spooled batches")

    # The store is back (here: the embedded one, same spool): the backlog is written, in order.
    worker, store_dir = start_on_embedded_store(tmp_path, broker.port, bundle_dir, prefix, spool, client,
                                                worker_factory)
    assert not list(spool.glob("*.json"))
    assert worker.stop() == 0
    assert "replayed" in worker.output()
    dim = json.loads((bundle_dir / "bundle.json").read_text())["embedding_dim"]
    store = VectorStore(StoreConfig(path=store_dir), dim)
    try:
        assert store.count() == len(results)
        assert all(store.find(f"s{i}", "cam") is not None for i in range(len(results)))
    finally:
        store.close()


def test_a_server_store_down_is_said_by_the_worker_alone_not_by_qdrant_client_at_each_try(broker, bundle_dir, dataset,
                                                                                            tmp_path, worker_factory):
    """A worker whose Qdrant server was down printed qdrant-client's "Failed to obtain server version ... Set
    check_compatibility=False" (an argument no config key reaches: two lines without a time or a journal priority) at
    each try to open the store, every ``spool.retry_s``, beside its own line once every ten minutes: each frame's
    decode resets Python's memory of the warnings already shown.  The worker's own line says why, once."""
    *_, worker, results, stats = _scored_while_the_store_is_down(
        {"url": f"http://127.0.0.1:{free_port()}", "path": None}, 8, broker, bundle_dir, dataset, tmp_path, worker_factory)
    assert stats["store_available"] is False and len(results) == 8
    assert worker.stop() == 0
    output = worker.output()
    assert "server version" not in output and "check_compatibility" not in output, output[-3000:]
    assert output.count("vector store unavailable (cannot open the vector store") == 1, output[-3000:]


@contextmanager
def _answering(status: int) -> Iterator[int]:
    """An HTTP/1.1 server on a free loopback port that answers every request ``status``, keeping its connections (a
    reverse proxy in front of a Qdrant server that is down answers 502 Bad Gateway); its port."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Refusing(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _answer(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            body = b"<html><body><h1>502 Bad Gateway</h1></body></html>"
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_PUT = do_POST = do_DELETE = _answer

        def log_message(self, *args: Any) -> None:  # the test's output is not the place
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Refusing)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


def test_a_store_server_behind_a_proxy_that_answers_502_is_said_once_not_each_http_request(
        broker, bundle_dir, dataset, tmp_path, worker_factory):
    """httpx, qdrant-client's transport, logs every HTTP request it makes at INFO (``INFO httpx: HTTP Request: GET
    http://.../collections/frames/exists "HTTP/1.1 502 Bad Gateway"``): two lines at each try to open the store, every
    ``spool.retry_s``, and once it opens a line per write, query and retention pass, in normal operation too.  The
    worker's own line says what is wrong, once; httpx's warnings and errors still come through."""
    with _answering(502) as port:
        *_, worker, results, stats = _scored_while_the_store_is_down(
            {"url": f"http://127.0.0.1:{port}", "path": None}, 8, broker, bundle_dir, dataset, tmp_path, worker_factory)
        assert stats["store_available"] is False and len(results) == 8
        assert worker.stop() == 0
    output = worker.output()
    assert "HTTP Request:" not in output and "httpx" not in output, output[-3000:]
    assert output.count("vector store unavailable (cannot open the vector store") == 1, output[-3000:]
    assert "502 (Bad Gateway)" in output, output[-3000:]


def test_a_corrupt_embedded_store_costs_the_history_not_the_worker(broker, bundle_dir, dataset, tmp_path,
                                                                   worker_factory):
    """A power cut can leave qdrant-edge's files half written. Loading a truncated status file makes its engine
    panic: a Rust panic reaches Python as a BaseException that ``except Exception`` lets through, so it ended the
    recorder's thread. The store is now unavailable like any outage (named, spooled, tried again), and every frame
    is still scored and answered."""
    store_dir = tmp_path / "qdrant"
    dim = json.loads((bundle_dir / "bundle.json").read_text())["embedding_dim"]
    store = VectorStore(StoreConfig(path=store_dir), dim)
    store.upsert([(str(uuid.uuid4()), np.ones(dim, np.float32), {"frame_id": "old", "camera": "cam"})])
    store.close()
    status = sorted(store_dir.rglob("vector_storage/deleted/status.dat"))
    assert status, "the engine's file layout changed: pick another file that a power cut can leave empty"
    status[0].write_bytes(b"")
    with pytest.raises(StoreError, match="cannot be loaded .*panicked.*damaged"):
        VectorStore(StoreConfig(path=store_dir), dim)
    *_, worker, results, stats = _scored_while_the_store_is_down(
        {"path": str(store_dir)}, 4, broker, bundle_dir, dataset, tmp_path, worker_factory)
    assert len(results) == 4 and stats["store_available"] is False and stats["healthy"], stats
    assert "damaged" in stats["store_damaged"], stats
    assert all(t["alive"] for t in stats["threads"].values()), stats["threads"]
    assert worker.stop() == 0
    log = worker.output()
    assert "damaged" in log and str(store_dir) in log and "PanicException" not in log, log[-3000:]


# 5. The broker's maximum packet size is respected ------------------------------------------------

def test_results_respect_the_brokers_maximum_packet_size(bundle_dir, dataset, tmp_path, worker_factory):
    broker = Broker(tmp_path / "broker", extra="max_packet_size 30000\n")
    prefix = f"p{uuid.uuid4().hex[:6]}"
    config = write_config(tmp_path, broker.port, bundle_dir, topics={"prefix": prefix},
                          heatmap={"format": "png", "size": 1024})  # a ~1 MB heatmap per frame
    try:
        client = Client(broker.port, prefix)
        worker = worker_factory(config)
        wait_online(client, prefix)
        for i in range(3):
            client.publish_frame("cam", _good_png(dataset), f"p{i}")
        results = client.json_on(f"{prefix}/cam/result", count=3)
        for r in results:
            assert r["heatmap"] is None and "maximum packet size" in r["heatmap_error"]
        assert not [m for m in client.messages if m.topic.endswith("/heatmap")]
        time.sleep(1)
        connects = broker.log_path.read_text().count("as w-")
        assert connects == 1, "the worker must not be disconnected and loop reconnecting"
        assert worker.stop() == 0
        client.close()
    finally:
        broker.stop()


def test_a_frame_whose_result_is_past_the_brokers_maximum_packet_size_is_not_recorded(bundle_dir, tmp_path,
                                                                                      worker_factory):
    """A frame answered ``result_too_large`` was recorded all the same (a similar-frame query by its id found it),
    though its camera's consumers got only the error: no other frame answered with an error is recorded (README's
    error table, docs/store.md), and a camera may send it again once the broker takes the result."""
    broker = Broker(tmp_path / "broker", extra="max_packet_size 700\n")
    config = write_config(tmp_path, broker.port, bundle_dir, heatmap={"publish": "never"})
    client = Client(broker.port)
    try:
        worker = worker_factory(config)
        wait_online(client, "inspect")
        tiny = cv2.imencode(".png", np.full((8, 8, 3), 128, np.uint8))[1].tobytes()
        client.publish_frame("cam", tiny, "big")
        [error] = client.json_on("inspect/cam/error", timeout=60)
        assert error["frame_id"] == "big" and error["code"] == "result_too_large", error
        with ApiClient(load_config(config), "test") as api:
            answer = api.query({"frame_id": "big", "camera": "cam", "top_k": 1, "include_thumbnails": False})
        assert not answer["ok"] and answer["error"]["code"] in {"unknown_frame", "empty_store"}, answer
        assert not [m for m in client.messages if m.topic == "inspect/cam/result"]
        assert worker.stop() == 0
    finally:
        client.close()
        broker.stop()


def test_an_answer_past_the_brokers_maximum_packet_size_says_the_request_was_carried_out(bundle_dir, tmp_path,
                                                                                         worker_factory):
    """A reload (or a label) whose answer was past the broker's maximum packet size was carried out and answered
    ``response_too_large`` with "ask for fewer hits": a client took it for refused, and no request but a query can ask
    for less.  The answer says it was carried out and what to change; a query's still says how to ask for less."""
    broker = Broker(tmp_path / "broker", extra="max_packet_size 450\n")
    prefix = f"p{uuid.uuid4().hex[:6]}"
    try:
        client = Client(broker.port, prefix)
        worker = worker_factory(write_config(tmp_path, broker.port, bundle_dir, topics={"prefix": prefix}))
        wait_online(client, prefix)
        answers = []
        for i, body in enumerate(({"command": "reload", "camera": "c1", "bundle": str(bundle_dir)},
                                  {"command": "status"})):
            props = Properties(PacketTypes.PUBLISH)
            props.ResponseTopic, props.CorrelationData = f"{prefix}/answers/{i}", b"x"
            client.client.publish(f"{prefix}/workers/w-test/control", json.dumps(body), qos=1,
                                  properties=props).wait_for_publish(10)
            answers.append(client.json_on(f"{prefix}/answers/{i}", timeout=60)[0])
        for answer in answers:
            assert answer["error"]["code"] == "response_too_large", answer
            assert "fewer hits" not in answer["error"]["message"] and "max_packet_size" in answer["error"]["message"]
        assert "carried out" in answers[0]["error"]["message"], answers[0]
        assert "hot reload: c1 now runs" in worker.output() and worker.stop() == 0  # the canary was made
        client.close()
    finally:
        broker.stop()


@contextmanager
def _eight_labelled_frames(tmp_path: Path, bundle_dir: Path, worker_factory,
                           max_packet_size: int) -> Iterator[tuple[Any, ApiClient, Path]]:
    """A worker behind a broker with ``max_packet_size``, 8 tiny frames of camera "cam" scored and each labelled a
    confirmed defect with a long defect type: (the worker, a request client, its config)."""
    broker = Broker(tmp_path / "broker", extra=f"max_packet_size {max_packet_size}\n")
    config = write_config(tmp_path, broker.port, bundle_dir, heatmap={"publish": "never"})
    client = Client(broker.port)
    try:
        worker = worker_factory(config)
        wait_online(client, "inspect")
        tiny = cv2.imencode(".png", np.full((8, 8, 3), 128, np.uint8))[1].tobytes()  # frames and results fit
        for n in range(8):
            client.publish_frame("cam", tiny, f"f{n}")
        client.wait_for(lambda m: m.topic == "inspect/cam/result", count=8)
        with ApiClient(load_config(config), "test") as api:
            for n in range(8):
                assert api.label({"action": "set", "frame_id": f"f{n}", "camera": "cam", "label": "confirmed_defect",
                                  "defect_type": "a-defect-type-long-enough-to-fill-a-packet", "note": None})["ok"]
            yield worker, api, config
        assert worker.stop() == 0
    finally:
        client.close()
        broker.stop()


def test_an_answer_past_the_brokers_maximum_packet_size_says_what_would_make_it_fit(bundle_dir, tmp_path,
                                                                                      worker_factory):
    """Every answer past the broker's maximum packet size said "ask for fewer hits": a label export (or a control
    answer) has no hits to ask fewer of, and a query could also leave its images out."""
    with _eight_labelled_frames(tmp_path, bundle_dir, worker_factory, 2500) as (_, api, _):
        export = api.label({"action": "export", "format": "json"})
        query = api.query({"top_k": 8, "filters": {"cameras": ["cam"]}})
    assert export["error"]["code"] == "response_too_large", export
    assert "fewer hits" not in export["error"]["message"] and "max_packet_size" in export["error"]["message"], export
    assert query["error"]["code"] == "response_too_large", query
    assert "fewer hits" in query["error"]["message"] and "include_thumbnails" in query["error"]["message"], query


def test_a_csv_label_export_carries_each_label_once_and_fits_where_the_csv_does(bundle_dir, tmp_path,
                                                                                  worker_factory):
    """A CSV export's answer carried every label twice, as JSON rows beside the CSV: it was refused
    ``response_too_large`` under a broker's maximum packet size the CSV alone fits in."""
    with _eight_labelled_frames(tmp_path, bundle_dir, worker_factory, 3000) as (_, api, config):
        export = api.label({"action": "export", "format": "csv"})
        assert export["ok"] and export["count"] == 8 and "labels" not in export, export
        rows = export["csv"].splitlines()
        assert len(rows) == 9 and rows[0].startswith("frame_id,camera,captured_at"), rows
        cli = subprocess.run([sys.executable, "-m", "worker", "labels", "--config", str(config), "--out",
                              str(tmp_path / "labels.csv")], capture_output=True, text=True, timeout=60, cwd=ROOT)
        assert cli.returncode == 0 and "8 labels written" in cli.stderr, cli.stderr
        assert (tmp_path / "labels.csv").read_text().splitlines() == rows


# 5a. The broker's Receive Maximum is kept to ------------------------------------------------------

class PubackRelay:
    """A TCP relay between a worker and mosquitto that reads the MQTT packets passing through: per connection, the most
    QoS 1 PUBLISHes of the worker the broker had not yet acknowledged to it, and, while ``hold`` is set, the broker's
    PUBACKs held back (as a slow link or a busy broker keeps them), so that the worker's window fills."""

    def __init__(self, broker_port: int) -> None:
        self.broker_port = broker_port
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.cond = threading.Condition()
        self.hold = False
        self.most: list[int] = []  # per connection, in order
        self.unacked: set[int] = set()  # of the current connection
        self.held: list[tuple[bytes, bytes]] = []
        self.pair: tuple[socket.socket, socket.socket] | None = None
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                worker, _ = self.server.accept()
            except OSError:  # closed
                return
            broker = socket.create_connection(("127.0.0.1", self.broker_port))
            with self.cond:
                self.pair, self.unacked, self.held = (worker, broker), set(), []
                self.most.append(0)
                self.cond.notify_all()
            threading.Thread(target=self._pipe, args=(worker, broker, True), daemon=True).start()
            threading.Thread(target=self._pipe, args=(broker, worker, False), daemon=True).start()

    @staticmethod
    def _packets(sock: socket.socket) -> Iterator[tuple[bytes, bytes]]:
        """Each MQTT packet read from ``sock``, whole, and its body (after the fixed header)."""
        buf = b""
        while True:
            length, multiplier, at = 0, 1, 1
            while at < len(buf):  # the remaining length: 1-4 bytes of 7 bits, least significant first
                length += (buf[at] & 0x7F) * multiplier
                multiplier, at = multiplier * 128, at + 1
                if not buf[at - 1] & 0x80:
                    break
            else:
                length = -1  # not all of it read yet
            if length >= 0 and len(buf) >= at + length:
                yield buf[:at + length], buf[at:at + length]
                buf = buf[at + length:]
                continue
            try:
                chunk = sock.recv(65536)
            except OSError:
                return
            if not chunk:
                return
            buf += chunk

    def _pipe(self, src: socket.socket, dst: socket.socket, upward: bool) -> None:
        for packet, body in self._packets(src):
            kind = packet[0] >> 4
            with self.cond:
                if (src, dst) != self.pair and (dst, src) != self.pair:
                    return  # a connection cut
                if upward and kind == 3 and (packet[0] >> 1) & 3:  # the worker's PUBLISH, QoS 1
                    topic_len = struct.unpack(">H", body[:2])[0]
                    self.unacked.add(struct.unpack(">H", body[2 + topic_len:4 + topic_len])[0])
                    self.most[-1] = max(self.most[-1], len(self.unacked))
                elif not upward and kind == 4:  # the broker's PUBACK of one
                    if self.hold:
                        self.held.append((packet, body))
                        self.cond.notify_all()
                        continue
                    self.unacked.discard(struct.unpack(">H", body[:2])[0])
                self.cond.notify_all()
                try:
                    dst.sendall(packet)
                except OSError:
                    return

    def wait(self, predicate, timeout: float = 60) -> None:
        with self.cond:
            assert self.cond.wait_for(predicate, timeout), (self.most, sorted(self.unacked), len(self.held))

    def release(self) -> None:
        """Pass the PUBACKs held back, and those to come."""
        with self.cond:
            self.hold = False
            worker = self.pair[0] if self.pair else None
            for packet, body in self.held:
                self.unacked.discard(struct.unpack(">H", body[:2])[0])
                if worker is not None:
                    worker.sendall(packet)
            self.held = []

    def cut(self) -> None:
        """Close the current connection, as a network fault does: the worker reconnects through the relay."""
        with self.cond:
            pair, self.pair = self.pair, None
        for sock in pair or ():
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def close(self) -> None:
        self.cut()
        self.server.close()


def test_the_worker_sends_no_more_unacknowledged_messages_than_the_brokers_receive_maximum(bundle_dir, dataset, tmp_path,
                                                                                           worker_factory):
    """paho keeps its own window of 20 unacknowledged QoS 1 messages whatever the broker's CONNACK says: past a
    Receive Maximum below it (HiveMQ's default is 10) a broker that enforces it closes the connection, and paho sent
    its whole backlog again at each reconnect, which never got through.  mosquitto announces one
    (``max_inflight_messages``) without enforcing it for QoS 1, so a relay counts what the worker leaves unacknowledged,
    holding the broker's PUBACKs back so that the window fills: on the first connection and after a reconnect with a
    backlog, the worker keeps to 2, and every answer still arrives once the PUBACKs pass."""
    broker = Broker(tmp_path / "broker", extra="max_inflight_messages 2\n")
    relay = PubackRelay(broker.port)
    prefix = f"r{uuid.uuid4().hex[:6]}"
    port = free_port()
    config = write_config(tmp_path, relay.port, bundle_dir, topics={"prefix": prefix},
                          limits={"inference_threads": 1}, metrics={"enabled": True, "port": port})
    try:
        client = Client(broker.port, prefix)
        worker = worker_factory(config)
        wait_online(client, prefix)
        with relay.cond:
            relay.hold = True
        n = 4
        for i in range(n):
            client.publish_frame("cam", _good_png(dataset), f"r{i}")
        deadline = time.monotonic() + 120
        while True:  # every frame scored: its result and heatmap are with paho, sent or waiting for room
            text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
            if f'edge_inspect_frames_total{{camera="cam",outcome="processed"}} {n}.0' in text:
                break
            assert time.monotonic() < deadline, text[-2000:]
            time.sleep(0.1)  # poll interval, with a deadline
        relay.wait(lambda: len(relay.unacked) >= 2)
        relay.cut()  # a backlog to send again at the reconnect
        relay.wait(lambda: len(relay.most) == 2 and len(relay.unacked) >= 2)
        relay.release()
        # at least once: what the broker had taken before the cut comes again (the PUBACKs held back were lost)
        def heatmaps() -> set[str | None]:
            with client.lock:
                return {dict(getattr(m.properties, "UserProperty", None) or []).get("frame_id")
                        for m in client.messages if m.topic == f"{prefix}/cam/heatmap"}

        outcomes: dict[str, list[str]] = {}
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and (len(outcomes) < n or len(heatmaps()) < n):
            outcomes = _outcomes(client, prefix, "cam")
            time.sleep(0.1)  # poll interval, with a deadline
        assert sorted(outcomes) == [f"r{i}" for i in range(n)] and all(set(v) == {"result"} for v in outcomes.values())
        assert heatmaps() == {f"r{i}" for i in range(n)}
        print(f"\nFIGURES Receive Maximum 2: most unacknowledged per connection {relay.most}")
        assert max(relay.most) <= 2, f"the worker left {relay.most} messages unacknowledged on its connections"
        worker.wait_output("the broker takes at most 2 unacknowledged messages")
        assert worker.stop() == 0
        client.close()
    finally:
        relay.close()
        broker.stop()


# 5b. A model that answers NaN or infinity gives no verdict ------------------------------------

def _nan_for(src: Path, dst: Path, frames: str) -> Path:
    """A copy of bundle ``src`` whose score is NaN for ``bright`` frames (mean above 250: 0 x sqrt(250 - mean) added)
    or ``dark`` ones (below 5), finite otherwise: what a broken export, or an overflow at a reduced precision,
    answers for some frames only."""
    shutil.copytree(src, dst)
    manifest = json.loads((dst / "bundle.json").read_text())
    model = ov.Core().read_model(dst / "model.xml")
    result = model.output(manifest["outputs"]["score"]["name"]).get_node()
    source = result.input_value(0)
    mean = ops.reduce_mean(ops.convert(model.inputs[0], "f32"), np.array([1, 2, 3]), keep_dims=False)
    below = ops.subtract(np.float32(250), mean) if frames == "bright" else ops.subtract(mean, np.float32(5))
    scored = ops.add(source, ops.reshape(ops.multiply(np.float32(0), ops.sqrt(below)), ops.shape_of(source), False))
    names = source.get_names()
    source.set_names(set())
    scored.output(0).set_names(names)
    result.input(0).replace_source_output(scored.output(0))
    # written beside, then moved: OpenVINO maps the model.bin it read, and overwriting a mapped file is a SIGBUS
    ov.save_model(model, dst / "nan.xml", compress_to_fp16=False)
    del model
    (dst / "nan.xml").replace(dst / "model.xml")
    (dst / "nan.bin").replace(dst / "model.bin")
    write_manifest(dst, {k: v for k, v in manifest.items() if k != "files"}, tuple(manifest["files"]))
    return dst


def test_a_frame_the_model_answers_nan_for_gets_an_error_not_a_normal_verdict(broker, bundle_dir, dataset, tmp_path,
                                                                              worker_factory):
    """A NaN score compares as below every threshold: it was published as a "normal" result (with NaN in its JSON,
    which strict readers refuse) and its NaN embedding went to the store. Now the frame gets ``invalid_output`` and
    is not recorded, an image query with it is answered so too, and the worker goes on serving. A bundle that
    answers NaN for the black frame it is warmed up with is refused at a reload, saying so."""
    bundle = _nan_for(bundle_dir, tmp_path / "nan-bright", "bright")
    dark = _nan_for(bundle_dir, tmp_path / "nan-dark", "dark")
    prefix = f"n{uuid.uuid4().hex[:6]}"
    config = write_config(tmp_path, broker.port, bundle, topics={"prefix": prefix}, store={"log_normal_every": 1})
    white = cv2.imencode(".png", np.full((128, 128, 3), 255, np.uint8))[1].tobytes()
    client = Client(broker.port, prefix)
    worker = worker_factory(config)
    try:
        wait_online(client, prefix)
        client.publish_frame("cam", white, "white")
        client.publish_frame("cam", _good_png(dataset), "good")
        error, = client.json_on(f"{prefix}/cam/error")
        assert error["code"] == "invalid_output" and error["frame_id"] == "white", error
        assert "NaN or infinity in its score" in error["message"] and "no verdict" in error["message"], error
        result, = client.json_on(f"{prefix}/cam/result")
        assert result["frame_id"] == "good" and result["logged"], result
        with ApiClient(load_config(config), "t") as api:
            answer = api.query({"image_b64": base64.b64encode(white).decode()})
            assert answer["error"]["code"] == "invalid_output", answer
            answer = api.query({"frame_id": "white", "camera": "cam"})
            assert answer["error"]["code"] == "unknown_frame", answer
            answer = api.query({"frame_id": "good", "camera": "cam"})
            assert answer["ok"], answer
            answer = api.control({"command": "reload", "bundle": str(dark)})
            assert answer["error"]["code"] == "reload_failed", answer
            assert "NaN or infinity in its score for a black frame" in answer["error"]["message"], answer
        client.publish_frame("cam", _good_png(dataset), "still")
        assert client.json_on(f"{prefix}/cam/result", count=2)[-1]["frame_id"] == "still"
        assert worker.stop() == 0
    finally:
        client.close()


# 6. Clean shutdown: in-flight frames are finished or explicitly accounted -----------------------

@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_sigterm_finishes_queued_frames_and_leaves_the_rest_with_the_broker(stop_signal, broker, bundle_dir, dataset,
                                                                            tmp_path, worker_factory):
    """SIGHUP as SIGTERM: a terminal or ssh session that closes sends it, and by default it ended the process at
    once, losing the queued frames the broker had been told were taken."""
    prefix = f"q{uuid.uuid4().hex[:6]}"
    config = write_config(tmp_path, broker.port, bundle_dir, topics={"prefix": prefix},
                          mqtt={"client_id": f"w-{prefix}"},
                          limits={"queue_size": 4, "queue_policy": "block", "inference_threads": 1},
                          heatmap={"format": "png", "size": 1024})
    client = Client(broker.port, prefix)
    worker = worker_factory(config)
    wait_online(client, prefix)
    frame = _good_png(dataset)
    # Enough frames, each made slow by a 1024 px PNG heatmap, that the worker cannot drain them all between
    # the second result and SIGTERM even when this test process is starved of CPU (40 light frames were all
    # answered once on a loaded machine).
    n = 100
    for i in range(n):
        client.publish_frame("cam", frame, f"q{i:03d}")
    client.wait_for(lambda m: m.topic == f"{prefix}/cam/result", count=2)
    assert worker.stop(stop_signal) == 0
    client.wait_for(lambda m: m.topic == f"{prefix}/workers/w-test/availability" and m.payload == b"stopped")
    first = _outcomes(client, prefix, "cam")
    # under block with a session that outlives the stop, no frame is answered shutdown: the one paho's thread held
    # waiting for room in the queue was (a helper's probe), acknowledged, and so never scored
    assert all(v == ["result"] for v in first.values()), first
    assert "shutdown: finishing" in worker.output() or "stopping" in worker.output()

    worker2 = worker_factory(config)  # same client id: the broker hands over what we did not take
    outcomes = {}
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and len(outcomes) < n:
        outcomes = _outcomes(client, prefix, "cam")
        time.sleep(0.1)
    assert set(outcomes) == {f"q{i:03d}" for i in range(n)}
    assert all(v == ["result"] for v in outcomes.values()), {k: v for k, v in outcomes.items() if v != ["result"]}
    assert len(first) < n, "the first run should have stopped before taking every frame"
    print(f"\nFIGURES shutdown: sent {n}; first run answered {len(first)}, the second run the other {n - len(first)}")
    assert worker2.stop() == 0


def _logged(worker, text: str, timeout: float = 120) -> bool:
    """Whether ``text`` is in the worker's log within ``timeout`` (polled; False at once when the worker ended)."""
    deadline = time.monotonic() + timeout
    while text not in worker.output() and worker.proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)  # poll interval for the log, with a deadline
    return text in worker.output()


@pytest.mark.parametrize("comes_back", [True, False], ids=["broker-back-during-the-stop", "broker-gone"])
def test_a_clean_stop_while_the_broker_is_away_waits_for_it_and_counts_what_it_never_took(comes_back, bundle_dir,
                                                                                           dataset, tmp_path,
                                                                                           worker_factory):
    """Results published while the broker is away wait in paho's queue, sent again at a reconnect; a clean stop
    then disconnected at once and they died with the process: frames acknowledged on arrival, never answered, and
    the stop said "0 frames refused" (a helper's probe: 7 of 30 answered). The stop now waits (worker.stop_wait_s)
    for the broker; what it never takes is logged as an error and counted in the stopped line."""
    store_dir = broker_readable_dir()
    port = free_port()
    broker = Broker(tmp_path / "b1", port=port, persistence_dir=store_dir)
    prefix = f"u{uuid.uuid4().hex[:6]}"
    config = write_config(tmp_path, port, bundle_dir, topics={"prefix": prefix},
                          worker={"stop_wait_s": 60 if comes_back else 2},
                          mqtt={"reconnect_min_s": 1, "reconnect_max_s": 1},
                          limits={"queue_size": 100, "inference_threads": 1}, heatmap={"format": "png", "size": 1024})
    observer = PersistentClient(port, prefix, f"observer-{prefix}")
    camera = Client(port, prefix)
    worker = worker_factory(config)
    n = 60
    ids = [f"u{i:03d}" for i in range(n)]
    try:
        wait_online(observer, prefix)
        for frame_id in ids:
            camera.publish_frame("cam", _good_png(dataset), frame_id)
        observer.wait_for(lambda m: m.topic == f"{prefix}/cam/result")  # scoring: the rest are queued or in hand
        camera.close()
        broker.stop()  # saves its sessions: the observer's gets what the broker takes while it is away
        worker.proc.send_signal(signal.SIGTERM)
        assert _logged(worker, "the broker has not taken (it is away): waiting up to"), worker.output()[-3000:]
        if comes_back:
            broker = Broker(tmp_path / "b2", port=port, persistence_dir=store_dir)
        assert worker.stop(timeout=120) == 0, worker.output()[-3000:]
        out = worker.output()
        unsent = int(out.split("unsent_at_stop: ", 1)[1].split(";", 1)[0])
        if not comes_back:
            assert unsent > 0 and f"ERROR worker.service: {unsent} published messages" in out, out[-3000:]
            return
        assert unsent == 0 and "were never taken by the broker" not in out, out[-3000:]
        topic = f"{prefix}/cam/result"
        deadline = time.monotonic() + 60
        for frame_id in ids:  # the results taken during the stop reach the observer's session
            observer.wait_for(lambda m, f=frame_id: m.topic == topic and json.loads(m.payload)["frame_id"] == f,
                              timeout=max(1.0, deadline - time.monotonic()))
        observer.wait_for(lambda m: m.topic == f"{prefix}/workers/w-test/availability" and m.payload == b"stopped")
    finally:
        observer.close()
        broker.stop()
        shutil.rmtree(store_dir, ignore_errors=True)  # outside pytest's tmp_path (see broker_readable_dir)


def test_frames_left_at_a_stop_are_handed_back_only_where_no_request_follows_them():
    """Under block, frames left at a stop stay unacknowledged for the next start; but acknowledgements go in the
    order the messages came, so a request after them (answered, or answered shutdown at the stop) stayed
    unacknowledged too, and the broker handed it to the next start: a reload served twice (a helper's review, a
    worker whose stop left queued frames).  Only the frames no other message follows are handed back; the others
    are answered, which lets the request's acknowledgement go."""
    from worker.acks import Acks

    sent: list[int] = []
    acks = Acks(lambda mid, qos: sent.append(mid))
    f1, f2, request, f3, f4 = (acks.open(mid, 1) for mid in range(1, 6))
    request.release()  # answered: waits for f1 and f2 to be acknowledged first
    assert sent == [] and acks.tail([f1, f2, f3, f4]) == {f3, f4}
    f1.release()
    f2.release()  # answered shutdown at the stop
    assert sent == [1, 2, 3] and acks.unacknowledged == 2  # f3 and f4 go to the next start


def test_requests_waiting_at_a_stop_are_each_answered(broker, bundle_dir, tmp_path, worker_factory):
    """Requests are acknowledged when queued, so the broker never hands them out again: those the request thread had
    not reached 5 s into the stop went unanswered, a client waiting on each for ever.  The one in hand is answered,
    each waiting one ``shutdown``."""
    prefix = f"s{uuid.uuid4().hex[:6]}"
    config = write_config(tmp_path, broker.port, bundle_dir, topics={"prefix": prefix},
                          model={"cache_dir": None},  # each reload compiles: most still wait at the stop
                          limits={"request_queue_size": 200})
    client = Client(broker.port, prefix)
    worker = worker_factory(config)
    wait_online(client, prefix)
    reply, reply_v3 = f"{prefix}/replies", f"{prefix}/replies-v3"
    for i in range(120):
        props = Properties(PacketTypes.PUBLISH)
        props.ResponseTopic, props.CorrelationData = reply, str(i).encode()
        client.client.publish(f"{prefix}/workers/w-test/control", json.dumps({"command": "reload"}), qos=1,
                              properties=props)
        if i % 6 == 0:  # and a client without MQTT v5, naming its answer topic in the body
            client.client.publish(f"{prefix}/workers/w-test/control",
                                  json.dumps({"command": "reload", "reply_to": reply_v3}), qos=1)
        if i == 60:  # response topics no answer may go to: a wildcard (paho raised, and the stop ended in an abort),
            # and the API's own topics (a client could make the worker post a result or a command it may not write)
            for nowhere in ("answers/+/x", f"{prefix}/cam/result", f"{prefix}/workers/w-test/control", f"{prefix}/label"):
                props = Properties(PacketTypes.PUBLISH)
                props.ResponseTopic = nowhere
                client.client.publish(f"{prefix}/workers/w-test/control", json.dumps({"command": "status"}), qos=1,
                                      properties=props)
    client.wait_for(lambda m: m.topic == reply)
    assert worker.stop() == 0
    # Those the broker had not handed over before the stop (a loaded machine) stay in the worker's session, and the
    # next start serves them: across both, each request is answered once.
    client.wait_for(lambda m: m.topic == f"{prefix}/workers/w-test/availability" and m.payload == b"stopped")
    again = worker_factory(config)
    answers = client.wait_for(lambda m: m.topic == reply, count=120)
    by_request: dict[bytes, list[dict]] = {}
    for m in answers:
        by_request.setdefault(m.properties.CorrelationData, []).append(json.loads(m.payload))
    assert len(by_request) == 120 and all(len(a) == 1 for a in by_request.values())
    refused = [a[0] for a in by_request.values() if not a[0]["ok"]]
    assert refused and {a["error"]["code"] for a in refused} == {"shutdown"}, refused[:3]
    v3 = [json.loads(m.payload) for m in client.wait_for(lambda m: m.topic == reply_v3, count=20)]
    assert {a["error"]["code"] for a in v3 if not a["ok"]} <= {"shutdown"}, v3[:3]
    client.wait_for(lambda m: m.topic == f"{prefix}/workers/w-test/availability" and m.payload == b"online"
                    and user_props(m).get("pid") == str(again.proc.pid))  # started: a stop now is a clean one
    assert again.stop() == 0
    assert len([m for m in client.messages if m.topic == reply]) == 120 and len(
        [m for m in client.messages if m.topic == reply_v3]) == 20
    assert not [m for m in client.messages if m.topic in (f"{prefix}/cam/result", f"{prefix}/label")
                or (m.topic == f"{prefix}/workers/w-test/control" and b'"ok"' in m.payload)]
    client.close()


def test_two_workers_sharing_a_client_id_are_told_why_the_broker_keeps_closing(broker, bundle_dir, tmp_path,
                                                                                  worker_factory):
    """One config.yaml with mqtt.client_id set, worker.id set per box: each connection takes the session from the
    other every few seconds, and the log said only "disconnected from broker (Unspecified error)"."""
    prefix, client_id = f"k{uuid.uuid4().hex[:6]}", f"same-{uuid.uuid4().hex[:6]}"
    workers = [worker_factory(write_config(tmp_path / name, broker.port, bundle_dir, topics={"prefix": prefix},
                                           worker={"id": name}, mqtt={"client_id": client_id, "reconnect_min_s": 1,
                                                                      "reconnect_max_s": 2}))
               for name in ("a", "b")]
    said = "the usual cause is another client connecting with the same client id"
    deadline = time.monotonic() + 120
    while not any(said in w.output() for w in workers) and time.monotonic() < deadline:
        time.sleep(0.2)  # poll interval of an observable state (the logs), with a deadline
    assert any(f"{said} '{client_id}'" in w.output() for w in workers), workers[0].output()[-2000:]
    for w in workers:
        w.stop(signal.SIGKILL)

