"""Brokers configured as factories run them: limits a broker announces in its CONNACK or applies on its own, with the
real worker and a real mosquitto set up that way."""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
import threading
import time
import urllib.request
from collections.abc import Iterator

import cv2
import numpy as np
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from conftest import Client, good_png, wait_online, write_config
from scripts.broker import Broker, broker_readable_dir, free_port


@contextlib.contextmanager
def _acl_broker(tmp_path, rules: str) -> Iterator[Broker]:
    """A mosquitto whose ACL file (for all clients) holds ``rules``, stopped and its files removed at the end."""
    files = broker_readable_dir("mosq-acl-")
    acl = files / "acl"
    acl.write_text(rules)
    acl.chmod(0o644)
    broker = Broker(tmp_path / "broker", extra=f"acl_file {acl}\n")
    try:
        yield broker
    finally:
        broker.stop()
        shutil.rmtree(files, ignore_errors=True)


def _frame_properties(frame_id: str) -> Properties:
    props = Properties(PacketTypes.PUBLISH)
    props.UserProperty = [("frame_id", frame_id), ("captured_at", str(time.time()))]
    return props


def test_a_message_size_limit_below_the_heatmaps_costs_the_heatmaps_not_the_connection(bundle_dir, dataset,
                                                                                         tmp_path, worker_factory):
    """mosquitto's message_size_limit is announced to no client: it answers a publish over it with a PUBACK of
    149 (Packet too large), which paho 2.2 took for a malformed packet.  It closed the connection and resent the
    heatmap at every reconnect, once a second for ever, and every frame not yet acknowledged was delivered and
    scored again each time.  Now the heatmaps are lost, said and counted; the connection and the results stay."""
    broker = Broker(tmp_path / "broker", extra="message_size_limit 20000\n")
    client = Client(broker.port)
    try:
        worker = worker_factory(write_config(tmp_path / "w", broker.port, bundle_dir,
                                             heatmap={"format": "png", "size": 512}))
        wait_online(client, "inspect")
        for n in range(3):
            client.publish_frame("cam1", good_png(dataset).read_bytes(), f"big-{n}")
        results = client.json_on("inspect/cam1/result", count=3)
        assert sorted(r["frame_id"] for r in results) == ["big-0", "big-1", "big-2"]

        def counted(m) -> bool:
            return m.topic == "inspect/workers/w-test/stats" and json.loads(m.payload)["publishes_refused"] >= 3

        stats = json.loads(client.wait_for(counted)[-1].payload)
        assert stats["last_publish_refused"] == {"topic": "inspect/cam1/heatmap", "reason": "Packet too large"}
        output = worker.output()
        assert "disconnected from broker" not in output, output[-3000:]
        assert "over the broker's message size limit (mosquitto: message_size_limit)" in output
        assert worker.stop() == 0
    finally:
        client.close()
        broker.stop()


def test_stats_past_the_brokers_maximum_packet_size_leave_out_their_per_camera_parts(bundle_dir, tmp_path,
                                                                                      worker_factory):
    """The stats grow with every camera; past the maximum packet size a broker announces, their publish raised in
    the worker's main loop and the worker exited.  They now go without their per-camera parts."""
    broker = Broker(tmp_path / "broker", extra="max_packet_size 4096\n")
    client = Client(broker.port)
    try:
        worker = worker_factory(write_config(tmp_path / "w", broker.port, bundle_dir, heatmap={"publish": "never"}))
        wait_online(client, "inspect")
        tiny = cv2.imencode(".jpg", np.full((64, 64, 3), 128, np.uint8))[1].tobytes()  # the broker takes 4 kB
        # a camera id no label could name, whose answer (the id in its topic and body) is past the 4 kB: it gave a
        # traceback per frame (a helper's review); answered before the frames below, which come after it
        client.publish_frame("c" * 2500, b"x", "f0")
        cameras = [f"camera-with-a-long-name-{n:02d}" for n in range(40)]
        for camera in cameras:
            client.publish_frame(camera, tiny, "f1")
        answered = client.wait_for(lambda m: m.topic.endswith(("/result", "/error")), count=len(cameras))
        assert {m.topic.split("/")[1] for m in answered} == set(cameras)  # a result, or a "dropped" past the queue

        def reduced(m) -> bool:
            return m.topic == "inspect/workers/w-test/stats" and "omitted" in json.loads(m.payload)

        first, second = (json.loads(m.payload) for m in client.wait_for(reduced, count=2)[:2])
        assert first["omitted"] == ["cameras", "capture", "capture_export", "evidence"] and "cameras" not in first
        assert second["uptime_s"] > first["uptime_s"]  # the main loop goes on
        assert "stats published without their per-camera parts" in worker.output()
        assert "frames refused (bad_camera)" in worker.output() and "Traceback" not in worker.output()
        assert worker.stop() == 0
    finally:
        client.close()
        broker.stop()


def test_a_broker_without_retain_or_qos_1_is_served_at_what_it_takes(bundle_dir, dataset, tmp_path, worker_factory):
    """`retain_available false` and `max_qos 0`: mosquitto refuses a connection whose last will is retained or at QoS
    1, and the worker tried again for ever ("Retain not supported").  It now sends its will, and publishes, within
    what the broker takes, and says what that costs."""
    broker = Broker(tmp_path / "broker", extra="retain_available false\nmax_qos 0\n")
    client = Client(broker.port)  # subscribed before the worker starts: availability is not retained here
    try:
        worker = worker_factory(write_config(tmp_path / "w", broker.port, bundle_dir))
        wait_online(client, "inspect")
        client.client.publish("inspect/cam1/frame", good_png(dataset).read_bytes(), qos=0,
                              properties=_frame_properties("at-qos-0"))
        assert client.json_on("inspect/cam1/result")[0]["frame_id"] == "at-qos-0"
        output = worker.output()
        assert "the broker keeps no retained messages" in output and "the broker takes QoS 0 only" in output
        assert "disconnected from broker" not in output, output[-3000:]
        assert worker.stop() == 0
    finally:
        client.close()
        broker.stop()


def test_a_response_topic_the_acl_forbids_is_said_as_the_requesters(bundle_dir, tmp_path, worker_factory):
    """A request naming a response topic the broker's ACL does not let the worker write: the log told the operator to
    let the worker write its own topics, though the topic was the requester's choice."""
    with _acl_broker(tmp_path, "topic readwrite inspect/#\ntopic read elsewhere/#\n") as broker:
        _response_topic_refused(broker, bundle_dir, tmp_path, worker_factory)


def _response_topic_refused(broker: Broker, bundle_dir, tmp_path, worker_factory) -> None:
    client = Client(broker.port)
    try:
        worker = worker_factory(write_config(tmp_path / "w", broker.port, bundle_dir))
        wait_online(client, "inspect")
        props = Properties(PacketTypes.PUBLISH)
        props.ResponseTopic, props.CorrelationData = "elsewhere/answers", b"r1"
        client.client.publish("inspect/workers/w-test/control", json.dumps({"command": "status"}), qos=1,
                              properties=props).wait_for_publish(5)
        said = "elsewhere/answers is outside topics.prefix: a response topic a request named"
        deadline = time.monotonic() + 60
        while said not in worker.output():
            assert time.monotonic() < deadline, worker.output()[-3000:]
            time.sleep(0.1)  # polling the worker's log for the line, not waiting a fixed time
        assert "must let anonymous clients write the worker's topics" not in worker.output()
        assert worker.stop() == 0
    finally:
        client.close()


def test_metrics_count_the_publishes_refused_during_a_clean_stop(bundle_dir, tmp_path):
    """``edge_inspect_publishes_refused_total`` was added to by the main loop only: what the broker refused once the
    loop had ended (a clean stop's last results, its ``stopped``) was in the stats' count and the log, never in
    /metrics.  It is read at each scrape.  The ACL refuses the worker's availability topic (its ``online`` and its
    ``stopped``); the worker runs in this process so that /metrics can still be read once its stop is over."""
    from worker.config import load_config
    from worker.service import Worker
    from worker.supervise import StopSignals

    with _acl_broker(tmp_path, "topic readwrite inspect/#\ntopic deny inspect/workers/w-test/availability\n") as broker:
        port = free_port()
        worker = Worker(load_config(write_config(tmp_path / "w", broker.port, bundle_dir,
                                                 metrics={"enabled": True, "port": port})))
        stop, signals = threading.Event(), StopSignals()
        running = threading.Thread(target=worker.run, args=(stop, signals), daemon=True)

        def refused() -> float:
            text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
            [line] = [line for line in text.splitlines() if line.startswith("edge_inspect_publishes_refused_total ")]
            return float(line.split()[-1])

        try:
            running.start()  # /metrics is served before the broker is connected to
            deadline = time.monotonic() + 60
            while worker.link.publishes_refused < 1 or refused() < 1:  # its 'online', refused while the loop runs
                assert time.monotonic() < deadline and running.is_alive()
                time.sleep(0.1)  # poll interval: the broker's PUBACK comes when it comes
            signals.received = signal.SIGTERM
            running.join(120)
            assert not running.is_alive(), "the stop did not end"
            assert worker.link.last_refused["topic"] == "inspect/workers/w-test/availability"
            assert refused() == worker.link.publishes_refused >= 2  # 'online' and, after the loop, 'stopped'
        finally:
            worker.stats.close()
            for claim in worker.claims:
                claim.close()


def test_a_broker_restarting_is_not_said_as_a_client_id_takeover(bundle_dir, tmp_path, worker_factory):
    """Three broker restarts within a minute were logged as "another client connecting with the same client id" (a
    helper's probe): the broker closing the connection three times looks like a takeover, but a takeover leaves the
    broker reachable, and a restart does not."""
    broker = Broker(tmp_path / "broker")
    worker = worker_factory(write_config(tmp_path / "w", broker.port, bundle_dir,
                                         mqtt={"reconnect_min_s": 1, "reconnect_max_s": 1}))

    def until(count: int, line: str) -> None:
        deadline = time.monotonic() + 60
        while worker.output().count(line) < count:
            assert time.monotonic() < deadline and worker.proc.poll() is None, worker.output()[-3000:]
            time.sleep(0.1)  # polling the worker's log for the line, not waiting a fixed time

    try:
        until(1, "connected to 127.0.0.1")
        for restart in range(1, 4):
            broker.stop()
            until(restart, "cannot reach the broker at")  # said at the first failed attempt of each outage
            broker = Broker(tmp_path / "broker", port=broker.port)
            until(restart + 1, "connected to 127.0.0.1")
        assert "the usual cause is another client" not in worker.output(), worker.output()[-3000:]
        assert worker.stop() == 0
    finally:
        broker.stop()


def test_an_own_announcement_the_acl_drops_is_said_while_frames_stream_in(bundle_dir, dataset, tmp_path,
                                                                          worker_factory):
    """The ACL lets the worker read frames but not its own workers/ topics: the check that its ``online`` comes back
    waited while any message arrived after it, so with a camera streaming it never said so."""
    with _acl_broker(tmp_path, "topic read inspect/+/frame\ntopic write inspect/#\n") as broker:
        _own_announcement_dropped(broker, bundle_dir, dataset, tmp_path, worker_factory)


def _own_announcement_dropped(broker: Broker, bundle_dir, dataset, tmp_path, worker_factory) -> None:
    camera = Client(broker.port)
    streaming = threading.Event()
    stop = threading.Event()

    def stream() -> None:
        frame, i = good_png(dataset).read_bytes(), 0
        while not stop.is_set():
            camera.publish_frame("cam", frame, f"s{i}")
            streaming.set()
            i += 1
            stop.wait(0.5)  # the camera's frame rate

    thread = threading.Thread(target=stream, daemon=True)
    thread.start()
    try:
        assert streaming.wait(30)
        worker = worker_factory(write_config(tmp_path / "w", broker.port, bundle_dir))
        said = "this worker's own 'online' on inspect/workers/w-test/availability did not come back"
        deadline = time.monotonic() + 60
        while said not in worker.output():
            assert time.monotonic() < deadline and worker.proc.poll() is None, worker.output()[-3000:]
            time.sleep(0.1)  # polling the worker's log for the line, not waiting a fixed time
        assert worker.stop() == 0
        final = json.loads(worker.output().split("stopped: ", 1)[1].split("; ", 1)[0])["cam"]
        assert final["processed"] > 0, final  # frames did stream in meanwhile
    finally:
        stop.set()
        thread.join(10)
        camera.close()
