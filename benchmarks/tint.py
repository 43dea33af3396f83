"""A colour camera's tint on a model of grey images: good frames flagged and defects caught, per bundle and tint.

    python -m benchmarks.tint BUNDLE [BUNDLE ...] [--data ../shared/data/mvtec --category grid] [--tints 0,0.05,0.1,0.2]

Every test image of the category is tinted as a colour camera's white balance would tint a grey part (blue x (1 - t),
red x (1 + t), clipped to 8 bits) and scored by each bundle (OpenVINO f32) at its threshold.  A bundle exported from
grey images turns every frame grey in its graph (``exporter.export.GREY_STEP``); one exported before it did not.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import cv2
import numpy as np

from benchmarks.common import DATA, header, md_table, openvino_ran


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("bundles", nargs="+")
    ap.add_argument("--data", default=str(DATA))
    ap.add_argument("--category", default="grid")
    ap.add_argument("--tints", default="0,0.05,0.1,0.2")
    args = ap.parse_args(argv)


    from bundle import prepare_image
    from bundle.runtime import CompiledBundle
    from exporter.export import GREY_STEP

    files = sorted((Path(args.data) / args.category / "test").glob("*/*.png"))
    if not files:
        print(f"no test images under {Path(args.data) / args.category / 'test'}", file=sys.stderr)
        return 2
    images = [cv2.imread(str(f), cv2.IMREAD_COLOR).astype(np.float32) for f in files]
    good = np.array([f.parent.name == "good" for f in files])
    rows, ran = [], set()
    for path in args.bundles:
        compiled = CompiledBundle(Path(path), batch=1, precision="f32")
        spec, threshold = compiled.manifest.input, compiled.thresholds.image.threshold
        request = compiled.create_request()
        ran.add(compiled.precision)
        grey = "grey step" if GREY_STEP in spec.in_graph else "no grey step"
        for tint in (float(t) for t in args.tints.split(",")):
            gain = np.float32([1 - tint, 1.0, 1 + tint])
            flagged = np.array([compiled.infer(prepare_image(np.clip(image * gain, 0, 255).astype(np.uint8), spec)
                                               [np.newaxis], request).score[0] >= threshold for image in images])
            rows.append([f"{Path(path).name} ({grey})", f"{tint:g}", f"{(flagged & good).sum()} of {good.sum()}",
                         f"{(flagged & ~good).sum()} of {(~good).sum()}"])
    print(f"{header(openvino_ran(ran))}; {args.category} test split, {len(files)} images\n")
    print(md_table(["bundle", "tint", "good flagged", "defects caught"], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
