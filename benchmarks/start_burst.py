"""Start-under-burst: how many worker starts answer every frame of a burst that meets them at start-up.

    python -m benchmarks.start_burst --starts 50 [--bundle DIR] [--root CHECKOUT]

Each start: 8 QoS 1 frames from 4 cameras (one connection per camera, in parallel) wait in the
worker's persistent session, so the broker delivers them the moment the worker subscribes, while
its two inference threads start; 8 more follow in parallel.  A start counts as answered when all
16 results arrive within ``--timeout``; otherwise the worker gets SIGTERM (and SIGKILL if it
ignores it, which is counted).  ``--root`` runs the worker from another checkout (e.g. a scratch
copy with a guard removed) against the same broker and bundle.
"""

from __future__ import annotations

import argparse
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
import yaml
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from benchmarks.common import ROOT
from scripts.broker import Broker


def _tiny_bundle(folder: Path) -> Path:
    """The tests' bundle: PatchCore at 128 px on a generated texture set (seconds)."""
    from exporter.synthetic import generate

    generate(folder / "data", "weave", size=128, n_train=32, n_test=4, seed=1)
    out = folder / "bundle"
    subprocess.run([sys.executable, "-m", "exporter", "train", "--data", str(folder / "data"), "--category", "weave",
                    "--out", str(out), "--input-size", "128", "--coreset-ratio", "0.05"], cwd=ROOT, check=True,
                   capture_output=True)
    return out


class Results:
    """Frame ids of every result seen under the prefix."""

    def __init__(self, port: int, prefix: str) -> None:
        self.ids: set[str] = set()
        self.online = 0
        self.cond = threading.Condition()
        self.client = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5,
                                  client_id=f"obs-{uuid.uuid4().hex[:8]}")
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        self.client.subscribe([(f"{prefix}/+/result", 1), (f"{prefix}/workers/+/availability", 1)])
        self.client.loop_start()

    def _on_message(self, client, userdata, msg) -> None:
        with self.cond:
            if msg.topic.endswith("/availability"):
                self.online += msg.payload == b"online"
            else:
                self.ids.add(json.loads(msg.payload)["frame_id"])
            self.cond.notify_all()

    def wait_online(self, count: int, timeout: float) -> bool:
        with self.cond:
            return self.cond.wait_for(lambda: self.online >= count, timeout)

    def wait(self, wanted: set[str], timeout: float) -> bool:
        with self.cond:
            return self.cond.wait_for(lambda: wanted <= self.ids, timeout)


def burst(port: int, prefix: str, frame: bytes, tag: str) -> set[str]:
    ids: set[str] = set()

    def camera(n: int) -> None:
        c = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5,
                        client_id=f"cam-{uuid.uuid4().hex[:8]}")
        c.connect("127.0.0.1", port)
        c.loop_start()
        infos = []
        for i in range(2):
            frame_id = f"{tag}-cam{n}-{i}"
            props = Properties(PacketTypes.PUBLISH)
            props.UserProperty = [("frame_id", frame_id), ("captured_at", str(time.time()))]
            infos.append(c.publish(f"{prefix}/cam{n}/frame", frame, qos=1, properties=props))
            ids.add(frame_id)
        for info in infos:
            info.wait_for_publish(10)
        c.disconnect()
        c.loop_stop()

    threads = [threading.Thread(target=camera, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return ids


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--starts", type=int, default=50)
    ap.add_argument("--bundle", type=Path)
    ap.add_argument("--root", type=Path, default=ROOT, help="checkout whose worker is started")
    ap.add_argument("--timeout", type=float, default=60)
    args = ap.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="start-burst-"))
    bundle = args.bundle or _tiny_bundle(work)
    broker = Broker(work / "broker")
    prefix = f"b{uuid.uuid4().hex[:6]}"
    cfg = {"worker": {"id": "w-burst", "stats_interval_s": 1}, "topics": {"prefix": prefix},
           "mqtt": {"port": broker.port, "client_id": f"burst-{prefix}", "session_expiry_s": 600},
           "model": {"bundle": str(bundle), "cache_dir": str(work / "ov-cache")},
           "limits": {"inference_threads": 2}, "store": {"path": str(work / "qdrant"), "log_normal_every": 0},
           "evidence": {"path": str(work / "evidence")}, "spool": {"path": str(work / "spool")},
           "metrics": {"enabled": False}}
    config = work / "config.yaml"
    config.write_text(yaml.safe_dump(cfg))
    frame = cv2.imencode(".png", np.random.default_rng(0).integers(0, 255, (128, 128, 3), np.uint8))[1].tobytes()
    results = Results(broker.port, prefix)
    answered = ignored_sigterm = 0
    try:
        for n in range(-1, args.starts):  # start -1 only creates the persistent session
            waiting = burst(broker.port, prefix, frame, f"s{n}a") if n >= 0 else set()
            started = time.monotonic()
            with (work / f"worker{n}.log").open("wb") as log:
                proc = subprocess.Popen([sys.executable, "-m", "worker", "--config", str(config)], cwd=args.root,
                                        stdout=log, stderr=subprocess.STDOUT)
                ids = waiting | (burst(broker.port, prefix, frame, f"s{n}b") if n >= 0 else set())
                ok = results.wait(ids, args.timeout) if ids else results.wait_online(1, args.timeout)
                took = time.monotonic() - started
                proc.send_signal(signal.SIGTERM)
                try:
                    code = proc.wait(30)
                except subprocess.TimeoutExpired:
                    ignored_sigterm += 1
                    proc.kill()
                    code = proc.wait()
            if n >= 0:
                answered += ok
                print(f"start {n}: {'answered' if ok else 'NOT answered'} {len(ids & results.ids)}/{len(ids)} "
                      f"in {took:.1f} s, exit {code}", flush=True)
    finally:
        results.client.loop_stop()
        broker.stop()
    print(f"RESULT answered starts {answered}/{args.starts}; ignored SIGTERM {ignored_sigterm}; root {args.root}")
    return 0 if answered == args.starts else 1


if __name__ == "__main__":
    sys.exit(main())
