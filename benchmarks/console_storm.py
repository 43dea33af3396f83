"""The console behind a defect storm: every frame anomalous (a lens covered) and each a large PNG or raw buffer.

mosquitto and the console run as processes, no worker: a client publishes ``--frames`` camera frames of
``--megapixels`` (a smooth random texture, PNG as a line camera's, or with ``--raw FORMAT`` a machine-vision
camera's raw buffer: Mono8, a Bayer 8-bit format or BGR8) each with an anomalous result, then a worker's
availability ``stopped``.  Measured per round (``--rounds``):

- staleness: the availability's publish -> the console's ``/api/state`` shows it (polled every 10 ms); the same
  wait holds a tile, and the worker's answer to a request from the page, behind what the console is doing;
- settled: the availability's publish -> every frame's thumbnail made or given up (``thumbnail_skipped``).

    python -m benchmarks.console_storm --frames 60 --megapixels 5 --rounds 3
    python -m benchmarks.console_storm --frames 60 --megapixels 5 --rounds 3 --raw BayerRG8
"""

from __future__ import annotations

import argparse
import json
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import cv2
import numpy as np

from benchmarks.common import ROOT, fmt, summary
from scripts.broker import Broker, free_port
from scripts.console_helpers import DIRECT, ConsoleProcess
from worker.pixels import PIXEL_FORMATS


def _get(url: str) -> dict:
    """The console's answer, straight to it: it is on loopback, a proxy set for pip must not carry the request."""
    return json.loads(DIRECT.open(url, timeout=10).read())


def _round(broker: Broker, folder: Path, frame: bytes, raw: dict[str, str], frames: int) -> tuple[float, float, int]:
    """Staleness and settled seconds, and the thumbnails given up, of one console process."""
    from tests.conftest import Client, write_config

    prefix, port = f"s{uuid.uuid4().hex[:8]}", free_port()
    config = write_config(folder, broker.port, folder / "no-bundle", topics={"prefix": prefix}, console={"port": port},
                          limits={"max_frame_bytes": len(frame) + 1, "max_pixels": 50_000_000})
    console = ConsoleProcess(config, folder / "console.log", port)
    client = Client(broker.port, prefix)
    try:
        now = datetime.now(UTC).isoformat()
        for k in range(frames):
            client.publish_frame("cam", frame, f"f{k}", extra=raw)
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
    parser.add_argument("--raw", metavar="FORMAT", help="raw buffers of this pixel format (8 or 24 bits a pixel)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench-out" / "console-storm")
    args = parser.parse_args()
    width = int((args.megapixels * 1e6 * 4 / 3) ** 0.5)
    height = width * 3 // 4
    texture = np.random.default_rng(0).integers(0, 256, (height // 8, width // 8, 3), np.uint8)
    image = cv2.resize(texture, (width, height), interpolation=cv2.INTER_LINEAR)
    raw: dict[str, str] = {}
    if args.raw is None:
        frame = cv2.imencode(".png", image)[1].tobytes()
    else:
        if args.raw not in PIXEL_FORMATS:
            parser.error(f"--raw {args.raw}: not a pixel format ({', '.join(PIXEL_FORMATS)})")
        bits = PIXEL_FORMATS[args.raw].bits_per_pixel
        if bits not in (8, 24):
            parser.error(f"--raw {args.raw}: {bits} bits a pixel; this benchmark makes 8 or 24")
        frame = (image if bits == 24 else cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)).tobytes()
        raw = {"pixel_format": args.raw, "width": str(width), "height": str(height)}
    print(f"{args.frames} anomalous frames of {width}x{height} px, {args.raw or 'PNG'} {len(frame) / 1e6:.1f} MB each")
    args.out.mkdir(parents=True, exist_ok=True)
    broker = Broker(args.out / "broker")
    stale, settled, skipped = [], [], []
    try:
        for r in range(args.rounds):
            folder = args.out / f"round-{r}"
            folder.mkdir(exist_ok=True)
            s, t, k = _round(broker, folder, frame, raw, args.frames)
            stale.append(s)
            settled.append(t)
            skipped.append(k)
            print(f"round {r}: availability shown after {s:.3f} s, thumbnails settled after {t:.2f} s, {k} given up")
    finally:
        broker.stop()
    print(f"staleness s: {fmt(summary(stale), 3)}; settled s: {fmt(summary(settled))}; given up: {skipped}")


if __name__ == "__main__":
    main()
