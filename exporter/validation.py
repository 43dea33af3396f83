"""A validation set that is not the test split: synthetic anomalies, with masks, on held-out normal images.

Settings (input size, memory bank, blur) are chosen on this set and the test split is reported once
(docs/quality/README.md).  Three kinds of anomaly, each drawn at the image's own resolution so that every
candidate input size sees the same defects:

* ``perlin``: anomalib's ``PerlinAnomalyGenerator`` (the DRAEM recipe: a Perlin-noise blob filled with an
  augmented natural photo, or with augmented noise when no photos are given);
* ``cutpaste``: a small rotated piece of another normal image pasted elsewhere (misplaced structure);
* ``scratch``: a thin bright or dark curve (the thin defects a texture's pixel AUROC hides).

Those three are blatant at the image level: almost every candidate setting finds them all, so they cannot
tell a memory bank that covers the normal variation from one that does not (docs/quality/README.md).  Two
subtler kinds, in the texture's own material, are there for that (``HARD_KINDS``, opt-in):

* ``deform``: a local smooth displacement of the texture (a bent wire, a dent), no new colour at all;
* ``stain``: a translucent, soft-edged blob of low contrast (glue, a smear).

Held-out normals alone cannot show false alarms: they come from the same session as the memory bank.  A line's
good parts drift (exposure, focus, placement, compression), so each normal also gets one **benign variant** of
each kind in ``BENIGN_KINDS``; a setting whose threshold flags them would flag good parts that drift so.  Their
magnitudes are fixed in advance, not tuned.  On grid they did not predict the test split's false alarms
(docs/quality/README.md, "The fast setting chosen again").
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from exporter.data import images_under, read_decoded

PERLIN_TRIES = 10  # draws of a Perlin blob until one marks a pixel
PERLIN_SIDE = 32  # the smallest side anomalib's Perlin noise is drawn at
KINDS = ("perlin", "cutpaste", "scratch")
HARD_KINDS = ("deform", "stain")
BENIGN_KINDS = ("light", "gamma", "focus", "noise", "place", "jpeg")


@dataclass(frozen=True)
class Anomalous:
    """One synthetic anomaly: the BGR image, its 0/1 mask (same size) and its kind."""

    image: np.ndarray
    mask: np.ndarray
    kind: str


def _perlin(image: np.ndarray, rng: np.random.Generator, photos: list[Path]) -> tuple[np.ndarray, np.ndarray]:
    import torch
    from anomalib.data.utils.generators.perlin import PerlinAnomalyGenerator

    seed = int(rng.integers(2**31))
    source = str(photos[int(rng.integers(len(photos)))]) if photos else None
    h, w = image.shape[:2]
    # anomalib draws from torch's global generator, in the constructor too (its solarize threshold): seed it
    # for both here, and restore it after.
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        generator = PerlinAnomalyGenerator(probability=1.0, blend_factor=(0.5, 1.0))
        for _ in range(PERLIN_TRIES):  # a small image's turned noise can leave no pixel above the blob's level
            # anomalib's noise needs 32 px a side (its coarsest scale; a side of 16 raised a RuntimeError): a
            # smaller image's is drawn that large and cut to it
            perturbation, mask = generator.generate_perturbation(max(h, PERLIN_SIDE), max(w, PERLIN_SIDE),
                                                                 anomaly_source_path=source)
            perturbation, mask = perturbation[:h, :w], mask[:h, :w]
            if bool((mask > 0.5).any()):
                break
    rgb = torch.from_numpy(image[..., ::-1].copy()).float() / 255.0
    beta = float(rng.uniform(0.5, 1.0))
    out = rgb * (1 - mask) + beta * perturbation + (1 - beta) * rgb * mask
    bgr = (out.clamp(0, 1).numpy()[..., ::-1] * 255).round().astype(np.uint8)
    return np.ascontiguousarray(bgr), (mask[..., 0].numpy() > 0.5).astype(np.uint8)


def _cutpaste(image: np.ndarray, donor: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    h, w = image.shape[:2]
    side = min(h, w)
    ph, pw = (max(3, int(side * rng.uniform(0.03, 0.12))) for _ in range(2))  # a small image's piece had no pixel
    y, x = int(rng.integers(0, h - ph)), int(rng.integers(0, w - pw))
    piece = donor[y : y + ph, x : x + pw]
    canvas = np.zeros_like(image)
    square = np.zeros((h, w), np.uint8)
    ty, tx = int(rng.integers(0, h - ph)), int(rng.integers(0, w - pw))
    canvas[ty : ty + ph, tx : tx + pw] = piece
    square[ty : ty + ph, tx : tx + pw] = 1
    turn = cv2.getRotationMatrix2D((tx + pw / 2, ty + ph / 2), float(rng.uniform(-90, 90)), 1.0)
    canvas = cv2.warpAffine(canvas, turn, (w, h), flags=cv2.INTER_LINEAR)
    mask = cv2.warpAffine(square, turn, (w, h), flags=cv2.INTER_NEAREST)
    out = np.where(mask[..., None] > 0, canvas, image)
    return out, mask


def _scratch(image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    h, w = image.shape[:2]
    side = min(h, w)
    mask = np.zeros((h, w), np.uint8)
    start = rng.uniform(0.15, 0.85, 2) * (w, h)
    angle = rng.uniform(0, 2 * np.pi)
    points = [start]
    for _ in range(4):
        angle += rng.normal(0, 0.4)
        points.append(points[-1] + side * rng.uniform(0.03, 0.08) * np.array([np.cos(angle), np.sin(angle)]))
    curve = np.clip(np.array(points), 0, [w - 1, h - 1]).round().astype(np.int32)
    cv2.polylines(mask, [curve], False, 1, max(2, round(side * rng.uniform(0.003, 0.008))))
    shade = int(rng.integers(0, 40)) if rng.random() < 0.5 else int(rng.integers(215, 256))
    out = image.copy()
    out[mask > 0] = shade
    return out, mask


def _deform(image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    h, w = image.shape[:2]
    side = min(h, w)
    sigma = max(1.5, side * rng.uniform(0.02, 0.05))  # narrower, a small image's bump could fall between pixels
    # at least 2.5 px, so that a small image's bump moves some pixels by the 2 the mask counts (else it would be the
    # normal image, counted as an anomaly)
    amplitude = max(2.5, sigma * rng.uniform(0.5, 1.0))
    cy, cx = rng.uniform(0.15, 0.85, 2) * (h, w)
    angle = rng.uniform(0, 2 * np.pi)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    bump = (amplitude * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * sigma**2))).astype(np.float32)
    warped = cv2.remap(image, xx - bump * np.float32(np.cos(angle)), yy - bump * np.float32(np.sin(angle)),
                       cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
    mask = (bump >= 2.0).astype(np.uint8)  # where the texture moved by two pixels or more
    return np.where(mask[..., None] > 0, warped, image), mask


def _stain(image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    h, w = image.shape[:2]
    side = min(h, w)
    shape = np.zeros((h, w), np.float32)
    centre = (int(rng.uniform(0.15, 0.85) * w), int(rng.uniform(0.15, 0.85) * h))
    axes = (max(2, int(side * rng.uniform(0.03, 0.08))), max(2, int(side * rng.uniform(0.03, 0.08))))
    cv2.ellipse(shape, centre, axes, float(rng.uniform(0, 180)), 0, 360, 1.0, -1)
    blob = cv2.GaussianBlur(shape, (0, 0), max(axes) / 3)
    weight = np.clip((blob - 0.25) / 0.5, 0, 1)  # soft edge inside the mask, exactly 0 outside it
    mask = (weight > 0).astype(np.uint8)
    shade = float(rng.integers(0, 256))
    alpha = rng.uniform(0.2, 0.45) * weight[..., None]
    out = image.astype(np.float32) * (1 - alpha) + shade * alpha
    return np.clip(out, 0, 255).round().astype(np.uint8), mask


def _anomaly(kind: str, image: np.ndarray, donor: np.ndarray, rng: np.random.Generator,
             photos: list[Path]) -> Anomalous:
    if kind == "perlin":
        bad, mask = _perlin(image, rng, photos)
    elif kind == "cutpaste":
        bad, mask = _cutpaste(image, cv2.resize(donor, image.shape[1::-1]), rng)
    elif kind == "scratch":
        bad, mask = _scratch(image, rng)
    elif kind == "deform":
        bad, mask = _deform(image, rng)
    elif kind == "stain":
        bad, mask = _stain(image, rng)
    else:
        raise ValueError(f"unknown anomaly kind {kind!r}; choose from {KINDS + HARD_KINDS}")
    return Anomalous(bad, mask, kind)


def synthesise(images: list[np.ndarray], seed: int = 0, photos: list[Path] | None = None,
               kinds: tuple[str, ...] = KINDS) -> list[Anomalous]:
    """One anomaly of each kind on each image (at its own resolution); deterministic for a seed.  A cut-paste
    piece comes from the next image."""
    rng = np.random.default_rng(seed)
    return [_anomaly(kind, image, images[(i + 1) % len(images)], rng, photos or [])
            for i, image in enumerate(images) for kind in kinds]


@dataclass(frozen=True)
class Example:
    """One image of the validation split: a held-out normal (``good``), a synthetic anomaly (its kind, with
    its mask) or a benign variant of a normal (``benign`` set to its kind: a good part that drifted)."""

    image: np.ndarray
    kind: str
    mask: np.ndarray | None = None
    benign: str | None = None


def examples(normals: list[Path], seed: int = 0, photos: list[Path] | None = None, kinds: tuple[str, ...] = KINDS,
             benign: tuple[str, ...] = BENIGN_KINDS) -> Iterator[Example]:
    """The validation split one image at a time, read from the normals' files: each normal, its anomalies (as
    :func:`synthesise` draws them) and its benign variants (as :func:`benign_variants`), so that no more than two
    full-resolution normals are held at once, however large the frames."""
    if not normals:
        return
    anomaly_rng, benign_rng = np.random.default_rng(seed), np.random.default_rng([seed, 1])
    first = read_decoded(normals[0])
    image = first
    for i in range(len(normals)):
        donor = first if i + 1 == len(normals) else read_decoded(normals[i + 1])
        yield Example(image, "good")
        for kind in kinds:
            bad = _anomaly(kind, image, donor, anomaly_rng, photos or [])
            yield Example(bad.image, kind, bad.mask)
        for kind in benign:
            yield Example(_benign(image, kind, benign_rng), "good", benign=kind)
        image = donor


def _benign(image: np.ndarray, kind: str, rng: np.random.Generator) -> np.ndarray:
    h, w = image.shape[:2]
    if kind == "light":  # exposure drift
        return cv2.convertScaleAbs(image, alpha=float(rng.uniform(0.9, 1.1)), beta=float(rng.uniform(-8, 8)))
    if kind == "gamma":  # another camera response
        table = 255.0 * (np.arange(256) / 255.0) ** float(rng.uniform(0.85, 1.18))
        return cv2.LUT(image, table.round().astype(np.uint8))
    if kind == "focus":  # focus drift
        return cv2.GaussianBlur(image, (0, 0), float(rng.uniform(0.5, 1.0)))
    if kind == "noise":  # sensor noise at a higher gain
        noisy = image.astype(np.float32) + rng.normal(0, float(rng.uniform(2, 4)), image.shape).astype(np.float32)
        return np.clip(noisy, 0, 255).round().astype(np.uint8)
    if kind == "place":  # the part a few pixels off and turned by up to a degree
        move = cv2.getRotationMatrix2D((w / 2, h / 2), float(rng.uniform(-1, 1)), 1.0)
        move[:, 2] = move[:, 2] + rng.uniform(-6, 6, 2)
        return cv2.warpAffine(image, move, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
    if kind == "jpeg":  # the camera's compression
        ok, buf = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, int(rng.integers(70, 86))])
        decoded = cv2.imdecode(buf, cv2.IMREAD_COLOR) if ok else None
        if decoded is None:
            raise RuntimeError("OpenCV could not round-trip a JPEG")
        return np.asarray(decoded, np.uint8)
    raise ValueError(f"unknown benign kind {kind!r}; choose from {BENIGN_KINDS}")


def benign_variants(images: list[np.ndarray], seed: int = 0, kinds: tuple[str, ...] = BENIGN_KINDS) -> list[tuple[str, np.ndarray]]:
    """One benign variant of each kind of each normal image, as (kind, image); deterministic for a seed and
    independent of the synthetic anomalies' draw."""
    rng = np.random.default_rng([seed, 1])
    return [(kind, _benign(image, kind, rng)) for image in images for kind in kinds]


def natural_photos(folder: Path | None) -> list[Path]:
    """The photos under ``folder`` (Perlin fill), or none when it is absent."""
    if folder is None or not folder.is_dir():
        return []
    return images_under(folder, (".jpg", ".jpeg", ".png"))
