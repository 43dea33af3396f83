"""Start-up and memory benchmark: worker import, bundle compile (OpenVINO cache cold/warm), first result, RSS.

    python -m benchmarks.startup --repeats 3

Each repeat starts ``python -m worker`` twice behind a real mosquitto: once with an empty
``model.cache_dir`` (cold) and once with the cache the first start wrote (warm), publishes one
frame as soon as the worker announces ``online`` and times spawn -> result and heatmap received.
Alongside: ``import`` of the worker's modules and ``CompiledBundle`` compile time, each in a fresh
interpreter, and the worker's RSS after the first result and after ``--frames`` more.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import cv2

from benchmarks.common import DATA, ROOT, fmt, header, md_table, measured_on, openvino_ran, summary, train_bundles
from benchmarks.throughput import WorkerRig

log = logging.getLogger("benchmarks.startup")

IMPORT = "import time; t = time.perf_counter(); import worker.service; print(time.perf_counter() - t)"
COMPILE = ("import sys, time; from bundle.runtime import CompiledBundle; t = time.perf_counter(); "
           "CompiledBundle(sys.argv[1], cache_dir=sys.argv[2]); print(time.perf_counter() - t)")


def fresh(code: str, *argv: str) -> float:
    out = subprocess.run([sys.executable, "-c", code, *argv], cwd=ROOT, capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--category", default="grid")
    parser.add_argument("--train-images", type=int, default=60)
    parser.add_argument("--bank", type=int, default=2437)
    parser.add_argument("--bundle", type=Path, help="use this bundle instead of training one")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--frames", type=int, default=48)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    work = Path(tempfile.mkdtemp(prefix="edge-inspect-startup-"))
    if args.bundle:
        bundle = args.bundle.resolve()
    else:
        bundle = train_bundles(args.data, args.category, args.train_images, args.bank, work)[1]["fp32"]
    from bundle import read_manifest
    from exporter.data import load_category

    spec = read_manifest(bundle).input
    test = load_category(args.data, args.category).test
    frames = [cv2.resize(cv2.imread(str(s.path)), (spec.width, spec.height), interpolation=cv2.INTER_AREA)
              for s in test[:16]]
    payloads = [cv2.imencode(".jpg", f)[1].tobytes() for f in frames]

    res: dict[str, list[float]] = {k: [] for k in (
        "import worker (s)", "compile, cache cold (s)", "compile, cache warm (s)",
        "spawn -> online, cold (s)", "spawn -> first result, cold (s)",
        "spawn -> online, warm (s)", "spawn -> first result, warm (s)",
        "RSS after first result (MB)", f"RSS after {args.frames} frames (MB)")}
    ran: set[str] = set()  # what the workers ran, read back
    for r in range(args.repeats):
        res["import worker (s)"].append(fresh(IMPORT))
        cache = work / f"cache-{r}"
        res["compile, cache cold (s)"].append(fresh(COMPILE, str(bundle), str(cache)))
        res["compile, cache warm (s)"].append(fresh(COMPILE, str(bundle), str(cache)))
        shutil.rmtree(cache)
        for state in ("cold", "warm"):
            rig = WorkerRig(bundle, work / f"worker-{r}-{state}", cache_dir=cache)
            try:
                first = rig.run(payloads, 1, None, "first")
                res[f"spawn -> online, {state} (s)"].append(rig.online_s)
                res[f"spawn -> first result, {state} (s)"].append(rig.online_s + first["p50_ms"] / 1000)
                if state == "warm":
                    res["RSS after first result (MB)"].append(rig.ps.memory_info().rss / 2**20)
                    steady = rig.run(payloads, args.frames, None, "steady")
                    res[f"RSS after {args.frames} frames (MB)"].append(steady["rss_mb"])
                ran |= rig.precisions
            finally:
                rig.close()
    print(f"\n{header(openvino_ran(ran, 'f32'))}; {args.repeats} repeats, median [min-max]; bundle {bundle} "
          f"(model.bin {(bundle / 'model.bin').stat().st_size / 2**20:.1f} MB)\n")
    print(md_table(["measure", "median [min-max]"], [[k, fmt(summary(v), 2)] for k, v in res.items()]))
    if args.json:
        args.json.write_text(json.dumps({**res, "measured_on": measured_on(openvino_ran(ran, "f32"))}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
