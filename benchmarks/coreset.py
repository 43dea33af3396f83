"""Training benchmark: PatchCore feature extraction and coreset samplers, side by side on the same embeddings.

Features: the category's training normals (as ``python -m exporter train`` splits them),
extracted with anomalib's ``PatchcoreModel``: the fit's own (cold) extraction is reported on its own row, then
``--extract-repeats`` warm extractions each in the default memory format and in ``channels_last``, interleaved.
Samplers at ``--ratio``, each repeated ``--repeats`` times:

- ``ours``: :func:`exporter.coreset.greedy_coreset` (128-d Gaussian projection, in-place mat-vec);
- ``ours-64``: the same with a 64-d projection;
- ``exact``: the same greedy rule in the full feature dimension (no projection): the reference;
- ``stock``: anomalib's ``KCenterGreedy`` (sparse random projection + full norm per pick), run for
  ``--stock-picks`` picks only and extrapolated linearly to the full count (its cost per pick is constant).

Each bank except ``stock`` is packaged (``exporter.build.package``: OpenVINO bundle, thresholds on
held-out normals, test-split metrics) so image/pixel AUROC come from the same code as ``exporter train``.

    python -m benchmarks.coreset --ratio 0.01 --repeats 3
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import DATA, FAST_INPUT, TORCH, fmt, header, md_table, measured_on, openvino_ran, subset, summary

log = logging.getLogger("benchmarks.coreset")


def stock_seconds_per_pick(features: torch.Tensor, picks: int) -> tuple[float, float]:
    """anomalib's sampler: (projection fit+transform seconds, seconds per pick over ``picks`` picks)."""
    from anomalib.models.components.sampling import KCenterGreedy

    sampler = KCenterGreedy(features, sampling_ratio=picks / features.shape[0])
    started = time.perf_counter()
    sampler.model.fit(features)
    sampler.features = sampler.model.transform(features)
    projected = time.perf_counter()
    idx = torch.randint(high=features.shape[0], size=(1,)).squeeze()
    for _ in range(picks):  # the body of KCenterGreedy.select_coreset_idxs, minus tqdm
        sampler.update_distances(cluster_center=idx)
        idx = sampler.get_new_idx()
        sampler.min_distances.scatter_(0, idx.unsqueeze(0).unsqueeze(1), 0.0)
    return projected - started, (time.perf_counter() - projected) / picks


def report(timings: dict[str, list[float]], metrics: dict[str, dict], samplers: set[str], cold: float
           ) -> tuple[list[list[str]], list[float]]:
    """The table's rows and the fit's seconds (extraction + ours).

    ``cold`` is the fit's own (first) extraction, a row of its own; the ``extract`` rows are warm repeats only.
    Extraction and the samplers run different numbers of times (``--extract-repeats``, ``--repeats``): the fit is the
    warm extraction's median plus each repeat of ours.  "stock time / this" is paired per round: each round's stock
    time over the same round's sampler time.
    """
    ref = {k: summary(v)["median"] for k, v in timings.items()}
    rows = [["extract, cold (the fit's own, 1 run)", f"{cold:.1f}", "", "", "", ""]]
    for name, values in timings.items():
        m = metrics.get(name, {})
        # paired per round: the same round's stock time over this sampler's
        ratio = ([s / v for s, v in zip(timings["stock (extrapolated)"], values, strict=True)]
                 if name in samplers else None)
        rows.append([name, fmt(summary(values), 1), fmt(summary(ratio), 1) if ratio else "",
                     str(m.get("image_auroc", "")), str(m.get("pixel_auroc", "")),
                     f"{m['model_bin_mb']:.1f}" if m else ""])
    return rows, [ref["extract"] + c for c in timings["ours"]]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--category", default="grid")
    parser.add_argument("--train-images", type=int, default=0, help="first N normals only (0 = all, as exporter train)")
    parser.add_argument("--ratio", type=float, default=0.01)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--extract-repeats", type=int, default=1)
    parser.add_argument("--stock-picks", type=int, default=50)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    from exporter.build import fit_patchcore, package
    from exporter.coreset import greedy_coreset
    from exporter.train.patchcore import PatchcoreGraph, PatchcoreSettings, extract

    settings = PatchcoreSettings(input_size=FAST_INPUT)
    # fit with a 1-row bank: the model, split and spec exactly as `exporter train` builds them
    data = subset(args.data, args.category, args.train_images, Path(tempfile.mkdtemp(prefix="edge-inspect-coreset-")))
    trained = fit_patchcore(data, args.category, dataclasses.replace(settings, max_bank=1))
    model, spec = trained.graph.model, trained.spec
    from exporter import backbones

    bb = backbones.resolve(settings.backbone)
    # the fit's own extraction is the first (cold) one: reported on its own row, not mixed with the warm
    # --extract-repeats pairs that compare the two memory formats
    cold = trained.training["feature_extraction_s"]
    timings: dict[str, list[float]] = {"extract": [], "extract channels_last": []}
    features = None
    for _ in range(args.extract_repeats):
        for name in timings:
            model.to(memory_format=torch.channels_last if "channels_last" in name else torch.contiguous_format)
            started = time.perf_counter()
            features = extract(model, trained.train, spec, bb, settings.batch_size)
            timings[name].append(time.perf_counter() - started)
    model.to(memory_format=torch.contiguous_format)
    n_select = max(1, int(features.shape[0] * args.ratio))
    log.info("%d features x %d; selecting %d", features.shape[0], features.shape[1], n_select)

    samplers = {
        "ours": lambda: greedy_coreset(features, n_select, 128, settings.seed),
        "ours-64": lambda: greedy_coreset(features, n_select, 64, settings.seed),
        "exact": lambda: greedy_coreset(features, n_select, features.shape[1], settings.seed),
    }
    picks: dict[str, torch.Tensor] = {}
    for name in samplers:
        timings[name] = []
    timings["stock (extrapolated)"] = []
    for _ in range(args.repeats):
        for name, run in samplers.items():
            started = time.perf_counter()
            picks[name] = run()
            timings[name].append(time.perf_counter() - started)
        setup, per_pick = stock_seconds_per_pick(features, args.stock_picks)
        timings["stock (extrapolated)"].append(setup + per_pick * n_select)

    work = Path(tempfile.mkdtemp(prefix="edge-inspect-coreset-"))
    metrics = {}
    for name, idx in picks.items():
        model.memory_bank = features[idx].contiguous()
        graph = PatchcoreGraph(model, spec.height, trained.graph.embedder, offset=trained.graph.offset).eval()
        out = package(dataclasses.replace(trained, graph=graph), work / name)
        metrics[name] = json.loads((out / "bundle.json").read_text())["metrics"]["test"]
        metrics[name]["model_bin_mb"] = (out / "model.bin").stat().st_size / 2**20

    # timings: torch extraction and samplers; AUROC: the packaged bundles, at the precision their metrics record
    where = (f"{TORCH} (extraction, samplers)", "AUROC: " + openvino_ran(m["precision"] for m in metrics.values()))
    if args.json:
        args.json.write_text(json.dumps({"measured_on": measured_on(*where), "timings": timings, "extract_cold_s": cold, "metrics": metrics,
                                         "n_select": n_select, "features": list(features.shape)}, indent=1))
    rows, fit_ours = report(timings, metrics, set(samplers), cold)
    print(f"\n{header(*where)}")
    print(f"{features.shape[0]} patch features x {features.shape[1]} from {len(trained.train)} images; "
          f"{n_select} picks (ratio {args.ratio}); {args.repeats} repeats, median [min-max]; stock: "
          f"{args.stock_picks} picks timed, extrapolated to {n_select}\n")
    print(md_table(["step", "seconds", "stock time / this", "image AUROC", "pixel AUROC", "model.bin MB"], rows))
    print(f"\nfit (warm extract median + ours): {fmt(summary(fit_ours), 1)} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
