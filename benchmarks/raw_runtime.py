"""The raw OpenVINO rows of ``benchmarks.throughput``, run in a process of their own.

The throughput benchmark imports torch and anomalib (to train, and for its torch rows); a raw
measurement inside that process would share it with them.  This module imports only ``bundle``,
OpenVINO, numpy, psutil and ``benchmarks.common`` (paho, no torch), as the worker does, and is what the benchmark runs as a subprocess:

    python -m benchmarks.raw_runtime BUNDLE FRAMES.npy --frames 96 --precision f32 --out raw.json

``FRAMES.npy``: uint8 [N, H, W, 3] BGR frames already at the bundle's input size
(:func:`bundle.prepare_image`).  Two measurements, each on a freshly compiled model:

- ``raw``: ``AsyncInferQueue`` with OpenVINO's optimal number of requests, THROUGHPUT hint
  (benchmark_app's method: the ceiling);
- ``raw-sync``: one request, synchronous, LATENCY hint (one worker thread's way).

The JSON written holds both, the precision OpenVINO really ran, and whether torch was imported
(it must not be: the benchmark refuses the result if it was).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import psutil

from benchmarks.common import percentiles
from bundle.runtime import CompiledBundle


def result(n: int, elapsed: float, latencies: list[float], cpu0, proc: psutil.Process | None = None) -> dict:
    """frames/s, p50/p99 latency and CPU (user + system) per frame of ``proc`` (default: this process)."""
    p50, p99 = percentiles(latencies)
    cpu1 = (proc or psutil.Process()).cpu_times()
    cpu = (cpu1.user + cpu1.system) - (cpu0.user + cpu0.system)
    return {"fps": n / elapsed, "p50_ms": p50, "p99_ms": p99, "cpu_ms_per_frame": 1000 * cpu / n}


def raw_async(bundle: CompiledBundle, frames: np.ndarray, n: int) -> dict:
    queue = bundle.async_queue()
    latencies: list[float] = []
    queue.set_callback(lambda request, t0: latencies.append(time.perf_counter() - t0))
    for i in range(len(queue)):  # warm-up: every request once
        queue.start_async({0: frames[i % len(frames)][np.newaxis]}, time.perf_counter())
    queue.wait_all()
    latencies.clear()
    started = time.perf_counter()
    cpu0 = psutil.Process().cpu_times()
    for i in range(n):
        queue.start_async({0: frames[i % len(frames)][np.newaxis]}, time.perf_counter())
    queue.wait_all()
    return result(n, time.perf_counter() - started, latencies, cpu0)


def raw_sync(bundle: CompiledBundle, frames: np.ndarray, n: int) -> dict:
    request = bundle.create_request()
    bundle.infer(frames[0][np.newaxis], request)
    latencies = []
    started = time.perf_counter()
    cpu0 = psutil.Process().cpu_times()
    for i in range(n):
        t0 = time.perf_counter()
        bundle.infer(frames[i % len(frames)][np.newaxis], request)
        latencies.append(time.perf_counter() - t0)
    return result(n, time.perf_counter() - started, latencies, cpu0)


def measure(bundle: Path, frames: np.ndarray, n: int, precision: str, cache_dir: Path | None = None) -> dict:
    """Both raw rows for ``bundle`` at ``precision``; each model is compiled before its clock starts.

    Batch 1, a static shape, as the worker compiles it (``worker.models``): the IR's batch is dynamic, and
    concurrent requests on the dynamic shape were seen to hang inside OpenVINO (see ``CompiledBundle``).
    Both compiled models live until the process ends: deleting the THROUGHPUT one after its
    ``AsyncInferQueue`` had run was seen to hang in OpenVINO 2026.4.
    """
    compiled = CompiledBundle(bundle, hint="THROUGHPUT", precision=precision, cache_dir=cache_dir, batch=1)
    out = {"raw": raw_async(compiled, frames, n)}
    latency = CompiledBundle(bundle, hint="LATENCY", precision=precision, cache_dir=cache_dir, batch=1)
    out["raw-sync"] = raw_sync(latency, frames, n)
    out["precision"] = latency.precision
    out["device"] = latency.device_name
    out["torch_imported"] = "torch" in sys.modules
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bundle", type=Path)
    parser.add_argument("frames_npy", type=Path, help="uint8 [N, H, W, 3] BGR frames at the bundle's input size")
    parser.add_argument("--frames", type=int, default=96, help="frames per measurement")
    parser.add_argument("--precision", default="f32", help="OpenVINO inference precision (bundle.runtime.CompiledBundle)")
    parser.add_argument("--cache-dir", type=Path)
    parser.add_argument("--out", type=Path, help="write the JSON here (default: stdout)")
    args = parser.parse_args(argv)
    frames = np.load(args.frames_npy)
    text = json.dumps(measure(args.bundle, frames, args.frames, args.precision, args.cache_dir))
    if args.out:
        args.out.write_text(text)
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
