"""Several parts in one camera frame: an MVTec-layout set of 2x2 mosaics of a category's images, to compare a bundle
trained on whole frames with one trained on tiles (``exporter train --tiling 2x2``).

    python -m benchmarks.mosaic --out /tmp/mosaic [--data ../shared/data/mvtec --category grid]
    python -m exporter train --data /tmp/mosaic --category grid-mosaic --precisions f32 --out WHOLE
    python -m exporter train --data /tmp/mosaic --category grid-mosaic --precisions f32 --tiling 2x2 --out TILED

A frame is four of the category's images side by side, each used once where it is a training normal (so the
exporter's seeded split of frames never puts one image on both sides): ``train/good`` holds len(train) // 4
frames.  Each test image becomes one test frame at a seeded corner, the other three corners filled with good test
images (never training ones); its label and mask are its own, placed at its corner.  A whole-frame model sees each
part at half the scale a single-part frame shows it; a 2x2 tiled model sees about one part per tile.
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

import cv2
import numpy as np

from benchmarks.common import DATA


def _mosaic(images: list[np.ndarray]) -> np.ndarray:
    """Four equally sized images as a 2x2 frame, in reading order."""
    return np.vstack([np.hstack(images[:2]), np.hstack(images[2:])])


def _read(path: Path, size: int, flags: int = cv2.IMREAD_COLOR) -> np.ndarray:
    image = cv2.imread(str(path), flags)
    if image is None:
        raise ValueError(f"{path}: cannot be decoded")
    return cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA if flags == cv2.IMREAD_COLOR else cv2.INTER_NEAREST)


def build(data: Path, category: str, out: Path, seed: int = 0, size: int = 1024) -> Path:
    """Write ``out/<category>-mosaic`` (MVTec AD layout); every part is resized to ``size`` px first."""
    rng = random.Random(seed)
    src, root = data / category, out / f"{category}-mosaic"
    goods = sorted((src / "train" / "good").glob("*.png"))
    rng.shuffle(goods)
    (root / "train" / "good").mkdir(parents=True, exist_ok=True)
    for i in range(len(goods) // 4):
        cv2.imwrite(str(root / "train" / "good" / f"{i:03d}.png"), _mosaic([_read(p, size) for p in goods[4 * i : 4 * i + 4]]))
    fillers = sorted((src / "test" / "good").glob("*.png"))
    blank = np.zeros((size, size), np.uint8)
    for folder in sorted(p for p in (src / "test").iterdir() if p.is_dir()):
        for path in sorted(folder.glob("*.png")):
            corner = rng.randrange(4)
            others = rng.sample([f for f in fillers if f != path], 3)
            parts = [_read(p, size) for p in others]
            parts.insert(corner, _read(path, size))
            (root / "test" / folder.name).mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(root / "test" / folder.name / path.name), _mosaic(parts))
            if folder.name != "good":
                mask = _read(src / "ground_truth" / folder.name / f"{path.stem}_mask.png", size, cv2.IMREAD_GRAYSCALE)
                masks = [blank] * 4
                masks[corner] = mask
                (root / "ground_truth" / folder.name).mkdir(parents=True, exist_ok=True)
                cv2.imwrite(str(root / "ground_truth" / folder.name / f"{path.stem}_mask.png"), _mosaic(masks))
    return root


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--category", default="grid")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=int, default=1024, help="each part's side in pixels (the frame's is twice it)")
    args = parser.parse_args(argv)
    print(build(args.data, args.category, args.out, args.seed, args.size))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
