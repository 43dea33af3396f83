"""What tiling costs per frame: a 4000x3000 frame whole, tiled on one request (the worker), tiled as one batch.

    python -m benchmarks.tiling --bundle PATH [--bundle PATH] [--grid-bundle] --grid 4 3 --repeats 5

For each bundle, three ways of inferring the same decoded 4000x3000 frame, timed interleaved in
``--repeats`` rounds of ``--frames`` frames (median of each round, then median [range] over rounds):
``whole`` (resize to the input size, one inference: the untiled worker), ``tiled`` (bundle/tiling.py:
one resize to the canvas, then the tiles one after another on one batch-1 request, merged map), and
``batched`` (the same tiles as one inference on a second compile with a static batch of cols x rows:
what compiling a second batch size would buy).  JPEG decoding of the frame is timed apart: it is the
same for all three.  ``--grid-bundle`` also trains a 256 px PatchCore bundle on MVTec grid (needs torch).
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

from benchmarks.common import DATA, fmt, header, md_table, openvino_ran, summary

log = logging.getLogger("benchmarks.tiling")


def frame_jpeg(width: int, height: int) -> bytes:
    """A textured 4000x3000-class frame: the generated weave enlarged, as a camera JPEG (quality 90)."""
    from exporter.synthetic import _texture

    small = _texture(np.random.default_rng(0), 512)
    image = cv2.cvtColor(cv2.resize(small, (width, height), interpolation=cv2.INTER_LINEAR), cv2.COLOR_GRAY2BGR)
    return cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 90])[1].tobytes()


def grid_bundle(folder: Path) -> Path:
    from benchmarks.common import train_bundles

    _, bundles = train_bundles(DATA, "grid", 32, 2437, folder)
    return bundles["fp32"]


def measure(bundles: list[Path], grid: tuple[int, int], overlap: float, repeats: int, frames: int,
            width: int, height: int) -> tuple[list[list[str]], set[str]]:
    """The table's rows, and the precisions OpenVINO ran (read back)."""
    from bundle import tiling
    from bundle.runtime import CompiledBundle
    from worker.config import TilingConfig
    from worker.decode import decode

    cfg = TilingConfig(grid=grid, overlap=overlap)
    data = frame_jpeg(width, height)
    frame = decode(data)
    runners, ran = [], set()
    for path in bundles:
        single = CompiledBundle(path, batch=1)
        batched = CompiledBundle(path, batch=grid[0] * grid[1])
        request, batch_request = single.create_request(), batched.create_request()
        ran |= {single.precision, batched.precision}
        spec = single.manifest.input

        def batch_run(b=batched, r=batch_request, s=spec) -> None:
            canvas, tiles = tiling.cut(frame, s.width, s.height, cfg)
            b.infer(np.stack([canvas[y:y + s.height, x:x + s.width] for _, _, x, y in tiles]), r)

        ways = {"whole": lambda s=single, r=request: tiling.see(s, r, frame, None),
                "tiled": lambda s=single, r=request: tiling.see(s, r, frame, cfg),
                "batched": batch_run}
        for run in ways.values():
            run()  # warm-up
        runners.append((path, spec, ways))
    times: dict[tuple[str, str], list[float]] = {}
    for _ in range(repeats):
        per_round = []
        for _ in range(frames):
            start = time.perf_counter()
            decode(data)
            per_round.append(time.perf_counter() - start)
        times.setdefault(("decode", ""), []).append(float(np.median(per_round)) * 1000)
        for path, _, ways in runners:
            for name, run in ways.items():
                per_round = []
                for _ in range(frames):
                    start = time.perf_counter()
                    run()
                    per_round.append(time.perf_counter() - start)
                times.setdefault((str(path), name), []).append(float(np.median(per_round)) * 1000)
    rows = [[f"JPEG decode {width}x{height}", "-", "-", fmt(summary(times[("decode", "")]), 1), "-"]]
    for path, spec, ways in runners:
        whole = times[(str(path), "whole")]
        for name in ways:
            ms = times[(str(path), name)]
            ratio = summary([m / w for m, w in zip(ms, whole, strict=True)])
            tiles = "1" if name == "whole" else f"{grid[0]}x{grid[1]}"
            rows.append([Path(path).name, f"{spec.width} px", f"{name} ({tiles})", fmt(summary(ms), 1), fmt(ratio, 2)])
    return rows, ran


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, action="append", default=[])
    parser.add_argument("--grid-bundle", action="store_true", help="also train and measure a 256 px MVTec grid bundle")
    parser.add_argument("--grid", type=int, nargs=2, default=(4, 3), metavar=("COLS", "ROWS"))
    parser.add_argument("--overlap", type=float, default=0.1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--frames", type=int, default=5)
    parser.add_argument("--size", type=int, nargs=2, default=(4000, 3000), metavar=("W", "H"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    with tempfile.TemporaryDirectory() as tmp:
        bundles = list(args.bundle) + ([grid_bundle(Path(tmp))] if args.grid_bundle else [])
        if not bundles:
            parser.error("give --bundle and/or --grid-bundle")
        rows, ran = measure(bundles, tuple(args.grid), args.overlap, args.repeats, args.frames, *args.size)
    print(header(openvino_ran(ran)) + "\n")
    print(md_table(["bundle", "input", "way (tiles)", "ms / frame: median [range] over rounds", "x whole, same round"], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
