"""Malformed messages on every input channel of a real worker, with canaries after each batch.

    python -m benchmarks.fuzz --messages 10000 [--bundle DIR] [--batch 200]

Channels: frame user properties and payloads, raw pixel buffers (their declarations and sizes), JSON envelopes (a
camera with ``payload: json_envelope``), topic levels, query, control and label requests (wrong types, unknown
fields, huge or deeply nested JSON, missing response topic, raw bytes), and the worker's own availability topic (the
payloads and user properties a second process under its worker.id would send).
After each batch three canaries must be answered: a QoS 1 frame from another camera (a result, or the
queue policy's ``dropped`` when the queue is full of one frame per camera), a control ``status`` and a query.
No message may make the worker log a traceback (an ``internal_error``: a bug).  At the end the worker gets
SIGTERM and a client takes over its persistent session: any QoS 1 message the worker never acknowledged is
redelivered to it and counted as unacked.  Prints per-channel counts, canaries answered, the worker's maximum RSS.
The hypothesis strategies here are also what tests/test_fuzz_channels.py draws from.
"""

from __future__ import annotations

import argparse
import base64
import json
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import cv2
import numpy as np
import paho.mqtt.client as mqtt
import psutil
import yaml
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from benchmarks.common import ROOT
from worker.pixels import Pixels
from worker.wire import PIXEL_FORMATS

CHANNELS = ("frame", "raw", "envelope", "topic", "query", "control", "label", "availability")
ENVELOPE_CAMERA = "fe"  # a camera configured with payload: json_envelope (cameras.fe in the fuzzed worker's config)
# MQTT strings: valid UTF-8 without control characters (mosquitto drops a publisher that sends them).
TEXT = st.text(st.characters(blacklist_categories=("Cs", "Cc", "Cn")), max_size=40)
NUMBERS = st.sampled_from(["nan", "inf", "-inf", "1e15", "-1e20", "1e308", "0", "-1", "1.5e9", "", " ", "now"])
KEYS = st.sampled_from(["frame_id", "camera", "image_b64", "top_k", "filters", "include_heatmaps", "command",
                        "bundle", "action", "label", "defect_type", "note", "format", "since", "until", "cameras"])
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | TEXT,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(KEYS | TEXT, children, max_size=5),
    max_leaves=12,
)


def png(seed: int = 0) -> bytes:
    return cv2.imencode(".png", np.random.default_rng(seed).integers(0, 255, (128, 128, 3), np.uint8))[1].tobytes()


GOOD = png()


def fitted(payload: bytes, fmt: str, width: str, height: str, change: int = 0, max_pixels: int = 300 * 300) -> bytes:
    """``payload`` repeated or cut to the size a raw pixel buffer's declaration gives, ``change`` bytes off, where the
    declaration is one the worker reads and at most ``max_pixels``; else as it is (the worker refuses it before its
    length counts)."""
    if fmt not in PIXEL_FORMATS or not (width.isascii() and width.isdigit() and height.isascii() and height.isdigit()) \
            or int(width) * int(height) > max_pixels:
        return payload
    size = max(0, Pixels(fmt, int(width), int(height)).nbytes + change)
    unit = payload or b"\x80"
    return (unit * (size // len(unit) + 1))[:size]


def _request_body(channel: str) -> st.SearchStrategy[bytes]:
    valid = {"query": {"frame_id": "x", "top_k": 3}, "control": {"command": "status"},
             "label": {"action": "set", "frame_id": "x", "camera": "c", "label": "false_alarm"}}[channel]
    mutated = st.builds(lambda extra, drop: json.dumps({**{k: v for k, v in valid.items() if k != drop}, **extra}),
                        st.dictionaries(KEYS | TEXT, JSON, max_size=3), st.sampled_from([None, *valid]))
    return st.one_of(
        mutated.map(str.encode),
        JSON.map(lambda v: json.dumps(v).encode()),
        st.integers(9, 3000).map(lambda depth: b"[" * depth + b"]" * depth),
        st.integers(9, 200).map(lambda depth: ('{"a":' * depth + "1" + "}" * depth).encode()),
        st.binary(max_size=256),
        *([st.just(json.dumps({**valid, "bundle": "n" * 4_100_000}).encode())] if channel == "control" else []),
    )


def message(prefix: str, worker_id: str) -> st.SearchStrategy[dict]:
    """One malformed message: {channel, topic, payload, user, response}."""
    def user(frame_id, captured_at, camera_id, extra) -> list[tuple[str, str]]:
        pairs = [(k, v) for k, v in (("frame_id", frame_id), ("captured_at", captured_at), ("camera_id", camera_id))
                 if v is not None]
        return pairs + extra

    frame = st.builds(
        lambda payload, props: {"channel": "frame", "topic": f"{prefix}/fz/frame", "payload": payload, "user": props},
        st.one_of(st.just(GOOD), st.binary(max_size=512), st.integers(0, len(GOOD) - 1).map(lambda n: GOOD[:n])),
        st.builds(user,
                  # hypothesis favours the first branch: the likely-valid values come first, absence last
                  st.one_of(st.text("abcdef0123456789", min_size=1, max_size=16), TEXT,
                            st.text(min_size=129, max_size=300, alphabet="ab/"), st.none()),
                  st.one_of(NUMBERS, st.builds(lambda: str(time.time())), TEXT, st.none()),
                  st.one_of(st.none(), st.none(), st.just("fz"), TEXT),
                  st.lists(st.tuples(TEXT, TEXT), max_size=2)),
    )
    # A machine-vision camera's raw pixel buffer (worker/pixels.py): any format name, sides as numbers or text, a
    # declaration given twice or not at all, the payload sized to fit or a few bytes off.
    side = st.one_of(st.integers(0, 300).map(str), st.just("99999999"), TEXT)
    raw = st.builds(
        lambda fmt, width, height, change, twice: {
            "channel": "raw", "topic": f"{prefix}/fz/frame", "payload": fitted(bytes(range(64)), fmt, width, height, change),
            "user": [("frame_id", uuid.uuid4().hex[:12]), ("captured_at", str(time.time())), ("pixel_format", fmt),
                     ("width", width), ("height", height), *([("width", width)] if twice else [])]},
        st.one_of(st.sampled_from([*PIXEL_FORMATS, "YUV422_8", "Mono14p"]), TEXT), side, side,
        st.sampled_from([0, 0, 0, -1, 1, -2]), st.booleans(),
    )
    # A JSON envelope camera: documents with the fields publishers use, a valid image among them or not.
    b64 = base64.b64encode(GOOD).decode()
    envelope_key = st.sampled_from(["image_b64", "image", "data", "frame_id", "id", "captured_at", "timestamp",
                                    "frame_time", "camera_id", "camera"])
    # flat values keep a batch within hypothesis's entropy budget (nested ones made it end runs early)
    envelope_value = st.one_of(st.just(b64), st.just(f"data:image/png;base64,{b64}"), NUMBERS,
                               st.builds(lambda: str(time.time())), TEXT, st.integers(), st.none())
    envelope = st.builds(
        lambda payload: {"channel": "envelope", "topic": f"{prefix}/{ENVELOPE_CAMERA}/frame", "payload": payload},
        st.one_of(st.dictionaries(envelope_key | TEXT, envelope_value, max_size=4)
                  .map(lambda d: json.dumps(d).encode("utf-8", "surrogatepass")), st.binary(max_size=128)),
    )
    topic = st.builds(
        lambda level, user: {"channel": "topic", "topic": f"{prefix}/{level}/frame", "payload": GOOD, "user": user},
        st.text(st.characters(blacklist_categories=("Cs", "Cc", "Cn"), blacklist_characters="/+#\x00"),
                min_size=1, max_size=200),
        st.just([("frame_id", "t"), ("captured_at", str(time.time()))]),
    )
    requests = [
        st.builds(lambda body, reply, ch=ch, topic_for=topic_for: {"channel": ch, "topic": topic_for, "payload": body,
                                                                   "response": reply},
                  _request_body(ch), st.booleans())
        for ch, topic_for in (("query", f"{prefix}/query"), ("control", f"{prefix}/workers/{worker_id}/control"),
                              ("label", f"{prefix}/label"))
    ]
    # The worker reads its own availability topic (a second process under its worker.id, worker/presence.py).
    presence_keys = st.sampled_from(["instance", "host", "pid", "client_id", "connection"])
    availability = st.builds(
        lambda payload, props: {"channel": "availability", "topic": f"{prefix}/workers/{worker_id}/availability",
                                "payload": payload, "user": props},
        st.one_of(st.just(b"online"), st.just(b"offline"), st.binary(max_size=64)),
        st.lists(st.tuples(presence_keys | TEXT, TEXT), max_size=6),
    )
    return st.one_of(frame, frame, raw, envelope, topic, *requests, availability)  # frames weigh double: the busiest channel


class Fuzzer:
    """A client that publishes messages and waits for canary answers."""

    def __init__(self, port: int, prefix: str, worker_id: str) -> None:
        self.prefix, self.worker_id = prefix, worker_id
        self.cond = threading.Condition()
        self.seen: dict[str, list] = {}
        self.client = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5,
                                  client_id=f"fuzz-{uuid.uuid4().hex[:8]}")
        self.client.max_inflight_messages_set(100)
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        self.client.subscribe([(f"{prefix}/canary/result", 1), (f"{prefix}/canary/error", 1), (f"{prefix}/replies/#", 1),
                               (f"{prefix}/workers/{worker_id}/availability", 1)])
        self.client.loop_start()
        self.counts = {c: 0 for c in CHANNELS}
        self.dropped = 0  # canary frames answered `dropped` by the queue policy (a full queue of one frame per camera)

    def _on_message(self, client, userdata, msg) -> None:
        with self.cond:
            self.seen.setdefault(msg.topic, []).append(msg.payload)
            self.cond.notify_all()

    def wait(self, topic: str, timeout: float, predicate=lambda payload: True) -> bool:
        with self.cond:
            return self.cond.wait_for(lambda: any(predicate(p) for p in self.seen.get(topic, [])), timeout)

    def publish(self, m: dict) -> mqtt.MQTTMessageInfo:
        props = Properties(PacketTypes.PUBLISH)
        if m.get("user"):
            props.UserProperty = m["user"]
        if m.get("response"):
            props.ResponseTopic = f"{self.prefix}/replies/fuzz"
            props.CorrelationData = b"fuzz"
        self.counts[m["channel"]] += 1
        return self.client.publish(m["topic"], m["payload"], qos=1, properties=props)

    def canaries(self, timeout: float) -> int:
        """Publish the three canaries; returns how many were answered within ``timeout``."""
        tag = uuid.uuid4().hex[:8]
        props = Properties(PacketTypes.PUBLISH)
        props.UserProperty = [("frame_id", f"c-{tag}"), ("captured_at", str(time.time()))]
        self.client.publish(f"{self.prefix}/canary/frame", GOOD, qos=1, properties=props)
        for kind, topic, body in (("control", f"{self.prefix}/workers/{self.worker_id}/control", b'{"command": "status"}'),
                                  ("query", f"{self.prefix}/query", json.dumps({"frame_id": "none"}).encode())):
            p = Properties(PacketTypes.PUBLISH)
            p.ResponseTopic = f"{self.prefix}/replies/{kind}-{tag}"
            p.CorrelationData = tag.encode()
            self.client.publish(topic, body, qos=1, properties=p)
        deadline = time.monotonic() + timeout

        def mine(payload: bytes) -> bool:
            return json.loads(payload)["frame_id"] == f"c-{tag}"

        with self.cond:
            self.cond.wait_for(lambda: any(mine(p) for t in ("result", "error")
                                           for p in self.seen.get(f"{self.prefix}/canary/{t}", [])), timeout)
            errors = [json.loads(p)["code"] for p in self.seen.get(f"{self.prefix}/canary/error", []) if mine(p)]
            answered = any(mine(p) for p in self.seen.get(f"{self.prefix}/canary/result", []))
        if errors == ["dropped"]:  # answered, by the policy: the queue held one frame of each of as many cameras
            answered, self.dropped = True, self.dropped + 1
        for kind in ("control", "query"):
            answered += self.wait(f"{self.prefix}/replies/{kind}-{tag}", max(0.0, deadline - time.monotonic()))
        return answered


def tracebacks_in(log: str) -> int:
    """Tracebacks the worker logged, each an ``internal_error`` (a bug): whole lines, so a fuzzed value that the log
    quotes, which hypothesis may draw from this module's own strings, is not counted."""
    return sum(line == "Traceback (most recent call last):" for line in log.splitlines())


def unacked_after_stop(port: int, client_id: str, control_topic: str, timeout: float = 60) -> int:
    """QoS 1 messages the stopped worker never acknowledged: the broker redelivers them to its session.

    A sentinel is queued on the session (the worker subscribes to its control topic) after the worker
    stopped; a client that takes the session over receives the redeliveries first, then the sentinel,
    so everything before the sentinel is what the worker left unacknowledged.
    """
    sentinel = f"sentinel-{uuid.uuid4().hex}".encode()
    pub = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    pub.connect("127.0.0.1", port)
    pub.loop_start()
    pub.publish(control_topic, sentinel, qos=1).wait_for_publish(10)
    pub.loop_stop()
    pub.disconnect()
    before: list[bytes] = []
    done = threading.Event()

    def on_message(client, userdata, msg) -> None:
        if msg.payload == sentinel:
            done.set()
        elif not done.is_set():
            before.append(msg.payload)

    c = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5, client_id=client_id)
    c.on_message = on_message
    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = 0
    c.connect("127.0.0.1", port, clean_start=False, properties=props)
    c.loop_start()
    try:
        if not done.wait(timeout):
            raise RuntimeError("the sentinel never arrived: the worker's session is gone")
    finally:
        c.loop_stop()
        c.disconnect()
    return len(before)


def main(argv: list[str] | None = None) -> int:
    from benchmarks.start_burst import _tiny_bundle
    from scripts.broker import Broker

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--messages", type=int, default=10_000)
    ap.add_argument("--batch", type=int, default=200)
    ap.add_argument("--bundle", type=Path)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="fuzz-"))
    bundle = args.bundle or _tiny_bundle(work)
    broker = Broker(work / "broker")
    prefix, worker_id, client_id = f"z{uuid.uuid4().hex[:6]}", "w-fuzz", f"fuzz-worker-{uuid.uuid4().hex[:6]}"
    cfg = {"worker": {"id": worker_id, "stats_interval_s": 5}, "topics": {"prefix": prefix},
           "mqtt": {"port": broker.port, "client_id": client_id, "session_expiry_s": 600},
           "model": {"bundle": str(bundle), "cache_dir": str(work / "ov-cache")},
           "limits": {"max_frame_bytes": 200_000, "queue_policy": "drop_oldest"},
           "store": {"path": str(work / "qdrant"), "log_normal_every": 50},
           "evidence": {"path": str(work / "evidence"), "max_frames": 200}, "spool": {"path": str(work / "spool")},
           "cameras": {ENVELOPE_CAMERA: {"payload": "json_envelope"}}, "metrics": {"enabled": False}}
    (work / "config.yaml").write_text(yaml.safe_dump(cfg))
    fuzzer = Fuzzer(broker.port, prefix, worker_id)
    log = (work / "worker.log").open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "worker", "--config", str(work / "config.yaml")], cwd=ROOT,
                            stdout=log, stderr=subprocess.STDOUT)
    assert fuzzer.wait(f"{prefix}/workers/{worker_id}/availability", 120, lambda p: p == b"online"), "no start"
    totals = {"sent": 0, "canaries": 0, "answered": 0, "max_rss": 0}
    started = time.monotonic()

    @settings(max_examples=max(1, args.messages // args.batch), deadline=None, database=None,
              phases=[Phase.generate], suppress_health_check=list(HealthCheck))
    @given(st.lists(message(prefix, worker_id), min_size=args.batch, max_size=args.batch))
    def batch(messages: list[dict]) -> None:
        for info in [fuzzer.publish(m) for m in messages]:
            info.wait_for_publish(30)
        totals["sent"] += len(messages)
        totals["canaries"] += 3
        totals["answered"] += fuzzer.canaries(120)
        totals["max_rss"] = max(totals["max_rss"], psutil.Process(proc.pid).memory_info().rss)
        print(f"{totals['sent']} sent, canaries {totals['answered']}/{totals['canaries']}, "
              f"RSS {totals['max_rss'] / 1e6:.0f} MB", flush=True)

    try:
        seed(args.seed)(batch)()
    finally:
        alive = proc.poll() is None
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(120)
        log.close()
        unacked = unacked_after_stop(broker.port, client_id, f"{prefix}/workers/{worker_id}/control")
        fuzzer.client.loop_stop()
        broker.stop()
    sent, canaries, answered = totals["sent"], totals["canaries"], totals["answered"]
    tracebacks = tracebacks_in((work / "worker.log").read_text(errors="replace"))
    print(json.dumps({"messages": sent, "per_channel": fuzzer.counts, "canaries": canaries,
                      "canaries_answered": answered, "canary_frames_dropped_by_policy": fuzzer.dropped,
                      "max_rss_mb": round(totals["max_rss"] / 1e6), "unacked": unacked, "tracebacks": tracebacks,
                      "alive_at_end": alive, "exit_code": code, "seconds": round(time.monotonic() - started),
                      "worker_log": str(work / "worker.log")}))
    return 0 if answered == canaries and unacked == 0 and not tracebacks and alive and code == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
