"""Inference benchmark: the worker against the raw OpenVINO runtime, anomalib's deployment paths and torch.

One PatchCore model is trained here (``fit_patchcore`` at ``--input-size``, default 256 px, the older speed
benchmarks' model and the default ``--frame-size``: ``benchmarks.common.FAST_INPUT``) and packaged as an FP32
bundle (and, with ``--int8``, an NNCF INT8 bundle of the same graph).  Each round then runs, on the same frames (the category's test
images, resized to ``--frame-size``):

- ``raw``: the compiled bundle through ``AsyncInferQueue`` with OpenVINO's optimal number
  of requests, THROUGHPUT hint (benchmark_app's method: the ceiling);
- ``raw-sync``: one request, synchronous, LATENCY hint (one worker thread's way);
  both in a process of their own (``python -m benchmarks.raw_runtime``: bundle, OpenVINO and
  numpy, no torch), fed the same prepared frames through a ``.npy`` file;
- ``worker``: ``python -m worker`` as a subprocess behind a real mosquitto; frames published
  as JPEG (QoS 1, ``limits.queue_policy: block``) as fast as the broker takes them; a frame
  counts when its result AND heatmap came back (the result alone where it says no heatmap is
  published); then a paced run at 80 % of that rate;
  ``--worker-variant NAME:KEY=VALUE,...`` adds a ``worker-fp32[NAME]`` row, the same worker with
  those config keys changed (dotted, YAML values), measured in the same rounds for a side-by-side ratio;
- ``anomalib-openvino``: anomalib's ``Engine.export(..., ExportType.OPENVINO)`` of a Lightning
  ``Patchcore`` holding the trained ``PatchcoreModel``, run per image by ``OpenVINOInferencer``;
  where the export cannot run (anomalib 2.7 needs ``onnxscript`` for it) the table says why;
- ``torch-inferencer``: anomalib's ``TorchInferencer`` on the same model, exported the
  way ``Engine.export(..., ExportType.TORCH)`` does (``to_torch``: ``{"model": lightning module}``);
- ``torch``: anomalib's ``PatchcoreModel`` called per image under ``no_grad`` (the tutorial way);
- ``torch (export graph)``: the ``PatchcoreGraph`` the bundle is exported from, per image under ``no_grad``.

The bundle rows and ``torch (export graph)`` apply the anomaly-map blur as two 1-D passes; the
anomalib rows use anomalib's 2-D blur with the same kernel (the table's ``blur`` column), and where the bundle
screens its bank (``--screen-rows``) they still meet every row with every patch.
``--precision`` (f32 by default, never OpenVINO's own default) is what the raw process, the worker
(``model.precision``) and ``OpenVINOInferencer`` run; the header names it, what OpenVINO really ran,
and the CPU model.  Torch rows run f32.

    python -m benchmarks.throughput --int8 --rounds 3
    python -m benchmarks.throughput --input-size 512 --bank 1500 --frame-size 512 --no-baselines \
        --worker-variant "threads3:limits.inference_threads=3"
    python -m benchmarks.throughput --input-size 256 --bank 1500 --screen-rows 0 --precision f32 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import paho.mqtt.client as mqtt
import psutil
import yaml
from paho.mqtt.subscribeoptions import SubscribeOptions

from benchmarks.common import (
    BURST_BROKER,
    DATA,
    FAST_INPUT,
    ROOT,
    WARM_FRAMES,
    fmt,
    md_table,
    publish_frame,
    summary,
    train_bundles,
    wait_for_answers,
)
from benchmarks.raw_runtime import result
from bundle import PRECISIONS, prepare_image
from bundle.runtime import ran_precision
from worker.supervise import OPENVINO_THREADS

log = logging.getLogger("benchmarks.throughput")
CAMERA = "bench"


# --- raw OpenVINO, in a process of its own ---------------------------------------------------------
def raw_rows(bundle: Path, frames_npy: Path, n: int, precision: str, folder: Path) -> dict:
    """``raw`` and ``raw-sync`` for ``bundle`` from ``python -m benchmarks.raw_runtime`` (no torch in that process)."""
    out = folder / f"raw-{uuid.uuid4().hex[:8]}.json"
    cmd = [sys.executable, "-m", "benchmarks.raw_runtime", str(bundle), str(frames_npy), "--frames", str(n),
           "--precision", precision, "--cache-dir", str(folder / "ov-cache"), "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    rows = json.loads(out.read_text())
    if rows["torch_imported"]:
        raise RuntimeError("the raw-runtime process imported torch: its figures would not be the runtime's alone")
    return rows


# --- the worker behind mosquitto -------------------------------------------------------------------
LOOPS = ("infer-", "recorder", "requests")  # the OS names of the worker's own loops (worker.supervise.supervised_loop)


def thread_cpu(proc: psutil.Process) -> dict[str, float]:
    """CPU seconds so far per OS thread name of ``proc`` (Linux; empty elsewhere)."""
    out: dict[str, float] = {}
    for t in proc.threads():
        try:
            name = Path(f"/proc/{proc.pid}/task/{t.id}/comm").read_text().strip()
        except OSError:  # ended meanwhile, or no /proc
            continue
        out[name] = out.get(name, 0.0) + t.user_time + t.system_time
    return out


class WorkerRig:
    """mosquitto + ``python -m worker`` + a paho client that times each frame until result and heatmap are back."""

    def __init__(self, bundle: Path, folder: Path, precision: str = "f32", cache_dir: Path | None = None,
                 overrides: dict[str, object] | None = None) -> None:
        """``overrides``: dotted config keys (``limits.inference_threads``) and their values, set on top of the rig's."""
        from scripts.broker import Broker, free_port

        self.broker = Broker(folder / "broker", extra=BURST_BROKER)
        cfg = {
            "worker": {"id": "bench", "stats_interval_s": 60},
            "mqtt": {"port": self.broker.port, "client_id": f"w-{uuid.uuid4().hex[:8]}"},
            "model": {"bundle": str(bundle), "cache_dir": str(cache_dir or folder / "ov-cache"), "precision": precision},
            "store": {"path": str(folder / "qdrant")},
            "evidence": {"path": str(folder / "evidence")},
            "learning": {"path": str(folder / "extensions")},
            "capture": {"path": str(folder / "capture")},
            "limits": {"queue_policy": "block"},
            "metrics": {"port": free_port()},
        }
        for key, value in (overrides or {}).items():
            *sections, leaf = key.split(".")
            node = cfg
            for section in sections:
                node = node.setdefault(section, {})
            node[leaf] = value
        self.folder = folder
        (folder / "config.yaml").write_text(yaml.safe_dump(cfg))
        self.log = (folder / "worker.log").open("wb")
        self.cond = threading.Condition()
        self.arrived: dict[str, dict[str, float]] = {}
        self.complete: set[str] = set()  # frames whose result and heatmap (or error) are all back
        self.without_heatmap: set[str] = set()  # frames whose result says no heatmap is published for them
        self.stages: dict[str, dict[str, float]] = {}  # the worker's own latency_ms per frame
        self.precisions: set[str] = set()  # what the worker ran, read back (its results' model.precision)
        self.online = False
        self.client = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2,
                                  client_id=f"bench-{uuid.uuid4().hex[:8]}", protocol=mqtt.MQTTv5)
        self.client.max_inflight_messages_set(64)
        self.client.max_queued_messages_set(0)
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", self.broker.port)
        self.client.loop_start()
        # no_local: the broker does not send the rig its own frames back (it reads only what the worker publishes),
        # which would double the broker's traffic and the rig's CPU on the cores the worker is measured on
        self.client.subscribe("inspect/#", options=SubscribeOptions(qos=1, noLocal=True))
        self._spawn()

    def _spawn(self) -> None:
        """Start ``python -m worker`` on the rig's config and wait until it says it is online."""
        self.spawned = time.perf_counter()
        self.proc = subprocess.Popen([sys.executable, "-m", "worker", "--config", str(self.folder / "config.yaml")],
                                     cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT)
        self.ps = psutil.Process(self.proc.pid)
        deadline = time.monotonic() + 120
        with self.cond:
            while not self.online:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"worker did not come online: {(self.folder / 'worker.log').read_text()[-2000:]}")
                self.cond.wait(0.5)
        self.online_s = time.perf_counter() - self.spawned

    def restart(self, between: Callable[[], None] | None = None) -> None:
        """Stop the worker as a service manager does (SIGTERM) and start it again on the same broker, config and state
        (``between`` runs while it is stopped)."""
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(60)
        if between is not None:
            between()
        with self.cond:
            self.online = False
        self._spawn()

    def _on_message(self, client, userdata, msg) -> None:
        now = time.perf_counter()
        kind = msg.topic.rsplit("/", 1)[-1]
        with self.cond:
            if kind == "availability":
                self.online = msg.payload == b"online"
            elif kind in ("result", "heatmap", "error"):
                frame_id = dict(getattr(msg.properties, "UserProperty", None) or []).get("frame_id")
                if frame_id is None and kind == "error":
                    frame_id = json.loads(msg.payload).get("frame_id")
                arrived = self.arrived.setdefault(frame_id, {})
                arrived[kind] = now
                if kind == "result":
                    result = json.loads(msg.payload)
                    self.stages[frame_id] = result["latency_ms"]
                    self.precisions.add(result["model"]["precision"])
                    if result["heatmap"] is None:  # heatmap.publish anomalous or never: nothing more will come
                        self.without_heatmap.add(frame_id)
                heatmap_done = "heatmap" in arrived or frame_id in self.without_heatmap
                if frame_id is not None and (kind == "error" or ("result" in arrived and heatmap_done)):
                    self.complete.add(frame_id)
            self.cond.notify_all()

    def run(self, payloads: list[bytes], n: int, rate: float | None, tag: str) -> dict:
        """Publish ``n`` frames (as fast as possible, or at ``rate`` frames/s); wait for every result + heatmap."""
        sent: dict[str, float] = {}
        rss_peak = [self.ps.memory_info().rss]
        stop = threading.Event()

        def sample() -> None:
            while not stop.wait(0.05):
                rss_peak.append(self.ps.memory_info().rss)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        cpu0 = self.ps.cpu_times()
        threads0 = thread_cpu(self.ps)
        with self.cond:
            before = len(self.complete)
        started = time.perf_counter()
        for i in range(n):
            if rate:
                delay = started + i / rate - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
            frame_id = f"{tag}-{i}"
            sent[frame_id] = time.perf_counter()
            publish_frame(self.client, f"inspect/{CAMERA}/frame", payloads[i % len(payloads)], frame_id)
        with self.cond:
            # every earlier run's frames are complete, so this run's are the count beyond them
            wait_for_answers(self.cond, lambda: len(self.complete) - before, n, lambda: self.proc.poll() is None)
            done = {f: max(self.arrived[f].values()) for f in sent}
            errors = sum("error" in self.arrived[f] for f in sent)
        stop.set()
        sampler.join()
        elapsed = max(done.values()) - started
        out = result(n, elapsed, [done[f] - sent[f] for f in sent], cpu0, self.ps)
        spent = {k: v - threads0.get(k, 0.0) for k, v in thread_cpu(self.ps).items()}
        loops = sum(v for k, v in spent.items() if k.startswith(LOOPS))
        openvino = spent.get(OPENVINO_THREADS, 0.0)
        out.update(loops_cpu_ms_per_frame=1000 * loops / n, openvino_cpu_ms_per_frame=1000 * openvino / n,
                   other_cpu_ms_per_frame=1000 * (sum(spent.values()) - loops - openvino) / n,
                   thread_cpu_s={k: round(v, 3) for k, v in spent.items()})
        out.update(rss_mb=max(rss_peak) / 2**20, errors=errors)
        with self.cond:
            for stage in ("queue", "decode", "infer", "post"):
                out[f"worker_{stage}_ms"] = float(np.mean([self.stages[f][stage] for f in sent if f in self.stages]))
        return out

    def warm_up(self, payloads: list[bytes], n: int) -> None:
        """An unmeasured burst of ``n`` frames, as the raw rows run every request once before their clock starts: the
        worker's first frames (its compiled model's first inferences, lazily built buffers) are not in a measurement."""
        self.run(payloads, n, None, "warm")

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(60)
        self.log.close()
        self.broker.stop()


# --- torch and anomalib's own deployment paths ---------------------------------------------------------
BLUR_2D = "2-D (anomalib)"
BLUR_SEPARABLE = "separable (bundle graph)"


def lightning_patchcore(graph, spec):
    """anomalib's Lightning ``Patchcore`` holding the trained ``PatchcoreModel`` (backbone and memory bank), with a
    Resize + Normalize pre-processor.  The module is built without weights; its ``model`` is then the trained one."""
    from anomalib.models import Patchcore
    from anomalib.pre_processing import PreProcessor
    from torchvision.transforms import v2

    transform = v2.Compose([v2.Resize((spec.height, spec.width), antialias=True), v2.Normalize(spec.mean, spec.std)])
    module = Patchcore(backbone="resnet18", layers=["layer2"], pre_trained=False, pre_processor=PreProcessor(transform),
                       evaluator=False, visualizer=False)
    module.model = graph.model  # the trained PatchcoreModel, memory bank included
    return module.eval()


def torch_inferencer(graph, spec, folder: Path):
    """Export the trained model as anomalib's ``ExportType.TORCH`` does and load it with ``TorchInferencer``."""
    from anomalib.deploy import TorchInferencer

    path = lightning_patchcore(graph, spec).to_torch(folder)
    os.environ["TRUST_REMOTE_CODE"] = "1"  # our own file, written just above
    return TorchInferencer(path, device="cpu")


def anomalib_openvino(graph, spec, frame_size: int, precision: str, folder: Path):
    """anomalib's ``Engine.export(..., ExportType.OPENVINO)`` of the trained model, loaded with ``OpenVINOInferencer``
    at ``precision`` (LATENCY hint: one image per call).  Returns (inferencer or None, note): None with the error
    when the export cannot run here (anomalib 2.7 exports through ``torch.onnx`` with dynamo, which needs onnxscript).
    """
    import contextlib

    from anomalib.deploy import ExportType, OpenVINOInferencer
    from anomalib.engine import Engine

    module = lightning_patchcore(graph, spec)
    folder.mkdir(parents=True, exist_ok=True)
    try:
        with contextlib.chdir(folder):  # Engine and the inferencer write their folders into the working directory
            # A static batch of 1 (one frame a call, as the worker runs): anomalib's default dynamic batch traces
            # the graph at batch 2, and dynamo bakes that 2 into one branch of this model's feature concat.
            path = Engine(default_root_dir=folder / "engine", logger=False).export(
                module, ExportType.OPENVINO, export_root=folder, input_size=(frame_size, frame_size),
                onnx_kwargs={"dynamic_shapes": None})
    except Exception as exc:  # any failure of the export is reported in the table, not fatal
        return None, f"anomalib Engine.export(ExportType.OPENVINO) failed: {type(exc).__name__}: {exc}"
    config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": precision}
    try:
        with contextlib.chdir(folder):
            inferencer = OpenVINOInferencer(path, device="CPU", config=config)
        inferencer.predict(np.zeros((frame_size, frame_size, 3), np.uint8))  # a model that cannot run is a note too
    except Exception as exc:
        return None, f"anomalib's exported model did not run in OpenVINOInferencer: {type(exc).__name__}: {exc}"
    ran = ran_precision(inferencer.model)
    return inferencer, f"anomalib Engine.export(ExportType.OPENVINO) -> {path.name}; OpenVINOInferencer runs {ran}"


def run_torch(predict, frames: list[np.ndarray], n: int) -> dict:
    predict(frames[0])
    latencies = []
    cpu0 = psutil.Process().cpu_times()
    started = time.perf_counter()
    for i in range(n):
        t0 = time.perf_counter()
        predict(frames[i % len(frames)])
        latencies.append(time.perf_counter() - t0)
    return result(n, time.perf_counter() - started, latencies, cpu0)


# --- main ----------------------------------------------------------------------------------------
def worker_variant(text: str) -> tuple[str, dict[str, object]]:
    """``NAME:KEY=VALUE[,KEY=VALUE]`` -> (name, {dotted key: YAML-parsed value})."""
    name, sep, rest = text.partition(":")
    pairs = [p.partition("=") for p in rest.split(",") if p]
    if not sep or not name or not pairs or any(not k or not eq for k, eq, _ in pairs):
        raise argparse.ArgumentTypeError(f"{text!r}: expected NAME:KEY=VALUE[,KEY=VALUE]")
    return name, {k.strip(): yaml.safe_load(v) for k, _, v in pairs}


FLOAT_PRECISIONS = [p for p in PRECISIONS if p != "int8"]  # int8 is a bundle (--int8), run at f32 by OpenVINO


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--category", default="grid")
    parser.add_argument("--train-images", type=int, default=60, help="normals to train on (0 = all); the bank size is --bank either way")
    parser.add_argument("--bank", type=int, default=2437, help="memory-bank rows (2437 = 1%% of grid's 256 px patches, the older "
                        "benchmarks' model; the default and the fast setting are 1500, the default's behind a 500-row screen)")
    parser.add_argument("--input-size", type=int, default=FAST_INPUT,
                        help="model input side in px (default %(default)s, the older benchmarks' model, as --bank's "
                             "default; the product default is PatchcoreSettings().input_size)")
    parser.add_argument("--backbone", help="offline backbone (default: PatchcoreSettings().backbone)")
    parser.add_argument("--screen-rows", type=int, help="the bank's screen (exporter train --screen-rows; default: "
                        "PatchcoreSettings().screen_rows, 0: none)")
    parser.add_argument("--precision", choices=FLOAT_PRECISIONS, default="f32",
                        help="OpenVINO inference precision for the raw, worker and anomalib-OpenVINO rows (torch rows run f32)")
    parser.add_argument("--frame-size", type=int, default=256, help="side of the published JPEG frames")
    parser.add_argument("--frames", type=int, default=96, help="frames per raw/worker measurement")
    parser.add_argument("--torch-frames", type=int, default=16, help="frames per torch / anomalib-inferencer measurement")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--int8", action="store_true", help="also package an INT8 bundle and measure it (raw and worker)")
    parser.add_argument("--worker-variant", type=worker_variant, action="append", default=[],
                        metavar="NAME:KEY=VALUE[,KEY=VALUE]",
                        help="also run the fp32 worker with these config keys changed (dotted, YAML values); repeatable")
    parser.add_argument("--no-baselines", dest="baselines", action="store_false",
                        help="skip the torch and anomalib rows (the worker against the raw runtime only)")
    parser.add_argument("--json", type=Path, help="write all measurements here")
    args = parser.parse_args(argv)
    variants = dict(args.worker_variant)
    if len(variants) != len(args.worker_variant):
        parser.error("--worker-variant names must differ")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    with tempfile.TemporaryDirectory(prefix="edge-inspect-throughput-") as work:  # bundles, exports, worker state
        return measure(args, variants, Path(work))


def measure(args: argparse.Namespace, variants: dict[str, dict], work: Path) -> int:
    """Train the bundles into ``work``, run every row and print the tables."""
    import torch

    from exporter.train.patchcore import to_tensor

    trained, bundles = train_bundles(args.data, args.category, args.train_images, args.bank, work,
                                     ("fp32", "int8") if args.int8 else ("fp32",), input_size=args.input_size,
                                     screen_rows=args.screen_rows, backbone=args.backbone)
    spec = trained.spec
    metrics = {k: json.loads((p / "bundle.json").read_text())["metrics"]["test"] for k, p in bundles.items()}

    test_paths = [s.path for s in trained.category.test]
    originals = [cv2.imread(str(p), cv2.IMREAD_COLOR) for p in test_paths]
    frames = [cv2.resize(im, (args.frame_size, args.frame_size), interpolation=cv2.INTER_AREA) for im in originals]
    payloads = [cv2.imencode(".jpg", f, [cv2.IMWRITE_JPEG_QUALITY, 95])[1].tobytes() for f in frames]
    prepared = [prepare_image(f, spec) for f in frames]
    rgb = [np.ascontiguousarray(f[..., ::-1]) for f in frames]
    frames_npy = work / "frames.npy"  # what the raw-runtime process reads: the same prepared frames
    np.save(frames_npy, np.stack(prepared))

    inferencer, ov_inferencer, ov_note = None, None, "not run (--no-baselines)"
    if args.baselines:
        inferencer = torch_inferencer(trained.graph, spec, work / "torch-export")
        ov_inferencer, ov_note = anomalib_openvino(trained.graph, spec, args.frame_size, args.precision,
                                                   work / "anomalib-openvino")
    log.info("%s", ov_note)
    graph = trained.graph.eval()
    model = graph.model.eval()

    def tutorial(image: np.ndarray) -> None:
        with torch.no_grad():
            model(to_tensor([image], spec))

    def export_graph(image: np.ndarray) -> None:
        with torch.no_grad():
            graph(to_tensor([image], spec))

    rigs = {k: WorkerRig(p, work / f"worker-{k}", args.precision) for k, p in bundles.items()}
    for name, overrides in variants.items():
        rigs[f"fp32[{name}]"] = WorkerRig(bundles["fp32"], work / f"worker-variant-{len(rigs)}", args.precision,
                                          overrides=overrides)
    rounds: list[dict] = []
    ran: dict[str, str] = {}  # bundle -> precision OpenVINO ran in the raw process
    device = ""
    try:
        for rig in rigs.values():  # the raw rows warm up in each of their processes; each worker before its first burst
            rig.warm_up(payloads, min(WARM_FRAMES, args.frames))
        for r in range(args.rounds):
            row: dict[str, dict] = {}
            for k in bundles:
                raw = raw_rows(bundles[k], frames_npy, args.frames, args.precision, work)
                ran[k], device = raw["precision"], raw["device"]
                row[f"raw-{k}"], row[f"raw-sync-{k}"] = raw["raw"], raw["raw-sync"]
                row[f"worker-{k}"] = rigs[k].run(payloads, args.frames, None, f"r{r}-burst")
                paced = 0.8 * row[f"worker-{k}"]["fps"]
                row[f"worker-{k}@80%"] = rigs[k].run(payloads, args.frames, paced, f"r{r}-paced")
            for name in variants:
                row[f"worker-fp32[{name}]"] = rigs[f"fp32[{name}]"].run(payloads, args.frames, None, f"r{r}-burst")
            if ov_inferencer is not None:
                row["anomalib-openvino"] = run_torch(ov_inferencer.predict, rgb, args.torch_frames)
            if inferencer is not None:
                row["torch-inferencer"] = run_torch(inferencer.predict, rgb, args.torch_frames)
                row["torch"] = run_torch(tutorial, prepared, args.torch_frames)
                row["torch (export graph)"] = run_torch(export_graph, prepared, args.torch_frames)
            rounds.append(row)
            log.info("round %d: %s", r, {k: round(v["fps"], 2) for k, v in row.items()})
    finally:
        for rig in rigs.values():
            rig.close()

    blur = {"anomalib-openvino": BLUR_2D, "torch-inferencer": BLUR_2D, "torch": BLUR_2D,
            "torch (export graph)": BLUR_SEPARABLE}
    how = {"anomalib-openvino": "anomalib Engine.export(OPENVINO) + OpenVINOInferencer",
           "torch-inferencer": "anomalib to_torch + TorchInferencer",
           "torch": "anomalib PatchcoreModel, no_grad",
           "torch (export graph)": "PatchcoreGraph (what the bundle exports), no_grad"}
    for k in bundles:
        for prefix, text in (("raw-", "bundle, AsyncInferQueue, THROUGHPUT, own process"),
                             ("raw-sync-", "bundle, 1 request, LATENCY, own process"),
                             ("worker-", "python -m worker behind mosquitto")):
            blur[prefix + k] = BLUR_SEPARABLE
            how[prefix + k] = text
    for name, overrides in variants.items():
        blur[f"worker-fp32[{name}]"] = BLUR_SEPARABLE
        how[f"worker-fp32[{name}]"] = "the worker with " + ", ".join(f"{k}={v}" for k, v in overrides.items())
    names = list(rounds[0])
    table = []
    for name in names:
        base = name.removesuffix("@80%")
        cols = [name, how[base] + (", paced at 80 %" if name != base else ""), blur[base]]
        for key, digits in (("fps", 2), ("p50_ms", 1), ("p99_ms", 1), ("cpu_ms_per_frame", 1)):
            cols.append(fmt(summary([rd[name][key] for rd in rounds]), digits))
        rss = [rd[name].get("rss_mb") for rd in rounds]
        cols.append(fmt(summary(rss), 0) if rss[0] is not None else "")
        table.append(cols)
    ratios = {"worker / raw (fp32)": [rd["worker-fp32"]["fps"] / rd["raw-fp32"]["fps"] for rd in rounds]}
    for name in variants:
        ratios[f"worker[{name}] / raw (fp32)"] = [rd[f"worker-fp32[{name}]"]["fps"] / rd["raw-fp32"]["fps"] for rd in rounds]
    if inferencer is not None:
        ratios.update({
            "worker / torch-inferencer (fp32)": [rd["worker-fp32"]["fps"] / rd["torch-inferencer"]["fps"] for rd in rounds],
            "worker / torch (fp32)": [rd["worker-fp32"]["fps"] / rd["torch"]["fps"] for rd in rounds],
            "worker / torch (export graph) (fp32)": [rd["worker-fp32"]["fps"] / rd["torch (export graph)"]["fps"]
                                                     for rd in rounds],
        })
    ratios["p99 / p50 at 80% (worker fp32)"] = [rd["worker-fp32@80%"]["p99_ms"] / rd["worker-fp32@80%"]["p50_ms"]
                                                for rd in rounds]
    if ov_inferencer is not None:
        ratios["worker / anomalib-openvino (fp32)"] = [rd["worker-fp32"]["fps"] / rd["anomalib-openvino"]["fps"]
                                                        for rd in rounds]
    if args.int8:
        ratios["raw int8 / raw fp32"] = [rd["raw-int8"]["fps"] / rd["raw-fp32"]["fps"] for rd in rounds]
        ratios["worker int8 / worker fp32"] = [rd["worker-int8"]["fps"] / rd["worker-fp32"]["fps"] for rd in rounds]
    header = (f"{args.rounds} rounds; median [min-max]; CPU: {device} (OpenVINO's name; {psutil.cpu_count()} logical CPUs); "
              f"precision {args.precision} (OpenVINO ran "
              f"{', '.join(f'{v} for {k}' for k, v in ran.items())}; torch rows f32); model input {args.input_size} px; "
              f"bank {args.bank} rows, screen {trained.graph.screen or 'none'}; frames {args.frame_size} px JPEG")
    print(f"\n{header}\n")
    print(md_table(["run", "how", "blur", "frames/s", "p50 ms", "p99 ms", "CPU ms/frame", "worker RSS MB"], table))
    print(f"\nanomalib-openvino: {ov_note}\n")
    print(md_table(["ratio", "median [min-max]"], [[k, fmt(summary(v), 2)] for k, v in ratios.items()]))
    print()
    stages = ("queue", "decode", "infer", "post")
    cpu_columns = ("loops_cpu_ms_per_frame", "openvino_cpu_ms_per_frame", "other_cpu_ms_per_frame")
    print(md_table(["worker run (its own latency_ms, mean)", *stages, "CPU ms/frame: its loops", "OpenVINO", "other"],
                   [[name, *(fmt(summary([rd[name][f"worker_{st}_ms"] for rd in rounds]), 1) for st in stages),
                     *(fmt(summary([rd[name][key] for rd in rounds]), 1) for key in cpu_columns)]
                    for name in names if name.startswith("worker")]))
    print("\nCPU by OS thread name: its loops = the inference threads (decode, heatmap, publish), the recorder and the "
          "request thread; OpenVINO = the threads it started while compiling; other = paho's network loop, the main "
          "thread, the store's.")
    print()
    print(md_table(["bundle", "image AUROC", "pixel AUROC", "F1", "model.bin MB"],
                   [[k, str(m.get("image_auroc")), str(m.get("pixel_auroc")), str(m.get("image_f1")),
                     f"{(bundles[k] / 'model.bin').stat().st_size / 2**20:.1f}"] for k, m in metrics.items()]))
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "header": header,
                                         "cpu": device, "precision_ran": ran, "anomalib_openvino": ov_note,
                                         "rounds": rounds, "ratios": ratios, "metrics": metrics}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
