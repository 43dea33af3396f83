"""What the bank extension (issue 17) costs per frame: a bundle from before it against one with it, empty and full.

    python -m benchmarks.extension --before /work/bench/settings/default --after /work/bench/ext-default \\
        --data ../shared/data/mvtec --category grid --rows 1000 --repeats 7

Rows, each compiled by ``bundle.runtime.CompiledBundle`` at f32 (set explicitly: the CPU plugin's default is
bf16 on CPUs with AMX), LATENCY hint, static batch 1 as the worker compiles it:

- ``before``: a bundle exported without the extension input (``--before``);
- ``extension 1 row``: the bundle with it (``--after``), compiled with one pad row, the plain model;
- ``extension N rows``: the same bundle compiled with ``--rows`` rows, all of them real patch features: the
  candidates the bundle itself returns for the category's test frames, which is what a taught false alarm adds.

All rows are timed interleaved: ``--repeats`` rounds of ``--frames`` single frames, each frame on every row in
turn (after a warm-up), so load from other processes falls on all rows alike; per round the median frame and the
fastest one (the least disturbed), then median [range] over rounds and the ratio to ``before`` in the same round.  Both
bundles' scores on the frames are compared too: with the same settings and data, ``before`` and the empty
extension are the same model.  Give ``--after`` more than once (e.g. a bundle trained with another
``extension_candidates``) to time several.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks.common import DATA, cpu_name, fmt, latency_ms, md_table, summary

log = logging.getLogger("benchmarks.extension")


def op_times(folder: Path, image: np.ndarray, extension: np.ndarray | None, runs: int) -> dict[str, float]:
    """Mean ms per frame of every operation of the graph's top level (OpenVINO's PERF_COUNT, f32, 1 thread)."""
    import openvino as ov

    from bundle import read_manifest

    spec = read_manifest(folder).input
    core = ov.Core()
    model = core.read_model(folder / "model.xml")
    shapes = {spec.name: [1, spec.height, spec.width, 3]}
    inputs: dict[int | str, np.ndarray] = {0: image[np.newaxis]}
    if extension is not None:
        shapes["extension"] = list(extension.shape)
        inputs["extension"] = extension
    model.reshape(shapes)
    compiled = core.compile_model(model, "CPU", {"PERF_COUNT": True, "PERFORMANCE_HINT": "LATENCY",
                                                 "INFERENCE_NUM_THREADS": 1, "INFERENCE_PRECISION_HINT": "f32"})
    request = compiled.create_infer_request()
    out: dict[str, float] = {}
    for i in range(runs + 1):
        request.infer(inputs)
        if i:  # the first run warms up
            for info in request.profiling_info:
                out[info.node_name] = out.get(info.node_name, 0.0) + info.real_time.total_seconds() * 1000 / runs
    return out


def profile_table(before: Path, afters: list[Path], rows: int, features: dict[Path, np.ndarray], image: np.ndarray,
                  runs: int) -> str:
    """Summed per-operation time of each graph, and of its head operations (named ``aten::``, as the export names
    them; the backbone's are not): the heads' time over the bundle without the extension is the extension's own
    cost, apart from the backbone's noise.  Totals, not operations matched by name: OpenVINO numbers the nodes
    of a kind in order, so the extension's operations shift the names of the bank's own (its ``MatMul_2`` is the
    other graph's ``MatMul_1``)."""
    from bundle import EXTENSION_PAD

    def heads(ops: dict[str, float]) -> float:
        return sum(v for k, v in ops.items() if "aten::" in k)

    base = op_times(before, image, None, runs)
    table = [["before", f"{sum(base.values()):.2f}", f"{heads(base):.3f}", "-"]]
    for folder in afters:
        dim = features[folder].shape[1]
        for name, ext in ((f"{folder.name}, 1 row", np.full((1, dim), EXTENSION_PAD, np.float32)),
                          (f"{folder.name}, {rows} rows", features[folder])):
            ops = op_times(folder, image, ext, runs)
            table.append([name, f"{sum(ops.values()):.2f}", f"{heads(ops):.3f}", f"{heads(ops) - heads(base):+.3f}"])
    return md_table(["graph (per-op counters, 1 thread)", "summed ms / frame", "head ops ms / frame",
                     "head ops over before, ms"], table)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--before", type=Path, required=True, help="a bundle without the extension input")
    ap.add_argument("--after", type=Path, action="append", required=True, help="a bundle with it (repeatable)")
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--category", default="grid")
    ap.add_argument("--rows", type=int, default=1000, help="extension rows of real patch features")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--frames", type=int, default=10)
    ap.add_argument("--profile", type=int, default=0, metavar="RUNS",
                    help="also sum OpenVINO's per-operation counters over RUNS frames (1 thread) and report the time "
                         "of the head operations, with and without the extension (apart from the backbone's noise)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")


    from bundle.runtime import CompiledBundle
    from exporter.data import load_category, read_image

    def compiled_at_f32(folder: Path, rows: int | None = None) -> CompiledBundle:
        return CompiledBundle(folder, hint="LATENCY", precision="f32", batch=1, extension_rows=rows)

    before = compiled_at_f32(args.before)
    if before.extension_spec is not None:
        raise SystemExit(f"{args.before} already has the extension input: give a bundle exported before it")
    test = load_category(args.data, args.category).test
    spec = before.manifest.input
    frames = [read_image(s.path, spec) for s in test[: args.frames]]
    rows = {"before": before}
    checks: list[str] = []
    features_of: dict[Path, np.ndarray] = {}
    for folder in args.after:
        empty = compiled_at_f32(folder)
        ext = empty.extension_spec
        if ext is None or empty.manifest.input != spec:
            raise SystemExit(f"{folder}: not a bundle with the extension input at {spec.height} px")
        k = ext.candidates
        # Real patch features: the bundle's own candidates for test frames, as many frames as the rows need.
        need = -(-args.rows // k)
        features = np.concatenate([empty.infer(read_image(s.path, spec)[np.newaxis]).candidates[0]  # type: ignore[index]
                                   for s in test[:need]])[: args.rows]
        full = compiled_at_f32(folder, args.rows)
        full.set_extension(features)
        features_of[folder] = features
        tag = f" (K={k})" if len(args.after) > 1 else ""
        rows[f"extension 1 row{tag}"] = empty
        rows[f"extension {args.rows} rows{tag}"] = full
        scores = np.array([before.infer(f[np.newaxis]).score[0] for f in frames])
        same = np.array([empty.infer(f[np.newaxis]).score[0] for f in frames])
        checks.append(f"{folder}: empty extension vs before, max relative score difference "
                      f"{float(np.max(np.abs(same - scores) / scores)):.1e} over {len(frames)} frames")

    # Interleaved frame by frame (each frame on every graph in turn), so load from other processes falls on all
    # graphs alike; per round the median frame and the fastest (the least disturbed) are kept.
    requests = {n: c.create_request() for n, c in rows.items()}
    latency: dict[str, list[float]] = {n: [] for n in rows}
    fastest: dict[str, list[float]] = {n: [] for n in rows}
    for c in rows.values():
        latency_ms(c, frames[:3])  # warm-up
    for r in range(args.repeats):
        times: dict[str, list[float]] = {n: [] for n in rows}
        for frame in frames:
            for n, c in rows.items():
                started = time.perf_counter()
                c.infer(frame[np.newaxis], requests[n])
                times[n].append((time.perf_counter() - started) * 1000)
        for n in rows:
            latency[n].append(statistics.median(times[n]))
            fastest[n].append(min(times[n]))
        log.info("round %d/%d done", r + 1, args.repeats)

    threads = {int(c.compiled.get_property("INFERENCE_NUM_THREADS")) for c in rows.values()}
    print(f"\nCPU: {cpu_name()}; {args.category}, {spec.height} px; "
          f"OpenVINO {', '.join(sorted({c.precision for c in rows.values()}))} (read back), LATENCY hint, "
          f"batch 1, {'/'.join(map(str, sorted(threads)))} inference threads; {args.repeats} rounds of "
          f"{len(frames)} frames")
    print("\n".join(checks) + "\n")
    if args.profile:
        print(profile_table(args.before, args.after, args.rows, features_of, frames[0], args.profile) + "\n")
    def ratio(values: dict[str, list[float]], n: str) -> str:
        return fmt(summary([a / b for a, b in zip(values[n], values["before"], strict=True)]), 3)

    print(md_table(["graph", "ms / frame: median [range] over rounds", "x before, same round",
                    "fastest frame of a round, ms", "x before, same round"],
                   [[n, fmt(summary(latency[n]), 2), ratio(latency, n), fmt(summary(fastest[n]), 2), ratio(fastest, n)]
                    for n in rows]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
