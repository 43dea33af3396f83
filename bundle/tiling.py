"""One frame, one or many inferences: the whole frame at the model's input size, or a grid of tiles.

The worker cuts a camera's frames as its ``tiling`` (or the bundle's) says; the exporter cuts training,
held-out and test images of a tiled bundle the same way with these same functions, so a model trained
on tiles sees tiles at the scale it learnt and its threshold is set on frame scores as the worker reads them.

A defect a few pixels wide in a 4000x3000 frame vanishes when the frame is shrunk to a model's
input size; tiles keep it.  The frame (after roi) is resized once to a canvas on which each tile is
exactly the model's input size, so tiles are plain crops and their anomaly maps lie on the canvas
pixel for pixel; overlapping pixels keep the larger value.  Tiles run one after another on the
thread's own infer request (the bundle is compiled with a static batch of 1; docs/benchmarks.md,
"Tiling", has the measurement of a batched compile).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import cv2
import numpy as np

from bundle import InputSpec, prepare_image

if TYPE_CHECKING:
    from bundle.runtime import CompiledBundle


class Grid(Protocol):
    """A tiling: a camera's (worker config) or a bundle's (:class:`bundle.TilingSpec`)."""

    @property
    def grid(self) -> tuple[int, int]: ...

    @property
    def overlap(self) -> float: ...


@dataclass(frozen=True)
class Seen:
    """What the model made of a frame: the image it saw (heatmap and thumbnail are drawn on it), the
    frame's raw score, its raw anomaly map, the embedding to store, and the tiles (None untiled)."""

    image: np.ndarray
    score: float
    anomaly_map: np.ndarray
    embedding: np.ndarray
    tiles: dict | None = None
    extension_revision: int | None = None  # of the bank extension that scored it (the lowest of its tiles)


def _starts(canvas: int, tile: int, n: int) -> list[int]:
    """Evenly spread tile origins with the first at 0 and the last ending at the canvas edge."""
    if n == 1:
        return [0]
    return [round(i * (canvas - tile) / (n - 1)) for i in range(n)]


def canvas_size(tiling: Grid, width: int, height: int) -> tuple[int, int]:
    """Canvas (width, height) on which ``tiling.grid`` tiles of ``width`` x ``height`` overlap by ``tiling.overlap``."""
    cols, rows = tiling.grid
    return (round(width * (cols - (cols - 1) * tiling.overlap)),
            round(height * (rows - (rows - 1) * tiling.overlap)))


def cut(frame: np.ndarray, width: int, height: int, tiling: Grid) -> tuple[np.ndarray, list[tuple[int, int, int, int]]]:
    """The canvas (``frame`` resized once) and its tiles as (col, row, x, y); each tile is ``width`` x ``height``."""
    cw, ch = canvas_size(tiling, width, height)
    # a frame read at the canvas's size already (exporter.data.read_frame) is not resized a second time
    canvas = frame if frame.shape[:2] == (ch, cw) else cv2.resize(frame, (cw, ch), interpolation=cv2.INTER_AREA)
    canvas = np.ascontiguousarray(canvas)
    cols, rows = tiling.grid
    return canvas, [(col, row, x, y) for row, y in enumerate(_starts(ch, height, rows))
                    for col, x in enumerate(_starts(cw, width, cols))]


def see(bundle: CompiledBundle, request: object, frame: np.ndarray, tiling: Grid | None) -> Seen:
    """Infer ``frame`` (8-bit BGR) whole or tiled; a tiled frame scores as its most anomalous tile."""
    spec = bundle.manifest.input
    if tiling is None:
        image = prepare_image(frame, spec)
        pred = bundle.infer(image[np.newaxis], request)
        return Seen(image, float(pred.score[0]), pred.anomaly_map[0], pred.embedding[0],
                    extension_revision=pred.extension_revision)
    w, h = spec.width, spec.height
    canvas, tiles = cut(frame, w, h, tiling)
    merged = np.full(canvas.shape[:2], -np.inf, np.float32)
    best: tuple[float, np.ndarray, list[int]] = (-np.inf, np.empty(0), [0, 0])
    revisions: list[int] = []
    for col, row, x, y in tiles:
        pred = bundle.infer(np.ascontiguousarray(canvas[y:y + h, x:x + w])[np.newaxis], request)
        if pred.extension_revision is not None:
            revisions.append(pred.extension_revision)
        paste(merged, pred.anomaly_map[0], x, y, w, h)
        score = float(pred.score[0])
        if score > best[0]:
            best = (score, pred.embedding[0], [col, row])
    cols, rows = tiling.grid
    return Seen(canvas, best[0], merged, best[1], {"count": len(tiles), "grid": [cols, rows], "worst": best[2]},
                min(revisions) if revisions else None)


def paste(merged: np.ndarray, anomaly_map: np.ndarray, x: int, y: int, width: int, height: int) -> None:
    """Merge one tile's map (resized to the tile if the graph's map is smaller) into the canvas's map at (x, y),
    keeping the larger value where tiles overlap; ``merged`` starts at -inf."""
    amap: np.ndarray = anomaly_map.astype(np.float32, copy=False)
    if amap.shape != (height, width):
        amap = cv2.resize(amap, (width, height), interpolation=cv2.INTER_LINEAR)
    view = merged[y:y + height, x:x + width]
    np.maximum(view, amap, out=view)


def record(tiling: Grid | None) -> dict | None:
    """A tiling as JSON (what a stored guard's patches depend on; what ``--choose`` scored on)."""
    return None if tiling is None else {"grid": list(tiling.grid), "overlap": tiling.overlap}


def tiles(frame: np.ndarray, spec: InputSpec, tiling: Grid | None) -> list[np.ndarray]:
    """Every tile of ``frame`` prepared for the graph (:func:`bundle.prepare_image`); untiled, the frame itself."""
    if tiling is None:
        return [prepare_image(frame, spec)]
    canvas, grid = cut(frame, spec.width, spec.height, tiling)
    return [prepare_image(canvas[y:y + spec.height, x:x + spec.width], spec) for _, _, x, y in grid]
