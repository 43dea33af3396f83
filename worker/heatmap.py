"""Heatmap images: the anomaly map as an OpenCV colour map blended over the frame the model saw."""

from __future__ import annotations

import cv2
import numpy as np

from bundle import Normalisation
from worker.config import HeatmapConfig

CONTENT_TYPES = {"jpeg": "image/jpeg", "png": "image/png"}

# OpenCV's JET as a user colour map, built once: applyColorMap rebuilds a built-in map on every call.
_JET = cv2.applyColorMap(np.arange(256, dtype=np.uint8)[:, np.newaxis], cv2.COLORMAP_JET)


def encode(image: np.ndarray, fmt: str, quality: int = 85) -> bytes:
    params = [cv2.IMWRITE_JPEG_QUALITY, quality] if fmt == "jpeg" else [cv2.IMWRITE_PNG_COMPRESSION, 1]
    ok, buf = cv2.imencode(".jpg" if fmt == "jpeg" else ".png", image, params)
    if not ok:
        raise RuntimeError(f"OpenCV could not encode a {fmt} image")
    return buf.tobytes()


def fit_size(image: np.ndarray, longer_side: int | None) -> np.ndarray:
    h, w = image.shape[:2]
    if not longer_side or max(h, w) == longer_side:
        return image
    scale = longer_side / max(h, w)
    interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    return cv2.resize(image, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=interp)


def render(frame: np.ndarray, anomaly_map: np.ndarray, norm: Normalisation, cfg: HeatmapConfig) -> bytes:
    """Blend a JET colour map of the normalised anomaly map (0.5 = pixel threshold) over ``frame``.

    Every step runs in OpenCV on 8-bit images at the output size (the frame is scaled before the blend, not
    after), since this runs once per published frame on the cores that also run inference.
    """
    frame = fit_size(frame, cfg.size)
    span = max(norm.threshold - norm.low, 1e-12)
    scale = 127.5 / span  # norm's 0..1 (0.5 at the threshold) as 0..255, saturated above
    floor = cv2.max(np.asarray(anomaly_map, dtype=np.float32), norm.low)  # at least `low`: the scaled level stays >= 0
    level = cv2.convertScaleAbs(floor, alpha=scale, beta=-norm.low * scale)
    if level.shape[:2] != frame.shape[:2]:
        shrink = level.shape[0] * level.shape[1] > frame.shape[0] * frame.shape[1]
        level = cv2.resize(level, (frame.shape[1], frame.shape[0]),
                           interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
    blended = cv2.addWeighted(cv2.applyColorMap(level, _JET), cfg.alpha, frame, 1 - cfg.alpha, 0)
    return encode(blended, cfg.format, cfg.quality)
