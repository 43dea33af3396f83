"""Malformed messages and requests on every input of a real operator console, with a canary after each batch.

    python -m benchmarks.console_fuzz --messages 10000 [--batch 100] [--seed 1]

The console reads what anyone able to publish under the prefix sends, and what anyone reaching its port asks.
Channels: camera frames and heatmaps (user properties, image files, raw pixel buffers and their declarations),
results and errors (a valid one mutated, any JSON, deep nesting, bytes), topic levels, a worker's availability,
model and stats (mutated the same way), and HTTP requests to every route (paths, query strings, bodies).  After
each batch a canary (a frame and its anomalous result from another camera) must be on the console's state, in its
defect feed and served as the frame sent.  No message or request may make the console log a traceback or answer
HTTP 500.  Prints per-channel counts, canaries seen, HTTP answers by status, the console's maximum RSS.  The
strategies here are also what tests/test_fuzz_channels.py draws from for the console.
"""

from __future__ import annotations

import argparse
import http.client
import json
import sys
import tempfile
import time
import urllib.parse
import uuid
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

import paho.mqtt.client as mqtt
import psutil
import yaml
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from benchmarks.fuzz import GOOD, JSON, NUMBERS, TEXT, fitted, tracebacks_in
from worker.wire import PIXEL_FORMATS

CHANNELS = ("frame", "heatmap", "result", "error", "topic", "worker", "http")
CAMERAS = ("cf", "cf-2")  # the cameras most messages name, so frames, results and requests meet
FRAME_IDS = ("f1", "f2", "f3")
WORKERS = ("w-test", "w-2")
ROUTES = ("api/state", "api/events?x=1", "api/frames/{camera}/{frame_id}/{kind}", "api/defects?{query}",
          "api/similar", "api/labels", "api/labels/unlabel", "api/labels/export?{query}", "api/extensions?{query}",
          "api/capture/export", "api/models/reload", "api/models/rollback", "static/{camera}", "{camera}")
RESULT = {"camera": "cf", "frame_id": "f1", "score": 0.7, "raw_score": 40.1, "threshold": 0.5, "verdict": "anomalous",
          "captured_at": "2026-12-06T00:00:00+00:00", "model": {"name": "m", "version": "1"}}
ERROR = {"code": "corrupt_image", "message": "x", "frame_id": "f1", "camera": "cf"}
STATS = {"at": "2026-12-06T00:00:00+00:00", "queue": 0, "cameras": {"cf": {"received": 3, "processed": 3}},
         "capture": {"cf": {"seen": 1, "kept": 1}}, "capture_export": {"running": None, "last": None},
         "other_process": None}
MODEL = {"name": "m", "version": "1", "bundle": "/b", "scopes": {"default": {"name": "m", "version": "1"}}}
QUERY_KEYS = st.sampled_from(["since", "until", "limit", "camera", "label", "format", "x"])


def _mutated(valid: dict) -> st.SearchStrategy[bytes]:
    """A valid message with fields dropped or replaced by any JSON, any JSON, nesting past any parser, or bytes."""
    keys = st.sampled_from(list(valid))
    return st.one_of(
        st.builds(lambda extra, drop: json.dumps({**{k: v for k, v in valid.items() if k != drop}, **extra}).encode(),
                  st.dictionaries(keys | TEXT, JSON | NUMBERS, max_size=3), st.sampled_from([None, *valid])),
        JSON.map(lambda v: json.dumps(v).encode()),
        st.integers(9, 3000).map(lambda depth: b"[" * depth + b"]" * depth),
        st.binary(max_size=256),
    )


def _image() -> st.SearchStrategy[tuple[bytes, list[tuple[str, str]]]]:
    """An image's payload and its pixel declaration (none, or a raw buffer's, fitting or a few bytes off)."""
    side = st.one_of(st.integers(0, 300).map(str), st.just("99999999"), TEXT)
    raw = st.builds(lambda fmt, w, h, change: (fitted(bytes(range(64)), fmt, w, h, change),
                                               [("pixel_format", fmt), ("width", w), ("height", h)]),
                    st.one_of(st.sampled_from(list(PIXEL_FORMATS)), TEXT), side, side, st.sampled_from([0, 0, -1, 1]))
    files = st.one_of(st.just(GOOD), st.binary(max_size=512), st.integers(0, len(GOOD) - 1).map(lambda n: GOOD[:n]))
    return st.one_of(files.map(lambda payload: (payload, [])), raw)


def message(prefix: str) -> st.SearchStrategy[dict]:
    """One malformed message or request: {channel, topic, payload, user} or {channel: http, method, path, body}."""
    camera = st.one_of(st.sampled_from(CAMERAS), TEXT.filter(lambda t: t and not set(t) & set("/+#\x00")))
    frame_id = st.one_of(st.sampled_from(FRAME_IDS), TEXT)

    def image(leaf: str) -> st.SearchStrategy[dict]:
        return st.builds(
            lambda cam, fid, img, extra: {"channel": leaf, "topic": f"{prefix}/{cam}/{leaf}", "payload": img[0],
                                          "user": [("frame_id", fid), *img[1], *extra]},
            camera, frame_id, _image(), st.lists(st.tuples(TEXT, TEXT), max_size=2))

    def json_on(channel: str, leaf: str, valid: dict) -> st.SearchStrategy[dict]:
        return st.builds(lambda cam, payload: {"channel": channel, "topic": f"{prefix}/{cam}/{leaf}",
                                               "payload": payload}, st.sampled_from(CAMERAS), _mutated(valid))

    topic = st.builds(lambda level, fid: {"channel": "topic", "topic": f"{prefix}/{level}/result",
                                          "payload": json.dumps({**RESULT, "camera": level, "frame_id": fid}).encode()},
                      camera, frame_id)
    worker = st.builds(
        lambda wid, leaf, payload: {"channel": "worker", "topic": f"{prefix}/workers/{wid}/{leaf}", "payload": payload},
        st.one_of(st.sampled_from(WORKERS), TEXT.filter(lambda t: t and not set(t) & set("/+#\x00"))),
        st.sampled_from(["stats", "model", "availability", "other"]),
        st.one_of(_mutated(STATS), _mutated(MODEL), st.sampled_from([b"online", b"offline", b"stopped", b""]),
                  st.binary(max_size=80)))
    quoted = st.one_of(camera, frame_id, TEXT).map(lambda t: urllib.parse.quote(t, safe=""))
    path = st.builds(
        lambda route, cam, fid, kind, query: route.format(camera=cam, frame_id=fid, kind=kind,
                                                          query=urllib.parse.urlencode(query)),
        st.sampled_from(ROUTES), quoted, quoted, st.sampled_from(["frame", "heatmap", "thumbnail", "x"]),
        st.dictionaries(QUERY_KEYS, NUMBERS | TEXT | st.integers().map(str), max_size=3))
    request = st.builds(lambda method, p, body: {"channel": "http", "method": method, "path": p, "body": body},
                        st.sampled_from(["GET", "POST"]), path,
                        st.one_of(_mutated({"frame_id": "f1", "camera": "cf", "top_k": 3, "label": "false_alarm",
                                            "bundle": "/b"}), st.just(b"")))
    # hypothesis favours the first branch: the cheap JSON channels first, images (the largest draws) last
    return st.one_of(json_on("result", "result", RESULT), worker, request, json_on("error", "error", ERROR), topic,
                     image("frame"), image("heatmap"))


class ConsoleFuzzer:
    """A client that publishes messages, makes requests and checks the canaries on the console."""

    def __init__(self, port: int, prefix: str, http_port: int) -> None:
        self.prefix, self.http_port = prefix, http_port
        self.client = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5,
                                  client_id=f"cfuzz-{uuid.uuid4().hex[:8]}")
        self.client.max_inflight_messages_set(100)
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        self.counts = {c: 0 for c in CHANNELS}
        self.statuses: Counter[int] = Counter()
        self.failed: list[str] = []  # requests answered 500 or not at all

    def publish(self, m: dict) -> mqtt.MQTTMessageInfo | None:
        self.counts[m["channel"]] += 1
        if m["channel"] == "http":
            self.request(m["method"], m["path"], m["body"])
            return None
        props = Properties(PacketTypes.PUBLISH)
        if m.get("user"):
            props.UserProperty = m["user"]
        return self.client.publish(m["topic"], m["payload"], qos=1, properties=props)

    def request(self, method: str, path: str, body: bytes = b"") -> tuple[int, bytes]:
        """One request on a connection of its own; a 500 or no answer is recorded as a failure."""
        connection = http.client.HTTPConnection("127.0.0.1", self.http_port, timeout=30)
        try:
            headers = {"Content-Type": "application/json"} if method == "POST" else {}
            connection.request(method, f"/{path}", body=body if method == "POST" else None, headers=headers)
            reply = connection.getresponse()
            data = reply.read() if not path.startswith("api/events") else b""
            self.statuses[reply.status] += 1
            if reply.status == 500:
                self.failed.append(f"{method} /{path}: 500")
            return reply.status, data
        except (OSError, http.client.HTTPException) as exc:
            self.failed.append(f"{method} /{path}: {type(exc).__name__} {exc}")
            return 0, b""
        finally:
            connection.close()

    def canary(self, timeout: float) -> bool:
        """A frame and its anomalous result from camera ``canary``: on the state, in the feed, served as sent."""
        tag = f"c-{uuid.uuid4().hex[:8]}"
        props = Properties(PacketTypes.PUBLISH)
        props.UserProperty = [("frame_id", tag)]
        self.client.publish(f"{self.prefix}/canary/frame", GOOD, qos=1, properties=props).wait_for_publish(30)
        result = {**RESULT, "camera": "canary", "frame_id": tag, "captured_at": datetime.now(UTC).isoformat()}
        self.client.publish(f"{self.prefix}/canary/result", json.dumps(result), qos=1).wait_for_publish(30)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status, state = self.request("GET", "api/state")
            if status == 200 and json.loads(state)["cameras"].get("canary", {}).get("frame_id") == tag:
                feed = json.loads(self.request("GET", "api/defects?camera=canary&limit=5")[1])["frames"]
                return feed[0]["frame_id"] == tag and self.request("GET", f"api/frames/canary/{tag}/frame")[1] == GOOD
            time.sleep(0.05)  # polling the console's state for the canary, the observable
        return False


def main(argv: list[str] | None = None) -> int:
    from scripts.broker import Broker, free_port
    from scripts.console_helpers import ConsoleProcess

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--messages", type=int, default=10_000)
    ap.add_argument("--batch", type=int, default=100)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="console-fuzz-"))
    broker = Broker(work / "broker")
    prefix, port = f"z{uuid.uuid4().hex[:6]}", free_port()
    cfg = {"worker": {"id": "w-test"}, "topics": {"prefix": prefix}, "mqtt": {"port": broker.port},
           "model": {"bundle": str(work / "no-bundle")}, "limits": {"max_frame_bytes": 200_000},
           "query": {"timeout_s": 1}, "console": {"port": port, "control_timeout_s": 1, "max_workers": 8}}
    (work / "config.yaml").write_text(yaml.safe_dump(cfg))
    console = ConsoleProcess(work / "config.yaml", work / "console.log", port)
    fuzzer = ConsoleFuzzer(broker.port, prefix, port)
    totals = {"sent": 0, "canaries": 0, "seen": 0, "max_rss": 0}
    started = time.monotonic()

    @settings(max_examples=max(1, args.messages // args.batch), deadline=None, database=None,
              phases=[Phase.generate], suppress_health_check=list(HealthCheck))
    @given(st.lists(message(prefix), min_size=args.batch, max_size=args.batch))
    def batch(messages: list[dict]) -> None:
        for info in [fuzzer.publish(m) for m in messages]:
            if info is not None:
                info.wait_for_publish(30)
        totals["sent"] += len(messages)
        totals["canaries"] += 1
        totals["seen"] += fuzzer.canary(60)
        totals["max_rss"] = max(totals["max_rss"], psutil.Process(console.proc.pid).memory_info().rss)
        print(f"{totals['sent']} sent, canaries {totals['seen']}/{totals['canaries']}, "
              f"RSS {totals['max_rss'] / 1e6:.0f} MB", flush=True)

    try:
        seed(args.seed)(batch)()
        state = json.loads(fuzzer.request("GET", "api/state")[1] or b"{}")
    finally:
        alive = console.proc.poll() is None
        code = console.stop()
        fuzzer.client.loop_stop()
        broker.stop()
    tracebacks = tracebacks_in(console.log_path.read_text(errors="replace"))
    print(json.dumps({"messages": totals["sent"], "per_channel": fuzzer.counts, "canaries": totals["canaries"],
                      "canaries_seen": totals["seen"], "http": dict(sorted(fuzzer.statuses.items())),
                      "http_failed": fuzzer.failed[:10], "dropped": state.get("dropped"),
                      "restarts": {t: s["restarts"] for t, s in state.get("threads", {}).items() if s["restarts"]},
                      "max_rss_mb": round(totals["max_rss"] / 1e6), "tracebacks": tracebacks, "alive_at_end": alive,
                      "exit_code": code, "seconds": round(time.monotonic() - started), "console_log": str(console.log_path)}))
    return 0 if totals["seen"] == totals["canaries"] and not fuzzer.failed and not tracebacks and alive and code == 0 \
        else 1


if __name__ == "__main__":
    sys.exit(main())
