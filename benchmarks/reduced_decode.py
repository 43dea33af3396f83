"""What a JPEG frame decoded smaller does to the score: the worker's reduced decode against a full decode.

    python -m benchmarks.reduced_decode --bundle BUNDLE [--data ../shared/data/mvtec --category grid] \
        [--sizes 1100x1100,1920x1080,1280x960,2200x2200] [--headroom 1,2,inf]

Every test image of the category is resized to each frame size and encoded as JPEG (``--quality``), then scored by
the bundle (OpenVINO f32) decoded in full, as the exporter reads an image, and decoded smaller as the worker does
(``limits.reduced_decode``) with each ``--headroom`` (the reduced frame's shorter side against the input's longer
side; the worker's is ``worker.decode.REDUCED_HEADROOM``).  Prints per frame size and headroom the factor decoded
at, the CPU time of decoding and resizing a frame to the input (one pass, OpenCV's own threads), the relative
score change (median and maximum of its size, and its signed mean: a direction would move the
false-alarm rate) and the frames whose verdict at the bundle's threshold changed, with the CPU.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import cv2
import numpy as np

from benchmarks.common import DATA, header, md_table, openvino_ran


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", required=True)
    ap.add_argument("--data", default=str(DATA))
    ap.add_argument("--category", default="grid")
    ap.add_argument("--sizes", default="1100x1100,1920x1080,1280x960,2200x2200")
    ap.add_argument("--headroom", default="1,2,inf", help="inf: a full decode, for its cost")
    ap.add_argument("--quality", type=int, default=92)
    args = ap.parse_args(argv)


    from bundle import prepare_image
    from bundle.runtime import CompiledBundle
    from worker.decode import decode, probe, reduction

    compiled = CompiledBundle(Path(args.bundle), batch=1, precision="f32")
    spec, threshold = compiled.manifest.input, compiled.thresholds.image.threshold
    request = compiled.create_request()
    files = sorted((Path(args.data) / args.category / "test").glob("*/*.png"))
    if not files:
        print(f"no test images under {Path(args.data) / args.category / 'test'}", file=sys.stderr)
        return 2

    def score(image: np.ndarray) -> float:
        return float(compiled.infer(image[np.newaxis], request).score[0])

    rows = []
    for size in [tuple(int(v) for v in s.split("x")) for s in args.sizes.split(",")]:
        frames = []
        for file in files:
            image = cv2.resize(cv2.imread(str(file), cv2.IMREAD_COLOR), size, interpolation=cv2.INTER_AREA)
            data = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, args.quality])[1].tobytes()
            frames.append((data, score(prepare_image(decode(data), spec))))
        jpeg = probe(frames[0][0], 1 << 30, 1 << 30)
        for headroom in (float(h) for h in args.headroom.split(",")):
            factor = reduction(jpeg, spec.width, spec.height, headroom)
            started = time.process_time()
            inputs = [prepare_image(decode(data, factor), spec) for data, _ in frames]
            cpu_ms = (time.process_time() - started) * 1000 / len(frames)
            change = np.array([(score(image) - full) / full for image, (_, full) in zip(inputs, frames, strict=True)])
            flips = sum((full >= threshold) != (full * (1 + c) >= threshold) for (_, full), c in zip(frames, change, strict=True))
            rows.append([f"{size[0]} x {size[1]}", f"{headroom:g}", f"1/{factor}", f"{cpu_ms:.2f}",
                         f"{np.median(np.abs(change)) * 100:.2f} % / {np.abs(change).max() * 100:.2f} %",
                         f"{change.mean() * 100:+.2f} %", f"{flips} / {len(frames)}"])
    print(f"{header(openvino_ran([compiled.precision]))}; {args.category} test split, {len(files)} images, "
          f"JPEG quality {args.quality}; bundle input {spec.width} x {spec.height}\n")
    print(md_table(["frame", "headroom", "decoded at", "decode + resize, CPU ms / frame", "score change, median / max",
                    "signed mean", "verdicts changed"], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
