"""Scale-out: 1, 2 and 3 workers in one MQTT v5 shared-subscription group on one broker, side by side.

Each round starts mosquitto, then for k = 1, 2, 3 starts k ``python -m worker`` processes
(``topics.share_group``), publishes the same frames as fast as the broker takes them
(``limits.queue_policy: block``, so nothing is dropped) and times every frame from publish
to result.  On a 2-core machine this shows where the machine, not the design, is the limit.

    python -m benchmarks.scaleout --bundle bundles/grid-patchcore --frames 120 --rounds 3
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

import paho.mqtt.client as mqtt
import psutil
import yaml

from benchmarks.common import (
    BURST_BROKER,
    DATA,
    ROOT,
    WARM_FRAMES,
    fmt,
    header,
    md_table,
    openvino_ran,
    percentiles,
    publish_frame,
    summary,
    wait_for_answers,
)
from scripts.broker import Broker


class Group:
    """k workers sharing one subscription group, and a client that times frames until their result."""

    def __init__(self, broker: Broker, bundle: Path, k: int, folder: Path) -> None:
        self.prefix = f"s{uuid.uuid4().hex[:6]}"
        self.cond = threading.Condition()
        self.online: set[str] = set()
        self.results: dict[str, float] = {}
        self.precisions: set[str] = set()  # what the workers ran, read back (their results' model.precision)
        self.client = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5,
                                  client_id=f"bench-{self.prefix}")
        self.client.max_inflight_messages_set(64)
        self.client.max_queued_messages_set(0)
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", broker.port)
        self.client.loop_start()
        self.client.subscribe(f"{self.prefix}/#", qos=1)
        self.procs = []
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(k):
            cfg = {
                "worker": {"id": f"w{i}", "stats_interval_s": 60},
                "mqtt": {"port": broker.port, "client_id": f"{self.prefix}-w{i}", "session_expiry_s": 0},
                "topics": {"prefix": self.prefix, "share_group": "bench"},
                "model": {"bundle": str(bundle), "cache_dir": str(folder / f"ov-cache-{i}"),
                          "rollout_path": str(folder / f"rollout-{i}")},
                "limits": {"queue_policy": "block"},
                "store": {"path": str(folder / f"qdrant-{i}")},
                "evidence": {"path": str(folder / f"evidence-{i}")},
                "spool": {"path": str(folder / f"spool-{i}")},
                "learning": {"path": str(folder / f"extensions-{i}")},
                "capture": {"path": str(folder / f"capture-{i}"), "export_path": str(folder / f"training-{i}")},
                "metrics": {"enabled": False},
            }
            path = folder / f"w{i}.yaml"
            path.write_text(yaml.safe_dump(cfg))
            log = (folder / f"w{i}.log").open("wb")
            self.procs.append(subprocess.Popen([sys.executable, "-m", "worker", "--config", str(path)], cwd=ROOT,
                                               stdout=log, stderr=subprocess.STDOUT))
        with self.cond:
            if not self.cond.wait_for(lambda: len(self.online) == k, 180):
                raise RuntimeError(f"only {len(self.online)} of {k} workers came online (logs in {folder})")

    def _on_message(self, client, userdata, msg) -> None:
        with self.cond:
            if msg.topic.endswith("/availability") and msg.payload == b"online":
                self.online.add(msg.topic.split("/")[-2])
            elif msg.topic.endswith("/result"):
                result = json.loads(msg.payload)
                self.results[result["frame_id"]] = time.perf_counter()
                self.precisions.add(result["model"]["precision"])
            self.cond.notify_all()

    def run(self, payloads: list[bytes], n: int, tag: str) -> dict:
        sent: dict[str, float] = {}
        cpu0 = sum(psutil.Process(p.pid).cpu_times().user + psutil.Process(p.pid).cpu_times().system
                   for p in self.procs)
        with self.cond:
            before = len(self.results)
        started = time.perf_counter()
        for i in range(n):
            frame_id = f"{tag}-{i}"
            sent[frame_id] = time.perf_counter()
            publish_frame(self.client, f"{self.prefix}/cam/frame", payloads[i % len(payloads)], frame_id)
        with self.cond:
            # every earlier run's frames are answered, so this run's are the count beyond them
            wait_for_answers(self.cond, lambda: len(self.results) - before, n,
                             lambda: all(p.poll() is None for p in self.procs))
        elapsed = max(self.results[f] for f in sent) - started
        cpu = sum(psutil.Process(p.pid).cpu_times().user + psutil.Process(p.pid).cpu_times().system
                  for p in self.procs) - cpu0
        p50, p99 = percentiles([self.results[f] - sent[f] for f in sent])
        rss = sum(psutil.Process(p.pid).memory_info().rss for p in self.procs) / 2**20
        return {"fps": n / elapsed, "p50_ms": p50, "p99_ms": p99, "cpu_ms_per_frame": 1000 * cpu / n, "rss_mb": rss}

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()
        for p in self.procs:
            p.send_signal(signal.SIGTERM)
        for p in self.procs:
            p.wait(60)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, help="a bundle (default: train PatchCore on grid with the CLI)")
    parser.add_argument("--frames", type=int, default=120, help="frames per measurement")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", default="1,2,3")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="edge-inspect-scaleout-"))
    bundle = args.bundle.resolve() if args.bundle else None
    if bundle is None:
        bundle = work / "grid-patchcore"
        subprocess.run([sys.executable, "-m", "exporter", "train", "--data", str(DATA), "--category", "grid",
                        "--out", str(bundle), "--no-eval"], check=True, cwd=ROOT)
    frames = sorted((DATA / "grid" / "test").glob("*/*.png"))
    if not frames:
        raise SystemExit(f"no frames under {DATA}/grid/test")
    payloads = [p.read_bytes() for p in frames]
    counts = [int(k) for k in args.workers.split(",")]
    broker = Broker(work / "broker", extra=BURST_BROKER)
    rounds: list[dict[int, dict]] = []
    ran: set[str] = set()
    try:
        for r in range(args.rounds):
            row = {}
            for k in counts:  # side by side in every round, so load changes hit all of them
                group = Group(broker, bundle, k, work / f"r{r}-k{k}")
                try:
                    group.run(payloads, min(WARM_FRAMES, args.frames), f"warm{r}")
                    row[k] = group.run(payloads, args.frames, f"r{r}")
                    ran |= group.precisions
                finally:
                    group.close()
                print(f"round {r + 1}: {k} worker(s): {row[k]['fps']:.1f} frames/s", flush=True)
            rounds.append(row)
    finally:
        broker.stop()
    table = []
    for k in counts:
        table.append([f"{k} worker(s)",
                      fmt(summary([rd[k]["fps"] for rd in rounds]), 1),
                      fmt(summary([rd[k]["fps"] / rd[counts[0]]["fps"] for rd in rounds])),
                      fmt(summary([rd[k]["p50_ms"] for rd in rounds]), 0),
                      fmt(summary([rd[k]["p99_ms"] for rd in rounds]), 0),
                      fmt(summary([rd[k]["cpu_ms_per_frame"] for rd in rounds]), 0),
                      fmt(summary([rd[k]["rss_mb"] for rd in rounds]), 0)])
    print(f"\n{header(openvino_ran(ran))}; {args.frames} frames per run (grid test images, 1024 px PNG), burst, queue_policy block; "
          f"median [min-max] of {args.rounds} rounds; {psutil.cpu_count()} CPUs\n")
    print(md_table(["workers", "frames/s", f"vs {counts[0]} worker", "p50 ms (burst)", "p99 ms (burst)",
                    "CPU ms/frame", "RSS MB (all)"], table))
    return 0


if __name__ == "__main__":
    sys.exit(main())
