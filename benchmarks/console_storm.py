"""The console behind a defect storm: every frame anomalous (a lens covered) and each a large PNG.

mosquitto and the console run as processes, no worker: a client publishes ``--frames`` camera frames of
``--megapixels`` (a smooth random texture, PNG, as a line camera's) each with an anomalous result, then a worker's
availability ``stopped``.  Measured per round (``--rounds``):

- staleness: the availability's publish -> the console's ``/api/state`` shows it (polled every 10 ms); the same
  wait holds a tile, and the worker's answer to a request from the page, behind what the console is doing;
- settled: the availability's publish -> every frame's thumbnail made or given up (``thumbnail_skipped``).

    python -m benchmarks.console_storm --frames 60 --megapixels 5 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import time
import urllib.request
import uuid
from datetime import UTC, datetime
from pathlib import Path

import cv2
import numpy as np

from benchmarks.common import ROOT, fmt, summary
from scripts.broker import Broker, free_port
from scripts.console_helpers import ConsoleProcess


def _get(url: str) -> dict:
    return json.loads(urllib.request.urlopen(url, timeout=10).read())


def _round(broker: Broker, folder: Path, png: bytes, frames: int) -> tuple[float, float, int]:
    """Staleness and settled seconds, and the thumbnails given up, of one console process."""
    from tests.conftest import Client, write_config

    prefix, port = f"s{uuid.uuid4().hex[:8]}", free_port()
    config = write_config(folder, broker.port, folder / "no-bundle", topics={"prefix": prefix}, console={"port": port},
                          limits={"max_frame_bytes": len(png) + 1, "max_pixels": 50_000_000})
    console = ConsoleProcess(config, folder / "console.log", port)
    client = Client(broker.port, prefix)
    try:
        now = datetime.now(UTC).isoformat()
        for k in range(frames):
            client.publish_frame("cam", png, f"f{k}")
            result = {"camera": "cam", "frame_id": f"f{k}", "score": 2.0, "threshold": 1.0, "verdict": "anomalous",
                      "captured_at": now}
            client.client.publish(f"{prefix}/cam/result", json.dumps(result), qos=1)
        client.client.publish(f"{prefix}/workers/w1/availability", "stopped", qos=1).wait_for_publish(60)
        sent = time.monotonic()
        while (_get(f"{console.url}/api/state")["workers"].get("w1") or {}).get("availability") != "stopped":
            time.sleep(0.01)  # polling for the observable state, the measured quantity
        stale = time.monotonic() - sent
        while True:
            state = _get(f"{console.url}/api/state")
            skipped = state["dropped"].get("thumbnail_skipped", 0)
            listed = _get(f"{console.url}/api/defects?camera=cam&limit={frames}")["frames"]
            if len(listed) == frames and sum(r["has_thumbnail"] for r in listed) + skipped >= frames:
                return stale, time.monotonic() - sent, skipped
            time.sleep(0.01)
    finally:
        client.close()
        console.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, default=60)
    parser.add_argument("--megapixels", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=ROOT / "bench-out" / "console-storm")
    args = parser.parse_args()
    width = int((args.megapixels * 1e6 * 4 / 3) ** 0.5)
    height = width * 3 // 4
    texture = np.random.default_rng(0).integers(0, 256, (height // 8, width // 8, 3), np.uint8)
    png = cv2.imencode(".png", cv2.resize(texture, (width, height), interpolation=cv2.INTER_LINEAR))[1].tobytes()
    print(f"{args.frames} anomalous frames of {width}x{height} px, PNG {len(png) / 1e6:.1f} MB each")
    args.out.mkdir(parents=True, exist_ok=True)
    broker = Broker(args.out / "broker")
    stale, settled, skipped = [], [], []
    try:
        for r in range(args.rounds):
            folder = args.out / f"round-{r}"
            folder.mkdir(exist_ok=True)
            s, t, k = _round(broker, folder, png, args.frames)
            stale.append(s)
            settled.append(t)
            skipped.append(k)
            print(f"round {r}: availability shown after {s:.3f} s, thumbnails settled after {t:.2f} s, {k} given up")
    finally:
        broker.stop()
    print(f"staleness s: {fmt(summary(stale), 3)}; settled s: {fmt(summary(settled))}; given up: {skipped}")


if __name__ == "__main__":
    main()
