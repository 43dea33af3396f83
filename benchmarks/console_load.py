"""Console responsiveness under load: N cameras publishing at F frames/s each, watched in headless Chromium.

mosquitto, the worker (a tiny 128 px PatchCore bundle trained here, so that the worker
keeps up on a small CPU and the console gets the full result rate) and the console run
as processes; one Chromium page shows the console.  Camera frames are published paced
(round robin, ``--cameras`` x ``--fps``).  Measured in the page, per window of
``--seconds`` (``--windows`` times):

- tile text latency: result ``published_at`` (worker clock) -> the tile shows that result
  (a MutationObserver on the tile's ``data-published-at``, same machine clock);
- tile image latency: ``published_at`` -> the tile's heatmap ``<img>`` switched to that frame;
- page responsiveness: main-thread lag of a 50 ms timer (how late it fires) and long tasks;
- a click on a tile: input delay, click -> "similar past frames" dialog open, click -> hits shown
  (worker query round trip), measured in the page from the click event's time stamp.

    python -m benchmarks.console_load --cameras 8 --fps 5 --seconds 20 --windows 3 [--screenshots docs]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import numpy as np

from benchmarks.common import ROOT, fmt, md_table, summary
from scripts.broker import Broker, free_port
from scripts.console_helpers import ConsoleProcess, launch

PROBE = """() => {
  const m = window.__bench = {tile: [], image: [], lag: [], longtasks: 0};
  const published = new Map();
  new MutationObserver((records) => {
    const now = Date.now();
    for (const r of records) {
      const el = r.target;
      if (r.attributeName === 'data-published-at' && el.dataset.publishedAt) {
        published.set(el.dataset.camera + '/' + el.dataset.frameId, Date.parse(el.dataset.publishedAt));
        m.tile.push(now - Date.parse(el.dataset.publishedAt));
      } else if (r.attributeName === 'src' && el.classList.contains('heat')) {
        const parts = el.getAttribute('src').split('/'), at = parts.indexOf('frames');  // a relative URL, or not
        const t = published.get(decodeURIComponent(parts[at + 1]) + '/' + decodeURIComponent(parts[at + 2]));
        if (t) m.image.push(now - t);
      }
    }
  }).observe(document.getElementById('tiles'), {attributes: true, subtree: true,
                                                 attributeFilter: ['data-published-at', 'src']});
  let last = performance.now();
  setInterval(() => { const now = performance.now(); m.lag.push(now - last - 50); last = now; }, 50);
  new PerformanceObserver((list) => { m.longtasks += list.getEntries().length; }).observe({entryTypes: ['longtask']});
  document.addEventListener('click', (e) => { m.clickAt = e.timeStamp; m.inputDelay = performance.now() - e.timeStamp; },
                            true);
  const dialog = document.getElementById('similar'), status = document.getElementById('q-status');
  new MutationObserver(() => { if (dialog.open && m.clickAt && m.dialogMs === undefined) m.dialogMs = performance.now() - m.clickAt; })
    .observe(dialog, {attributes: true});
  new MutationObserver(() => {
    const t = status.textContent;
    if (m.clickAt && m.hitsMs === undefined && (t.includes('similar frames') || t.startsWith('error')))
      m.hitsMs = performance.now() - m.clickAt;
  }).observe(status, {childList: true, characterData: true, subtree: true});
}"""


def bundle(out: Path) -> Path:
    """The tests' tiny bundle (128 px, generated textures), trained once with the CLI."""
    folder = out / "bundle"
    if not (folder / "bundle.json").is_file():
        subprocess.run([sys.executable, "-m", "exporter", "synth", "--out", str(out / "data"), "--train", "32",
                        "--test", "4"], check=True, cwd=ROOT, capture_output=True)
        subprocess.run([sys.executable, "-m", "exporter", "train", "--data", str(out / "data"), "--category", "weave",
                        "--out", str(folder), "--input-size", "128", "--coreset-ratio", "0.05"], check=True, cwd=ROOT,
                       capture_output=True)
    return folder


def publish(port: int, prefix: str, frames: list[tuple[str, bytes]], cameras: int, fps: float, stop: threading.Event,
            sent: list[int], limit: int | None = None) -> None:
    """Paced QoS 0 frames, round robin over ``cameras``, until ``stop`` (or ``limit`` frames)."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    client = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5,
                         client_id=f"bench-cams-{uuid.uuid4().hex[:6]}")
    client.connect("127.0.0.1", port)
    client.loop_start()
    period = 1.0 / (cameras * fps)
    due = time.monotonic()
    n = 0
    info = None
    while not stop.is_set() and (limit is None or n < limit):
        name, data = frames[n % len(frames)]
        props = Properties(PacketTypes.PUBLISH)
        props.UserProperty = [("frame_id", f"{name}-{n}"), ("captured_at", str(time.time()))]
        info = client.publish(f"{prefix}/cam{n % cameras + 1}/frame", data, qos=0, properties=props)
        n += 1
        sent[0] = n
        due += period
        time.sleep(max(0.0, due - time.monotonic()))
    if info is not None:
        info.wait_for_publish(5)
    client.loop_stop()
    client.disconnect()


def small_png(path: Path, width: int = 1100, colours: int = 128) -> None:
    """Screenshots for the docs: scaled down and palette-quantised, to keep the repository small."""
    from PIL import Image

    image = Image.open(path).convert("RGB")
    image = image.resize((width, round(image.height * width / image.width)), Image.LANCZOS)
    image.quantize(colours, method=Image.Quantize.MEDIANCUT).save(path, optimize=True)


def window_numbers(m: dict) -> dict:
    lag = np.asarray(m["lag"] or [0.0])
    out = {"frames_shown": len(m["tile"]), "longtasks": m["longtasks"], "lag_p99_ms": float(np.percentile(lag, 99)),
           "lag_max_ms": float(lag.max()), "click_input_delay_ms": m["inputDelay"], "click_to_dialog_ms": m["dialogMs"],
           "click_to_hits_ms": m["hitsMs"]}
    for key in ("tile", "image"):
        v = np.asarray(m[key] or [np.nan])
        out[f"{key}_p50_ms"], out[f"{key}_p95_ms"] = float(np.percentile(v, 50)), float(np.percentile(v, 95))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cameras", type=int, default=8)
    parser.add_argument("--fps", type=float, default=5.0)
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--windows", type=int, default=3)
    parser.add_argument("--out", type=Path, default=ROOT / "bench-out" / "console")
    parser.add_argument("--screenshots", type=Path, help="write console.png and console-similar.png here")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    from tests.conftest import write_config

    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    model = bundle(out)
    test = out / "data" / "weave" / "test"
    frames = [(f"{p.parent.name}-{p.stem}", p.read_bytes()) for p in sorted(test.glob("*/*.png"))]
    run_dir = out / f"run-{uuid.uuid4().hex[:6]}"
    run_dir.mkdir()
    broker = Broker(run_dir / "broker")
    port = free_port()
    config = write_config(run_dir, broker.port, model, console={"port": port},
                          worker={"id": "bench", "stats_interval_s": 2}, limits={"queue_size": 64},
                          evidence={"max_frames": 5000})
    worker = subprocess.Popen([sys.executable, "-m", "worker", "--config", str(config)], cwd=ROOT,
                              stdout=(run_dir / "worker.log").open("wb"), stderr=subprocess.STDOUT)
    console = None
    windows = []
    try:
        console = ConsoleProcess(config, run_dir / "console.log", port)
        stop, sent = threading.Event(), [0]
        with sync_playwright() as p:
            browser = launch(p, 1400, 1000)
            page = browser.new_page()
            page.goto(console.url)
            page.wait_for_selector("#worker-bench.on", timeout=60_000)
            # Warm-up: one frame, alone, before the load (the worker's first inference is the slow one; before
            # commit fbf956d, concurrent first inferences on a dynamic-batch input also froze the worker).
            publish(broker.port, "inspect", frames[:1], 1, 1.0, threading.Event(), [0], limit=1)
            page.wait_for_selector(".tile", timeout=60_000)
            publisher = threading.Thread(target=publish, args=(broker.port, "inspect", frames, args.cameras, args.fps,
                                                               stop, sent), daemon=True)
            publisher.start()
            page.wait_for_function(f"document.querySelectorAll('.tile').length >= {args.cameras}", timeout=30_000)
            time.sleep(3)  # warm-up: every tile, plot and feed is live
            for w in range(args.windows):
                page.evaluate(PROBE)
                n0, t0 = sent[0], time.monotonic()
                time.sleep(args.seconds / 2)
                tile = page.locator(".tile").nth(w % args.cameras)
                clicked = time.monotonic()
                tile.locator(".pics").click()
                page.wait_for_function("document.querySelector('#q-status').textContent.includes('similar frames')"
                                       " || document.querySelector('#q-status').textContent.startsWith('error')",
                                       timeout=30_000)
                answered = time.monotonic()
                status = page.locator("#q-status").text_content()
                if args.screenshots and w == 0:
                    args.screenshots.mkdir(parents=True, exist_ok=True)
                    page.screenshot(path=str(args.screenshots / "console-similar.png"))
                    small_png(args.screenshots / "console-similar.png")
                page.keyboard.press("Escape")
                time.sleep(max(0.0, args.seconds - (time.monotonic() - t0)))
                m = page.evaluate("window.__bench")
                numbers = window_numbers(m)
                numbers.update(published_fps=(sent[0] - n0) / (time.monotonic() - t0),
                               shown_fps=numbers["frames_shown"] / (time.monotonic() - t0),
                               driver_click_to_hits_ms=(answered - clicked) * 1000, query=status)
                windows.append(numbers)
                print(json.dumps(numbers), flush=True)
            if args.screenshots:
                page.screenshot(path=str(args.screenshots / "console.png"))
                small_png(args.screenshots / "console.png")
            stop.set()
            publisher.join(5)
            stats = page.evaluate("fetch('/api/state').then(r => r.json()).then(s => s.workers)")
            browser.close()
    finally:
        if console is not None:
            console.stop()
        worker.terminate()
        worker.wait(60)
        broker.stop()
    rows = []
    for key, label in [("published_fps", "frames published /s (all cameras)"),
                       ("shown_fps", "results shown in tiles /s"),
                       ("tile_p50_ms", "result published -> tile text, p50 ms"),
                       ("tile_p95_ms", "result published -> tile text, p95 ms"),
                       ("image_p50_ms", "result published -> tile heatmap image, p50 ms"),
                       ("image_p95_ms", "result published -> tile heatmap image, p95 ms"),
                       ("lag_p99_ms", "main-thread timer lag, p99 ms"),
                       ("lag_max_ms", "main-thread timer lag, max ms"),
                       ("longtasks", "long tasks (>50 ms) per window"),
                       ("click_input_delay_ms", "click on a tile: input delay (event created -> handled), ms"),
                       ("click_to_dialog_ms", "click on a tile -> similar dialog open, ms"),
                       ("click_to_hits_ms", "click on a tile -> similar frames shown (worker query), ms"),
                       ("driver_click_to_hits_ms", "same, seen from Playwright (adds its actionability checks), ms")]:
        rows.append([label, fmt(summary([w[key] for w in windows]), 1)])
    cams = (stats.get("bench", {}).get("stats") or {}).get("cameras", {})
    dropped = sum(c.get("dropped", 0) for c in cams.values())
    processed = sum(c.get("processed", 0) for c in cams.values())
    print(f"\n{args.cameras} cameras x {args.fps:g} frames/s, {args.windows} windows of {args.seconds:g} s; "
          f"median [min-max] over windows; worker processed {processed}, dropped {dropped}; "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs\n")
    print(md_table(["measure", "value"], rows))
    if args.json:
        args.json.write_text(json.dumps({"windows": windows, "processed": processed, "dropped": dropped}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
