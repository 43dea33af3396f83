"""`exporter train --choose`: candidates fitted and scored on the data's own validation split, one exported by a rule."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from exporter.choose import CANDIDATES, LEVEL, Scored, candidate_names, pick
from exporter.synthetic import sample
from exporter.validation import BENIGN_KINDS, KINDS, benign_variants, examples, synthesise


def _scored(name: str, auroc: float, flagged: int) -> Scored:
    # pick reads the figures only; the fitted graph is not needed to rank them
    return Scored(name, None, auroc, None, None, flagged, 60, 1.0)  # type: ignore[arg-type]


def test_the_rule_takes_the_best_image_auroc_then_fewest_benign_flags_then_the_cheaper():
    assert pick([_scored("fast", 0.90, 0), _scored("default", 0.90 + 2 * LEVEL, 9)]).name == "default"
    assert pick([_scored("fast", 0.90, 3), _scored("default", 0.90 + LEVEL / 2, 5)]).name == "fast"
    assert pick([_scored("fast", 0.90, 5), _scored("default", 0.90 + LEVEL / 2, 3)]).name == "default"
    assert pick([_scored("fast", 0.90, 4), _scored("default", 0.90 + LEVEL / 2, 4),
                 _scored("fine", 0.90 + LEVEL, 4)]).name == "fast"


def test_candidate_names_come_in_cost_order_and_unknown_or_single_ones_are_refused():
    assert candidate_names("default, fast") == ["fast", "default"]
    assert candidate_names("fine,fast,default") == list(CANDIDATES)
    with pytest.raises(ValueError, match="unknown candidates"):
        candidate_names("fast,quick")
    with pytest.raises(ValueError, match="at least two"):
        candidate_names("fast,fast")


def test_the_streamed_validation_split_is_the_one_the_sweeps_draw(tmp_path):
    rng = np.random.default_rng(5)
    paths = []
    for i in range(3):
        paths.append(tmp_path / f"{i}.png")
        cv2.imwrite(str(paths[-1]), sample(rng, 96)[0])
    normals = [cv2.imread(str(p), cv2.IMREAD_COLOR) for p in paths]
    streamed = list(examples(paths, seed=2, kinds=KINDS))
    assert [e.kind for e in streamed if e.mask is not None] == [a.kind for a in synthesise(normals, 2, [], KINDS)]
    for got, want in zip([e for e in streamed if e.mask is not None], synthesise(normals, 2, [], KINDS), strict=True):
        assert np.array_equal(got.image, want.image) and np.array_equal(got.mask, want.mask)
    benign = [e for e in streamed if e.benign]
    assert [(e.benign, e.image.tobytes()) for e in benign] == [(k, v.tobytes()) for k, v in benign_variants(normals, 2)]
    assert [e.image.tobytes() for e in streamed if e.kind == "good" and not e.benign] == [n.tobytes() for n in normals]
    assert len(streamed) == 3 * (1 + len(KINDS) + len(BENIGN_KINDS))


def _train(dataset: Path, out: Path, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "exporter", "train", "--data", str(dataset), "--category", "weave",
                           "--out", str(out), *flags], capture_output=True, text=True, timeout=900)


def test_choose_exports_the_winner_and_records_every_candidate(dataset, tmp_path):
    proc = _train(dataset, tmp_path / "chosen", "--choose", "fast,default", "--precisions", "f32", "--coreset-ratio",
                  "0.02")
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = json.loads((tmp_path / "chosen" / "bundle.json").read_text())
    chosen = manifest["training"]["chosen"]
    table = {c["name"]: c for c in chosen["candidates"]}
    assert list(table) == ["fast", "default"]
    winner = table[chosen["winner"]]
    assert manifest["input"]["width"] == winner["input_size"] == {"fast": 256, "default": 512}[chosen["winner"]]
    assert manifest["training"]["coreset_ratio"] == 0.02  # the option given applies to every candidate
    assert chosen["validation"]["normals"] == manifest["training"]["threshold_images"]
    for row in table.values():
        assert 0 <= row["benign_flagged"] <= row["benign_total"] == manifest["training"]["threshold_images"] * len(BENIGN_KINDS)
        assert 0.0 <= row["image_auroc"] <= 1.0 and row["aupro"] is not None
    best = max(row["image_auroc"] for row in table.values())
    assert winner["image_auroc"] >= best - LEVEL
    assert f"chosen: {chosen['winner']}" in proc.stdout
    normals = manifest["training"]["threshold_images"]
    assert f"note: only {normals} held-out normals" in proc.stdout  # the generated set is small: the ranking is coarse
    assert manifest["metrics"]["test"]["image_auroc"] is not None  # the test split is scored once, for the winner


@pytest.mark.parametrize("flags, message", [
    (("--choose", "fast,default", "--input-size", "384"), "--input-size cannot be given with --choose"),
    (("--choose", "fast"), "at least two"),
    (("--choose", "fast,default", "--model", "efficientad"), "--choose picks among PatchCore settings"),
    (("--validation-photos", "/tmp"), "--validation-photos is for --choose"),
])
def test_choose_refuses_what_it_cannot_honour_before_any_fit(dataset, tmp_path, flags, message):
    proc = _train(dataset, tmp_path / "out", *flags)
    assert proc.returncode == 2
    assert message in proc.stderr
    assert ": fitting" not in proc.stderr  # refused before the first candidate was fitted
    assert not (tmp_path / "out").exists()


def test_validation_photos_that_are_not_there_are_refused_before_the_data_is_read(tmp_path, capsys):
    """A `--validation-photos` folder mistyped, or holding no photos, was dropped without a word: every candidate's
    anomalies were filled with noise, which the bundle's record of the choice does not say."""
    from exporter.__main__ import main

    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("photos go here\n")
    for photos in (tmp_path / "typo", empty):
        assert main(["train", "--data", str(tmp_path / "absent"), "--out", str(tmp_path / "out"), "--choose",
                     "fast,default", "--validation-photos", str(photos)]) == 2
        err = capsys.readouterr().err
        assert f"error: --validation-photos {photos}: no such folder, or it holds no .jpg or .png photos" in err, err
        assert "no such folder or list file" not in err  # refused before the data was looked at
