"""PatchCore settings side by side as bundles: fit time, f32 latency and test-split quality, in one run.

    python -m benchmarks.settings --data ../shared/data/mvtec --category grid --out /tmp/settings \\
        --setting "old default=--input-size 640 --coreset-ratio 0.005 --max-bank 0 --screen-rows 0" --setting "default=" \\
        --setting "fast=--input-size 256 --max-bank 1500 --screen-rows 0 --bank-views d4 --backbone efficientnet_lite1" --repeats 5

Each ``--setting NAME=FLAGS`` is rebuilt from ``python -m exporter train`` flags (an empty FLAGS is the
current default), fitted and packaged exactly as ``exporter train`` does (f32 thresholds from the held-out
normals, test metrics of the OpenVINO bundle at f32), then all bundles are timed interleaved at f32:
``--repeats`` rounds, each the median latency of ``--frames`` single frames (LATENCY hint, one request,
every core), then median [range] over rounds and the ratio to the first setting in the same round.
With ``--out`` the bundles are kept and a second run times them again without fitting.

``--fit-images N`` also times the fit alone (features + coreset, no export) of each setting on N normal
images made from the category's training images (flips and quarter turns), the larger set the fit-time
goal is stated for.  The figures this benchmark makes are for the test split, reported once; settings are
chosen on the validation split (``benchmarks.patchcore_sweep``).
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
import tempfile
import time
from pathlib import Path

import cv2

from benchmarks.common import DATA, cpu_name, fmt, latency_ms, md_table, summary

log = logging.getLogger("benchmarks.settings")


def parse_setting(text: str):
    """``NAME=FLAGS`` -> (name, PatchcoreSettings) through the exporter's own parser and family defaults."""
    from exporter.__main__ import build_parser
    from exporter.families import FAMILIES

    name, sep, flags = text.partition("=")
    if not sep or not name:
        raise SystemExit(f"--setting {text!r}: write NAME=FLAGS, e.g. 'fast=--input-size 256'")
    args = build_parser().parse_args(["train", "--data", ".", "--out", ".", *shlex.split(flags)])
    return name, FAMILIES["patchcore"].settings(args)


def larger_set(data: Path, category: str, n: int, folder: Path) -> Path:
    """``folder/category/train/good`` with ``n`` images: the category's normals, then flipped and turned copies."""
    from exporter.data import load_category

    sources = load_category(data, category).train
    out = folder / category / "train" / "good"
    out.mkdir(parents=True, exist_ok=True)
    variants = [lambda i: i, lambda i: cv2.flip(i, 1), lambda i: cv2.flip(i, 0),
                lambda i: cv2.rotate(i, cv2.ROTATE_90_CLOCKWISE), lambda i: cv2.rotate(i, cv2.ROTATE_180)]
    for k in range(n):
        image = cv2.imread(str(sources[k % len(sources)]), cv2.IMREAD_COLOR)
        cv2.imwrite(str(out / f"{k:04d}.png"), variants[(k // len(sources)) % len(variants)](image))
    return folder


def fit_only(data: Path, category: str, settings) -> dict:
    """Seconds to fit (features + coreset) on every image of ``data/category`` (no held-out split, no export)."""
    from exporter import backbones
    from exporter.data import load_category
    from exporter.export import input_spec
    from exporter.train.patchcore import fit

    train = load_category(data, category).train
    bb = backbones.resolve(settings.backbone)
    started = time.monotonic()
    _, timings = fit(settings, bb, train, input_spec(settings.input_size, bb.mean, bb.std))
    return {"images": len(train), "total_s": round(time.monotonic() - started, 1), **timings}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--category", default="grid")
    ap.add_argument("--setting", action="append", required=True, help="NAME=exporter train flags (repeatable)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--frames", type=int, default=10)
    ap.add_argument("--fit-images", type=int, help="also time the fit alone on this many generated normal images")
    ap.add_argument("--out", type=Path, help="keep the bundles here (default: a temporary folder)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")


    from bundle import read_manifest
    from bundle.runtime import CompiledBundle
    from exporter.build import fit_patchcore, package
    from exporter.data import load_category, read_image

    settings = dict(parse_setting(s) for s in args.setting)
    folder = args.out or Path(tempfile.mkdtemp(prefix="settings-"))
    bundles = {name: folder / name.replace(" ", "-") for name in settings}
    for name, s in settings.items():
        if (bundles[name] / "bundle.json").is_file():
            log.info("%s: reusing %s (delete it to fit again)", name, bundles[name])
            continue
        package(fit_patchcore(args.data, args.category, s), bundles[name], precisions=["f32"])
    fits = {}
    if args.fit_images:
        with tempfile.TemporaryDirectory(prefix="fitset-") as tmp:
            generated = larger_set(args.data, args.category, args.fit_images, Path(tmp))
            fits = {name: fit_only(generated, args.category, s) for name, s in settings.items()}
        for name, f in fits.items():
            log.info("%s: fit on %d images: %s", name, args.fit_images, f)

    category = load_category(args.data, args.category)
    compiled = {n: CompiledBundle(b, hint="LATENCY", precision="f32") for n, b in bundles.items()}
    frames = {n: [read_image(s.path, c.manifest.input) for s in category.test[: args.frames]] for n, c in compiled.items()}
    latency: dict[str, list[float]] = {n: [] for n in compiled}
    for n, c in compiled.items():
        latency_ms(c, frames[n][:3])  # warm-up
    for r in range(args.repeats):
        for n, c in compiled.items():
            latency[n].append(latency_ms(c, frames[n]))
        log.info("round %d/%d done", r + 1, args.repeats)

    base = next(iter(compiled))
    rows = []
    for n, b in bundles.items():
        m = read_manifest(b)
        test = m.precisions["f32"].metrics["test"]
        t = m.training
        good = [s for s in category.test if s.label == 0]
        rates = test["detection_rate"]
        rows.append([n, f"{m.input.height} px", str(t["memory_bank"]), f"{t['fit_s']:.0f} ({t['train_images']} images)",
                     *([f"{fits[n]['total_s']:.0f}"] if fits else []),
                     fmt(summary(latency[n]), 1),
                     fmt(summary([x / y for x, y in zip(latency[n], latency[base], strict=True)]), 2),
                     str(test.get("image_auroc")), str(test.get("pixel_auroc")), str(test.get("aupro")),
                     f"{round(rates.get('good', 0) * len(good))} of {len(good)}",
                     f"{min(v for k, v in rates.items() if k != 'good'):.2f}"])
    ran = ", ".join(sorted({c.precision for c in compiled.values()}))  # read back from the compiled models
    print(f"\nCPU: {cpu_name()}; {args.category}; OpenVINO at {ran} (read back; asked f32), "
          "LATENCY hint, batch 1; "
          f"test split; bundles in {folder}\n")
    print(md_table(["setting", "input", "bank rows", "fit s (train split)",
                    *([f"fit s ({args.fit_images} generated)"] if fits else []),
                    "ms / frame: median [range]", f"x {base}, same round", "image AUROC", "pixel AUROC", "AUPRO",
                    "good flagged", "worst type caught"], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
