"""The heatmap image: where the map is above the pixel threshold it is red, below it blue, at the asked size."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from bundle import Normalisation
from worker.config import HeatmapConfig
from worker.decode import use_opencv_threads
from worker.heatmap import render

NORM = Normalisation(low=1.0, threshold=3.0)


def decoded(data: bytes) -> np.ndarray:
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    assert image is not None
    return image


@pytest.mark.parametrize("size", [None, 64, 512])
def test_hot_region_is_red_and_the_rest_blue(size: int | None) -> None:
    frame = np.full((256, 256, 3), 128, np.uint8)
    amap = np.full((256, 256), 0.5, np.float32)  # below `low`: the bottom of the colour map
    amap[:128, :128] = 9.0  # far above the threshold: the top
    cfg = HeatmapConfig(format="png", alpha=1.0, size=size)
    image = decoded(render(frame, amap, NORM, cfg))
    side = size or 256
    assert image.shape == (side, side, 3)
    q = side // 4
    hot = image[:q, :q].reshape(-1, 3).mean(0)  # BGR
    cold = image[-q:, -q:].reshape(-1, 3).mean(0)
    assert hot[2] > 100 and hot[0] < 30  # red
    assert cold[0] > 100 and cold[2] < 30  # blue


def test_the_pixel_threshold_maps_to_the_middle_of_the_colour_map() -> None:
    frame = np.zeros((32, 32, 3), np.uint8)
    amap = np.full((32, 32), NORM.threshold, np.float32)
    image = decoded(render(frame, amap, NORM, HeatmapConfig(format="png", alpha=1.0)))
    middle = cv2.applyColorMap(np.array([[127, 128]], np.uint8), cv2.COLORMAP_JET)[0]
    assert any(np.abs(image[16, 16].astype(int) - m.astype(int)).max() <= 1 for m in middle)


def test_every_level_has_opencvs_jet_colour() -> None:
    """The map's 256 levels, one per column, come out as OpenCV's built-in JET (the worker keeps it as a table)."""
    levels = np.arange(256, dtype=np.float32)
    amap = np.tile(NORM.low + levels * (NORM.threshold - NORM.low) / 127.5, (4, 1))  # level L in column L
    image = decoded(render(np.zeros((4, 256, 3), np.uint8), amap, NORM, HeatmapConfig(format="png", alpha=1.0, size=256)))
    expected = cv2.applyColorMap(np.tile(np.arange(256, dtype=np.uint8), (4, 1)), cv2.COLORMAP_JET)
    np.testing.assert_array_equal(image, expected)


def test_opencv_threads_zero_gives_opencvs_own_pool_back_not_no_threading():
    """``limits.opencv_threads: 0`` is OpenCV's pool (one thread per CPU); OpenCV's own 0 would mean no threading."""
    before = cv2.getNumThreads()
    try:
        use_opencv_threads(1)
        assert cv2.getNumThreads() == 1
        use_opencv_threads(0)
        assert cv2.getNumThreads() == cv2.getNumberOfCPUs()
    finally:
        cv2.setNumThreads(before)
