"""The end-to-end demo: train -> bundle -> mosquitto -> worker -> camera replay -> similar-defect query -> report.

Run through ``bash scripts/demo.sh`` (which sets the machine up first).  Uses MVTec AD
grid from ../shared/data/mvtec when present, else a generated texture set.  Writes
everything under demo-out/ and shuts every process down at the end, also on Ctrl-C.
"""

from __future__ import annotations

import argparse
import base64
import json
import shlex
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt
import yaml

from scripts.broker import Broker, free_port
from scripts.console_helpers import ConsoleProcess

ROOT = Path(__file__).resolve().parents[1]
GRID = ROOT.parent / "shared" / "data" / "mvtec"
CAMERA = "line1"


def banner(text: str) -> None:
    print(f"\n=== {text}", flush=True)


def shell(cmd: list[str | Path]) -> str:
    """A command as a shell reads it back: pasted, a path with a space or a quote stays one argument."""
    return shlex.join(str(c) for c in cmd)


def run(cmd: list[str | Path], **kw) -> subprocess.CompletedProcess:
    print("$ " + shell(cmd), flush=True)
    return subprocess.run(cmd, check=True, cwd=ROOT, **kw)


def choose_data(out: Path) -> tuple[Path, str, str]:
    """(data root, category, defect type to query with)."""
    if (GRID / "grid" / "train" / "good").is_dir():
        return GRID, "grid", "broken"
    banner("../shared/data/mvtec/grid not found: generating a small texture set instead")
    data = out / "data"
    if not (data / "weave").is_dir():
        run([sys.executable, "-m", "exporter", "synth", "--out", str(data), "--size", "256", "--train", "60",
             "--test", "6"])
    return data, "weave", "hole"


# Everything the worker writes (its config keys), under --out: removed at the start of each run, so a run neither
# scores with the bank rows an earlier run's console labels added nor replays that run's spool, captures or rollouts.
# The OpenVINO cache (model.cache_dir) is kept: it only saves compiling the same bundle again.
WORKER_STATE = {
    ("store", "path"): "qdrant",
    ("evidence", "path"): "evidence",
    ("spool", "path"): "data/spool",
    ("learning", "path"): "data/extensions",
    ("capture", "path"): "data/capture",
    ("capture", "export_path"): "data/training",
    ("model", "rollout_path"): "data/rollout",
    ("mqtt", "session_file"): "data/mqtt-session.json",
}


def reset_worker_state(out: Path) -> None:
    """Remove what an earlier run's worker (and console) wrote under ``out``."""
    for rel in WORKER_STATE.values():
        path = out / rel
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


def demo_config(out: Path, port: int, bundle: Path) -> Path:
    cfg = yaml.safe_load((ROOT / "config.yaml").read_text())
    cfg["mqtt"]["port"] = port
    cfg["model"]["bundle"] = str(bundle)
    cfg["model"]["cache_dir"] = str(out / "ov-cache")
    for (section, key), rel in WORKER_STATE.items():
        cfg.setdefault(section, {})[key] = str(out / rel)
    cfg["limits"]["queue_policy"] = "block"  # a replay should lose nothing: back-pressure instead of drops
    cfg["worker"]["stats_interval_s"] = 1  # the demo waits on the stats topic for the store to catch up
    cfg["console"]["port"] = free_port()
    cfg["metrics"]["port"] = free_port()  # config.yaml's 9108 may be another worker's /metrics
    path = out / "config.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def replay_fps(results: list[dict]) -> float:
    """Frames/s through the worker: the results over the time from the publisher's first frame (the earliest
    ``captured_at``, which the publisher stamps as it publishes a frame) to the worker's last result (the latest
    ``published_at``); the publisher's own start-up (Python, paho, connecting) is not in it."""
    from worker.wire import parse_timestamp

    first = min(parse_timestamp(r["captured_at"]) for r in results)
    last = max(parse_timestamp(r["published_at"]) for r in results)
    return len(results) / max(last - first, 1e-6)


class Watcher:
    """Prints a live line per result and keeps results, some heatmaps and the worker's status."""

    def __init__(self, port: int, total: int, heatmap_dir: Path) -> None:
        self.total = total
        self.results: list[dict] = []
        self.errors: list[dict] = []
        self.heatmap_dir = heatmap_dir
        self.status: list[str] = []
        self.done = threading.Event()
        self.logged = 0  # results the worker says it recorded (their embeddings go to the store)
        self.stats: dict = {}
        self.stats_seen = threading.Condition()
        self.client = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5,
                                  client_id="demo-watcher")
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        self.client.subscribe("inspect/#", qos=1)
        self.client.loop_start()

    def _on_message(self, client, userdata, msg) -> None:
        leaf = msg.topic.rsplit("/", 1)[-1]
        if leaf == "result":
            r = json.loads(msg.payload)
            self.results.append(r)
            self.logged += bool(r.get("logged"))
            mark = "ANOMALOUS" if r["verdict"] == "anomalous" else "normal   "
            print(f"[{len(self.results):3d}/{self.total}] {r['camera']} {r['frame_id']:<28} score {r['score']:.3f} "
                  f"{mark} infer {r['latency_ms']['infer']:6.1f} ms  total {r['latency_ms']['total']:7.1f} ms",
                  flush=True)
        elif leaf == "heatmap":
            props = dict(getattr(msg.properties, "UserProperty", None) or [])
            (self.heatmap_dir / f"{props.get('frame_id', 'unknown')}.jpg").write_bytes(msg.payload)
        elif leaf == "error":
            self.errors.append(json.loads(msg.payload))
            print(f"error: {msg.payload.decode()}", flush=True)
        elif leaf == "stats":
            with self.stats_seen:
                self.stats = json.loads(msg.payload)
                self.stats_seen.notify_all()
        elif leaf == "availability":
            self.status.append(msg.payload.decode())
            print(f"worker availability: {msg.payload.decode()}", flush=True)
        if len(self.results) + len(self.errors) >= self.total:
            self.done.set()

    def wait_stored(self, timeout: float) -> bool:
        """Until the worker's stats say every recorded result is written to the store (none left to write)."""
        def caught_up() -> bool:
            return self.stats.get("store_written", 0) >= self.logged and self.stats.get("store_pending") == 0
        with self.stats_seen:
            return self.stats_seen.wait_for(caught_up, timeout)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def write_report(out: Path, manifest: dict, watcher: Watcher, query: dict, timings: dict, query_id: str,
                 cpu: str) -> Path:
    """report/README.md: the figures the README quotes, each naming the CPU and precision it was measured at
    (``cpu``: the worker's, this machine's), since they differ from CPU to CPU and precision to precision."""
    report = out / "report"
    report.mkdir(exist_ok=True)
    test = manifest.get("metrics", {}).get("test") or {}
    served = ", ".join(sorted({r["model"]["precision"] for r in watcher.results})) or "no results"
    lines = [
        "# edge-inspect demo report",
        "",
        f"Bundle `{manifest['name']}` version `{manifest['version']}` ({manifest['family']}, "
        f"{manifest['training']['backbone']}, {manifest['input']['width']} px).",
        "",
        f"Quality measured on {test.get('device', 'an unrecorded CPU')} at {test.get('precision', 'an unrecorded precision')}"
        f" (the bundle's test metrics); frames served on {cpu} at {served} (the results' model.precision).",
        "",
        "| measure | value |", "|---|---|",
        f"| image AUROC (OpenVINO bundle, test split) | {test.get('image_auroc')} |",
        f"| pixel AUROC | {test.get('pixel_auroc')} |",
        f"| image F1 at the bundle threshold | {test.get('image_f1')} |",
        f"| training (fit) time | {manifest['training'].get('fit_s')} s |",
        f"| frames replayed / results / errors | {watcher.total} / {len(watcher.results)} / {len(watcher.errors)} |",
        f"| worker throughput (publisher's first frame to last result) | {timings['fps']:.1f} frames/s |",
        f"| demo wall time | {timings['wall_s']:.0f} s |",
        "",
        "## Results", "",
        "| frame | score | verdict | infer ms | total ms |", "|---|---|---|---|---|",
    ]
    for r in sorted(watcher.results, key=lambda r: r["frame_id"]):
        lines.append(f"| {r['frame_id']} | {r['score']:.3f} | {r['verdict']} | {r['latency_ms']['infer']} | "
                     f"{r['latency_ms']['total']} |")
    lines += ["", "## Heatmaps (a few anomalous frames)", ""]
    anomalous = [r["frame_id"] for r in watcher.results if r["verdict"] == "anomalous"][:6]
    for frame_id in anomalous:
        src = watcher.heatmap_dir / f"{frame_id}.jpg"
        if src.is_file():
            shutil.copy(src, report / src.name)
            lines.append(f"![{frame_id}]({src.name}) `{frame_id}`")
    lines += ["", f"## Past frames most similar to `{query_id}`", "",
              "| rank | frame | similarity | score | verdict | thumbnail |", "|---|---|---|---|---|---|"]
    for rank, hit in enumerate(query.get("hits", []), 1):
        name = f"similar-{rank}.jpg"
        if hit.get("thumbnail_b64"):
            (report / name).write_bytes(base64.b64decode(hit["thumbnail_b64"]))
        lines.append(f"| {rank} | {hit['frame_id']} | {hit['similarity']:.3f} | {hit['score']:.3f} | "
                     f"{hit['verdict']} | ![]({name}) |")
    path = report / "README.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=ROOT / "demo-out")
    parser.add_argument("--retrain", action="store_true", help="train again even if the bundle exists")
    args = parser.parse_args()
    started = time.monotonic()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    data, category, query_type = choose_data(out)

    bundle = out / "bundles" / f"{category}-patchcore"
    if args.retrain or not (bundle / "bundle.json").is_file():
        banner(f"training PatchCore on {data / category} (offline backbone weights)")
        # The fast setting as the README states it (256 px, 1500 bank rows, each met by every patch, the bank from
        # every flip and quarter turn of the training images: both data sets are textures); the default (512 px,
        # 1500 rows behind a 500-row screen) gives the finer maps (docs/quality/README.md).
        run([sys.executable, "-m", "exporter", "train", "--data", str(data), "--category", category,
             "--out", str(bundle), "--input-size", "256", "--max-bank", "1500", "--screen-rows", "0",
             "--bank-views", "d4", "--backbone", "efficientnet_lite1"])
    else:
        banner(f"reusing bundle {bundle} (--retrain to train again)")
    manifest = json.loads((bundle / "bundle.json").read_text())
    print(json.dumps(manifest.get("metrics", {}).get("test", {}), indent=2))

    reset_worker_state(out)
    heatmaps = out / "heatmaps"
    shutil.rmtree(heatmaps, ignore_errors=True)
    heatmaps.mkdir()

    frames = sorted((data / category / "test").glob("*/*.png"))
    broker = watcher = worker_log = worker = console = None
    try:  # from the broker's start on: whatever fails, what was started is stopped
        banner("starting mosquitto on a free loopback port")
        broker = Broker(out / "broker")
        print(f"mosquitto pid {broker.proc.pid} on 127.0.0.1:{broker.port}")
        config = demo_config(out, broker.port, bundle)
        watcher = Watcher(broker.port, len(frames), heatmaps)
        worker_log = (out / "worker.log").open("wb")
        banner(f"starting the worker (config {config}, log {out / 'worker.log'})")
        worker = subprocess.Popen([sys.executable, "-m", "worker", "--config", str(config)], cwd=ROOT,
                                  stdout=worker_log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while "online" not in watcher.status:
            if worker.poll() is not None or time.monotonic() > deadline:
                print((out / "worker.log").read_text()[-3000:])
                raise SystemExit("the worker did not come online")
            time.sleep(0.1)

        cfg = yaml.safe_load(config.read_text())
        console = ConsoleProcess(config, out / "console.log", cfg["console"]["port"])
        banner(f"operator console: {console.url}/ (live while the demo runs; "
               f"{shell(['python', '-m', 'worker', 'console', '--config', config])})")
        banner(f"replaying {len(frames)} test images as camera {CAMERA}")
        subprocess.run([sys.executable, str(ROOT / "deploy" / "camera_publisher.py"), "--port", str(broker.port),
                        "--camera", CAMERA, "--folder", str(data / category / "test"), "--glob", "*/*.png",
                        "--fps", "0", "--quiet"], check=True, cwd=ROOT)
        if not watcher.done.wait(600):
            raise SystemExit(f"only {len(watcher.results)} of {len(frames)} results arrived")
        fps = replay_fps(watcher.results)
        print(f"\n{len(watcher.results)} results, {len(watcher.errors)} errors, {fps:.1f} frames/s through the worker")

        if not watcher.wait_stored(60):
            print(f"warning: the store holds {watcher.stats.get('store_written', 0)} of the {watcher.logged} recorded "
                  "frames after 60 s; the query below may miss some")
        # the publisher's ids are <run>-<n>-<folder>_<stem> (unique per run): the first frame of that defect type
        query_id = sorted(r["frame_id"] for r in watcher.results if f"-{query_type}_" in r["frame_id"])[0]
        banner(f"past defects most similar to {query_id}")
        run([sys.executable, "-m", "worker", "query", "--config", str(config), "--frame-id", query_id,
             "--camera", CAMERA, "--top-k", "5"])
        answer = subprocess.run([sys.executable, "-m", "worker", "query", "--config", str(config), "--frame-id",
                                 query_id, "--camera", CAMERA, "--top-k", "5", "--json"], cwd=ROOT,
                                capture_output=True, text=True, check=True)
        query = json.loads(answer.stdout)
    finally:
        banner("shutting down")
        if console is not None:
            print(f"console exited with {console.stop()}")
        if worker is not None and worker.poll() is None:
            worker.terminate()
            print(f"worker exited with {worker.wait(60)}")
        if worker_log is not None:
            worker_log.close()
        if watcher is not None:
            time.sleep(0.3)
            watcher.close()
        if broker is not None:
            broker.stop()
            print("mosquitto stopped")
    timings = {"fps": fps, "wall_s": time.monotonic() - started}
    import openvino as ov

    from bundle.runtime import device_name

    report = write_report(out, manifest, watcher, query, timings, query_id, device_name(ov.Core(), "CPU"))
    banner(f"report: {report}")
    print(f"demo wall time {timings['wall_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
