"""Inference precision side by side: f32 vs bf16 vs f16 vs INT8 on one PatchCore fit, on this CPU.

    python -m benchmarks.precision --data ../shared/data/mvtec --category grid --repeats 5

Fits PatchCore once (default settings unless ``--input-size``/``--coreset-ratio``), exports it twice (FP32
weights and NNCF INT8 weights) with thresholds measured at every precision the CPU runs natively, then for
each (bundle, precision) pair: the test split's image/pixel AUROC, F1 and good images flagged at that
precision's own thresholds; latency (LATENCY hint: every core, batch 1; median of ``--frames``
frames per round) and frames/s (THROUGHPUT hint, OpenVINO's async queue over ``--frames`` frames), timed
interleaved over ``--repeats`` rounds, median [range].  Prints the CPU model with the table.  With ``--out``
the bundles are kept, and a second run on the same folder times them again without fitting.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
from pathlib import Path

from benchmarks.common import DATA, cpu_name, fmt, frames_per_s, latency_ms, md_table, summary

log = logging.getLogger("benchmarks.precision")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default=str(DATA))
    ap.add_argument("--category", default="grid")
    ap.add_argument("--input-size", type=int)
    ap.add_argument("--coreset-ratio", type=float)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--frames", type=int, default=10)
    ap.add_argument("--out", help="keep the bundles here (default: a temporary folder)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")


    from bundle import read_manifest
    from bundle.runtime import CompiledBundle
    from exporter.build import fit_patchcore, package
    from exporter.data import load_category, read_image
    from exporter.evaluate import evaluate
    from exporter.train.patchcore import PatchcoreSettings

    settings = PatchcoreSettings(**{k: v for k, v in (("input_size", args.input_size),
                                                      ("coreset_ratio", args.coreset_ratio)) if v is not None})
    folder = Path(args.out or tempfile.mkdtemp(prefix="precision-"))
    bundles = {w: folder / w for w in ("fp32", "int8")}
    if all((b / "bundle.json").is_file() for b in bundles.values()):
        log.info("reusing the bundles in %s (delete them to fit again)", folder)
    else:
        trained = fit_patchcore(Path(args.data), args.category, settings)
        for w, b in bundles.items():
            package(trained, b, precision=w)
    pairs = [(w, p) for w in bundles for p in read_manifest(bundles[w]).precisions]
    category = load_category(Path(args.data), args.category)
    spec = read_manifest(bundles["fp32"]).input
    quality, latency, throughput = {}, {}, {}
    for w, p in pairs:
        compiled = CompiledBundle(bundles[w], hint="LATENCY", precision=p)
        quality[(w, p)] = evaluate(compiled, category)
        log.info("%s/%s: %s", w, p, {k: quality[(w, p)].get(k) for k in ("image_auroc", "pixel_auroc", "image_f1")})
    images = [read_image(s.path, spec) for s in category.test[: args.frames]]
    lat = {k: CompiledBundle(bundles[k[0]], hint="LATENCY", precision=k[1]) for k in pairs}
    thr = {k: CompiledBundle(bundles[k[0]], hint="THROUGHPUT", precision=k[1]) for k in pairs}
    for k in pairs:
        latency_ms(lat[k], images[:3])  # warm-up
        frames_per_s(thr[k], images[:3])
        latency[k], throughput[k] = [], []
    for r in range(args.repeats):
        for k in pairs:
            latency[k].append(latency_ms(lat[k], images))
            throughput[k].append(frames_per_s(thr[k], images))
        log.info("round %d/%d done", r + 1, args.repeats)
    base = pairs[0]
    rows = []
    for k in pairs:
        q = quality[k]
        rows.append([("INT8" if k[0] == "int8" else "FP32"), lat[k].precision, fmt(summary(latency[k]), 1),
                     fmt(summary([b / a for a, b in zip(latency[k], latency[base], strict=True)]), 2),
                     fmt(summary(throughput[k]), 1), f"{q.get('image_auroc')}", f"{q.get('pixel_auroc')}",
                     f"{q['image_f1']}", f"{q['detection_rate'].get('good', 'n/a')}"])
    training = read_manifest(bundles["fp32"]).training
    print(f"\nCPU: {cpu_name()}; {args.category}, input {spec.height} px, "
          f"{training.get('memory_bank', '?')} bank rows; bundles in {folder}\n")
    print(md_table(["weights", "inference precision", "ms / frame (LATENCY, batch 1)", "speed-up vs f32, same round",
                    "frames/s (THROUGHPUT, async)", "image AUROC", "pixel AUROC", "F1", "good flagged"], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
