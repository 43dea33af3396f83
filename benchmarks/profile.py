"""Where a bundle's inference time goes: OpenVINO per-operation counters, backbone vs heads, by op type.

    python -m benchmarks.profile BUNDLE [BUNDLE ...] --runs 20 --precision f32 --threads 1

"heads" = operations whose name matches :data:`exporter.quantize.HEADS` (pooling, memory-bank
distances and score, blur, embedding); the rest is the CNN backbone and pre-processing.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import openvino as ov

from benchmarks.common import header, md_table, openvino_ran
from bundle import BundleError, read_manifest
from bundle.runtime import ran_precision, supported_precisions
from exporter.quantize import HEADS


def profile(bundle: Path, runs: int, precision: str = "f32", threads: int = 1) -> tuple[Counter, Counter, str]:
    """Per-part and per-kernel microseconds, and the precision OpenVINO ran (read back).  A reduced precision the
    CPU does not run natively is refused, as the runtime refuses it: OpenVINO would run another one (an f16 hint
    runs bf16 on a CPU without FP16 units) and the profile would be of that."""
    manifest = read_manifest(bundle)
    spec, ext = manifest.input, manifest.extension
    core = ov.Core()
    native = supported_precisions(core, "CPU", manifest.precision)
    if precision != "f32" and precision not in native:
        raise BundleError(f"this CPU does not run {precision} natively (it runs {', '.join(native)})")
    compiled = core.compile_model(str(bundle / "model.xml"), "CPU",
                                  {"PERF_COUNT": True, "PERFORMANCE_HINT": "LATENCY",
                                   "INFERENCE_NUM_THREADS": threads, "INFERENCE_PRECISION_HINT": precision})
    request = compiled.create_infer_request()
    image = np.random.default_rng(0).integers(0, 255, (1, spec.height, spec.width, 3), dtype=np.uint8)
    inputs = {0: image} if ext is None else {0: image, ext.input: np.full((1, ext.feature_dim), ext.pad, np.float32)}
    part, kind = Counter(), Counter()
    heads = re.compile(HEADS)
    for i in range(runs + 1):
        request.infer(inputs)
        if i == 0:
            continue  # warm-up
        for info in request.profiling_info:
            us = info.real_time.total_seconds() * 1e6
            part["heads" if heads.match(info.node_name) else "backbone"] += us / runs
            kind[f"{info.node_type} ({info.exec_type})"] += us / runs
    return part, kind, ran_precision(compiled)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bundles", type=Path, nargs="+")
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--precision", default="f32", choices=("f32", "bf16", "f16"),
                        help="inference precision (set, never the CPU's default)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    for bundle in args.bundles:
        try:
            part, kind, ran = profile(bundle, args.runs, args.precision, args.threads)
        except BundleError as exc:
            parser.error(str(exc))
        total = sum(part.values())
        print(f"\n{bundle} ({read_manifest(bundle).precision} weights), {header(openvino_ran([ran], args.precision))}, "
              f"{args.threads} thread(s), mean of {args.runs} runs: {total / 1000:.1f} ms\n")
        print(md_table(["part", "ms", "share"], [[k, f"{v / 1000:.1f}", f"{v / total:.0%}"] for k, v in part.most_common()]))
        print()
        print(md_table(["op (kernel)", "ms", "share"], [[k, f"{v / 1000:.1f}", f"{v / total:.0%}"] for k, v in kind.most_common(8)]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
