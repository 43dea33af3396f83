"""A small generated texture set in MVTec AD layout, for tests and for a demo without real data.

The texture is a woven lattice with per-image jitter and sensor noise; defects are
dark holes, bright scratches and smeared (missing-structure) patches, each with its
ground-truth mask.  Deterministic for a given seed.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

DEFECTS = ("hole", "scratch", "smear")


def _texture(rng: np.random.Generator, size: int) -> np.ndarray:
    period = 16
    phase_x, phase_y = rng.uniform(0, period, 2)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    lines = np.maximum(
        np.cos(2 * np.pi * (xx + phase_x) / period) ** 8,
        np.cos(2 * np.pi * (yy + phase_y) / period) ** 8,
    )
    image = 90 + 110 * lines + rng.normal(0, 6, (size, size))
    return np.clip(image, 0, 255).astype(np.uint8)


def _defect(rng: np.random.Generator, image: np.ndarray, kind: str) -> np.ndarray:
    size = image.shape[0]
    mask = np.zeros_like(image)
    cx, cy = (int(v) for v in rng.integers(size // 5, 4 * size // 5, 2))
    r = max(3, size // 14)
    if kind == "hole":
        cv2.ellipse(mask, (cx, cy), (r, int(r * 0.7)), float(rng.uniform(0, 180)), 0, 360, 255, -1)
        image[mask > 0] = rng.integers(15, 40)
    elif kind == "scratch":
        angle = rng.uniform(0, np.pi)
        dx, dy = int(2.5 * r * np.cos(angle)), int(2.5 * r * np.sin(angle))
        cv2.line(mask, (cx - dx, cy - dy), (cx + dx, cy + dy), 255, max(2, size // 64))
        image[mask > 0] = 250
    else:
        cv2.circle(mask, (cx, cy), r, 255, -1)
        smeared = cv2.GaussianBlur(image, (0, 0), 4)
        image[mask > 0] = smeared[mask > 0]
    return mask


def sample(rng: np.random.Generator, size: int, kind: str = "good") -> tuple[np.ndarray, np.ndarray]:
    """One generated 8-bit grey image and its 0/255 mask (empty for ``good``), for building other layouts in tests."""
    image = _texture(rng, size)
    mask = np.zeros_like(image) if kind == "good" else _defect(rng, image, kind)
    return image, mask


def generate(out: Path, category: str = "weave", size: int = 128, n_train: int = 24, n_test: int = 4,
             seed: int = 0) -> Path:
    """Write ``out/category`` with ``n_train`` normals, ``n_test`` good and ``n_test`` per defect type."""
    rng = np.random.default_rng(seed)
    root = Path(out) / category
    for i in range(n_train):
        _write(root / "train" / "good" / f"{i:03d}.png", _texture(rng, size))
    for i in range(n_test):
        _write(root / "test" / "good" / f"{i:03d}.png", _texture(rng, size))
    for kind in DEFECTS:
        for i in range(n_test):
            image = _texture(rng, size)
            mask = _defect(rng, image, kind)
            _write(root / "test" / kind / f"{i:03d}.png", image)
            _write(root / "ground_truth" / kind / f"{i:03d}_mask.png", mask)
    return root


def _write(path: Path, image: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), image):
        raise OSError(f"cannot write {path}")
