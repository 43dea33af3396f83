"""Datasets in MVTec AD layout: ``CATEGORY/train/good``, ``CATEGORY/test/<type>``, ``CATEGORY/ground_truth/<type>``.

Images are read with OpenCV and resized with :func:`bundle.prepare_image`, the same
function the worker uses, so training, evaluation and serving see identical pixels.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from bundle import InputSpec, prepare_image

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp"}


class DatasetError(ValueError):
    """The data folder is not in MVTec AD layout, or is missing what a step needs."""


@dataclass(frozen=True)
class Sample:
    path: Path
    defect: str  # "good" or the defect type
    mask: Path | None  # ground-truth mask, for defects

    @property
    def label(self) -> int:
        return int(self.defect != "good")


@dataclass(frozen=True)
class Category:
    root: Path
    train: list[Path]
    test: list[Sample]

    def split_train(self, val_fraction: float, seed: int = 0) -> tuple[list[Path], list[Path]]:
        """Hold out normal training images to set thresholds without looking at test labels."""
        paths = list(self.train)
        random.Random(seed).shuffle(paths)
        # At least a quarter (up to 10) of a small set, so the threshold rests on more than one or two images.
        n_val = max(round(len(paths) * val_fraction), min(10, len(paths) // 4)) if len(paths) > 1 else 0
        return sorted(paths[n_val:]), sorted(paths[:n_val])


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES) if folder.is_dir() else []


def load_category(data: Path, category: str) -> Category:
    root = Path(data) / category
    train = _images(root / "train" / "good")
    if not train:
        raise DatasetError(f"{root}/train/good has no images (expected MVTec AD layout)")
    test: list[Sample] = []
    test_root = root / "test"
    for type_dir in sorted(p for p in test_root.iterdir() if p.is_dir()) if test_root.is_dir() else []:
        for image in _images(type_dir):
            mask = None
            if type_dir.name != "good":
                mask = root / "ground_truth" / type_dir.name / f"{image.stem}_mask.png"
                if not mask.is_file():
                    raise DatasetError(f"{image}: ground-truth mask {mask} missing")
            test.append(Sample(image, type_dir.name, mask))
    return Category(root, train, test)


def find_categories(data: Path) -> list[str]:
    """Every sub-folder of ``data`` that looks like an MVTec AD category."""
    return sorted(p.name for p in Path(data).iterdir() if (p / "train" / "good").is_dir())


def read_image(path: Path, spec: InputSpec) -> np.ndarray:
    """Read an image file as the worker would see it: 8-bit BGR, resized for the graph."""
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        raise DatasetError(f"{path}: cannot be decoded as an image")
    return prepare_image(image, spec)


def read_mask(path: Path | None, spec: InputSpec) -> np.ndarray:
    """Ground-truth mask at the graph's resolution (nearest neighbour), as 0/1 uint8."""
    if path is None:
        return np.zeros((spec.height, spec.width), np.uint8)
    mask = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    if mask is None:
        raise DatasetError(f"{path}: cannot be decoded as a mask")
    mask = cv2.resize(mask, (spec.width, spec.height), interpolation=cv2.INTER_NEAREST)
    return (mask > 127).astype(np.uint8)
