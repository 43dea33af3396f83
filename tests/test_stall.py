"""A worker that cannot be stalled: the issue's three reproductions and the watchdog, against real components.

Real mosquitto, the worker as its own process with a real OpenVINO bundle and the embedded Qdrant.
See docs/reliability.md, promises 7-9.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import cv2
import numpy as np
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from benchmarks.start_burst import burst
from conftest import Client, good_png, start_on_embedded_store, user_props, wait_online, write_config
from scripts.broker import free_port
from worker.store import point_id


def _png(dataset: Path) -> bytes:
    return good_png(dataset).read_bytes()


def request(client: Client, topic: str, payload: bytes, timeout: float = 60) -> dict:
    """MQTT v5 request/response: publish with a response topic and correlation data, wait for the answer."""
    reply = f"{client.prefix}/replies/{uuid.uuid4().hex}"
    correlation = uuid.uuid4().bytes
    props = Properties(PacketTypes.PUBLISH)
    props.ResponseTopic = reply
    props.CorrelationData = correlation
    client.client.publish(topic, payload, qos=1, properties=props).wait_for_publish(5)
    (msg,) = client.wait_for(lambda m: m.topic == reply, timeout=timeout)
    assert msg.properties.CorrelationData == correlation
    return json.loads(msg.payload)


def canaries_answered(client: Client, prefix: str, frame: bytes, camera: str = "good") -> None:
    """A QoS 1 frame from another camera, a control status and a query must all be answered."""
    frame_id = f"canary-{uuid.uuid4().hex[:8]}"
    client.publish_frame(camera, frame, frame_id)
    client.wait_for(lambda m: m.topic == f"{prefix}/{camera}/result" and json.loads(m.payload)["frame_id"] == frame_id,
                    timeout=60)
    status = request(client, f"{prefix}/workers/w-test/control", b'{"command": "status"}')
    assert status["ok"] is True and "default" in status["models"], status
    query = request(client, f"{prefix}/query", json.dumps({"frame_id": frame_id, "camera": camera}).encode())
    assert "ok" in query and (query["ok"] or query["error"]["code"] in ("unknown_frame", "empty_store")), query


# Reproduction 1: captured_at = nan / inf / 1e15 (then read as seconds) / -1e20 at QoS 1 stalled the whole worker ----------------

def test_non_finite_or_absurd_timestamps_are_refused_and_the_worker_goes_on(broker, bundle_dir, dataset, tmp_path,
                                                                            worker_factory):
    prefix = f"t{uuid.uuid4().hex[:6]}"
    config = write_config(tmp_path, broker.port, bundle_dir, topics={"prefix": prefix})
    client = Client(broker.port, prefix)
    worker = worker_factory(config)
    wait_online(client, prefix)
    frame = _png(dataset)
    sent = []
    # U+FEFF made paho drop the worker's connection, and the broker sent the frame again on every reconnect.
    for name, value in (("nan", "nan"), ("inf", "inf"), ("1e25", "1e25"), ("-1e20", "-1e20"), ("bom", "\ufeff1700000000")):
        for i in range(25):  # more than mosquitto's in-flight window (20) per value
            frame_id = f"{name}-{i}"
            client.publish_frame("bad", frame, frame_id, captured_at=value, wait=False)
            sent.append(frame_id)
    errors = client.wait_for(lambda m: m.topic == f"{prefix}/bad/error", count=len(sent), timeout=120)
    bodies = [json.loads(m.payload) for m in errors]
    assert sorted(b["frame_id"] for b in bodies) == sorted(sent)  # each exactly once
    assert {b["code"] for b in bodies} == {"bad_metadata"}
    assert not [m for m in client.messages if m.topic == f"{prefix}/bad/result"]
    canaries_answered(client, prefix, frame)
    assert worker.proc.poll() is None
    assert worker.stop() == 0
    final = json.loads(worker.output().split("stopped: ", 1)[1].split("; ", 1)[0])
    assert final["bad"]["received"] == final["bad"]["errored"] == len(sent), final


# Reproduction 2: {"command": "reload", "bundle": 5} ended the request thread -----------------------------

BAD_CONTROL = [
    b'{"command": "reload", "bundle": 5}',
    b'{"command": "reload", "bundle": ["a"]}',
    b'{"command": 5}',
    b'{"command": "status", "camera": {"x": 1}}',
    b'{"command": "status", "extra": true}',
    b'{"command": "format-disk"}',
    b"[1, 2, 3]",
    b'"status"',
    b"null",
    b"\xff\xfe\x00",
    b"",
    b"[" * 100_000,
    b'{"command": "status", "camera": "' + b"c" * 3_000_000 + b'"}',
]


def test_malformed_control_is_answered_and_the_request_plane_keeps_working(broker, bundle_dir, dataset, tmp_path,
                                                                           worker_factory):
    prefix = f"c{uuid.uuid4().hex[:6]}"
    config = write_config(tmp_path, broker.port, bundle_dir, topics={"prefix": prefix})
    client = Client(broker.port, prefix)
    worker = worker_factory(config)
    wait_online(client, prefix)
    for payload in BAD_CONTROL:
        answer = request(client, f"{prefix}/workers/w-test/control", payload)
        assert answer["ok"] is False and answer["error"]["code"] == "bad_request", (payload[:60], answer)
    for payload in (b'{"top_k": "many", "frame_id": 1}', b'{"frame_id": "x", "unknown": 1}', b"{" * 50):
        answer = request(client, f"{prefix}/query", payload)
        assert answer["ok"] is False and answer["error"]["code"] == "bad_request", answer
    for payload in (b'{"action": "set", "frame_id": 5, "camera": "c", "label": "x"}', b'{"action": "drop"}'):
        answer = request(client, f"{prefix}/label", payload)
        assert answer["ok"] is False and answer["error"]["code"] == "bad_request", answer
    # A request without a response topic cannot be answered, but must not stop anything either.
    client.client.publish(f"{prefix}/workers/w-test/control", b'{"command": 7}', qos=1).wait_for_publish(5)
    canaries_answered(client, prefix, _png(dataset))
    stats = client.json_on(f"{prefix}/workers/w-test/stats", timeout=30)[-1]
    assert stats["healthy"] is True and stats["threads"]["requests"]["restarts"] == 0, stats["threads"]
    assert worker.stop() == 0


# Reproduction 3: inference threads deadlocked in their first InferRequest.infer at start ---------------

def test_worker_starts_under_a_burst_of_parallel_frames_every_time(broker, bundle_dir, dataset, tmp_path,
                                                                   worker_factory):
    """The burst is waiting in the worker's persistent session, so it arrives the moment the worker subscribes,
    while both inference threads start; a second burst follows in parallel.  Every start must answer all."""
    prefix = f"s{uuid.uuid4().hex[:6]}"
    config = write_config(tmp_path, broker.port, bundle_dir, topics={"prefix": prefix},
                          limits={"inference_threads": 2}, store={"log_normal_every": 0},
                          mqtt={"client_id": f"burst-{prefix}", "session_expiry_s": 600})
    client = Client(broker.port, prefix)
    frame = _png(dataset)
    first = worker_factory(config)  # creates the persistent session
    wait_online(client, prefix)
    assert first.stop() == 0
    starts = 6
    for n in range(starts):
        client.messages.clear()
        waiting = burst(broker.port, prefix, frame, f"s{n}a")
        worker = worker_factory(config)
        ids = waiting | burst(broker.port, prefix, frame, f"s{n}b")
        results = client.wait_for(lambda m: m.topic.endswith("/result"), count=len(ids), timeout=120)
        assert sorted(json.loads(m.payload)["frame_id"] for m in results) == sorted(ids), f"start {n}"
        assert worker.stop(timeout=60) == 0, worker.output()[-2000:]


# Watchdog: a stuck thread is seen, and the worker exits for its service manager --------------------------

def _recorder_stuck_on(frame_id: str, broker, bundle_dir: Path, tmp_path: Path, worker_factory, **limits):
    """A worker (watchdog 4 s, /healthz on) whose recorder will block for good on the frame ``frame_id`` of camera
    cam: the evidence file it writes first is a FIFO nobody reads, made once the worker runs (at its start it
    removes what a write cut short left, *.tmp).  Returns (prefix, metrics port, client, worker)."""
    prefix = f"w{uuid.uuid4().hex[:6]}"
    port = free_port()
    config = write_config(tmp_path, broker.port, bundle_dir, topics={"prefix": prefix},
                          worker={"watchdog_s": 4}, metrics={"enabled": True, "port": port}, limits=limits)
    key = point_id("cam", frame_id)
    fifo = tmp_path / "evidence" / key[:2] / f"{key}.thumbnail.jpg.tmp"
    client = Client(broker.port, prefix)
    worker = worker_factory(config)
    wait_online(client, prefix)
    fifo.parent.mkdir(parents=True)
    os.mkfifo(fifo)
    return prefix, port, client, worker


def test_a_stuck_thread_fails_healthz_and_the_worker_exits_with_code_3(broker, bundle_dir, dataset, tmp_path,
                                                                        worker_factory):
    """The recorder is made to block for real: the evidence file it will write for one frame is a FIFO
    nobody reads, so its open() never returns (the GIL released, as in a hung disk or NFS mount)."""
    prefix, port, client, worker = _recorder_stuck_on("stuck-1", broker, bundle_dir, tmp_path, worker_factory)
    health = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=10).read())
    assert health["ok"] is True and {"recorder", "requests", "infer-0"} <= set(health["threads"]), health
    metrics = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    assert 'edge_inspect_thread_up{thread="recorder"} 1.0' in metrics
    client.publish_frame("cam", _png(dataset), "stuck-1")
    client.wait_for(lambda m: m.topic == f"{prefix}/cam/result", timeout=60)  # inference is not held up
    failing = None
    deadline = time.monotonic() + 60
    while worker.proc.poll() is None and time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2)
        except urllib.error.HTTPError as exc:
            try:
                failing = json.loads(exc.read())
            except http.client.IncompleteRead:
                pass  # the 503's body was cut off: the process exited while sending it
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass  # the process is exiting
        time.sleep(0.1)  # poll interval of this observer, not a synchronisation
    assert worker.proc.wait(30) == 3, worker.output()[-3000:]
    assert "watchdog: recorder: stuck" in worker.output()
    if failing is not None:  # seen when the poll landed between the thread getting stuck and the exit
        assert failing["ok"] is False and any(p.startswith("recorder: stuck") for p in failing["problems"])
    offline = client.wait_for(lambda m: m.topic == f"{prefix}/workers/w-test/availability" and m.payload == b"offline",
                              timeout=90)  # the broker publishes the last will
    assert offline


def _healthz(port: int) -> dict | None:
    """/healthz's body, 200 or 503; None while it does not answer."""
    try:
        return json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2).read())
    except urllib.error.HTTPError as exc:
        try:
            return json.loads(exc.read())
        except (http.client.IncompleteRead, ValueError):
            return None
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return None


def _large_png(side: int = 3900) -> bytes:
    """A frame of many pixels in few bytes: each takes a noticeable time to decode, so a burst of them waits in the
    worker's queue."""
    image = np.full((side, side, 3), 120, np.uint8)
    image[::50] = 30
    ok, data = cv2.imencode(".png", image)
    assert ok
    return data.tobytes()


def test_the_frames_queued_when_the_watchdog_gives_up_are_each_answered(broker, bundle_dir, dataset, tmp_path,
                                                                        worker_factory):
    """The watchdog's exit (code 3) used os._exit with frames in the queue: acknowledged to the broker, they were
    never answered, by this process or the next.  Now each is answered ``shutdown`` ("worker restarting: ..."), and
    those that reached the worker only as it exited (not acknowledged) are the next process's, as a service manager
    starts it: each frame is answered once by one or the other."""
    prefix, port, client, worker = _recorder_stuck_on("stuck-1", broker, bundle_dir, tmp_path, worker_factory,
                                                      inference_threads=1, max_frame_bytes=2_000_000)
    client.publish_frame("cam", _png(dataset), "stuck-1")
    client.wait_for(lambda m: m.topic == f"{prefix}/cam/result", timeout=60)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # the recorder is 2 s from the watchdog's limit: the burst goes now
        health = _healthz(port)
        if health is not None and (health["threads"]["recorder"]["busy_s"] or 0) >= 2:
            break
        time.sleep(0.1)  # poll interval of this observer, not a synchronisation
    else:
        raise AssertionError(f"the recorder never got stuck: {worker.output()[-3000:]}")
    large = _large_png()
    ids = [f"big-{i}" for i in range(24)]
    for frame_id in ids:
        client.publish_frame("big", large, frame_id)
    assert worker.proc.wait(60) == 3, worker.output()[-3000:]
    # Frames the broker had not handed over by the exit stay in the session: on a loaded machine some of the burst can
    # come that late, so the next process (same client id) is started, as the service manager would.
    successor = worker_factory(tmp_path / "config.yaml")
    availability = f"{prefix}/workers/w-test/availability"
    client.wait_for(lambda m: m.topic == availability and m.payload == b"online"
                    and user_props(m).get("pid") == str(successor.proc.pid), timeout=120)
    client.wait_for(lambda m: m.topic in (f"{prefix}/big/result", f"{prefix}/big/error"), count=len(ids), timeout=120)
    assert successor.stop() == 0, successor.output()[-3000:]
    # its last word, after all it published: a frame answered twice would be here by now
    client.wait_for(lambda m: m.topic == availability and m.payload == b"stopped")
    answered = [m for m in client.messages if m.topic in (f"{prefix}/big/result", f"{prefix}/big/error")]
    assert sorted(json.loads(m.payload)["frame_id"] for m in answered) == sorted(ids)  # each once
    errors = [json.loads(m.payload) for m in answered if m.topic.endswith("/error")]
    assert errors, "the burst was all processed before the exit: the test proves nothing"
    assert all(e["code"] == "shutdown" and e["message"].startswith("worker restarting: recorder: stuck")
               for e in errors), errors
    assert "answered shutdown before the exit" in worker.output()


def test_a_freeze_of_the_whole_process_is_not_a_stuck_thread(broker, bundle_dir, dataset, tmp_path, worker_factory):
    """SIGSTOP (as docker pause or a paused VM) for longer than worker.watchdog_s: the monotonic clock runs on, so
    the dead man's switch fired the moment the process resumed (exit 1, a stack dump that read like a deadlock), and
    the watchdog would have called every thread stuck.  Now the main loop sees that the process did not run, says
    so once, and goes on."""
    prefix = f"z{uuid.uuid4().hex[:6]}"
    config = write_config(tmp_path, broker.port, bundle_dir, topics={"prefix": prefix}, worker={"watchdog_s": 4})
    client = Client(broker.port, prefix)
    worker = worker_factory(config)
    wait_online(client, prefix)
    frame = _png(dataset)
    client.publish_frame("cam", frame, "before")
    client.wait_for(lambda m: m.topic == f"{prefix}/cam/result", timeout=60)
    os.kill(worker.proc.pid, signal.SIGSTOP)
    try:
        time.sleep(5.5)  # the freeze itself (longer than watchdog_s), not a synchronisation
    finally:
        os.kill(worker.proc.pid, signal.SIGCONT)
    client.publish_frame("cam", frame, "after")
    client.wait_for(lambda m: m.topic == f"{prefix}/cam/result" and json.loads(m.payload)["frame_id"] == "after",
                    timeout=60)
    assert worker.proc.poll() is None, worker.output()[-3000:]
    deadline = time.monotonic() + 10
    while "the process did not run for" not in worker.output() and time.monotonic() < deadline:
        time.sleep(0.1)  # poll interval of this observer, not a synchronisation
    output = worker.output()
    assert "WARNING" in output and "the process did not run for" in output, output[-3000:]
    assert "watchdog:" not in output and "Timeout (" not in output, output[-3000:]
    assert worker.stop() == 0, worker.output()[-3000:]


def test_the_dead_mans_switch_ends_a_process_whose_gil_is_held(tmp_path):
    """A thread that holds the GIL forever (as in the start-up deadlock) stops every Python thread, the
    watchdog included; faulthandler's C timer still ends the process and dumps every thread's stack."""
    import subprocess
    import sys

    code = ("import re; from worker.supervise import DeadMansSwitch; DeadMansSwitch(1).arm(); "
            "re.match(r'(a+)+$', 'a' * 64 + 'b')")  # backtracks for ages without releasing the GIL
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode != 0 and "Timeout" in proc.stderr and "File" in proc.stderr, proc.stderr[-2000:]
    assert time.monotonic() - started < 60


def test_the_dead_mans_switch_re_armed_often_keeps_a_live_process_and_arms_its_timer_rarely(tmp_path):
    """The main loop re-arms every 0.2 s; each re-arm of faulthandler's timer holds the GIL until the old timer
    thread has exited, so the switch re-arms only every tenth of its timeout, and a loop that keeps calling it
    still keeps the process alive well past the timeout."""
    import subprocess
    import sys

    code = ("import faulthandler, time\n"
            "from worker.supervise import DeadMansSwitch\n"
            "armed = []\n"
            "real = faulthandler.dump_traceback_later\n"
            "faulthandler.dump_traceback_later = lambda *a, **k: (armed.append(1), real(*a, **k))\n"
            "switch = DeadMansSwitch(1)\n"
            "end = time.monotonic() + 3\n"
            "calls = 0\n"
            "while time.monotonic() < end:\n"
            "    switch.arm(); calls += 1; time.sleep(0.005)\n"
            "switch.disarm()\n"
            "print(calls, len(armed))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 0, proc.stderr[-2000:]  # alive 3 s past a 1 s timeout: re-arming still works
    calls, armed = map(int, proc.stdout.split())
    assert calls > 100 and armed <= 31, (calls, armed)  # at most every 0.1 s (plus the first), not every call


# Recorder and spool: kill -9 mid-write, a truncated spool at start, a store server that is not there --------

def test_kill_9_during_spool_writes_then_restart_with_a_truncated_spool(broker, bundle_dir, dataset, tmp_path,
                                                                          worker_factory):
    """No Qdrant server can run here: the server path is exercised through its error paths only (a URL
    nobody listens on), for the spool and for queries, which must answer store_unavailable."""
    prefix = f"p{uuid.uuid4().hex[:6]}"
    spool = tmp_path / "spool"
    down = write_config(tmp_path / "a", broker.port, bundle_dir, topics={"prefix": prefix},
                        store={"url": f"http://127.0.0.1:{free_port()}", "path": None, "batch_size": 1,
                               "flush_s": 0.05},
                        spool={"path": str(spool), "retry_s": 0.5})
    client = Client(broker.port, prefix)
    worker = worker_factory(down)
    wait_online(client, prefix)
    frame = _png(dataset)
    n = 12
    for i in range(n):
        client.publish_frame("cam", frame, f"k{i}")
    client.wait_for(lambda m: m.topic == f"{prefix}/cam/result", count=n)
    answer = request(client, f"{prefix}/query", b'{"frame_id": "k0", "camera": "cam"}')
    assert answer["ok"] is False and answer["error"]["code"] == "store_unavailable", answer
    deadline = time.monotonic() + 60
    while len(list(spool.glob("*.json"))) < n and time.monotonic() < deadline:
        time.sleep(0.05)  # poll interval while the recorder spools, with a deadline
    assert len(list(spool.glob("*.json"))) == n
    worker.stop(signal.SIGKILL)
    newest = sorted(spool.glob("*.json"))[-1]
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])  # what a kill -9 mid-write leaves
    (spool / "999999999999.tmp").write_bytes(b'{"points": [')

    worker, _ = start_on_embedded_store(tmp_path, broker.port, bundle_dir, prefix, spool, client, worker_factory)
    assert not list(spool.glob("*.json")) and [p.name for p in spool.glob("*.corrupt")] == [
        newest.with_suffix(".corrupt").name]
    stats = client.json_on(f"{prefix}/workers/w-test/stats", timeout=30)[-1]
    assert stats["spool_corrupt_batches"] == 1 and stats["healthy"], stats
    canaries_answered(client, prefix, frame)
    found = request(client, f"{prefix}/query", b'{"frame_id": "k0", "camera": "cam", "top_k": 20}')
    assert found["ok"] and len({h["frame_id"] for h in found["hits"]} & {f"k{i}" for i in range(n)}) == n - 2, found
    assert worker.stop() == 0


# Fairness: a flooding camera beside a normal one -----------------------------------------------------------

def test_a_camera_flooding_at_ten_times_its_share_does_not_evict_another_cameras_frames(
        broker, bundle_dir, dataset, tmp_path, worker_factory):
    prefix = f"q{uuid.uuid4().hex[:6]}"
    config = write_config(tmp_path, broker.port, bundle_dir, topics={"prefix": prefix},
                          limits={"queue_size": 16, "queue_policy": "drop_oldest", "inference_threads": 1},
                          heatmap={"format": "png", "size": 1024}, store={"log_normal_every": 0})
    client = Client(broker.port, prefix)
    worker = worker_factory(config)
    wait_online(client, prefix)
    frame = _png(dataset)
    normal = [f"n{i}" for i in range(8)]
    flood = [f"f{i}" for i in range(80)]
    for i, frame_id in enumerate(flood):
        if i % 10 == 0:
            client.publish_frame("steady", frame, normal[i // 10], wait=False)
        client.publish_frame("flood", frame, frame_id, wait=False)
    flood_out = client.wait_for(lambda m: m.topic in (f"{prefix}/flood/result", f"{prefix}/flood/error"),
                                count=len(flood), timeout=180)
    steady = client.wait_for(lambda m: m.topic == f"{prefix}/steady/result", count=len(normal), timeout=60)
    assert sorted(json.loads(m.payload)["frame_id"] for m in steady) == sorted(normal)
    assert not [m for m in client.messages if m.topic == f"{prefix}/steady/error"]
    codes = [json.loads(m.payload).get("code", "result") for m in flood_out]
    assert sorted(json.loads(m.payload)["frame_id"] for m in flood_out) == sorted(flood)  # one outcome each
    assert codes.count("dropped") > 0, "the flood must have overflowed the queue for this test to mean anything"
    print(f"\nFIGURES fairness: flood 80 -> {codes.count('result')} results, {codes.count('dropped')} dropped; "
          f"steady 8 -> {len(steady)} results, 0 dropped")
    assert worker.stop() == 0


def test_a_stalled_capture_disk_costs_the_sample_frames_not_inspection(broker, bundle_dir, dataset, tmp_path,
                                                                        worker_factory):
    """The capture sample wrote its files on the inference threads, under its lock: a data disk that stalled
    (fsfreeze, a dying SD card) stopped inference, and frames were dropped with nothing said.  The sample is written
    on a thread of its own behind a bounded queue.  A FIFO where the sample writes its first file blocks that write
    as a stalled disk does, until the test opens it for reading."""
    from worker.capture import camera_folder

    prefix = f"s{uuid.uuid4().hex[:6]}"
    client = Client(broker.port, prefix)
    config = write_config(tmp_path, broker.port, bundle_dir, topics={"prefix": prefix})
    folder = tmp_path / "capture" / camera_folder("cam")
    folder.mkdir(parents=True)
    fifos = [folder / f"{point_id('cam', f'f{i:02d}')}.png.tmp" for i in range(12)]  # whichever frame comes first
    for fifo in fifos:
        os.mkfifo(fifo)
    worker = worker_factory(config)
    wait_online(client, prefix)
    frame = _png(dataset)
    try:
        for i in range(12):
            client.publish_frame("cam", frame, f"f{i:02d}")
        results = client.json_on(f"{prefix}/cam/result", count=12, timeout=60)
        assert sorted(r["frame_id"] for r in results) == [f"f{i:02d}" for i in range(12)]
        client.wait_for(lambda m: m.topic == f"{prefix}/workers/w-test/stats"
                        and json.loads(m.payload)["capture_busy_skipped"] >= 1, timeout=30)
    finally:  # the disk comes back: a reader at each FIFO lets the stalled write complete (into the pipe's buffer)
        readers = [os.open(fifo, os.O_RDONLY | os.O_NONBLOCK) for fifo in fifos]
    try:
        assert worker.stop() == 0, worker.output()[-2000:]
    finally:
        for reader in readers:
            os.close(reader)
        client.close()
