"""What input size and memory-bank rows cost: PatchCore export-graph latency on the OpenVINO runtime.

    python -m benchmarks.latency --config 640:7616 --config 512:750 --config 512:750:int8 --repeats 5
    python -m benchmarks.latency --config 640:7616 --config 512:1500:screen=500:refine=0.25

Each ``SIZE:ROWS`` is the exported PatchCore graph (EfficientNet-Lite0 blocks.2+4, the
production ``PatchcoreGraph``, with the map blur a fitted bundle gets at that size) at that input size
with a memory bank of that many rows (``:screen=N`` screens it with its first N rows, ``:refine=SHARE`` of the
patches meeting them all, ``:unrefined=bound|scaled`` the others' distance, as ``exporter train --screen-rows N
--refine SHARE --unrefined WHAT``); the
rows are random, which does not change the work (a dense distance to every row).  Configs are
compiled once and timed interleaved, ``--repeats`` rounds of ``--frames`` single-frame
inferences each (LATENCY hint, ``--threads`` threads, ``--precision``, f32 unless set): median of each round, then median and
range over rounds.  Without ``--config`` or ``--bundle``: the old default (640 px, 7616 rows on grid), the
default (512 px, 1500 rows behind a 500-row screen) and the fast setting (256 px, 1500 rows).  ``--bundle DIR`` (repeatable) times an
exported bundle of any family in the same rounds, compiled the same way (its bank extension, if any, empty):

    python -m benchmarks.latency --config 512:750 --bundle bundles/grid-efficientad --repeats 5
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from benchmarks.common import fmt, header, md_table, openvino_ran, summary
from bundle import BundleError, Manifest, read_manifest
from bundle.runtime import ran_precision

log = logging.getLogger("benchmarks.latency")


def _config(threads: int, precision: str) -> dict:
    """How every timed model is compiled: one frame at a time, a fixed thread count, the precision named."""
    return {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": threads, "INFERENCE_PRECISION_HINT": precision}


def compile_graph(size: int, rows: int, threads: int, precision: str = "f32", int8: bool = False, screen: int = 0,
                  refine: float = 0.25, unrefined: str | None = None):
    """The graph at ``size`` px with ``rows`` random bank rows; ``int8``: its backbone quantised as ``exporter train
    --precision int8`` does, calibrated on random frames (the scales move, the work does not).

    Returns (infer, the precision OpenVINO runs it at, read back)."""
    import openvino as ov
    import torch

    from bundle import EXTENSION_PAD
    from exporter import backbones
    from exporter.export import convert, input_spec
    from exporter.train.embedding import DefectEmbedding
    from exporter.train.patchcore import PatchcoreGraph, PatchcoreSettings, build_model, patch_features

    settings = PatchcoreSettings(input_size=size)
    bb = backbones.resolve(settings.backbone)
    model = build_model(settings, bb)  # with the blur a fitted bundle gets at that size: its cost depends on the size
    with torch.no_grad():
        dim = patch_features(model, torch.zeros(1, 3, 64, 64)).shape[1]
    model.memory_bank = torch.randn(rows, dim, generator=torch.Generator().manual_seed(0))
    graph = PatchcoreGraph(model, size, DefectEmbedding(torch.zeros(dim), torch.eye(dim)), screen_rows=screen,
                           refine=refine, unrefined=unrefined or settings.unrefined).eval()
    ir = convert(graph, input_spec(size, bb.mean, bb.std))
    if int8:
        from exporter.quantize import quantize

        rng = np.random.default_rng(0)
        ir = quantize(ir, [rng.integers(0, 255, (size, size, 3), dtype=np.uint8) for _ in range(8)])
    ir.reshape({"extension": [1, dim]})  # the empty bank extension: one pad row, static as the worker compiles it
    compiled = ov.Core().compile_model(ir, "CPU", _config(threads, precision))
    pad = np.full((1, dim), EXTENSION_PAD, np.float32)
    return (lambda frame: compiled({0: frame, 1: pad})), ran_precision(compiled)


def compile_bundle(folder: Path, manifest: Manifest, threads: int, precision: str = "f32") -> tuple[int, Callable, str]:
    """An exported bundle's IR (``manifest``: its verified ``bundle.json``), compiled as :func:`compile_graph`
    compiles the graph; (input side, infer, the precision OpenVINO runs it at, read back)."""
    import openvino as ov

    from bundle import EXTENSION_PAD

    core = ov.Core()
    model = core.read_model(str(folder / "model.xml"))
    feeds: dict[int, np.ndarray] = {}
    if manifest.extension is not None:
        dim = manifest.extension.feature_dim
        model.reshape({"extension": [1, dim]})
        feeds[1] = np.full((1, dim), EXTENSION_PAD, np.float32)
    compiled = core.compile_model(model, "CPU", _config(threads, precision))
    return manifest.input.height, lambda frame: compiled({0: frame, **feeds}), ran_precision(compiled)


# The old default, the default and the fast setting, as SIZE:ROWS (README, "Exporter").
DEFAULT_CONFIGS = ("640:7616", "512:1500:screen=500", "256:1500")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", action="append", help=f"SIZE:ROWS, or SIZE:ROWS:int8 for an INT8 backbone (repeatable; "
                                                      f"default {', '.join(DEFAULT_CONFIGS)})")
    ap.add_argument("--bundle", action="append", type=Path, default=[], help="an exported bundle folder (repeatable)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--frames", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--precision", default="f32", choices=("f32", "bf16", "f16"), help="inference precision (always set)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    from exporter.train.patchcore import UNREFINED

    manifests: dict[Path, Manifest] = {}
    for folder in args.bundle:  # a wrong folder is a one-line error before anything is compiled
        try:
            manifests[folder] = read_manifest(folder)
        except BundleError as exc:
            ap.error(f"--bundle: {exc}")

    entries: dict[str, tuple[int, Callable, str]] = {}
    for config in args.config or ([] if args.bundle else DEFAULT_CONFIGS):
        size, rows, *extra = config.split(":")
        options = dict(item.partition("=")[::2] for item in extra)
        if set(options) - {"int8", "screen", "refine", "unrefined"} or options.get("int8", "") != "":
            ap.error(f"--config {config}: use SIZE:ROWS, then optionally :int8, :screen=ROWS, :refine=SHARE, "
                     ":unrefined=bound|scaled")
        screen, refine = int(options.get("screen", 0)), float(options.get("refine", 0.25))
        unrefined = options.get("unrefined")
        if unrefined is not None and unrefined not in UNREFINED:
            ap.error(f"--config {config}: unrefined is one of {', '.join(UNREFINED)}")
        name = (f"PatchCore graph, {size} px, {rows} rows" + (", INT8 backbone" if "int8" in options else "")
                + (f", screen {screen}, refine {refine:g}" if screen else "")
                + (f", unrefined {unrefined}" if unrefined else ""))
        entries[name] = (int(size), *compile_graph(int(size), int(rows), args.threads, args.precision,
                                                   int8="int8" in options, screen=screen, refine=refine,
                                                   unrefined=unrefined))
    for folder in args.bundle:
        entries[f"bundle {folder.name}"] = compile_bundle(folder, manifests[folder], args.threads, args.precision)
    frames = {k: np.random.default_rng(0).integers(0, 255, (1, side, side, 3), dtype=np.uint8) for k, (side, _, _) in entries.items()}
    rounds: dict[str, list[float]] = {k: [] for k in entries}
    for k, (_, infer, _) in entries.items():
        for _ in range(3):
            infer(frames[k])  # warm-up
    for r in range(args.repeats):
        for k, (_, infer, _) in entries.items():
            times = []
            for _ in range(args.frames):
                started = time.perf_counter()
                infer(frames[k])
                times.append((time.perf_counter() - started) * 1000)
            rounds[k].append(statistics.median(times))
        log.info("round %d/%d done", r + 1, args.repeats)
    base = next(iter(entries))
    rows = [[k, str(side), fmt(summary(rounds[k]), 1),
             fmt(summary([a / b for a, b in zip(rounds[k], rounds[base], strict=True)]), 2)]
            for k, (side, _, _) in entries.items()]
    ran = openvino_ran([p for _, _, p in entries.values()], args.precision)
    print(f"{header(ran)}, INFERENCE_NUM_THREADS {args.threads}, LATENCY hint, batch 1\n")
    print(md_table(["what", "input px", "ms / frame: median [range] over rounds", f"x {base}, same round"], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
