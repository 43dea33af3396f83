"""The validation split that settings are chosen on: synthetic anomalies on held-out normals, with exact masks."""

from __future__ import annotations

import shutil

import cv2
import numpy as np
import pytest
import torch

from exporter.data import hold_out_defects, load_category
from exporter.synthetic import DEFECTS, generate, sample
from exporter.thresholds import VAL_DEFECT_FRACTION
from exporter.validation import BENIGN_KINDS, HARD_KINDS, KINDS, benign_variants, natural_photos, synthesise


@pytest.fixture(scope="module")
def normals() -> list[np.ndarray]:
    rng = np.random.default_rng(3)
    return [cv2.cvtColor(sample(rng, 160)[0], cv2.COLOR_GRAY2BGR) for _ in range(3)]


def test_every_kind_changes_the_image_only_inside_its_mask(normals):
    kinds = KINDS + HARD_KINDS
    made = synthesise(normals, seed=1, kinds=kinds)
    assert [a.kind for a in made] == list(kinds) * len(normals)
    for i, anomaly in enumerate(made):
        normal = normals[i // len(kinds)]
        assert anomaly.image.shape == normal.shape and anomaly.mask.shape == normal.shape[:2]
        assert anomaly.mask.any(), anomaly.kind
        changed = np.abs(anomaly.image.astype(int) - normal.astype(int)).max(axis=2) > 0
        assert changed.any(), anomaly.kind
        assert not (changed & (anomaly.mask == 0)).any(), f"{anomaly.kind} changed pixels outside its mask"


def test_a_deformation_of_a_small_image_is_never_the_image_itself():
    """The deformation's bump scales with the image: on images under about 200 px it often moved no pixel by the 2
    its mask counts, and the normal image itself was counted as an anomaly in ``--choose``'s validation."""
    rng = np.random.default_rng(4)
    small = [cv2.cvtColor(sample(rng, 64)[0], cv2.COLOR_GRAY2BGR) for _ in range(40)]
    for normal, anomaly in zip(small, synthesise(small, seed=2, kinds=("deform",)), strict=True):
        assert anomaly.mask.any() and not np.array_equal(anomaly.image, normal)


def test_the_same_seed_gives_the_same_set_and_another_seed_another(normals):
    first = synthesise(normals, seed=5)
    torch.rand(7)  # whatever ran before (a fit, a model) must not change the set
    again, other = synthesise(normals, seed=5), synthesise(normals, seed=6)
    assert all(np.array_equal(a.image, b.image) and np.array_equal(a.mask, b.mask) for a, b in zip(first, again, strict=True))
    assert not all(np.array_equal(a.mask, b.mask) for a, b in zip(first, other, strict=True))


def test_perlin_fills_from_natural_photos_when_given(normals, tmp_path):
    photo = np.zeros((64, 64, 3), np.uint8)
    photo[..., 1] = 255  # pure green: anomalib's colour augmentations keep it coloured; a grey fill stays grey
    cv2.imwrite(str(tmp_path / "green.png"), photo)
    assert natural_photos(tmp_path) == [tmp_path / "green.png"] and natural_photos(tmp_path / "absent") == []

    def colour(photos: list) -> float:
        """Mean channel spread inside the masks over a few draws (some augmentations turn any fill grey)."""
        made = synthesise(normals, seed=2, photos=photos, kinds=("perlin",))
        inside = np.concatenate([m.image[m.mask > 0].astype(int) for m in made])
        return float((inside.max(axis=1) - inside.min(axis=1)).mean())

    assert colour(natural_photos(tmp_path)) > 20
    assert colour([]) < 3


def test_an_unknown_kind_is_refused(normals):
    with pytest.raises(ValueError, match="unknown anomaly kind"):
        synthesise(normals, kinds=("dent",))


def test_benign_variants_change_every_image_a_little_and_are_drawn_apart_from_the_anomalies(normals):
    made = benign_variants(normals, seed=4)
    assert [k for k, _ in made] == list(BENIGN_KINDS) * len(normals)
    for i, (kind, image) in enumerate(made):
        normal = normals[i // len(BENIGN_KINDS)]
        assert image.shape == normal.shape and image.dtype == np.uint8, kind
        assert np.abs(image.astype(int) - normal.astype(int)).mean() > 0, kind
        assert abs(image.mean() - normal.mean()) < 20 and abs(image.std() - normal.std()) < 20, kind  # drift, not another picture
    synthesise(normals, seed=4)  # drawing the anomalies in between changes nothing
    assert all(np.array_equal(a, b) for (_, a), (_, b) in zip(made, benign_variants(normals, seed=4), strict=True))
    assert not all(np.array_equal(a, b) for (_, a), (_, b) in zip(made, benign_variants(normals, seed=5), strict=True))
    with pytest.raises(ValueError, match="unknown benign kind"):
        benign_variants(normals, kinds=("flood",))


def test_copies_of_a_defect_are_held_out_for_the_recall_threshold_together(tmp_path):
    """A defect held out to choose a recall threshold had its byte-for-byte copies (another name) left in the test
    split, whose recall then counted an image the threshold was chosen on."""
    root = generate(tmp_path, size=32, n_train=8, n_test=4)
    for i in range(3):
        shutil.copy(root / "test" / "hole" / "000.png", root / "test" / "hole" / f"copy{i}.png")
        shutil.copy(root / "ground_truth" / "hole" / "000_mask.png", root / "ground_truth" / "hole" / f"copy{i}_mask.png")
    category = load_category(tmp_path, "weave")
    for seed in range(6):
        rest, held = hold_out_defects(category, VAL_DEFECT_FRACTION, seed)
        held_bytes = {s.path.read_bytes() for s in held}
        assert not [s.path.name for s in rest.test if s.path.read_bytes() in held_bytes], seed
        assert {s.defect for s in rest.test} == {s.defect for s in category.test}  # every type is still tested
        assert {s.defect for s in held} == set(DEFECTS)


def test_every_kind_marks_and_changes_pixels_of_small_and_narrow_images():
    """Below about 40 px a cut-paste piece or a deformation's bump could mark no pixel, or a Perlin blob be turned
    off the image: the normal image itself was counted as an anomaly; a side of 16 px stopped the Perlin draw with
    a RuntimeError from anomalib."""
    rng = np.random.default_rng(6)
    shapes = [(16, 16), (20, 20), (24, 24), (32, 32), (12, 90), (90, 14)]
    small = [cv2.cvtColor(cv2.resize(sample(rng, 96)[0], (w, h), interpolation=cv2.INTER_AREA), cv2.COLOR_GRAY2BGR)
             for h, w in shapes for _ in range(3)]
    kinds = KINDS + HARD_KINDS
    for seed in range(3):
        for i, anomaly in enumerate(synthesise(small, seed=seed, kinds=kinds)):
            normal = small[i // len(kinds)]
            assert anomaly.mask.shape == normal.shape[:2], anomaly.kind
            assert anomaly.mask.any() and not np.array_equal(anomaly.image, normal), (anomaly.kind, normal.shape, seed)
