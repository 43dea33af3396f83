"""Training data as users have it: layouts, image formats, the data summary and refusals, AUPRO, threshold modes."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from bundle import read_manifest
from conftest import ROOT
from exporter.data import (DatasetError, find_categories, hold_out_defects, load_category, read_image, read_mask,
                           summarise)
from exporter.export import input_spec
from exporter import metrics
from exporter.metrics import PixelMetrics, aupro
from exporter.synthetic import DEFECTS, sample
from exporter.build import _split
from exporter.thresholds import ThresholdChoice, far_threshold, recall_threshold

SPEC = input_spec(64, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


def pixel_metrics(maps, masks, types) -> dict:
    """The pixel summary of images with their masks (``None``: a defect known by its image label only)."""
    summed = PixelMetrics()
    for anomaly_map, mask, defect_type in zip(maps, masks, types, strict=True):
        summed.add(anomaly_map, mask, defect_type)
    return summed.result()


def _exporter(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "exporter", *args], capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT)


def _write(path: Path, image: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), image)
    return path


def _grey16_nonsquare(image: np.ndarray) -> np.ndarray:
    """A 16-bit grey frame, 96 wide and 72 high, whose top 8 bits are the generated 8-bit texture."""
    return (image[:72, :96].astype(np.uint16) << 8) | 0x5A


# --- AUPRO -----------------------------------------------------------------------------------------------------


def test_aupro_on_a_hand_made_case():
    """Two 2x2 regions; A scores above every background pixel, B above exactly k of the 112 background pixels.

    PRO is 0.5 from FPR 0 (A found) and 1 from FPR k/112 (B found too), so the area to 0.3, normalised,
    is (0.5 k/112 + (0.3 - k/112)) / 0.3.
    """
    masks = np.zeros((1, 10, 12), np.uint8)
    masks[0, 1:3, 1:3] = 1  # region A
    masks[0, 6:8, 8:10] = 1  # region B
    background = masks[0] == 0
    maps = np.zeros((1, 10, 12), np.float32)
    maps[0][background] = np.linspace(0, 1, int(background.sum()), dtype=np.float32)  # distinct, ascending
    maps[0, 1:3, 1:3] = 2.0
    k = 20
    maps[0, 6:8, 8:10] = np.sort(maps[0][background])[-k - 1] + 1e-4  # above the top k background scores only
    expected = (0.5 * k / 112 + (0.3 - k / 112)) / 0.3
    assert aupro(maps, masks) == pytest.approx(expected, abs=1e-9)
    assert aupro(maps, np.zeros_like(masks)) is None


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_aupro_equals_anomalibs_metric(seed):
    """Random maps and masks (several regions per image, some images without any, tied scores): same value."""
    from anomalib.metrics import AUPRO
    from anomalib.metrics.aupro import _AUPRO

    assert issubclass(AUPRO, _AUPRO)  # the public metric is this class with anomalib's field plumbing on top
    rng = np.random.default_rng(seed)
    masks = np.zeros((6, 40, 52), np.uint8)
    for i in range(5):
        for _ in range(int(rng.integers(1, 4))):
            y, x = rng.integers(0, 34, 2)
            h, w = rng.integers(2, 9, 2)
            masks[i, y : y + h, x : x + w] = 1
    maps = (rng.random(masks.shape) + 0.6 * masks).astype(np.float32)
    maps = np.round(maps, 2) if seed == 2 else maps
    reference = _AUPRO(fpr_limit=0.3)
    reference.update(torch.from_numpy(maps), torch.from_numpy(masks))
    ours = aupro(maps, masks)
    assert 0.3 < ours < 1.0
    assert ours == pytest.approx(float(reference.compute()), abs=1e-5)


def test_pixel_metrics_say_which_images_they_cover():
    rng = np.random.default_rng(0)
    mask = np.zeros((16, 16), np.uint8)
    mask[4:9, 4:9] = 1
    maps = rng.random((3, 16, 16)).astype(np.float32) + np.stack([0 * mask, mask, mask])
    absent = pixel_metrics(maps, [mask * 0, None, None], ["good", "bent", "glue"])
    assert absent == {"pixel_auroc": None, "aupro": None, "pixel_metrics": "absent: no masks for types bent, glue"}
    partial = pixel_metrics(maps, [mask * 0, mask, None], ["good", "hole", "glue"])
    assert partial["pixel_auroc"] > 0.9 and partial["aupro"] > 0.5
    assert "good and the types with masks (hole)" in partial["pixel_metrics"] and "no masks: glue" in partial["pixel_metrics"]
    full = pixel_metrics(maps[:2], [mask * 0, mask], ["good", "hole"])
    assert full["pixel_metrics"] == "all 2 test images" and full["aupro"] == partial["aupro"]


def test_pixel_auroc_equals_sklearns_and_chunks_change_nothing(monkeypatch):
    """The curves walk the scores in chunks; ties spanning a chunk's edge and regions across images agree exactly."""
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(4)
    masks = np.zeros((7, 30, 34), np.uint8)
    for i in range(1, 7):
        y, x = rng.integers(0, 24, 2)
        masks[i, y : y + rng.integers(2, 7), x : x + rng.integers(2, 9)] = 255 if i % 2 else 1
    maps = np.round(rng.random(masks.shape) + 0.5 * (masks > 0), 2).astype(np.float32)  # many ties
    truth = [None if i == 6 else m for i, m in enumerate(masks)]
    whole = pixel_metrics(maps, truth, ["good", *["hole"] * 5, "glue"])
    area = aupro(maps[:6], masks[:6])
    assert whole["pixel_auroc"] == round(roc_auc_score((masks[:6] > 0).reshape(-1), maps[:6].reshape(-1)), 4)
    assert whole["pixel_metrics"].startswith("6 of 7 test images")
    monkeypatch.setattr(metrics, "CHUNK", 5)
    assert pixel_metrics(maps, truth, ["good", *["hole"] * 5, "glue"]) == whole
    assert aupro(maps[:6], masks[:6]) == pytest.approx(area, abs=1e-12)


def test_pixel_metrics_of_a_large_split_fit_a_small_memory_limit():
    """300 maps at 640 px: the scores alone are about 0.5 GB; every map, mask and sort index held at once (the
    metrics before) needs several GB, and the kernel killed that run here."""
    group = _memory_cgroup(1_500_000_000)
    if group is None:
        pytest.skip("no cgroup v1 memory cgroup can be made here (needs root and a writable cgroup v1 hierarchy)")
    script = """if True:
        import cv2, numpy as np
        from exporter.metrics import PixelMetrics
        rng, metrics = np.random.default_rng(0), PixelMetrics()
        for i in range(300):  # defect scores U(0.5, 1.5) against background U(0, 1): AUROC 7/8
            mask = cv2.circle(np.zeros((640, 640), np.uint8), (320, 320), 64, 1, -1) * (i % 2)
            metrics.add(rng.random((640, 640), dtype=np.float32) + np.float32(0.5) * mask, mask, "hole")
        print(metrics.result()["pixel_auroc"])
    """
    try:
        proc = subprocess.run(["sh", "-c", f'echo $$ > {group}/cgroup.procs && exec "$0" "$@"', sys.executable,
                               "-c", script], capture_output=True, text=True, timeout=600, cwd=ROOT)
    finally:
        group.rmdir()
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert float(proc.stdout) == pytest.approx(0.875, abs=0.002)


def test_far_and_recall_thresholds():
    normals = np.array([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0])
    assert (normals >= far_threshold(normals, 0.2)).sum() == 2  # at most 20 % flagged
    assert (normals >= far_threshold(normals, 0.01)).sum() == 0
    defects = np.array([5.0, 7.0, 11.0, 12.0])
    assert recall_threshold(defects, 0.75) == 7.0 and (defects >= 7.0).mean() == 0.75
    assert recall_threshold(defects, 0.8) == 5.0
    # a target whose count is whole, though not in floats (0.58 x 50 = 28.999..., 0.56 x 25 = 14.000...2)
    assert (np.arange(50.0) >= far_threshold(np.arange(50.0), 0.58)).sum() == 29
    assert (np.arange(25.0) >= recall_threshold(np.arange(25.0), 0.56)).sum() == 14


def test_the_default_threshold_passes_every_held_out_normal_even_when_they_all_score_the_same():
    """Frames that do not change (a constant part, a still camera) all score the same: the threshold was that
    score, and the worker flags a score at the threshold, so every frame like the training images was flagged."""
    from exporter.export import image_threshold

    for scores in (np.full(6, 23.956987, np.float32), np.array([1, 2, 3, 3.0001], np.float32)):
        threshold = image_threshold(scores, 0.0)
        assert all(float(s) < threshold for s in scores)  # as the worker compares: raw >= threshold is flagged
        assert threshold == pytest.approx(float(scores.max()), rel=1e-6)


# --- layouts ---------------------------------------------------------------------------------------------------


def test_mvtec_masks_are_optional_per_defect_type(tmp_path):
    from exporter.synthetic import generate

    root = generate(tmp_path, "weave", size=64, n_train=4, n_test=2)
    shutil.rmtree(root / "ground_truth" / "smear")
    cat = load_category(tmp_path, "weave")
    assert {s.defect for s in cat.test if s.mask is None} == {"good", "smear"}
    assert all(s.mask is not None and s.mask.is_file() for s in cat.test if s.defect in ("hole", "scratch"))
    hole = root / "ground_truth" / "hole"
    for mask in hole.glob("*_mask.png"):  # masks named <stem>_gt, as some conversions of MVTec AD name them
        mask.rename(hole / mask.name.replace("_mask", "_GT"))
    assert all(s.mask is not None and s.mask.name.endswith("_GT.png") for s in
               load_category(tmp_path, "weave").test if s.defect == "hole")
    (hole / "000_GT.png").rename(hole / "mask_000.png")  # a name that belongs to no image: said
    with pytest.raises(DatasetError, match="1 defect images have no ground-truth mask.*hole/000.png.*named for no "
                                           "image, e.g. .*hole/mask_000.png.*remove that type's ground_truth folder"):
        load_category(tmp_path, "weave")


@pytest.mark.parametrize("names", [("Train", "Test", "Ground_Truth"), ("train", "Test", "ground_truth"),
                                   ("train", "test", "Ground_Truth"), ("TRAIN", "Test_Public", "GROUND_TRUTH")])
def test_mvtec_folders_are_read_in_any_case(tmp_path, names):
    """``train/``, ``test/`` and ``ground_truth/`` were found only in lower case (DAGM's in any): ``Test/`` was left
    out ("evaluation: none"), ``Train/`` read as a category, ``Ground_Truth/`` masks not read."""
    train, test, truth = names
    rng = np.random.default_rng(13)
    for i in range(8):
        _write(tmp_path / "part" / train / "good" / f"{i}.png", sample(rng, 64)[0])
    _write(tmp_path / "part" / test / "good" / "0.png", sample(rng, 64)[0])
    for i in range(2):
        picture, mask = sample(rng, 64, "hole")
        _write(tmp_path / "part" / test / "bent" / f"{i}.png", picture)
        _write(tmp_path / "part" / truth / "bent" / f"{i}_mask.png", mask)
    cat = load_category(tmp_path, "part")
    assert [(s.path.name, s.defect, s.mask.name if s.mask else None) for s in cat.test] == [
        ("0.png", "bent", "0_mask.png"), ("1.png", "bent", "1_mask.png"), ("0.png", "good", None)]
    assert len(cat.train) == 8 and find_categories(tmp_path) == ["part"]
    assert "evaluation: image AUROC" in summarise(cat).text(6, 2)
    (tmp_path / "part" / test.swapcase()).mkdir()  # two test folders: only one would be read
    with pytest.raises(DatasetError, match=f"has 2 folders named {test.lower()}.*only one is read"):
        load_category(tmp_path, "part")


def test_mvtec_images_outside_the_folders_read_are_said_and_loose_test_images_refused(tmp_path):
    """Images the MVTec AD layout does not read were left out without a word: ``train/scratch/`` beside
    ``train/good/``, LOCO's and 3D-AD's ``validation/``, and images directly in ``test/`` (then "evaluation:
    none", exit 0)."""
    rng = np.random.default_rng(14)
    root = tmp_path / "part"
    for i in range(8):
        _write(root / "train" / "good" / f"{i}.png", sample(rng, 64)[0])
    _write(root / "test" / "good" / "0.png", sample(rng, 64)[0])
    _write(root / "test" / "hole" / "0.png", sample(rng, 64, "hole")[0])
    assert not load_category(tmp_path, "part").left_out
    for name in ("train/scratch/0.png", "train/scratch/1.png", "validation/good/0.png", "train/loose.png"):
        _write(root / name, sample(rng, 64)[0])
    notes = summarise(load_category(tmp_path, "part")).text(6, 2).splitlines()
    assert [line for line in notes if "is not read" in line or "not read:" in line] == [
        "  note: train/scratch/ (2 images) is not read: training takes train/good/ only (defect images belong in "
        "test/<type>/)",
        "  note: validation/ (1 images) is not read: the MVTec AD layout reads train/good/ and test/",
        "  note: train/ holds 1 images directly (e.g. loose.png), not read: training takes train/good/ only"]
    _write(root / "test" / "1.png", sample(rng, 64)[0])
    with pytest.raises(DatasetError, match="test holds 1 images directly \\(e.g. 1.png\\), outside a folder that "
                                           "labels them.*into test/good/"):
        load_category(tmp_path, "part")


def _public_layout(root: Path, name: str, rng: np.random.Generator) -> dict[str, int]:
    """A small copy of one public set's layout as it is downloaded; returns the defect images' mask pixels by name."""
    def image(kind: str) -> tuple[np.ndarray, np.ndarray]:
        return sample(rng, 64, kind)

    truth: dict[str, int] = {}
    if name == "btad":  # BTAD: ok/ko, bitmaps, masks named like their image
        for i in range(8):
            _write(root / "train" / "ok" / f"{i:04d}.bmp", image("good")[0])
        _write(root / "test" / "ok" / "0000.bmp", image("good")[0])
        for i in range(2):
            picture, mask = image("hole")
            _write(root / "test" / "ko" / f"{i:04d}.bmp", picture)
            _write(root / "ground_truth" / "ko" / f"{i:04d}.png", mask)
            truth[f"{i:04d}.bmp"] = int((mask > 0).sum())
    elif name == "visa":  # VisA as anomalib splits it: upper-case JPEG, masks named like their image
        for i in range(8):
            _write(root / "train" / "good" / f"{i:03d}.JPG", image("good")[0])
        _write(root / "test" / "good" / "100.JPG", image("good")[0])
        picture, mask = image("scratch")
        _write(root / "test" / "bad" / "000.JPG", picture)
        _write(root / "ground_truth" / "bad" / "000.png", mask)
        truth["000.JPG"] = int((mask > 0).sum())
    elif name == "mvtec3d":  # MVTec 3D-AD: rgb/, xyz/ and gt/ in every folder
        for i in range(8):
            _write(root / "train" / "good" / "rgb" / f"{i:03d}.png", image("good")[0])
            _write(root / "train" / "good" / "xyz" / f"{i:03d}.tiff", np.zeros((8, 8, 3), np.float32))
        _write(root / "test" / "good" / "rgb" / "000.png", image("good")[0])
        _write(root / "test" / "good" / "gt" / "000.png", np.zeros((64, 64), np.uint8))
        picture, mask = image("hole")
        _write(root / "test" / "crack" / "rgb" / "000.png", picture)
        _write(root / "test" / "crack" / "gt" / "000.png", mask)
        truth["000.png"] = int((mask > 0).sum())
    elif name == "mvtec_ad_2":  # MVTec AD 2: the labelled test split is test_public/, its ground_truth inside
        for i in range(8):
            _write(root / "train" / "good" / f"{i:03d}_regular.png", image("good")[0])
        _write(root / "validation" / "good" / "000_regular.png", image("good")[0])
        _write(root / "test_public" / "good" / "000_regular.png", image("good")[0])
        picture, mask = image("scratch")
        _write(root / "test_public" / "bad" / "000_regular.png", picture)
        _write(root / "test_public" / "ground_truth" / "bad" / "000_regular_mask.png", mask)
        _write(root / "test_private" / "000_regular.png", image("good")[0])  # unlabelled: not read
        truth["000_regular.png"] = int((mask > 0).sum())
    else:  # MVTec LOCO: a folder of masks per image, one per defect, stored as that defect's grey value
        for i in range(8):
            _write(root / "train" / "good" / f"{i:03d}.png", image("good")[0])
        _write(root / "test" / "good" / "000.png", image("good")[0])
        picture, first = image("hole")
        second = image("scratch")[1]
        _write(root / "test" / "logical_anomalies" / "000.png", picture)
        _write(root / "ground_truth" / "logical_anomalies" / "000" / "000.png", (first > 0).astype(np.uint8) * 73)
        _write(root / "ground_truth" / "logical_anomalies" / "000" / "001.png", (second > 0).astype(np.uint8))
        truth["000.png"] = int(((first > 0) | (second > 0)).sum())
    return truth


@pytest.mark.parametrize("name", ["btad", "visa", "mvtec3d", "mvtec_ad_2", "mvtec_loco"])
def test_public_sets_are_read_as_downloaded(tmp_path, name):
    """Their normal folders, test folders and mask names and folders; a mask pixel is any non-zero value."""
    root = tmp_path / name
    truth = _public_layout(root, name, np.random.default_rng(6))
    cat = load_category(tmp_path, name)
    assert len(cat.train) == 8 and all(p.suffix != ".tiff" for p in cat.train)
    assert [s.defect for s in cat.test].count("good") == 1
    defects = [s for s in cat.test if s.label]
    assert {s.path.name for s in defects} == set(truth) and all(s.mask is not None for s in defects)
    spec = input_spec(64, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    assert {s.path.name: int(read_mask(s.mask, spec).sum()) for s in defects} == truth
    assert not summarise(cat).unreadable and find_categories(tmp_path) == [name]
    if name == "mvtec_ad_2":
        assert cat.split == "the data's own test split (test_public/)"


def _as_copied_from_a_mac(root: Path) -> None:
    """What a folder gains on its way from a Mac (a zip, a USB disk): a ``._<name>`` resource fork beside every
    file and folder, a ``.DS_Store`` in every folder, the zip's ``__MACOSX/`` mirror; and a notebook's hidden
    ``.ipynb_checkpoints/`` holding a copy of an image."""
    for path in sorted(root.rglob("*")):
        (path.parent / f"._{path.name}").write_bytes(b"\x00\x05\x16\x07" + bytes(60))  # AppleDouble, not an image
        if path.is_dir():
            (path / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    first = next(p for p in sorted(root.rglob("*.png")) if not p.name.startswith("."))
    for folder in (root / "__MACOSX" / first.parent.relative_to(root), first.parent / ".ipynb_checkpoints"):
        folder.mkdir(parents=True)
        shutil.copy(first, folder / first.name)


@pytest.mark.parametrize("name", ["mvtec_ad_2", "mvtec_loco", "labelled"])
def test_hidden_files_and_folders_are_not_data(tmp_path, name):
    """The data reads as it did before the copy: no resource fork is an undecodable image, and no hidden folder a
    defect type, a mask folder or a category."""
    rng = np.random.default_rng(8)
    for copy in ("clean", "mac"):
        if name == "labelled":
            for i in range(10):
                _write(tmp_path / copy / name / "good" / f"{i}.png", sample(rng, 64)[0])
            _write(tmp_path / copy / name / "dent" / "0.png", sample(rng, 64, "hole")[0])
        else:
            _public_layout(tmp_path / copy / name, name, rng)
    _as_copied_from_a_mac(tmp_path / "mac")
    clean, mac = load_category(tmp_path / "clean", name), load_category(tmp_path / "mac", name)
    relative = lambda cat: ([p.relative_to(cat.root) for p in cat.train],  # noqa: E731
                            [(s.path.relative_to(cat.root), s.defect, s.mask and s.mask.relative_to(cat.root))
                             for s in cat.test])
    assert relative(mac) == relative(clean) and (mac.layout, mac.split) == (clean.layout, clean.split)
    assert summarise(mac).problems() == [] and find_categories(tmp_path / "mac") == find_categories(tmp_path / "clean")


def test_a_mask_pixel_is_a_defect_at_any_bit_depth_and_in_any_colour_channel(tmp_path):
    """Masks were read as 8-bit grey: a 16-bit label image with defect value 1 became all 0 (the defect image then
    counted as good beside its mask, or lost its pixels), and so did a mark of value 1 in one colour channel."""
    rng = np.random.default_rng(9)
    region = np.zeros((64, 64), bool)
    region[20:30, 12:40] = True
    masks = {"label16": region.astype(np.uint16),  # a labelling tool's 16-bit label image, class id 1
             "red1": np.dstack([np.zeros((64, 64, 2), np.uint8), region.astype(np.uint8)])}  # BGR: red = 1
    for name, mask in masks.items():
        for i in range(8):
            _write(tmp_path / "mvtec" / name / "train" / "good" / f"{i}.png", sample(rng, 64)[0])
        _write(tmp_path / "mvtec" / name / "test" / "dent" / "0.png", sample(rng, 64, "hole")[0])
        _write(tmp_path / "mvtec" / name / "ground_truth" / "dent" / "0_mask.png", mask)
        (sample_in_mvtec,) = [s for s in load_category(tmp_path / "mvtec", name).test if s.label]
        assert int(read_mask(sample_in_mvtec.mask, SPEC).sum()) == int(region.sum())
        for i in range(8):
            _write(tmp_path / "beside" / name / f"{i}.png", sample(rng, 64)[0])
        _write(tmp_path / "beside" / name / "8.png", sample(rng, 64, "hole")[0])
        _write(tmp_path / "beside" / name / "8_mask.png", mask)
        cat = load_category(tmp_path / "beside", name)
        assert [s.path.name for s in cat.test if s.label] == ["8.png"] and not summarise(cat).unreadable


def test_a_public_set_trains_and_evaluates_with_pixel_metrics(tmp_path):
    """BTAD's layout end to end: ok/ and ko/ folders, bitmaps, masks named like their image."""
    rng = np.random.default_rng(7)
    root = tmp_path / "01"
    for i in range(16):
        _write(root / "train" / "ok" / f"{i:04d}.bmp", sample(rng, 64)[0])
    for i in range(3):
        _write(root / "test" / "ok" / f"{i:04d}.bmp", sample(rng, 64)[0])
        picture, mask = sample(rng, 64, "hole")
        _write(root / "test" / "ko" / f"{10 + i:04d}.bmp", picture)
        _write(root / "ground_truth" / "ko" / f"{10 + i:04d}.png", mask)
    proc = _exporter("train", "--data", str(tmp_path), "--category", "01", "--out", str(tmp_path / "b"), *TINY)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "test split: the data's own test split: good 3, ko 3" in proc.stdout and "masks: ko" in proc.stdout
    test = read_manifest(tmp_path / "b").metrics["test"]
    assert test["images"] == 6 and set(test["detection_rate"]) == {"good", "ko"}
    assert 0 <= test["aupro"] <= 1 and 0 <= test["pixel_auroc"] <= 1


def test_labelled_folders_hold_out_good_images_for_test(tmp_path):
    rng = np.random.default_rng(0)
    for i in range(20):
        _write(tmp_path / "ok" / f"{i:02d}.png", sample(rng, 64)[0])
    for i in range(3):
        _write(tmp_path / "ng" / f"{i}.png", sample(rng, 64, "hole")[0])
    cat = load_category(tmp_path)
    assert cat.layout == "labelled folders" and cat.name == tmp_path.name
    test_good = [s.path for s in cat.test if s.defect == "good"]
    assert len(test_good) == 4 and not set(test_good) & set(cat.train) and len(cat.train) == 16
    assert sorted(s.path.name for s in cat.test if s.defect == "ng") == ["0.png", "1.png", "2.png"]
    assert all(s.mask is None for s in cat.test)
    assert load_category(tmp_path) == cat  # seeded: evaluate later sees the same split
    assert load_category(tmp_path, seed=1).train != cat.train


def test_copies_among_good_images_go_to_one_side_of_a_drawn_test_split(tmp_path):
    """Labelled folders with a good image stored twice (``img (1).png``): the drawn test share took one copy and
    training the other, while the summary said the test images were never trained on."""
    rng = np.random.default_rng(3)
    for i in range(30):
        _write(tmp_path / "good" / f"{i:03d}.png", sample(rng, 64)[0])
        if i < 15:
            shutil.copy(tmp_path / "good" / f"{i:03d}.png", tmp_path / "good" / f"{i:03d} (1).png")
    for i in range(3):
        _write(tmp_path / "hole" / f"{i}.png", sample(rng, 64, "hole")[0])

    def digests(paths: list[Path]) -> set[str]:
        return {hashlib.sha256(p.read_bytes()).hexdigest() for p in paths}

    for seed in range(5):
        cat = load_category(tmp_path, seed=seed)
        test_good = [s.path for s in cat.test if s.defect == "good"]
        assert len(test_good) + len(cat.train) == 45 and len(test_good) >= 9, (seed, len(test_good))
        assert not digests(test_good) & digests(cat.train), seed
        assert not summarise(cat).in_both, seed


def test_csv_and_json_lists(tmp_path):
    rng = np.random.default_rng(0)
    rows = []
    for i in range(10):
        rows.append(f"img/g{i}.png,good")
        _write(tmp_path / "img" / f"g{i}.png", sample(rng, 64)[0])
    image, mask = sample(rng, 64, "hole")
    _write(tmp_path / "img" / "d0.png", image)
    _write(tmp_path / "masks" / "d0.png", mask)
    _write(tmp_path / "img" / "d1.png", sample(rng, 64, "scratch")[0])
    rows += ["img/d0.png,hole,masks/d0.png", "img/d1.png,1"]  # each image once: g0.png labelled 1 too is refused
    (tmp_path / "parts.csv").write_text("path,label,mask\n" + "\n".join(rows) + "\n")
    cat = load_category(tmp_path / "parts.csv")
    assert cat.layout == "list" and cat.name == "parts"
    defects = {s.defect: s.mask for s in cat.test if s.label}
    assert defects == {"hole": tmp_path / "masks" / "d0.png", "defect": None}
    (tmp_path / "parts.json").write_text(json.dumps([{"path": f"img/g{i}.png", "label": "ok"} for i in range(10)]))
    assert load_category(tmp_path / "parts.json").test == []  # good only: nothing to evaluate
    (tmp_path / "broken.csv").write_text("img/g0.png,good\nimg/nothere.png,scratch\n")
    with pytest.raises(DatasetError, match="1 listed files do not exist.*nothere.png.*relative to"):
        load_category(tmp_path / "broken.csv")


def test_a_lists_split_and_label_values_are_known_ones_or_refused_by_name(tmp_path):
    """Any split value but ``train`` was the test split: a list's ``val`` rows were tested, ``training``/``testing``
    made every row a test one (and "only 0 good training images"); a JSON ``"label": false`` became the defect type
    "False"."""
    rng = np.random.default_rng(2)
    for i in range(12):
        _write(tmp_path / "img" / f"{i}.png", sample(rng, 64, "hole" if i >= 10 else "good")[0])

    def listed(name: str, splits: list[str]) -> Path:
        rows = [f"img/{i}.png,{'scratch' if i >= 10 else 'good'},{split}" for i, split in enumerate(splits)]
        (tmp_path / name).write_text("path,label,split\n" + "\n".join(rows) + "\n")
        return tmp_path / name

    synonyms = load_category(listed("synonyms.csv", ["Training"] * 8 + ["testing"] * 4))
    assert len(synonyms.train) == 8 and [s.defect for s in synonyms.test] == ["good"] * 2 + ["scratch"] * 2
    with pytest.raises(DatasetError, match=r"split values \['val', 'validation'\] are neither train nor test.*"
                                           "train, training, test, testing"):
        load_category(listed("val.csv", ["train"] * 8 + ["val", "val", "validation", "test"]))
    with pytest.raises(DatasetError, match=r"split values \[''\]"):  # a row without one, among rows with one
        load_category(listed("gap.csv", ["train"] * 8 + ["test", "", "test", "test"]))
    (tmp_path / "bool.json").write_text(json.dumps([{"path": f"img/{i}.png", "label": i >= 10} for i in range(12)]))
    with pytest.raises(DatasetError, match=r"labels \['False', 'True'\] do not say which images are normal"):
        load_category(tmp_path / "bool.json")


def test_an_image_listed_twice_is_refused_by_name(tmp_path):
    """A row added to relabel an image, the old row left in the list: the image was tested as good and as a scratch
    at once (its one score counted both ways), or trained on as normal and tested as a defect, without a word."""
    rng = np.random.default_rng(17)
    for i in range(12):
        _write(tmp_path / "img" / f"{i}.png", sample(rng, 64, "scratch" if i >= 10 else "good")[0])
    rows = [f"img/{i}.png,{'scratch' if i >= 10 else 'good'}" for i in range(12)]
    (tmp_path / "once.csv").write_text("\n".join(rows) + "\n")
    assert len(load_category(tmp_path / "once.csv").test) == 4
    (tmp_path / "relabelled.csv").write_text("\n".join([*rows, "img/3.png,scratch"]) + "\n")
    with pytest.raises(DatasetError, match=r"relabelled.csv: img/3.png is listed 2 times, labelled 'good', 'scratch': "
                                           "list each image once, with its one label"):
        load_category(tmp_path / "relabelled.csv")
    (tmp_path / "twice.json").write_text(json.dumps([{"path": r.split(",")[0], "label": r.split(",")[1]}
                                                     for r in [*rows, rows[0], rows[11]]]))
    with pytest.raises(DatasetError, match=r"img/0.png is listed 2 times, labelled 'good', 'good' \(1 more listed"):
        load_category(tmp_path / "twice.json")


@pytest.mark.parametrize("variant", ["byte-order mark, CRLF", "semicolons", "tabs", "Windows paths", "JSON with a BOM"])
def test_lists_as_spreadsheets_and_windows_save_them_read_as_the_plain_list(tmp_path, variant):
    """Excel's "CSV UTF-8" starts with a byte-order mark (its header was read as a file named '\\ufeffpath'); where
    the comma is a decimal mark it writes semicolons; a list made on Windows names files with backslashes."""
    rng = np.random.default_rng(1)
    rows = [(f"img/g{i}.png", "good", "") for i in range(9)] + [("img/dé faut.png", "hole", "masks/dé faut.png")]
    for name, _, mask in rows:
        image, truth = sample(rng, 64, "hole" if mask else "good")
        _write(tmp_path / name, image)
        if mask:
            _write(tmp_path / mask, truth)
    (tmp_path / "plain.csv").write_text("path,label,mask\n" + "".join(f"{p},{lab},{m}\n" for p, lab, m in rows))
    out = tmp_path / ("list.json" if "JSON" in variant else "list.csv")
    if variant == "byte-order mark, CRLF":
        out.write_bytes(("path,label,mask\r\n" + "".join(f"{p},{lab},{m}\r\n" for p, lab, m in rows)).encode("utf-8-sig"))
    elif variant in ("semicolons", "tabs"):
        sep = ";" if variant == "semicolons" else "\t"
        out.write_text(sep.join(["path", "label", "mask"]) + "\n" + "".join(f"{sep.join(r)}\n" for r in rows))
    elif variant == "Windows paths":
        out.write_text("path,label,mask\r\n" + "".join(f"{p},{lab},{m}\r\n".replace("/", "\\") for p, lab, m in rows))
    else:
        out.write_bytes(json.dumps([{"path": p, "label": lab, **({"mask": m} if m else {})} for p, lab, m in rows])
                        .encode("utf-8-sig"))
    plain, read = load_category(tmp_path / "plain.csv"), load_category(out)
    assert (read.train, read.test) == (plain.train, plain.test) and len(plain.train) + len(plain.test) == 10
    assert [s.mask for s in read.test if s.label] == [tmp_path / "masks" / "dé faut.png"]
    (tmp_path / "ansi.csv").write_bytes((tmp_path / "plain.csv").read_text().encode("cp1252"))
    with pytest.raises(DatasetError, match="not UTF-8 text.*CSV UTF-8"):
        load_category(tmp_path / "ansi.csv")


def test_16_bit_grey_non_square_images_read_like_the_worker_reads_them(tmp_path):
    """Top 8 bits, three equal channels, stretched to the square input: what worker/decode.py + prepare_image do."""
    grey16 = _grey16_nonsquare(sample(np.random.default_rng(0), 96)[0])
    path = _write(tmp_path / "a.png", grey16)
    image = read_image(path, SPEC)
    expected = cv2.resize((grey16 >> 8).astype(np.uint8), (64, 64), interpolation=cv2.INTER_AREA)
    assert image.shape == (64, 64, 3) and image.dtype == np.uint8
    for channel in range(3):
        np.testing.assert_array_equal(image[:, :, channel], expected)
    from worker.decode import decode  # the worker's own decoder gives the same 8-bit pixels

    frame = decode(cv2.imencode(".png", grey16)[1].tobytes())
    np.testing.assert_array_equal(frame[:, :, 0], (grey16 >> 8).astype(np.uint8))


def test_a_jpeg_cut_short_is_refused_as_the_worker_refuses_it(tmp_path):
    """OpenCV decodes a JPEG that a stopped copy cut short without an error, its missing part grey: the exporter
    trained on such files, where the worker refuses the same bytes as a frame (``truncated_image``)."""
    from worker.decode import FrameError, probe

    rng = np.random.default_rng(3)
    for i in range(9):
        _write(tmp_path / "parts" / f"{i}.jpg", sample(rng, 64)[0])
    whole = (tmp_path / "parts" / "0.jpg").read_bytes()
    assert not summarise(load_category(tmp_path / "parts")).problems()
    cut = tmp_path / "parts" / "0.jpg"
    cut.write_bytes(whole[: len(whole) // 2])
    assert cv2.imread(str(cut)) is not None  # what the exporter read before
    with pytest.raises(FrameError, match="truncated"):
        probe(cut.read_bytes(), 10**6, 10**6)
    problems = summarise(load_category(tmp_path / "parts")).problems()
    assert problems == [f"1 file cannot be decoded: {cut} (a JPEG cut short); remove them (not images), or copy or "
                        "save them again (empty, cut short)"]
    with pytest.raises(DatasetError, match="cut short"):
        read_image(cut, SPEC)
    cut.write_bytes(whole + b"\r\n")  # bytes after the end marker, as an MJPEG grab keeps: read
    assert read_image(cut, SPEC).shape == (64, 64, 3)


def test_a_good_folder_of_sub_folders_and_a_folder_of_categories_are_refused_saying_what_to_change(tmp_path):
    """They were refused as a folder without good/ (it had one) and as a folder without images."""
    rng = np.random.default_rng(4)
    for i in range(4):
        _write(tmp_path / "part" / "good" / f"batch{i % 2}" / f"{i}.png", sample(rng, 64)[0])
    _write(tmp_path / "part" / "scratch" / "0.png", sample(rng, 64, "hole")[0])
    with pytest.raises(DatasetError, match=r"part/good holds its images in sub-folders.*move the normal images into good/"):
        load_category(tmp_path / "part")
    _public_layout(tmp_path / "sets" / "btad", "btad", rng)
    with pytest.raises(DatasetError, match=r"holds the categories \['btad'\]: pick one with --category"):
        load_category(tmp_path / "sets")



@pytest.mark.parametrize("files, said", [
    (["good/0.png", "good/1.png", "bad/broken/0.png", "bad/glue/0.png"], r"the folders \['bad'\] keep their images"),
    (["good/0.png", "good/1.png", "good/line2/0.png", "scratch/0.png"], r"good keeps images in its sub-folders \['line2'\]"),
    (["train/good/0.png", "train/good/1.png", "test/good/0.png", "test/glue/batch1/0.png", "test/glue/0.png"],
     r"glue keeps images in its sub-folders \['batch1'\]"),
    (["good/0.png", "ok/0.png", "scratch/0.png"], r"2 folders of normal images \(good/, ok/\), and only one is read"),
    (["train/good/0.png", "train/ok/0.png", "test/good/0.png"], r"2 folders of normal images \(good/, ok/\)"),
])
def test_images_in_sub_folders_of_a_class_are_refused_not_left_out(tmp_path, files, said):
    """Only a class folder's own images are read: defects in bad/broken/, goods in good/line2/ or a type's batch1/
    were left out of the split (a set whose defects all lay deeper trained with no test split) without a word, and
    of good/ and ok/ side by side only the first."""
    rng = np.random.default_rng(5)
    for name in files:
        _write(tmp_path / "part" / name, sample(rng, 64)[0])
    with pytest.raises(DatasetError, match=said):
        load_category(tmp_path / "part")


def test_images_with_32_bit_samples_are_named_before_the_fit(tmp_path):
    """The summary read a floating-point TIFF (as stored) and listed no problem; training reads images as 8-bit BGR,
    which gets nothing from it, so the run stopped after the whole fit calling the file cut short."""
    rng = np.random.default_rng(6)
    for i in range(8):
        _write(tmp_path / "part" / "good" / f"{i}.png", sample(rng, 64)[0])
    cv2.imwrite(str(tmp_path / "part" / "good" / "f.tif"), sample(rng, 64)[0].astype(np.float32) / 255)
    problems = summarise(load_category(tmp_path / "part")).problems()
    assert len(problems) == 1 and problems[0].startswith("1 images have 32-bit or floating-point samples"), problems
    assert "f.tif" in problems[0]


def test_tiffs_of_12_bit_samples_are_named_before_the_fit(tmp_path):
    """OpenCV reads a TIFF of packed 12-bit samples as stored but not as 8-bit colour: the summary listed no problem
    and training stopped on the file, calling it cut short; a 10-bit one was called a format the worker refuses
    ("unknown").  Both are named, with their depth, before the fit, as the worker refuses them (unsupported_format)."""
    import tifffile

    from worker.decode import FrameError, probe

    rng = np.random.default_rng(7)
    for i in range(8):
        _write(tmp_path / "part" / "good" / f"{i}.png", sample(rng, 64)[0])
    for bits in (12, 10):
        tifffile.imwrite(tmp_path / "part" / "good" / f"d{bits}.tif", rng.integers(0, 1 << bits, (64, 64)).astype(
            np.uint16), bitspersample=bits, photometric="minisblack")
    problems = summarise(load_category(tmp_path / "part")).problems()
    assert len(problems) == 1 and problems[0].startswith("2 TIFFs have samples that neither training nor the worker "
                                                         "reads as 8-bit colour"), problems
    for bits in (10, 12):
        assert f"d{bits}.tif ({bits}-bit unsigned samples)" in problems[0]
        with pytest.raises(FrameError) as refused:
            probe((tmp_path / "part" / "good" / f"d{bits}.tif").read_bytes(), 10**6, 10**6)
        assert refused.value.code == "unsupported_format"


def test_a_png_cut_short_is_named_as_cut_short_and_libpng_writes_nothing(tmp_path, capfd):
    """A PNG cut short was "not an image, or cut short", and libpng wrote "PNG input buffer is incomplete" to
    stderr for it, between the summary's lines, naming no file.  It is named as a PNG cut short, before OpenCV reads
    it, as the worker refuses it (truncated_image)."""
    rng = np.random.default_rng(8)
    for i in range(8):
        _write(tmp_path / "part" / "good" / f"{i}.png", sample(rng, 64)[0])
    whole = (tmp_path / "part" / "good" / "0.png").read_bytes()
    (tmp_path / "part" / "good" / "cut.png").write_bytes(whole[: len(whole) // 2])
    problems = summarise(load_category(tmp_path / "part")).problems()
    assert len(problems) == 1 and f"{tmp_path / 'part' / 'good' / 'cut.png'} (a PNG cut short)" in problems[0], problems
    assert "libpng" not in capfd.readouterr().err


def test_an_image_over_opencvs_pixel_limit_is_named_not_a_traceback(tmp_path):
    """OpenCV raises, rather than returning nothing, for an image of more than 2^30 pixels (a wafer or line-scan
    picture, or a PNG bomb of a few hundred kilobytes): the summary stopped ``exporter train`` with OpenCV's
    traceback, naming no file.  The file is named, with why, as any file that cannot be decoded."""
    import struct
    import zlib

    rng = np.random.default_rng(11)
    for i in range(8):
        _write(tmp_path / "part" / "good" / f"{i}.png", sample(rng, 64)[0])
    side = 33_000  # 1-bit grey: 1.09e9 pixels in about 140 kB

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = (b"\x00" + bytes(side // 8)) * 1000  # a filter byte, then the row's bits: a whole, valid picture
    packer = zlib.compressobj(9)
    idat = b"".join(packer.compress(rows) for _ in range(side // 1000)) + packer.flush()
    (tmp_path / "part" / "good" / "huge.png").write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)) + chunk(b"IDAT", idat)
        + chunk(b"IEND", b""))
    problems = summarise(load_category(tmp_path / "part")).problems()
    assert len(problems) == 1 and f"{tmp_path / 'part' / 'good' / 'huge.png'} (more pixels than OpenCV decodes" \
        in problems[0], problems


def test_pngs_whose_colour_profile_does_not_fit_are_read_without_libpngs_warnings(tmp_path, capfd):
    """The worker leaves a PNG's colour profile out before decoding (OpenCV does not apply it) because libpng warns
    about one that does not fit (an RGB profile on a grey PNG) on stderr; the exporter did not, and wrote such a
    line, naming no file, at every read of every such image: summary, fit, threshold and test.  Both read the same
    pixels, without the lines."""
    from PIL import Image, ImageCms

    profile = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    rng = np.random.default_rng(12)
    (tmp_path / "plain").mkdir()
    (tmp_path / "part" / "good").mkdir(parents=True)
    for i in range(8):
        grey = Image.fromarray(np.ascontiguousarray(np.atleast_3d(sample(rng, 64)[0])[:, :, 0]))
        grey.save(tmp_path / "plain" / f"{i}.png")
        grey.save(tmp_path / "part" / "good" / f"{i}.png", icc_profile=profile)
    cat = load_category(tmp_path / "part")
    assert summarise(cat).problems() == []
    for path in cat.train:
        assert np.array_equal(read_image(path, SPEC), read_image(tmp_path / "plain" / path.name, SPEC))
    assert "libpng" not in capfd.readouterr().err


def test_images_holding_several_pictures_are_said_to_be_read_for_their_first(tmp_path):
    """Only a TIFF's first page (an animated PNG's or WebP's first frame) is read, by training as by the worker:
    a camera's TIFF of several exposures or focus steps of one part lost all but the first without a word.  The
    summary says so; a phone's MPO (a photo and its gain map) is one picture."""
    from PIL import Image

    rng = np.random.default_rng(13)
    pictures = [Image.fromarray(sample(rng, 64)[0]) for _ in range(3)]
    for i in range(8):
        _write(tmp_path / "part" / "good" / f"{i}.png", sample(rng, 64)[0])
    pictures[0].save(tmp_path / "part" / "good" / "stack.tif", save_all=True, append_images=pictures[1:])
    pictures[0].save(tmp_path / "part" / "good" / "phone.jpg", "MPO", save_all=True, append_images=pictures[1:2])
    summary = summarise(load_category(tmp_path / "part"))
    assert summary.problems() == []
    said = [line for line in summary.notes() if "more than one picture" in line]
    assert said == [f"  warning: 1 images hold more than one picture (e.g. {tmp_path / 'part' / 'good' / 'stack.tif'}: "
                    "3; a TIFF's pages, an animated PNG's or WebP's frames): only the first is read, as the worker "
                    "reads a frame's first; save each picture as a file of its own to use the others"], summary.notes()


def test_a_damaged_tiff_is_named_by_train_without_opencvs_lines_that_name_no_file(tmp_path):
    """libtiff's complaints about a TIFF cut short reached ``exporter train``'s output through OpenCV's log
    ("[ERROR:0@0.3] global grfmt_tiff.cpp:117 TIFF_Error TIFFFetchDirectory: : Seek error ...", several per read),
    naming no file, before the summary named it: as the worker does, OpenCV keeps only its fatal messages (``-v``
    shows them)."""
    rng = np.random.default_rng(14)
    for i in range(8):
        _write(tmp_path / "part" / "good" / f"{i}.png", sample(rng, 64)[0])
    tiff = cv2.imencode(".tiff", sample(rng, 64)[0])[1].tobytes()
    (tmp_path / "part" / "good" / "cut.tif").write_bytes(tiff[: len(tiff) * 2 // 3])
    proc = _exporter("train", "--data", str(tmp_path / "part"), "--out", str(tmp_path / "bundle"))
    assert proc.returncode != 0 and f"{tmp_path / 'part' / 'good' / 'cut.tif'} (" in proc.stderr + proc.stdout, proc
    assert "TIFF_Error" not in proc.stderr and "global " not in proc.stderr, proc.stderr[-2000:]


def test_a_mask_not_the_shape_of_its_image_is_named_before_the_fit(tmp_path):
    """Masks were stretched onto their image whatever their shape: a phone photo (a JPEG turned by its EXIF
    orientation when decoded) with a mask of the stored pixels, or a mask saved turned, gave pixel figures against
    the wrong pixels without a word.  A mask at another scale with the same proportions is resized, and said."""
    from PIL import Image

    rng = np.random.default_rng(8)
    root = tmp_path / "part"
    for i in range(8):
        _write(root / "train" / "good" / f"{i}.png", sample(rng, 64)[0])
    image, mask = sample(rng, 64, "hole")
    wide, wide_mask = image[:48], mask[:48]  # 64 x 48
    _write(root / "test" / "hole" / "0.png", wide)
    _write(root / "ground_truth" / "hole" / "0_mask.png", wide_mask)
    _write(root / "test" / "hole" / "1.png", wide)
    _write(root / "ground_truth" / "hole" / "1_mask.png", cv2.resize(wide_mask, (32, 24), interpolation=cv2.INTER_NEAREST))
    assert summarise(load_category(root)).problems() == []
    assert "note: 1 masks are at another scale than their images" in summarise(load_category(root)).text(6, 2)

    exif = Image.Exif()
    exif[0x0112] = 6  # turned a quarter when shown
    Image.fromarray(wide).save(root / "test" / "hole" / "2.jpg", exif=exif.tobytes())
    _write(root / "ground_truth" / "hole" / "2_mask.png", wide_mask)  # the stored pixels' mask
    _write(root / "test" / "hole" / "3.png", wide)
    _write(root / "ground_truth" / "hole" / "3_mask.png", np.ascontiguousarray(wide_mask.T))  # saved turned
    summary = summarise(load_category(root))
    assert summary.sizes == {(64, 64): 8, (64, 48): 3, (48, 64): 1}  # sizes as trained on: the JPEG turned
    problems = summary.problems()
    assert len(problems) == 1 and problems[0].startswith("2 masks are not the shape of their image (e.g. "), problems
    assert "2_mask.png is 64x48, its image 48x64 as decoded" in problems[0]


def test_a_mask_saved_with_its_photos_orientation_is_turned_as_its_image_is(tmp_path):
    """An image was turned by its EXIF orientation and its mask was not (read as stored): a phone photo's mask drawn
    on the stored pixels and saved with the photo's orientation tag, shown turned with it by every viewer, was refused
    as "not the shape of its image", and on a square photo it marked other pixels without a word.  A mask is read as
    it is shown, as its image is."""
    from PIL import Image

    rng = np.random.default_rng(9)
    root = tmp_path / "part"
    for i in range(8):
        _write(root / "train" / "good" / f"{i}.png", sample(rng, 64)[0])
    exif = Image.Exif()
    exif[0x0112] = 6  # turned a quarter clockwise when shown
    image, mask = sample(rng, 64, "hole")
    mask = (mask > 0).astype(np.uint8) * 255
    mask[:8, :24] = 255  # not symmetric under the turn
    (root / "test" / "hole").mkdir(parents=True)
    (root / "ground_truth" / "hole").mkdir(parents=True)
    for name, rows in (("square", 64), ("wide", 48)):
        Image.fromarray(image[:rows]).save(root / "test" / "hole" / f"{name}.jpg", exif=exif.tobytes())
        Image.fromarray(mask[:rows]).save(root / "ground_truth" / "hole" / f"{name}_mask.png", exif=exif.tobytes())
        _write(tmp_path / "shown" / f"{name}.png", np.ascontiguousarray(np.rot90(mask[:rows], k=-1)))
    assert summarise(load_category(root)).problems() == []
    for name in ("square", "wide"):
        shown = read_mask(tmp_path / "shown" / f"{name}.png", SPEC)
        assert shown.any() and np.array_equal(read_mask(root / "ground_truth" / "hole" / f"{name}_mask.png", SPEC), shown)


@pytest.mark.parametrize("suffix", [".tif", ".jpg", ".png"])
def test_an_image_turned_by_its_orientation_is_recorded_at_its_size_as_decoded(tmp_path, suffix):
    """OpenCV's TIFF decoder applies the orientation even with ``IMREAD_UNCHANGED``, and the size was swapped once
    more: the TIFF's correct mask was refused, and ``frame_sizes`` recorded the stored shape, so the worker called
    every frame of that camera ``unlike_training``."""
    from PIL import Image

    from exporter.data import frame_sizes, read_decoded

    rng = np.random.default_rng(16)
    exif = Image.Exif()
    exif[0x0112] = 6  # turned a quarter when decoded
    for i in range(12):
        image, mask = sample(rng, 64, "hole" if i == 11 else "good")
        name = tmp_path / "part" / ("scratch/a" if i == 11 else f"good/{i}")
        name.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image[:48]).save(name.with_suffix(suffix), exif=exif.tobytes())  # 64 wide, 48 high as stored
    decoded = read_decoded(tmp_path / "part" / "scratch" / f"a{suffix}")
    assert decoded.shape[:2] == (64, 48)  # turned: 48 wide, 64 high
    _write(tmp_path / "part" / "scratch" / "a_mask.png", np.zeros((64, 48), np.uint8) | 255)  # at the decoded size
    cat = load_category(tmp_path, "part")
    summary = summarise(cat)
    assert summary.problems() == [] and set(summary.sizes) == {(48, 64)}
    assert frame_sizes([*cat.train, *(s.path for s in cat.test)]) == {"48x64": 12}


def test_images_larger_than_a_worker_takes_are_said_in_the_summary(tmp_path):
    """A 20 MP camera's images trained without a word, and the worker then refused every frame of that camera
    (image_too_large, or payload_too_large as PNG) until its limits were raised."""
    rng = np.random.default_rng(9)
    for i in range(8):
        _write(tmp_path / "part" / "good" / f"{i}.png", sample(rng, 64)[0])
    assert "larger than a worker takes" not in summarise(load_category(tmp_path / "part")).text(6, 2)
    cv2.imwrite(str(tmp_path / "part" / "good" / "big.png"), np.full((4000, 4100), 128, np.uint8))  # 16.4 MP
    summary = summarise(load_category(tmp_path / "part"))
    assert summary.problems() == []  # said, not refused: the worker's limits can be raised
    assert "note: 1 images are larger than a worker takes as a frame unless told (e.g. " in summary.text(6, 2)
    assert "big.png: 4100x4000" in summary.text(6, 2)


def test_data_given_as_a_dot_is_named_after_the_folder_it_is(tmp_path, monkeypatch):
    """`--data ..` named the bundle `..-patchcore`, refused only when written after the whole fit; `--data .` made
    a bundle `-patchcore` of category ''."""
    rng = np.random.default_rng(7)
    for i in range(8):
        _write(tmp_path / "bracket" / "good" / f"{i}.png", sample(rng, 64)[0])
    monkeypatch.chdir(tmp_path / "bracket" / "good")
    assert load_category(Path("..")).name == "bracket"
    monkeypatch.chdir(tmp_path / "bracket")
    assert load_category(Path(".")).name == "bracket"

def test_an_out_folder_the_bundle_cannot_go_to_is_refused_before_the_data_is_read(tmp_path):
    """It was found after the fit: minutes of training, then a traceback (or the refusal to replace a folder that
    is not a bundle)."""
    rng = np.random.default_rng(5)
    for i in range(8):
        _write(tmp_path / "parts" / f"{i}.png", sample(rng, 64)[0])
    (tmp_path / "a-file").write_text("")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("mine")
    for out, said in ((tmp_path / "a-file" / "bundle", "a-file is a file, not a folder"),
                      (tmp_path / "notes", "exists and is not a model bundle")):
        proc = _exporter("train", "--data", str(tmp_path / "parts"), "--out", str(out))
        assert proc.returncode == 2 and f"error: --out {out}" in proc.stderr and said in proc.stderr, proc.stderr
        assert "data:" not in proc.stdout  # refused before the summary, so before any fit
    assert (tmp_path / "notes" / "todo.txt").read_text() == "mine"


def test_test_images_that_copy_training_images_are_named_in_the_summary(tmp_path):
    """A set assembled by hand often has the same file in train/good and test/good: nothing said so, and the test
    figures then overstate the model."""
    rng = np.random.default_rng(6)
    for i in range(8):
        _write(tmp_path / "part" / "train" / "good" / f"{i}.png", sample(rng, 64)[0])
    _write(tmp_path / "part" / "test" / "good" / "a.png", sample(rng, 64)[0])
    _write(tmp_path / "part" / "test" / "dent" / "0.png", sample(rng, 64, "hole")[0])
    assert "warning" not in summarise(load_category(tmp_path, "part")).text(6, 2)
    for name in ("3.png", "5.png"):
        shutil.copy(tmp_path / "part" / "train" / "good" / name, tmp_path / "part" / "test" / "good" / f"copy-{name}")
    summary = summarise(load_category(tmp_path, "part"))
    assert [(t.name, s.name) for t, s in summary.in_both] == [("copy-3.png", "3.png"), ("copy-5.png", "5.png")]
    assert "warning: 2 test images are byte for byte training images (e.g. " in summary.text(6, 2)
    assert not summary.problems()  # said, not refused: the user decides


def test_summary_and_refusals(tmp_path):
    rng = np.random.default_rng(0)
    for i in range(5):
        _write(tmp_path / "few" / f"{i}.png", _grey16_nonsquare(sample(rng, 96)[0]))
    (tmp_path / "few" / "notes.png").write_text("not an image")
    (tmp_path / "few" / "empty.png").write_bytes(b"")  # OpenCV asserts on no bytes at all
    summary = summarise(load_category(tmp_path / "few"))
    text = summary.text(4, 2)
    assert "(good only)" in text and "96x72 (5)" in text and "grey (5)" in text and "16-bit (5)" in text
    assert "evaluation: none" in text
    problems = summary.problems()
    assert len(problems) == 2
    assert "only 7 good training images; at least 8" in problems[0]
    assert (f"2 files cannot be decoded: {tmp_path / 'few' / 'empty.png'} (empty), "  # which to copy, which to delete
            f"{tmp_path / 'few' / 'notes.png'} (not an image, or cut short)") in problems[1]

    for i in range(12):  # photos of many sizes: the most common listed, the others counted
        _write(tmp_path / "sizes" / f"{i}.png", np.zeros((40 + (i > 2) * i, 50), np.uint8))
    line = next(x for x in summarise(load_category(tmp_path / "sizes")).text(4, 2).splitlines() if "image sizes" in x)
    assert line.endswith(": 50x40 (3), " + ", ".join(f"50x{40 + i} (1)" for i in range(3, 10)) + " and 2 more (2)"), line

    proc = _exporter("train", "--data", str(tmp_path / "few"), "--out", str(tmp_path / "b"))
    assert proc.returncode == 2
    assert "data: " + str(tmp_path / "few") + " (good only)" in proc.stdout
    assert "error: unusable data:" in proc.stderr and "notes.png" in proc.stderr and "add photos" in proc.stderr
    assert not (tmp_path / "b").exists()

    (tmp_path / "nogood" / "scratch").mkdir(parents=True)
    _write(tmp_path / "nogood" / "scratch" / "0.png", sample(rng, 64)[0])
    proc = _exporter("train", "--data", str(tmp_path), "--category", "nogood", "--out", str(tmp_path / "b"))
    assert proc.returncode == 2 and "none named good/, ok/ or normal/" in proc.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = _exporter("train", "--data", str(empty), "--out", str(tmp_path / "b"))
    assert proc.returncode == 2 and "has no images; expected MVTec AD layout" in proc.stderr


def test_a_file_name_that_is_not_utf_8_is_printed_escaped_not_an_error(tmp_path):
    """A folder named in Latin-1 bytes stopped ``train`` at its summary ("'utf-8' codec can't encode character
    '\\udce4'") where the console's encoding is strict (``PYTHONIOENCODING=utf-8``)."""
    import os

    rng = np.random.default_rng(17)
    folder = tmp_path / os.fsdecode(b"d\xe4ta")
    folder.mkdir()
    for i in range(5):  # too few: refused after the summary, before any fit (OpenCV cannot write to such a name)
        (folder / f"{i}.png").write_bytes(cv2.imencode(".png", sample(rng, 64)[0])[1].tobytes())
    proc = subprocess.run([sys.executable, "-m", "exporter", "train", "--data", str(folder), "--out",
                           str(tmp_path / "b")], capture_output=True, timeout=600, cwd=ROOT,
                          env={**os.environ, "PYTHONIOENCODING": "utf-8"})
    assert proc.returncode == 2
    assert f"data: {tmp_path}/d\\udce4ta (good only)".encode() in proc.stdout, proc.stderr[-2000:]
    assert b"error: unusable data:" in proc.stderr and b"codec" not in proc.stderr


def _visa(root: Path, rng: np.random.Generator) -> Path:
    """VisA as downloaded: per object Data/Images/{Normal,Anomaly} and Data/Masks/Anomaly (defect pixels stored as
    1), and split_csv/1cls.csv naming every object's split, with paths relative to the VisA folder."""
    rows = ["object,split,label,image,mask"]
    for obj in ("candle", "pcb1"):
        for i in range(14):
            _write(root / obj / "Data" / "Images" / "Normal" / f"{i:04d}.JPG", sample(rng, 64)[0])
            rows.append(f"{obj},{'train' if i < 11 else 'test'},normal,{obj}/Data/Images/Normal/{i:04d}.JPG,")
        for i in range(3):
            image, mask = sample(rng, 64, "hole")
            _write(root / obj / "Data" / "Images" / "Anomaly" / f"{i:03d}.JPG", image)
            _write(root / obj / "Data" / "Masks" / "Anomaly" / f"{i:03d}.png", (mask > 0).astype(np.uint8))
            rows.append(f"{obj},test,anomaly,{obj}/Data/Images/Anomaly/{i:03d}.JPG,{obj}/Data/Masks/Anomaly/{i:03d}.png")
    (root / "split_csv").mkdir()
    (root / "split_csv" / "1cls.csv").write_text("\n".join(rows) + "\n")
    return root / "split_csv" / "1cls.csv"


def test_visa_as_downloaded_reads_its_own_split_and_masks_per_object(tmp_path):
    split = _visa(tmp_path / "VisA", np.random.default_rng(9))
    cat = load_category(split, "candle")
    assert cat.name == "candle" and cat.split == "the list's own split column"
    assert len(cat.train) == 11 and all("candle/Data/Images/Normal" in str(p) for p in cat.train)
    assert [s.defect for s in cat.test] == ["good"] * 3 + ["anomaly"] * 3
    assert all(read_mask(s.mask, SPEC).any() for s in cat.test if s.label)  # 1 is a defect pixel
    assert not set(cat.train) & {s.path for s in cat.test}
    with pytest.raises(DatasetError, match="no rows whose object is 'cashew'.*candle.*pcb1"):
        load_category(split, "cashew")
    with pytest.raises(DatasetError, match="lists 2 objects \\(candle, pcb1\\).*pick one with --category"):
        load_category(split)
    cat_pcb1, _, _, held, record = _split(split, "pcb1", 0, ThresholdChoice("recall", 0.9))  # defects held out to choose on
    assert held and load_category(split, "pcb1").without(record["validation_defects"]).test == cat_pcb1.test
    folders = load_category(tmp_path / "VisA" / "candle" / "Data" / "Images")  # the folders alone: image labels
    assert folders.layout == "labelled folders" and {s.defect for s in folders.test} == {"good", "Anomaly"}
    with pytest.raises(DatasetError, match=f"candle keeps its images in Data/Images/ \\(VisA as downloaded\\): give "
                                           f"--data {split} --category candle .*, or --data {tmp_path}/VisA/candle/Data/"
                                           "Images \\(its folders alone"):
        load_category(tmp_path / "VisA", "candle")  # the object folder, as the download names it

    proc = _exporter("train", "--data", str(split), "--category", "pcb1", "--out", str(tmp_path / "b"), *TINY)
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = read_manifest(tmp_path / "b")
    assert manifest.category == "pcb1" and manifest.training["test_split"] == "the list's own split column"
    test = manifest.metrics["test"]
    assert test["images"] == 6 and test["pixel_auroc"] is not None and test["aupro"] is not None
    out = tmp_path / "m.json"
    proc = _exporter("evaluate", "--bundle", str(tmp_path / "b"), "--data", str(split), "--category", "pcb1",
                     "--json", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(out.read_text())["images"] == 6


def test_a_set_too_large_for_the_memory_left_is_refused_with_what_it_needs():
    from exporter.resources import OutOfMemory, available_bytes, check_fits

    check_fits(5_000_000, 400, "x", "y", available=2 * 10**9)
    with pytest.raises(OutOfMemory, match=r"^the patch features of 5000 images need about 25\.0 GB of memory and 8\.0 GB "
                                          r"is available, enough for about 1600 of the 5000: train on fewer images$"):
        check_fits(5_000_000, 5000, "the patch features of 5000 images", "train on fewer images", available=8 * 10**9)
    assert 0 < available_bytes() <= __import__("psutil").virtual_memory().total


@pytest.mark.parametrize("version", ["v2", "v1"])
def test_a_containers_memory_limit_bounds_what_a_fit_may_take(tmp_path, version):
    """The limit less what the cgroup uses, page cache the kernel can drop counted as free; no limit: the machine's."""
    from exporter.resources import _cgroup_headroom, available_bytes

    gb = 10**9
    limit, usage, stat = (("memory.max", "memory.current", "memory.stat") if version == "v2" else
                          ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes", "memory/memory.stat"))
    cache_key = "inactive_file" if version == "v2" else "total_inactive_file"
    (tmp_path / "memory").mkdir()
    (tmp_path / limit).write_text(f"{4 * gb}\n")
    (tmp_path / usage).write_text(f"{3 * gb}\n")
    (tmp_path / stat).write_text(f"anon 123\n{cache_key} {gb // 2}\nactive_file 7\n")
    assert _cgroup_headroom(tmp_path) == gb + gb // 2
    assert available_bytes(tmp_path) == gb + gb // 2  # below what the machine has free
    (tmp_path / limit).write_text("max\n" if version == "v2" else "9223372036854771712\n")
    assert _cgroup_headroom(tmp_path) is None  # no limit set: the machine's available memory alone


def _memory_cgroup(limit: int) -> Path | None:
    """A child of this process's cgroup v1 memory cgroup, limited to ``limit`` bytes, where the machine lets us."""
    line = next((x for x in Path("/proc/self/cgroup").read_text().splitlines() if ":memory:" in x), None)
    if line is None:
        return None
    folder = Path("/sys/fs/cgroup/memory") / line.split(":", 2)[2].lstrip("/") / f"edge-inspect-{uuid.uuid4().hex[:8]}"
    try:
        folder.mkdir()
        (folder / "memory.limit_in_bytes").write_text(str(limit))
    except OSError:
        if folder.is_dir():
            folder.rmdir()
        return None
    return folder


def test_a_fit_larger_than_a_containers_memory_limit_stops_with_what_it_needs(tmp_path):
    """Without the check the kernel kills the run once the features fill the limit; with it, one line says why."""
    group = _memory_cgroup(2_500_000_000)
    if group is None:
        pytest.skip("no cgroup v1 memory cgroup can be made here (needs root and a writable cgroup v1 hierarchy)")
    try:
        rng = np.random.default_rng(8)
        for i in range(800):  # 720 to fit at 512 px: about 3.6 GB of patch features and their projection
            _write(tmp_path / "many" / f"{i:03d}.png", sample(rng, 64)[0])
        proc = subprocess.run(["sh", "-c", f'echo $$ > {group}/cgroup.procs && exec "$0" "$@"', sys.executable, "-m",
                               "exporter", "train", "--data", str(tmp_path / "many"), "--out", str(tmp_path / "b"),
                               "--input-size", "512"], capture_output=True, text=True, timeout=600, cwd=ROOT)
    finally:
        group.rmdir()  # the process has ended; its charge moves to the parent
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "error: the patch features of 720 training images (2949120 rows of 152) need about 3.6 GB" in proc.stderr
    assert "GB is available, enough for about " in proc.stderr and "train on fewer images" in proc.stderr
    assert not (tmp_path / "b").exists()


# --- end to end: train, export, evaluate with OpenVINO ---------------------------------------------------------

TINY = ["--input-size", "64", "--coreset-ratio", "0.05"]


def test_labelled_folders_of_16_bit_grey_non_square_images_train_and_evaluate(tmp_path):
    """No masks: image AUROC and F1 measured, pixel metrics absent and saying why; evaluate sees the same split."""
    rng = np.random.default_rng(3)
    data = tmp_path / "part"
    for i in range(20):
        _write(data / "good" / f"{i:02d}.png", _grey16_nonsquare(sample(rng, 96)[0]))
    for kind in DEFECTS[:2]:
        for i in range(3):
            _write(data / kind / f"{i}.png", _grey16_nonsquare(sample(rng, 96, kind)[0]))
    proc = _exporter("train", "--data", str(data), "--out", str(tmp_path / "b"), *TINY)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "16-bit (26)" in proc.stdout and "96x72 (26)" in proc.stdout and "no pixel metrics (no masks)" in proc.stdout
    manifest = read_manifest(tmp_path / "b")
    test = manifest.metrics["test"]
    assert manifest.category == "part" and manifest.training["data_layout"] == "labelled folders"
    assert test["images"] == 4 + 6 and set(test["detection_rate"]) == {"good", "hole", "scratch"}
    assert test["pixel_auroc"] is None and test["aupro"] is None
    assert test["pixel_metrics"] == "absent: no masks for types hole, scratch"
    assert test["image_auroc"] > 0.7, test
    out = tmp_path / "m.json"
    proc = _exporter("evaluate", "--bundle", str(tmp_path / "b"), "--data", str(data), "--json", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    again = json.loads(out.read_text())
    assert again["images"] == test["images"] and again["image_auroc"] == test["image_auroc"]
    assert again["trained_test_images"] == 0 and "trained_left_out" not in again

    # Good images added since: the split drawn again took some of the bundle's training images into test, silently.
    for i in range(20, 26):
        _write(data / "good" / f"{i:02d}.png", _grey16_nonsquare(sample(rng, 96)[0]))
    grown = [s.path for s in load_category(data).test if s.defect == "good"]
    trained = set(manifest.training["trained_images"])
    drawn_again = [p for p in grown if hashlib.sha256(p.read_bytes()).hexdigest()[:16] in trained]
    assert drawn_again, grown  # the case: some of the new split's good images were trained on
    proc = _exporter("evaluate", "--bundle", str(tmp_path / "b"), "--data", str(data), "--json", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    grown_metrics = json.loads(out.read_text())
    left_out = grown_metrics["trained_left_out"]
    assert left_out > 0 and grown_metrics["trained_test_images"] == 0, grown_metrics
    assert left_out == len(drawn_again) and grown_metrics["images"] == len(grown) - left_out + 6, grown_metrics
    assert f"note: {left_out} good images drawn into the test split are images this bundle was trained on" in proc.stderr


def test_good_images_only_train_and_export_without_evaluation(tmp_path):
    rng = np.random.default_rng(4)
    for i in range(12):
        _write(tmp_path / "goods" / f"{i:02d}.jpg", sample(rng, 80)[0])
    proc = _exporter("train", "--data", str(tmp_path / "goods"), "--out", str(tmp_path / "b"), *TINY,
                     "--threshold-mode", "far", "--target-far", "0.1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "evaluation: none (no labelled test images)" in proc.stdout
    assert "image threshold: lowest that flags at most 0.1 of the held-out normals" in proc.stdout
    manifest = read_manifest(tmp_path / "b")
    assert manifest.metrics == {"test": None, "not_evaluated": "no test split (none: good images only, nothing to evaluate)"}
    assert manifest.thresholds.method.startswith("far: lowest image threshold with at most 0.1 of 3 held-out normal")
    proc = _exporter("evaluate", "--bundle", str(tmp_path / "b"), "--data", str(tmp_path / "goods"))
    # good images are scored as good parts for the false alarms, but not those the bundle was trained on: all of these
    assert proc.returncode == 2 and "all 12 images are images this bundle was trained on" in proc.stderr, proc.stderr



def test_an_mvtec_layout_of_training_images_only_says_it_has_no_test_split(tmp_path):
    """``part/train/good`` alone (no test images yet) was said to be tested on "the data's own test split", in the
    summary and in the bundle's record (``training.test_split``, ``metrics.not_evaluated``: "no test split (the data's
    own test split)"), which it was not."""
    rng = np.random.default_rng(15)
    for i in range(8):
        _write(tmp_path / "part" / "train" / "good" / f"{i}.png", sample(rng, 64)[0])
    cat = load_category(tmp_path, "part")
    assert (cat.test, cat.split) == ([], "none: test/ is absent, nothing to evaluate")
    assert "  test split: none: test/ is absent, nothing to evaluate\n" in summarise(cat).text(6, 2)
    (tmp_path / "part" / "test" / "bent").mkdir(parents=True)
    cat = load_category(tmp_path, "part")
    assert (cat.split, cat.empty) == ("none: test/ holds no images, nothing to evaluate", ("test/bent/",))
    _write(tmp_path / "part" / "test" / "bent" / "0.png", sample(rng, 64, "scratch")[0])
    assert load_category(tmp_path, "part").split == "the data's own test split"


def test_images_beside_the_labelled_folders_are_said_not_read(tmp_path):
    """Images lying in the data folder itself, beside good/ and scratch/ (not yet sorted), were left out of a
    labelled-folders set without a word; the MVTec AD layout says the same of its loose images."""
    rng = np.random.default_rng(16)
    for i in range(10):
        _write(tmp_path / "parts" / "good" / f"{i}.png", sample(rng, 64)[0])
    _write(tmp_path / "parts" / "scratch" / "a.png", sample(rng, 64, "scratch")[0])
    for name in ("unsorted 1.png", "unsorted 2.jpg"):
        _write(tmp_path / "parts" / name, sample(rng, 64)[0])
    cat = load_category(tmp_path / "parts")
    assert len(cat.train) + len(cat.test) == 11
    notes = [line for line in summarise(cat).text(7, 1).splitlines() if "directly" in line]
    assert notes == ["  note: the data folder holds 2 images directly (e.g. unsorted 1.png), not read: labelled folders "
                     "read good/ and one folder per defect type; move each into its class's folder"], notes


def test_training_images_of_mixed_sizes_are_none_of_them_unlike_the_training_images(tmp_path):
    """Hand-cut crops, every one its own size: the manifest kept only the 8 commonest sizes, and the worker then said
    of the portrait ones' proportions and of the small ones' size that no training image had them.  Every training
    image is now like the training images; a frame of another proportion is still said, and the record stays short."""
    rng = np.random.default_rng(13)
    sizes = [(128 + 3 * i, 64 + i) for i in range(10)] + [(64 + i, 128 + 3 * i) for i in range(6)] + [(32, 40), (40, 32)]
    for i, (width, height) in enumerate(sizes):
        _write(tmp_path / "crops" / f"{i:02d}.png", cv2.resize(sample(rng, 128)[0], (width, height)))
    proc = _exporter("train", "--data", str(tmp_path / "crops"), "--out", str(tmp_path / "b"), *TINY)
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = read_manifest(tmp_path / "b")
    assert len(manifest.training["frame_sizes"]) < len(sizes)
    assert {size: manifest.unlike_training(*size) for size in sizes} == dict.fromkeys(sizes)
    assert "has proportions none of the training images had" in manifest.unlike_training(300, 100)



def test_a_data_folder_whose_name_cannot_name_the_bundle_is_refused_before_the_fit(tmp_path):
    """The default bundle name is the folder's and the model's: of a folder named ``.set`` it could not name a bundle,
    and the run failed writing the manifest after the whole fit and export, with pydantic's raw error."""
    rng = np.random.default_rng(14)
    for i in range(10):
        _write(tmp_path / ".set" / f"{i}.png", sample(rng, 64)[0])
    proc = _exporter("train", "--data", str(tmp_path / ".set"), "--out", str(tmp_path / "b"), *TINY)
    assert proc.returncode == 2 and not (tmp_path / "b").exists()
    assert "error: '.set-patchcore' cannot name a bundle: " in proc.stderr and "give one with --name" in proc.stderr
    assert "pydantic" not in proc.stderr and "coreset:" not in proc.stderr, proc.stderr[-3000:]  # nothing fitted
    proc = _exporter("train", "--data", str(tmp_path / ".set"), "--out", str(tmp_path / "b"), *TINY, "--name", "set")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert read_manifest(tmp_path / "b").name == "set"


def test_list_with_some_masks_and_a_recall_threshold(tmp_path):
    """Masks for one type only: pixel metrics over good + that type. Recall threshold on defects kept out of test,
    and the summary printed before the fit says the test split without them (it said 4 of each type, 12 images, where
    8 were evaluated)."""
    rng = np.random.default_rng(5)
    rows = []
    for i in range(20):
        rows.append(f"img/g{i:02d}.png,good")
        _write(tmp_path / "img" / f"g{i:02d}.png", sample(rng, 64)[0])
    for kind in ("hole", "scratch"):
        for i in range(4):
            image, mask = sample(rng, 64, kind)
            _write(tmp_path / "img" / f"{kind}{i}.png", image)
            if kind == "hole":
                _write(tmp_path / "gt" / f"{kind}{i}.png", mask)
            rows.append(f"img/{kind}{i}.png,{kind}" + (f",gt/{kind}{i}.png" if kind == "hole" else ""))
    (tmp_path / "list.csv").write_text("\n".join(rows) + "\n")
    proc = _exporter("train", "--data", str(tmp_path / "list.csv"), "--out", str(tmp_path / "b"), *TINY,
                     "--threshold-mode", "recall", "--target-recall", "0.5")
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = read_manifest(tmp_path / "b")
    held = manifest.training["validation_defects"]
    assert len(held) == 4 and {Path(p).name[:-5] for p in held} == {"hole", "scratch"}
    assert manifest.thresholds.method.startswith("recall: highest image threshold flagging at least 0.5 of 4")
    test = manifest.metrics["test"]
    assert test["images"] == 4 + 4  # 4 held-out good, 2 + 2 defects left after validation took half of each type
    said = proc.stdout.splitlines()
    assert [line.rsplit(": ", 1)[1] for line in said if line.startswith("  test split: ")] == ["good 4, hole 2, scratch 2"]
    assert "  held out of the test split for the threshold: hole 2, scratch 2" in said
    assert test["pixel_metrics"].startswith("6 of 8 test images: good and the types with masks (hole)")
    assert 0 <= test["aupro"] <= 1 and 0 <= test["pixel_auroc"] <= 1
    out = tmp_path / "m.json"
    proc = _exporter("evaluate", "--bundle", str(tmp_path / "b"), "--data", str(tmp_path / "list.csv"), "--json",
                     str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(out.read_text())["images"] == 8


def _kolektor2(root: Path, rng: np.random.Generator) -> dict[str, int]:
    """KolektorSDD2 as downloaded: train/ and test/ of PNGs with <stem>_GT.png beside each (blank for good ones);
    returns the test defects' mask pixels by name."""
    truth: dict[str, int] = {}
    for split, good, bad in (("train", 16, 2), ("test", 3, 2)):
        for i in range(good + bad):
            picture, mask = sample(rng, 64, "good" if i < good else "hole")
            _write(root / split / f"{split[:2]}{i:04d}.png", picture)
            _write(root / split / f"{split[:2]}{i:04d}_GT.png", mask)
            if split == "test" and i >= good:
                truth[f"te{i:04d}.png"] = int((mask > 0).sum())
    return truth


def test_masks_beside_images_kolektorsdd2_train_and_evaluate_with_pixel_metrics(tmp_path):
    """A blank mask is a good image, a marked one a defect; the defects in train/ are never trained on."""
    truth = _kolektor2(tmp_path / "ksdd2", np.random.default_rng(8))
    cat = load_category(tmp_path, "ksdd2")
    assert [p.name for p in cat.train] == [f"tr{i:04d}.png" for i in range(16)]  # no mask, no train defect
    assert [s.defect for s in cat.test].count("good") == 3
    defects = [s for s in cat.test if s.label]
    assert {s.path.name: int(read_mask(s.mask, SPEC).sum()) for s in defects} == truth
    assert "2 defect images of the training folder left out" in cat.split
    proc = _exporter("train", "--data", str(tmp_path), "--category", "ksdd2", "--out", str(tmp_path / "b"), *TINY)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "(images with masks beside them)" in proc.stdout and "masks: defect" in proc.stdout
    test = read_manifest(tmp_path / "b").metrics["test"]
    assert test["images"] == 5 and set(test["detection_rate"]) == {"good", "defect"}
    assert 0 <= test["aupro"] <= 1 and test["pixel_metrics"] == "all 5 test images"


def test_masks_beside_images_in_part_folders_or_one_folder_get_a_held_out_test_split(tmp_path):
    """KolektorSDD (a folder per part, <stem>_label.bmp) and a single folder of <stem>_mask.png files."""
    rng = np.random.default_rng(9)
    for part in range(6):
        for i in range(3):
            picture, mask = sample(rng, 64, "scratch" if (part, i) == (2, 1) else "good")
            _write(tmp_path / "ksdd" / f"kos{part:02d}" / f"Part{i}.jpg", picture)
            _write(tmp_path / "ksdd" / f"kos{part:02d}" / f"Part{i}_label.bmp", mask)
    cat = load_category(tmp_path, "ksdd")
    assert cat.layout == "images with masks beside them" and len(cat.train) + len(cat.test) == 18
    assert [(s.path.parent.name, s.path.name) for s in cat.test if s.label] == [("kos02", "Part1.jpg")]
    assert not any("_label" in p.name for p in cat.train)
    for i in range(10):
        picture, mask = sample(rng, 64, "hole" if i == 9 else "good")
        _write(tmp_path / "flat" / f"{i}.png", picture)
        if i >= 8:  # a good image may come without a mask
            _write(tmp_path / "flat" / f"{i}_mask.png", mask)
    flat = load_category(tmp_path, "flat")
    assert [s.path.name for s in flat.test if s.label] == ["9.png"]
    assert {p.name for p in flat.train} | {s.path.name for s in flat.test} == {f"{i}.png" for i in range(10)}
    (tmp_path / "flat-train").mkdir()
    (tmp_path / "flat").rename(tmp_path / "flat-train" / "train")  # a train/ folder and no test/ beside it
    held = load_category(tmp_path, "flat-train")
    assert [s.path.name for s in held.test if s.label] == ["9.png"] and len(held.test) == 3, held.test
    assert held.split.startswith("all defect images and 2 of 9 good images") and len(held.train) == 7
    _write(tmp_path / "ksdd" / "extra" / "a.png", sample(rng, 64)[0])  # a part folder without masks
    with pytest.raises(DatasetError, match=r"folders \['extra'\] hold images without masks beside them"):
        load_category(tmp_path, "ksdd")


def test_dagm_masks_in_a_label_folder_only_for_the_defects(tmp_path):
    """DAGM 2007: Train/ and Test/ (capitalised) of .PNG images, Label/<stem>_label.PNG for the defective ones only."""
    rng = np.random.default_rng(10)
    for split, count in (("Train", 12), ("Test", 4)):
        for i in range(count):
            picture, mask = sample(rng, 64, "hole" if i % 4 == 3 else "good")
            _write(tmp_path / "Class1" / split / f"{i:04d}.PNG", picture)
            if mask.any():
                _write(tmp_path / "Class1" / split / "Label" / f"{i:04d}_label.PNG", mask)
    (tmp_path / "Class1" / "Train" / "Label" / "Labels.txt").write_text("1\n")  # DAGM's list, not read
    cat = load_category(tmp_path, "Class1")
    assert cat.layout == "images with masks beside them"
    assert [p.name for p in cat.train] == [f"{i:04d}.PNG" for i in range(12) if i % 4 != 3]
    assert [(s.path.name, s.defect, s.mask.name if s.mask else None) for s in cat.test] == [
        ("0003.PNG", "defect", "0003_label.PNG"), *((f"{i:04d}.PNG", "good", None) for i in range(3))]
    assert "3 defect images of the training folder left out" in cat.split
    assert not summarise(cat).problems()
    _write(tmp_path / "notes" / "a.png", sample(rng, 64)[0])  # no training folder: not a category
    assert find_categories(tmp_path) == ["Class1"]  # what `exporter benchmark --data` runs on


def test_labelled_folders_take_a_defects_mask_from_beside_it_and_never_train_on_a_mask(tmp_path):
    rng = np.random.default_rng(11)
    for i in range(10):
        picture, blank = sample(rng, 64)
        _write(tmp_path / "part" / "good" / f"{i}.png", picture)
        _write(tmp_path / "part" / "good" / f"{i}_mask.png", blank)
    picture, mask = sample(rng, 64, "scratch")
    _write(tmp_path / "part" / "scratch" / "a.png", picture)
    _write(tmp_path / "part" / "scratch" / "a_mask.png", mask)
    _write(tmp_path / "part" / "scratch" / "b.png", sample(rng, 64, "scratch")[0])  # labelled by its folder only
    cat = load_category(tmp_path, "part")
    assert cat.layout == "labelled folders"
    assert not any("_mask" in p.name for p in cat.train) and not any("_mask" in s.path.name for s in cat.test)
    assert len(cat.train) + sum(1 for s in cat.test if not s.label) == 10
    assert [(s.path.name, s.defect, s.mask.name if s.mask else None) for s in cat.test if s.label] == [
        ("a.png", "scratch", "a_mask.png"), ("b.png", "scratch", None)]


@pytest.mark.parametrize("masks", ["masks/{i}.png", "ground_truth/scratch/{i}_mask.png"])
def test_a_folder_of_masks_beside_labelled_folders_is_no_defect_type_and_is_said(tmp_path, masks):
    """A ``masks/`` folder beside ``good/`` and ``scratch/`` was read as a defect type: its masks were scored as
    defect images (and chose a recall threshold); a ``ground_truth/`` one was left out without a word."""
    rng = np.random.default_rng(12)
    for i in range(10):
        _write(tmp_path / "part" / "good" / f"{i}.png", sample(rng, 64)[0])
    for i in range(3):
        picture, mask = sample(rng, 64, "scratch")
        _write(tmp_path / "part" / "scratch" / f"{i}.png", picture)
        _write(tmp_path / "part" / masks.format(i=i), mask)
    cat = load_category(tmp_path, "part")
    assert {s.defect for s in cat.test} == {"good", "scratch"} and len([s for s in cat.test if s.label]) == 3
    folder = masks.split("/")[0]
    assert f"  note: {folder}/ (3 images) is not read: labelled folders take a defect's mask from beside its image" \
        in summarise(cat).text(7, 1)


def test_files_not_read_in_linked_folders_are_named_and_a_link_loop_is_walked_once(tmp_path):
    """Folders linked into the data (``good -> /nas/line1/good``) are read as data, but the files in them that are
    not read (a ``.gif``, an iPhone's ``.heic``) were left out without a word: the walk that names them did not
    follow links.  A link back to a folder above is walked once, not round until the path is too long."""
    from PIL import Image

    rng = np.random.default_rng(14)
    store = tmp_path / "nas"
    for i in range(10):
        _write(store / "ok" / f"{i}.png", sample(rng, 64)[0])
    _write(store / "dents" / "a.png", sample(rng, 64, "scratch")[0])
    Image.fromarray(sample(rng, 64)[0]).save(store / "ok" / "late.gif")
    Image.fromarray(sample(rng, 64)[0]).save(store / "dents" / "b.gif")
    root = tmp_path / "parts"
    root.mkdir()
    (root / "good").symlink_to(store / "ok", target_is_directory=True)
    (root / "dent").symlink_to(store / "dents", target_is_directory=True)
    cat = load_category(root)
    assert len(cat.train) + len(cat.test) == 11
    notes = [line for line in summarise(cat).text(7, 1).splitlines() if "not read" in line]
    assert notes == ["  note: 2 files are not read, their names not a PNG, JPEG, BMP, TIFF or WebP image's: "
                     "2 .gif (dent/b.gif, good/late.gif); save them as PNG to train on them"], notes

    flat = store / "ok"  # good images only, with a link from a sub-folder back to the folder itself
    (flat / "misc").mkdir()
    (flat / "misc" / "back").symlink_to(flat, target_is_directory=True)
    notes = [line for line in summarise(load_category(flat)).text(7, 1).splitlines() if "not read" in line]
    assert notes == ["  note: 1 files are not read, their names not a PNG, JPEG, BMP, TIFF or WebP image's: "
                     "1 .gif (late.gif); save them as PNG to train on them"], notes


def test_images_by_other_names_are_read_or_named_and_formats_the_worker_refuses_are_refused(tmp_path):
    """``.jfif``/``.jpe`` JPEGs (Windows' names) were left out of a folder without a word, a folder of only them had
    "no images", and so were GIF and PGM files; listed in a CSV, those two trained, and the worker refuses them as
    frames (unsupported_format): a bundle was trained on images its worker cannot take."""
    from PIL import Image

    from worker.decode import FrameError, probe

    rng = np.random.default_rng(10)
    root = tmp_path / "parts"
    for i in range(8):
        _write(root / f"{i}.png", sample(rng, 64)[0])
    for name in ("a.jfif", "b.jfif", "c.jpe"):
        (root / name).write_bytes(cv2.imencode(".jpg", sample(rng, 64)[0])[1].tobytes())
    Image.fromarray(sample(rng, 64)[0]).save(root / "d.gif")
    Image.fromarray(sample(rng, 64)[0]).save(root / "e.pgm")
    for name in ("notes.txt", "Thumbs.db", "desktop.ini", ".DS_Store", "._0.png"):  # not data, as before: not said
        (root / name).write_bytes(b"\x00\x05\x16\x07")
    cat = load_category(root)
    assert sorted(p.name for p in cat.train) == ["0.png", "1.png", "2.png", "3.png", "4.png", "5.png", "6.png",
                                                 "7.png", "a.jfif", "b.jfif", "c.jpe"]
    summary = summarise(cat)
    assert summary.problems() == []
    notes = [line for line in summary.text(9, 2).splitlines() if "not read" in line]
    assert notes == ["  note: 2 files are not read, their names not a PNG, JPEG, BMP, TIFF or WebP image's: "
                     "1 .gif (d.gif), 1 .pgm (e.pgm); save them as PNG to train on them"], notes
    for name in ("a.jfif", "c.jpe"):  # the worker takes these as frames
        assert probe((root / name).read_bytes(), 10**6, 10**6).format == "jpeg"

    only = tmp_path / "only"
    only.mkdir()
    shutil.copy(root / "d.gif", only / "d.gif")
    with pytest.raises(DatasetError, match=r"only has no images \(it holds 1 files not read, their names not an "
                                           r"image's: 1 \.gif \(d\.gif\)\)"):
        load_category(only)

    shutil.copy(root / "d.gif", root / "f.png")  # a GIF by content, whatever its name
    (tmp_path / "list.csv").write_text("".join(f"parts/{p.name},good\n" for p in sorted(root.iterdir())
                                               if p.suffix in (".png", ".jfif", ".jpe", ".gif", ".pgm")
                                               and not p.name.startswith(".")))
    problems = summarise(load_category(tmp_path / "list.csv")).problems()
    assert len(problems) == 1 and problems[0].startswith("3 images are in a format the worker refuses as a frame"), problems
    assert f"{root / 'd.gif'} (GIF), {root / 'e.pgm'} (PPM), {root / 'f.png'} (GIF)" in problems[0]
    for name in ("d.gif", "e.pgm", "f.png"):
        with pytest.raises(FrameError) as refused:
            probe((root / name).read_bytes(), 10**6, 10**6)
        assert refused.value.code == "unsupported_format"


def test_16_bit_images_of_12_bit_data_are_warned_of_in_the_summary(tmp_path):
    """A 12-bit camera's images in 16-bit files trained without a word on almost black pixels (0..15), as the
    worker reads such frames too; full-range 16-bit images are not warned of."""
    from worker.decode import decode

    rng = np.random.default_rng(11)
    for i in range(9):
        _write(tmp_path / "full" / f"{i}.png", _grey16_nonsquare(sample(rng, 96)[0]))
        twelve = sample(rng, 64)[0].astype(np.uint16) << 4
        twelve[0, 0] = 4095
        _write(tmp_path / "twelve" / f"{i}.png", twelve)
    assert "warning" not in summarise(load_category(tmp_path / "full")).text(7, 2)
    summary = summarise(load_category(tmp_path / "twelve"))
    assert summary.problems() == []  # said, not refused
    warning = [line for line in summary.text(7, 2).splitlines() if "warning" in line]
    assert len(warning) == 1 and warning[0].startswith("  warning: 9 16-bit images use only their low 12 bits (e.g. "), warning
    assert "they are almost black (0..15); scale them to the full 16-bit range (x16) before training" in warning[0]
    frame = decode((tmp_path / "twelve" / "0.png").read_bytes())  # what the worker makes of such a frame
    assert frame.max() <= 15


def test_copies_among_the_training_images_stay_on_one_side_of_the_threshold_split(tmp_path):
    """A file and its copy (``img (1).png``) or link were two training images, and could land one in the fit and one
    among the held-out normals: the copy then scored as memorised and set the threshold, without a word."""
    from exporter.build import VAL_FRACTION

    rng = np.random.default_rng(12)
    root = tmp_path / "parts"
    for i in range(16):
        _write(root / f"{i:02d}.png", sample(rng, 64)[0])
    groups = []
    for i in (1, 4, 7, 10, 13):
        shutil.copy(root / f"{i:02d}.png", root / f"{i:02d} (1).png")
        groups.append({root / f"{i:02d}.png", root / f"{i:02d} (1).png"})
    (root / "zz.png").symlink_to(root / "02.png")
    groups.append({root / "02.png", root / "zz.png"})
    cat = load_category(root)
    assert len(cat.train) == 22
    for seed in range(10):
        fit, held = cat.split_train(VAL_FRACTION, seed)
        assert sorted(fit + held) == sorted(cat.train) and len(fit) >= 16 and held
        assert all(group <= set(fit) or group <= set(held) for group in groups), (seed, held)
    text = summarise(cat).text(17, 5)
    assert (f"note: 6 training images are byte for byte copies of others (e.g. {root / '01 (1).png'} and "
            f"{root / '01.png'}): each kept with the one it copies in the fit or among the held-out images") in text, text
    for path in root.iterdir():
        if path.name[:2] not in ("00", "01", "02", "04", "05", "07", "08"):
            path.unlink()
    problems = summarise(load_category(root)).problems()  # 10 files, 7 images
    assert problems and problems[0].startswith("only 7 good training images (3 more are copies of these); at least 8"), problems


def test_a_mask_whose_image_is_gone_is_refused_not_read_as_an_image(tmp_path):
    """A mask left behind when its image was deleted was read as an image: a blank one became a good training image
    (or a held-out threshold image), a marked one a test image.  Refused by name in a folder that pairs masks with
    its images and in a mask folder; in a folder that pairs none, such a name is an image's (a view of a part, a photo
    of a label: refusing them told a user to delete training images, a helper's review)."""
    rng = np.random.default_rng(12)
    _kolektor2(tmp_path / "ksdd2", rng)
    (tmp_path / "ksdd2" / "train" / "tr0003.png").unlink()
    with pytest.raises(DatasetError, match=r"mask .*ksdd2/train/tr0003_GT.png has no image \(no tr0003\.\* beside "
                                           r"it\): restore the image or delete the mask"):
        load_category(tmp_path, "ksdd2")
    for i in range(10):
        _write(tmp_path / "part" / "good" / f"{i:03d}.png", sample(rng, 64)[0])
    _write(tmp_path / "part" / "scratch" / "a.png", sample(rng, 64, "scratch")[0])
    assert len(load_category(tmp_path, "part").train) == 8
    blank = np.zeros((64, 64), np.uint8)
    marked = blank.copy()
    marked[20:30, 20:30] = 255
    _write(tmp_path / "part" / "scratch" / "a_mask.png", marked)  # this folder pairs masks with its images
    _write(tmp_path / "part" / "scratch" / "gone_MASK.png", blank)
    with pytest.raises(DatasetError, match=r"mask .*part/scratch/gone_MASK.png has no image .*restore the image or "
                                           r"delete"):
        load_category(tmp_path, "part")
    (tmp_path / "part" / "scratch" / "gone_MASK.png").unlink()
    _write(tmp_path / "part" / "good" / "010_label.png", sample(rng, 64)[0])  # no masks there: a view of part 010
    assert len(load_category(tmp_path, "part").train) == 9
    _write(tmp_path / "Class1" / "Train" / "0000.PNG", sample(rng, 64)[0])
    _write(tmp_path / "Class1" / "Train" / "0000_label.PNG", blank)
    _write(tmp_path / "Class1" / "Train" / "Label" / "0001_label.PNG", blank)  # DAGM, 0001.PNG deleted
    with pytest.raises(DatasetError, match=r"mask .*Label/0001_label.PNG has no image \(no 0001\.\* beside it\)"):
        load_category(tmp_path, "Class1")
    from exporter.synthetic import generate

    root = generate(tmp_path, "weave", size=64, n_train=4, n_test=2)
    _write(root / "test" / "hole" / "gone_mask.png", blank)  # a test image of its type, without a mask of its own
    with pytest.raises(DatasetError, match=r"gone_mask.png"):
        load_category(tmp_path, "weave")
    (root / "test" / "hole" / "gone_mask.png").unlink()
    _write(root / "train" / "good" / "000_mask.png", blank)  # beside its image: MVTec AD reads masks from ground_truth
    with pytest.raises(DatasetError, match=r"1 masks lie beside their images in .*train/good, e.g. .*000_mask.png "
                                           r"\(of 000\).*ground_truth/<type>/ only"):
        load_category(tmp_path, "weave")
    for i in range(8):
        _write(tmp_path / "flat" / f"{i}.png", sample(rng, 64)[0])
    _write(tmp_path / "flat" / "8_mask.png", sample(rng, 64)[0])  # a folder of good images pairs no masks: an image
    assert len(load_category(tmp_path, "flat").train) == 9
    for i in range(8):  # photos of labels, every one named so: images
        _write(tmp_path / "labels" / f"{i:04d}_label.png", sample(rng, 64)[0])
    assert len(load_category(tmp_path, "labels").train) == 8
    _write(tmp_path / "Class1" / "Train" / "0001.PNG", sample(rng, 64)[0])  # the DAGM folder mended
    _write(tmp_path / "Class1" / "Train" / "0000_GT.PNG", blank)  # a second mask of 0000: it was read as an image
    with pytest.raises(DatasetError, match=r"0000.PNG has two masks, 0000_GT.PNG and 0000_label.PNG: keep one"):
        load_category(tmp_path, "Class1")
    for cls in ("Class1", "Class2"):  # one category's doubled mask is its own error, not every category's
        for name, image in (("0000", sample(rng, 64)[0]), ("0000_label", blank), ("0001", sample(rng, 64)[0])):
            _write(tmp_path / "dagm" / cls / "Train" / f"{name}.PNG", image)
    _write(tmp_path / "dagm" / "Class2" / "Train" / "0000_GT.PNG", blank)
    with pytest.raises(DatasetError, match=r"holds the categories \['Class1', 'Class2'\]: pick one"):
        load_category(tmp_path / "dagm")
    assert len(load_category(tmp_path / "dagm", "Class1").train) == 2


def test_a_defect_type_folder_without_images_is_said_in_the_summary(tmp_path):
    """An empty defect folder (images not copied yet, or saved under another name) left its type out of the test
    split without a word."""
    rng = np.random.default_rng(15)
    for i in range(10):
        _write(tmp_path / "part" / "good" / f"{i}.png", sample(rng, 64)[0])
    _write(tmp_path / "part" / "scratch" / "a.png", sample(rng, 64, "scratch")[0])
    (tmp_path / "part" / "dent").mkdir()
    (tmp_path / "part" / "dent" / "a.gif").write_bytes(b"GIF89a")
    text = summarise(load_category(tmp_path, "part")).text(7, 1)
    assert "  note: dent/ holds no images: not in the test split" in text.splitlines()
    from exporter.synthetic import generate

    root = generate(tmp_path, "weave", size=64, n_train=4, n_test=2)
    assert "no images" not in summarise(load_category(tmp_path, "weave")).text(3, 1)
    (root / "test" / "glue").mkdir()
    (root / "test" / "smudge").mkdir()
    assert "note: test/glue/, test/smudge/ hold no images: not in the test split" in summarise(
        load_category(tmp_path, "weave")).text(3, 1)


def test_defects_held_out_for_the_threshold_leave_the_test_split_with_a_relative_data_folder(dataset, monkeypatch):
    """``--threshold-mode recall`` holds some defects out to choose the threshold; with ``--data`` relative (as the
    README's commands give it) they were joined to the data folder a second time, matched no test image and were
    scored as test images too, so the manifest's test figures included the images the threshold was tuned on."""
    monkeypatch.chdir(dataset.parent)
    category = load_category(Path(dataset.name), "weave")
    assert not category.root.is_absolute() and any(s.label for s in category.test)
    rest, held = hold_out_defects(category, 0.5, seed=0)
    assert held and not {s.path for s in held} & {s.path for s in rest.test}
    assert len(rest.test) == len(category.test) - len(held)
    assert category.without([category.recorded(s.path) for s in held]).test == rest.test


def test_jpeg_and_blank_masks_are_warned_about(dataset, tmp_path):
    """A mask saved as JPEG (its compression noise counts as defect: in a helper's probe one drawn region became six
    and AUPRO fell from 0.86 to 0.76) and a defect image's mask that marks nothing (its pixels then count as
    defect-free) changed the pixel metrics without a word; the summary that train and evaluate print warns of both."""
    shutil.copytree(dataset / "weave", tmp_path / "weave")
    truth = tmp_path / "weave" / "ground_truth"
    jpeg, blank = sorted((truth / "hole").glob("*.png"))[:2]
    _, encoded = cv2.imencode(".jpg", cv2.imread(str(jpeg), cv2.IMREAD_GRAYSCALE), [cv2.IMWRITE_JPEG_QUALITY, 90])
    jpeg.write_bytes(encoded.tobytes())  # JPEG content under the .png name a tool kept
    assert cv2.imwrite(str(blank), np.zeros_like(cv2.imread(str(blank), cv2.IMREAD_GRAYSCALE)))
    summary = summarise(load_category(tmp_path, "weave"))
    assert summary.lossy_masks == [jpeg] and summary.blank_masks == [blank]
    notes = "\n".join(summary.notes())
    assert f"warning: 1 masks are JPEG (e.g. {jpeg})" in notes and "save masks as PNG" in notes
    assert f"warning: 1 defect images have masks that mark no pixel (e.g. {blank})" in notes
    assert not summarise(load_category(dataset, "weave")).lossy_masks  # the generated set's PNG masks: no warning


def test_a_tiffs_reduced_resolution_pages_are_no_pictures_of_their_own(tmp_path):
    """A scanner's or camera's TIFF often carries a thumbnail or preview of its picture as a later page, marked
    reduced-resolution (NewSubfileType bit 0): the summary warned that such an image held several pictures and that
    only the first was read, which is all there is to read.  Only full-resolution pages count."""
    from PIL import Image, TiffImagePlugin

    rng = np.random.default_rng(15)
    for i in range(8):
        _write(tmp_path / "part" / "good" / f"{i}.png", sample(rng, 64)[0])
    full, other = (Image.fromarray(sample(rng, 64)[0]) for _ in range(2))

    def pages(path: Path, kept: list[tuple[Image.Image, int]]) -> None:
        with TiffImagePlugin.AppendingTiffWriter(path, new=True) as tiff:
            for page, subfile in kept:
                page.save(tiff, "TIFF", tiffinfo={254: subfile})
                tiff.newFrame()

    pages(tmp_path / "part" / "good" / "scan.tif", [(full, 0), (full.resize((16, 16)), 1)])
    summary = summarise(load_category(tmp_path / "part"))
    assert [line for line in summary.notes() if "more than one picture" in line] == [], summary.notes()
    pages(tmp_path / "part" / "good" / "two.tif", [(full, 0), (full.resize((16, 16)), 1), (other, 0)])
    said = [line for line in summarise(load_category(tmp_path / "part")).notes() if "more than one picture" in line]
    assert said and f"{tmp_path / 'part' / 'good' / 'two.tif'}: 2;" in said[0], said


def test_a_tiff_of_16_bit_grey_and_alpha_is_refused_alike_by_both_sides_naming_its_layout(tmp_path):
    """Pillow, which reads every frame's header, does not open a TIFF of 16-bit grey and alpha: the worker answered
    such a frame ``not_an_image``, "not a recognised image", and the summary called it "a format the worker refuses
    (unknown)" and counted it among the 8-bit grey images (OpenCV decodes it).  Both now say it is a TIFF of 16-bit
    grey and alpha, refused as ``unsupported_format``, and how to save it; 8-bit grey and alpha is still read."""
    import tifffile

    from worker.decode import FrameError, decode, probe

    rng = np.random.default_rng(8)
    good = tmp_path / "part" / "good"
    for i in range(8):
        _write(good / f"{i}.png", sample(rng, 64)[0])
    grey = rng.integers(0, 1 << 16, (64, 64)).astype(np.uint16)
    for name, dtype, alpha in (("ga16.tif", np.uint16, 65535), ("ga8.tif", np.uint8, 255)):
        stored = grey if dtype == np.uint16 else (grey >> 8).astype(np.uint8)
        pixels = np.stack([stored, np.full_like(grey, alpha, dtype)], -1)
        tifffile.imwrite(good / name, pixels, photometric="minisblack", extrasamples=["unassalpha"])
    summary = summarise(load_category(tmp_path / "part"))
    problems = summary.problems()
    said, fix = "16-bit grey and alpha", "save such a TIFF without its extra channel (alpha), with 8-bit samples, or as PNG"
    assert problems == [f"1 TIFFs are of a layout whose header the worker does not read, so it refuses them as frames "
                        f"(unsupported_format): {good / 'ga16.tif'} ({said}); {fix}"], problems
    assert summary.channels == {"grey": 9} and summary.depths == {"8-bit": 9}, (summary.channels, summary.depths)
    with pytest.raises(FrameError) as refused:
        probe((good / "ga16.tif").read_bytes(), 10**6, 10**6)
    assert refused.value.code == "unsupported_format"
    assert refused.value.message == f"TIFF of {said} is not accepted (its header is not read in that layout): {fix}"
    data = (good / "ga8.tif").read_bytes()
    assert probe(data, 10**6, 10**6) == ("tiff", 64, 64)
    assert np.array_equal(decode(data)[:, :, 0], (grey >> 8).astype(np.uint8))


def test_a_colour_tiff_s_unassociated_alpha_darkens_its_pixels_alike_on_both_sides(tmp_path):
    """README said transparency is dropped on both sides, a transparent area read as the colour stored under it:
    true of PNG, but OpenCV reads a colour TIFF of unassociated alpha (the kind Pillow and most tools save) through
    libtiff's RGBA path, which multiplies each colour by its alpha, so a transparent area reads black.  Both sides
    decode alike (no fault in the code); this pins what README now says."""
    import tifffile

    from exporter.data import read_decoded
    from worker.decode import decode

    colour = np.full((16, 16, 3), 200, np.uint8)
    alpha = np.zeros((16, 16), np.uint8)
    alpha[:, 8:] = 255  # the left half transparent
    tifffile.imwrite(tmp_path / "a.tif", np.dstack([colour, alpha]), photometric="rgb", extrasamples=["unassalpha"])
    assert cv2.imwrite(str(tmp_path / "a.png"), np.dstack([colour, alpha]))
    for name, transparent in (("a.tif", 0), ("a.png", 200)):
        worker = decode((tmp_path / name).read_bytes())
        assert np.array_equal(worker, read_decoded(tmp_path / name)), name
        assert (worker[:, :8] == transparent).all() and (worker[:, 8:] == 200).all(), (name, worker[0, :, 0])
