"""The benchmark command on the generated set: report files, absent categories, OpenVINO/torch parity."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading

import cv2
import numpy as np
import openvino as ov
import pytest
from bundle import read_manifest
from bundle.runtime import supported_precisions
from conftest import ROOT

from benchmarks.common import wait_for_answers
from benchmarks.thresholds import leave_one_out
from exporter.benchmark import absent_categories
from exporter.report import check_report_folder
from exporter.validation import BENIGN_KINDS


def test_benchmark_writes_a_report_with_parity_and_absent_categories(dataset, tmp_path):
    """Beside weave, a copy of it with one mask missing and one with 3 good images: those categories' rows are lost,
    named in the report, and the run goes on (one category's bad data stopped the whole benchmark).  Weave's
    threshold rests on 8 held-out normals, which train warns of and the benchmark now logs too.  A training
    image copied into weave's test/good is counted in the bundle's test metrics and the report (train warned of it,
    the report and bundle.json did not).  The report names the command line as given, every option included."""
    data, out = tmp_path / "data", tmp_path / "report"
    shutil.copytree(dataset / "weave", data / "weave")
    shutil.copy(min((data / "weave" / "train" / "good").glob("*.png")), data / "weave" / "test" / "good" / "copy.png")
    shutil.copytree(dataset / "weave", data / "partial")
    next((data / "partial" / "ground_truth").glob("*/*.png")).unlink()
    shutil.copytree(dataset / "weave", data / "few")  # 3 good training images: the run stopped at its thresholds
    for extra in sorted((data / "few" / "train" / "good").glob("*.png"))[3:]:
        extra.unlink()
    proc = subprocess.run([sys.executable, "-m", "exporter", "benchmark", "--data", str(data), "--models", "patchcore",
                           "--input-size", "128", "--out", str(out)], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert report["absent_categories"] == []  # not MVTec AD: its 15 categories were all listed as absent
    few, failed = report["failed"]  # in name order
    assert failed["category"] == "partial" and "mask" in failed["error"], failed
    assert few["category"] == "few" and "only 3 good training images" in few["error"], few
    assert f"Not benchmarked, its data unusable: patchcore / partial: {failed['error']}" in (out / "report.md").read_text()
    # train warns of a threshold set on 8 held-out normals; the benchmark said nothing of it (its F1 and rates rest on it)
    assert ("benchmark: weave: warning: only 8 held-out normals set the image threshold, so each of them moves it"
            in proc.stderr), proc.stderr[-3000:]
    (row,) = report["rows"]
    assert row["model"] == "patchcore" and row["category"] == "weave"
    assert row["parity"]["same_verdicts"] and row["parity"]["within_tolerance"], row["parity"]
    assert 0.5 < row["image_auroc"] <= 1 and 0.5 < row["pixel_auroc"] <= 1 and 0 < row["aupro"] <= 1
    assert row["bundle_bytes"] > 0 and set(row["detection_rate"]) == {"good", "hole", "scratch", "smear"}
    assert row["trained_test_images"] == 1 and row["images"] == 17 and "trained_images" not in row["training"], row
    manifest = read_manifest(out / "bundles" / "weave-patchcore")
    assert manifest.metrics["test"]["trained_test_images"] == 1
    assert len(manifest.training["trained_images"]) == 32 and all(len(d) == 16 for d in manifest.training["trained_images"])
    text = (out / "report.md").read_text()
    assert ("Warning, test images that are byte for byte training images (fitted or held out), so the figures above "
            "overstate the model: patchcore / weave 1 of 17.") in text, text
    assert (f"by `python -m exporter benchmark --data {data} --models patchcore --input-size 128 --out {out}` on "
            in text and report["command"] in text), text  # the options that ran (--input-size was left out)
    assert "| patchcore | weave |" in text and "Categories absent under the data root (not benchmarked): none." in text
    assert f"| {row['aupro']:.4f} |" in text and "AUPRO (FPR <= 0.3)" in text
    for plot in ("roc.png", "heatmaps-weave.png"):
        assert f"]({plot})" in text
        assert 1_000 < (out / plot).stat().st_size < 300_000
    assert (out / "bundles" / "weave-patchcore" / "bundle.json").is_file()


def test_a_report_folder_holding_the_users_own_report_is_refused_before_any_fit(dataset, tmp_path):
    """``--out`` an existing folder holding a report.md of the user's (a common name): the benchmark fitted every
    model and then wrote its report over it (and any roc.png).  Refused before any fit now, nothing written; a
    folder holding an earlier benchmark's report is still replaced (the session's report folder, run again)."""
    out = tmp_path / "mine"
    out.mkdir()
    (out / "report.md").write_text("my notes\n")
    (out / "notes.txt").write_text("mine too\n")
    proc = subprocess.run([sys.executable, "-m", "exporter", "benchmark", "--data", str(dataset), "--models",
                           "patchcore", "--input-size", "128", "--out", str(out)], capture_output=True, text=True,
                          timeout=600, cwd=ROOT)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.splitlines()[-1] == (f"error: --out {out} holds report.md, not an earlier benchmark's report: "
                                            "the report would be written over them; choose another folder")
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt", "report.md"]
    assert (out / "report.md").read_text() == "my notes\n"
    assert "features" not in proc.stderr  # refused before the fit
    (out / "report.json").write_text(json.dumps({"rows": []}))  # as an earlier benchmark left it: replaced
    check_report_folder(out)


def test_only_categories_asked_for_or_of_a_partial_mvtec_root_are_listed_absent():
    """A data root that is not MVTec AD had all 15 MVTec categories listed as absent in its report."""
    assert absent_categories(["weave", "partial"], None) == []
    assert absent_categories(["weave"], ["weave", "grid", "grid"]) == ["grid"]
    partial = absent_categories(["grid", "weave"], None)
    assert len(partial) == 14 and "grid" not in partial and "bottle" in partial


def test_a_category_without_test_images_is_named_unusable_before_its_fit(dataset, tmp_path):
    """A category of good training images only was fitted and exported, then ended the whole run with "need at least
    one array to concatenate" (no report, every other category's row lost).  It is refused with its reason now."""
    data, out = tmp_path / "data", tmp_path / "report"
    shutil.copytree(dataset / "weave" / "train", data / "untested" / "train")
    proc = subprocess.run([sys.executable, "-m", "exporter", "benchmark", "--data", str(data), "--models", "patchcore",
                           "--input-size", "128", "--out", str(out)], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1] == ("error: no category could be benchmarked: untested: unusable data: "
                                                    "no test images (none: test/ is absent, nothing to evaluate): add "
                                                    "test/good and test/<defect> images"), proc.stderr[-3000:]
    assert not (out / "bundles").exists()  # refused before its fit
    # a category or model named twice was benchmarked twice (fitted again into the same bundle, two rows of it)
    proc = subprocess.run([sys.executable, "-m", "exporter", "benchmark", "--data", str(data), "--models",
                           "patchcore,patchcore", "--categories", "untested,untested", "--out", str(out)],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 2 and proc.stderr.count("patchcore on untested cannot be run") == 1, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1].count("untested:") == 1, proc.stderr[-3000:]


def test_a_category_named_in_another_layout_is_benchmarked_and_none_found_says_why(dataset, tmp_path):
    """A user's own category in labelled folders (good/, scratch/), which ``train --category`` reads, was refused by
    ``benchmark --categories`` as "no requested category ... (found: [])"; without --categories the same words said
    nothing of why none was found."""
    data, out = tmp_path / "data", tmp_path / "report"
    shutil.copytree(dataset / "weave" / "train" / "good", data / "bracket" / "good")
    shutil.copytree(dataset / "weave" / "test" / "scratch", data / "bracket" / "scratch")
    command = [sys.executable, "-m", "exporter", "benchmark", "--data", str(data), "--models", "patchcore",
               "--input-size", "64", "--out", str(out)]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1] == (
        f"error: no category found under {data}: benchmark finds categories in the MVTec AD layout "
        "(CATEGORY/train/good) or with masks beside their images; name categories in another layout (labelled "
        "folders, a list) with --categories"), proc.stderr[-3000:]
    proc = subprocess.run([*command, "--categories", "bracket"], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert [(r["category"], r["images"]) for r in report["rows"]] == [("bracket", 6 + 4)], report["rows"]  # 1 in 5 goods
    assert report["failed"] == [] and report["absent_categories"] == []


def test_a_category_named_by_its_path_below_the_data_gets_its_report(dataset, tmp_path):
    """``--categories line1/bracket`` (a category one folder down) was fitted, exported and evaluated, and then the
    run ended at its report, ``[Errno 2] No such file or directory: '.../heatmaps-line1/bracket.png'``: no report of
    any category written.  Its plot is now named in the report's own folder and linked."""
    data, out = tmp_path / "data", tmp_path / "report"
    shutil.copytree(dataset / "weave" / "train" / "good", data / "line1" / "bracket" / "good")
    shutil.copytree(dataset / "weave" / "test" / "scratch", data / "line1" / "bracket" / "scratch")
    proc = subprocess.run([sys.executable, "-m", "exporter", "benchmark", "--data", str(data), "--models", "patchcore",
                           "--input-size", "64", "--categories", "line1/bracket", "--out", str(out)],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert [r["category"] for r in report["rows"]] == ["line1/bracket"], report["rows"]
    (plot,) = [p.name for p in out.glob("heatmaps-*.png")]
    assert plot.startswith("heatmaps-line1-bracket-") and (out / plot).stat().st_size > 1_000, plot
    assert f"]({plot})" in (out / "report.md").read_text()


def test_a_category_of_flat_images_efficientad_cannot_learn_is_named_not_the_end_of_the_run(tmp_path):
    """EfficientAD's refusal of flat normal images (no texture to learn) was a plain ValueError, which ended the whole
    benchmark: no report, and the rows of every category measured before it lost."""
    data, out = tmp_path / "data", tmp_path / "report"
    for folder, count, grey in (("train/good", 10, 100), ("test/good", 2, 105), ("test/hole", 2, 115)):
        (data / "flat" / folder).mkdir(parents=True)
        for i in range(count):
            image = np.full((64, 64, 3), grey + 10 * i, np.uint8)  # no two alike: no copies said
            if folder == "test/hole":
                image[20:30, 20:30] = 0
            assert cv2.imwrite(str(data / "flat" / folder / f"{i:03d}.png"), image)
    proc = subprocess.run([sys.executable, "-m", "exporter", "benchmark", "--data", str(data), "--models", "efficientad",
                           "--steps", "1", "--natural", str(data / "flat" / "train" / "good"), "--out", str(out)],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)  # photos here: ../shared may be absent
    assert proc.returncode == 2, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: no category could be benchmarked: flat: every one of the 10 normal images (or "
                           "tiles) is a single flat colour"), proc.stderr[-3000:]


def test_a_benchmark_of_efficientad_without_natural_photos_is_refused_before_any_fit(dataset, tmp_path):
    """``benchmark`` of both families (the default) where the natural photos are not (a box without ../shared, a
    --natural mistyped) fitted and exported PatchCore on the first category, then ended at EfficientAD's fit with
    "no natural images under ...": no report, the PatchCore rows lost.  Refused now before any fit, naming --natural."""
    out, missing = tmp_path / "report", tmp_path / "no-photos"
    proc = subprocess.run([sys.executable, "-m", "exporter", "benchmark", "--data", str(dataset), "--models",
                           "patchcore,efficientad", "--input-size", "256", "--natural", str(missing), "--out", str(out)],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1].startswith(f"error: --natural {missing}: no such folder, or no images "
                                                           "in it"), proc.stderr[-3000:]
    assert not out.exists(), sorted(out.rglob("*"))


def test_settings_are_compared_as_bundles_in_one_run_and_chosen_on_validation(dataset, tmp_path):
    """benchmarks.settings (test split, bundles, f32) and benchmarks.patchcore_sweep (validation split) end to end."""
    out = tmp_path / "settings"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.settings", "--data", str(dataset), "--category", "weave",
                           "--setting", "small=--input-size 64 --coreset-ratio 0.1",
                           "--setting", "capped=--input-size 96 --coreset-ratio 0.1 --max-bank 50",
                           "--fit-images", "40", "--repeats", "2", "--frames", "3", "--out", str(out)],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {line.split("|")[1].strip(): line for line in proc.stdout.splitlines() if line.startswith("| small")
            or line.startswith("| capped")}
    assert set(rows) == {"small", "capped"}
    assert "| 64 px |" in rows["small"] and "| 96 px | 50 |" in rows["capped"]  # the cap bounds the bank
    assert "OpenVINO at f32 (read back; asked f32)" in proc.stdout and "fit s (40 generated)" in proc.stdout
    manifest = json.loads((out / "capped" / "bundle.json").read_text())
    assert manifest["training"]["max_bank"] == 50 and set(manifest["precisions"]) == {"f32"}

    proc = subprocess.run([sys.executable, "-m", "benchmarks.patchcore_sweep", "--data", str(dataset), "--category",
                           "weave", "--natural", str(tmp_path / "none"),
                           "--config", "size=64,ratio=0.1,rows=40,seed=1,score=map_max,screen=10",
                           "--config", "size=64,ratio=0.1,rows=40,precision=int8"],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "weave, validation split" in proc.stdout
    cpu = ov.Core().get_property("CPU", "FULL_DEVICE_NAME")  # figures name the CPU and what each config really ran
    assert f"CPU: {cpu}; OpenVINO f32 (read back; asked f32), INT8 backbone; torch f32; fits: torch f32" in proc.stdout
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| size=64")]  # score=map_max: the key parses
    assert [r.split("|")[1].strip() for r in rows] == ["size=64,ratio=0.1,rows=40,seed=1,score=map_max,screen=10",
                                                       "size=64,ratio=0.1,rows=40,precision=int8"]  # by OpenVINO, INT8
    for row in rows:
        cells = [c.strip() for c in row.split("|")[1:-1]]
        assert cells[1] == "40" and all(0 <= float(c) <= 1 for c in cells[4:-2])  # AUROCs and AUPRO are real numbers
        flagged, of, total = cells[-2].split()  # benign variants of the held-out normals the threshold flags
        per_kind = [int(n) for n in cells[-1].split(" / ")]
        assert of == "of" and int(total) % len(BENIGN_KINDS) == 0 and int(total) > 0 and len(per_kind) == len(BENIGN_KINDS)
        assert sum(per_kind) == int(flagged) <= int(total)


def test_learning_benchmark_runs_the_scenario_as_the_worker_absorbs(bundle_dir, dataset):
    """benchmarks.learning end to end on the generated set: its table has a row per appearance, guard and number of
    labels, with real figures; one confirmed defect of each type guards the second row of each pair."""
    proc = subprocess.run([sys.executable, "-m", "benchmarks.learning", str(bundle_dir), "--data", str(dataset),
                           "--category", "weave", "--split", "test", "--margins", "0.8", "--labels", "1,2", "--trials", "2",
                           "--confirmed", "1"],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith(("| mark", "| glare"))]
    assert len(rows) == 8, proc.stdout  # two appearances, without and with the guard, 1 and 2 labels
    guards = []
    for row in rows:
        cells = [c.strip() for c in row.split("|")[1:-1]]
        assert cells[1] == "0.8" and cells[2] == "d4" and cells[5] in ("1", "2")  # margin, views (learning.views), labels
        guards.append(cells[3])
        assert 0 <= float(cells[4]) <= 1 and 0 <= float(cells[6].split()[0]) <= 1
        assert 0 <= int(cells[8]) <= 2 * 2  # labels a full extension cut short, over 2 trials of up to 2 labels
        drops = dict(part.rsplit(" ", 2)[0:2] for part in cells[11].split(", "))  # type -> median score drop, %
        assert drops and set(drops) == {c.split()[1] for c in cells[10].split(", ") if c.startswith("caught")}, cells
        assert all(-100 <= float(v) <= 100 for v in drops.values()), cells
        assert [int(n) >= 0 for n in cells[12].split(", ")] == [True, True]  # defects no longer caught, per order
    assert guards == ["none", "none", "confirmed", "confirmed"] * 2
    assert "precision f32" in proc.stdout and "Guard before absorption: image_auroc" in proc.stdout
    assert "confirmed defects (1 of each type, out of the guard set)" in proc.stdout
    # An extension too small for one label: the label is cut short as the worker cuts it, counted, and the run goes on.
    proc = subprocess.run([sys.executable, "-m", "benchmarks.learning", str(bundle_dir), "--data", str(dataset),
                           "--category", "weave", "--split", "test", "--margins", "0.8", "--labels", "1", "--trials", "1",
                           "--rows", "2"], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    cut = [int(line.split("|")[9]) for line in proc.stdout.splitlines() if line.startswith(("| mark", "| glare"))]
    assert len(cut) == 2 and max(cut) == 1, proc.stdout

def test_learning_benchmark_holds_out_the_normals_of_the_bundles_own_seed(bundle_dir, dataset, tmp_path):
    """The held-out normals are drawn with the seed the bundle's manifest records (it hard-coded 0), as
    benchmarks.thresholds reads it."""
    from benchmarks.learning import held_out_normals
    from exporter.build import VAL_FRACTION
    from exporter.data import load_category

    bundle = tmp_path / "bundle"
    shutil.copytree(bundle_dir, bundle)
    manifest = json.loads((bundle / "bundle.json").read_text())
    manifest["training"]["seed"] = 5
    (bundle / "bundle.json").write_text(json.dumps(manifest))
    cat = load_category(dataset, "weave")
    seed5, seed0 = (cat.split_train(VAL_FRACTION, seed)[1] for seed in (5, 0))
    assert seed5 != seed0  # the seeds draw other normals here
    got = held_out_normals(dataset, "weave", bundle)
    assert len(got) == len(seed5) and all(np.array_equal(g, cv2.imread(str(p), cv2.IMREAD_COLOR))
                                          for g, p in zip(got, seed5, strict=True))


def test_extension_benchmark_times_before_empty_and_full(dataset, bundle_dir, tmp_path):
    """benchmarks.extension end to end: a bundle exported without the extension (--extension-candidates 0) against
    the default one, empty and with real rows; the empty extension scores as the bundle without it."""
    before = tmp_path / "before"
    proc = subprocess.run([sys.executable, "-m", "exporter", "train", "--data", str(dataset), "--category", "weave",
                           "--out", str(before), "--input-size", "128", "--coreset-ratio", "0.05", "--no-eval",
                           "--precisions", "f32", "--extension-candidates", "0"],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "extension" not in json.loads((before / "bundle.json").read_text())
    proc = subprocess.run([sys.executable, "-m", "benchmarks.extension", "--before", str(before), "--after",
                           str(bundle_dir), "--data", str(dataset), "--category", "weave", "--rows", "300",
                           "--repeats", "2", "--frames", "3", "--profile", "2"],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line.split("|")[1].strip() for line in proc.stdout.splitlines() if line.startswith("| ")]
    assert rows == ["graph (per-op counters, 1 thread)", "before", "weave-patchcore, 1 row", "weave-patchcore, 300 rows",
                    "graph", "before", "extension 1 row", "extension 300 rows"], proc.stdout
    cells: dict[str, list[str]] = {}
    for line in proc.stdout.splitlines():  # the per-op table comes first; the latency table has a "before" row too
        if line.startswith(("| before", "| weave-patchcore")):
            cells.setdefault(line.split("|")[1].strip(), [c.strip() for c in line.split("|")[2:-1]])
    base = float(cells["before"][1])
    # The head ops are timed in every graph and the last column is their excess over the bundle without the
    # extension; its size (sub-millisecond, per-op counters of single frames vary run to run) is a benchmark figure.
    assert base > 0 and len(cells) == 3, proc.stdout
    for name in ("weave-patchcore, 1 row", "weave-patchcore, 300 rows"):
        heads, over = float(cells[name][1]), float(cells[name][2])
        assert heads > 0 and abs(heads - base - over) < 2e-3, (name, cells[name], base)
    assert "OpenVINO f32 (read back), LATENCY hint, batch 1" in proc.stdout
    (check,) = [line for line in proc.stdout.splitlines() if "empty extension vs before" in line]
    assert float(check.split("difference ")[1].split()[0]) < 1e-4, check


def test_latency_benchmark_times_exported_bundles_beside_graphs(bundle_dir):
    """benchmarks.latency --bundle: an exported bundle (its extension empty) timed in the rounds of a graph config."""
    proc = subprocess.run([sys.executable, "-m", "benchmarks.latency", "--config", "128:50", "--config", "128:50:int8",
                           "--config", "128:50:screen=10:refine=0.5", "--bundle", str(bundle_dir),
                           "--repeats", "2", "--frames", "2", "--threads", "1"],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [[c.strip() for c in line.split("|")[1:-1]] for line in proc.stdout.splitlines() if line.startswith("| ")]
    assert [r[0] for r in rows[1:]] == ["PatchCore graph, 128 px, 50 rows", "PatchCore graph, 128 px, 50 rows, INT8 backbone",
                                        "PatchCore graph, 128 px, 50 rows, screen 10, refine 0.5",
                                        f"bundle {bundle_dir.name}"], proc.stdout
    assert rows[4][1] == str(json.loads((bundle_dir / "bundle.json").read_text())["input"]["height"])
    assert all(float(r[2].split()[0]) > 0 for r in rows[2:]) and rows[1][3].startswith("1.00"), proc.stdout
    cpu = ov.Core().get_property("CPU", "FULL_DEVICE_NAME")
    assert f"CPU: {cpu}; OpenVINO f32 (read back; asked f32), INFERENCE_NUM_THREADS 1" in proc.stdout


@pytest.mark.parametrize("precision", ["f16", "bf16"])
def test_profile_names_the_cpu_and_the_precision_it_ran_or_refuses_one_the_cpu_lacks(bundle_dir, precision):
    """benchmarks.profile printed the precision it asked for: an f16 hint runs bf16 on a CPU without FP16 units, so
    it profiled bf16 under an f16 label.  It prints the CPU and the precision read back, and refuses, as the runtime
    does, a precision the CPU does not run natively."""
    proc = subprocess.run([sys.executable, "-m", "benchmarks.profile", str(bundle_dir), "--runs", "1",
                           "--precision", precision], capture_output=True, text=True, timeout=300, cwd=ROOT)
    core = ov.Core()
    if precision not in supported_precisions(core, "CPU"):
        assert proc.returncode == 2 and f"does not run {precision} natively" in proc.stderr, proc.stderr[-2000:]
        return
    assert proc.returncode == 0, proc.stderr[-3000:]
    cpu = core.get_property("CPU", "FULL_DEVICE_NAME")
    assert f"CPU: {cpu}; OpenVINO {precision} (read back; asked {precision})" in proc.stdout, proc.stdout


def test_latency_benchmark_refuses_a_folder_that_is_not_a_bundle_in_one_line(tmp_path):
    """A mistyped --bundle is a usage error naming the folder, before any graph is built or compiled."""
    proc = subprocess.run([sys.executable, "-m", "benchmarks.latency", "--config", "128:50", "--bundle", str(tmp_path)],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert f"--bundle: {tmp_path}: no bundle.json" in proc.stderr.splitlines()[-1], proc.stderr[-3000:]


def test_thresholds_benchmark_reports_leave_one_out_and_catches_per_rule(bundle_dir, dataset):
    """benchmarks.thresholds: the bundle's own rule reproduces its threshold; leave-one-out counts each normal once."""
    proc = subprocess.run([sys.executable, "-m", "benchmarks.thresholds", "--bundle", str(bundle_dir), "--data", str(dataset),
                           "--category", "weave", "--natural", str(dataset / "absent")],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [[c.strip() for c in line.split("|")[1:-1]] for line in proc.stdout.splitlines() if line.startswith("| ")]
    assert [r[0].split(" (")[0] for r in rows[1:]] == ["max(mean + 3 std, max)", "max of the normals"], proc.stdout
    manifest = json.loads((bundle_dir / "bundle.json").read_text())
    assert abs(float(rows[1][1]) - manifest["thresholds"]["image"]["threshold"]) < 1e-3, (rows, manifest["thresholds"])
    flagged, of = rows[2][2].split(" of ")
    assert int(of) > 0 and 0 <= int(flagged) <= 1  # left out, the highest normal is the only one the max can flag
    assert leave_one_out(np.array([1.0, 2.0]), np.min) == 1  # a normal never sets the threshold it is judged by
    assert "perlin" in rows[1][3] and "good 0/" in rows[1][4], proc.stdout
    validation = next(line for line in proc.stdout.splitlines() if line.startswith("validation split"))
    figures = [float(part.split()[-1]) for part in validation.split(": ", 1)[1].split(", ")]
    assert len(figures) == 3 and all(0.0 <= f <= 1.0 for f in figures), validation


def test_a_burst_rig_stops_waiting_when_answers_stop_or_a_worker_exits():
    """A lost frame ends a throughput or scale-out run with an error once answers stop, not after n seconds."""
    cond = threading.Condition()
    answered = [0]

    def answer_all() -> None:
        with cond:
            answered[0] = 5
            cond.notify_all()

    answerer = threading.Thread(target=answer_all)
    with cond:
        answerer.start()
        wait_for_answers(cond, lambda: answered[0], 5, lambda: True)  # returns once all five are in
        with pytest.raises(RuntimeError, match="5/6 frames answered and none for 0 s"):
            wait_for_answers(cond, lambda: answered[0], 6, lambda: True, stall_s=0.2)
        with pytest.raises(RuntimeError, match="a worker exited with 5/6"):
            wait_for_answers(cond, lambda: answered[0], 6, lambda: False)
    answerer.join()


def test_the_throughput_rig_counts_a_frame_on_its_result_when_no_heatmap_is_published(bundle_dir, dataset, tmp_path):
    """A worker variant with ``heatmap.publish: never`` can be measured: each result says no heatmap follows."""
    from benchmarks.throughput import WorkerRig

    images = sorted((dataset / "weave" / "test").rglob("*.png"))[:3]
    payloads = [cv2.imencode(".jpg", cv2.imread(str(p)))[1].tobytes() for p in images]
    rig = WorkerRig(bundle_dir, tmp_path, overrides={"heatmap.publish": "never"})
    try:
        rig.warm_up(payloads, 2)  # unmeasured, as throughput runs before each worker's first burst
        out = rig.run(payloads, 6, None, "t")
    finally:
        rig.close()
    sent = {f"t-{i}" for i in range(6)} | {"warm-0", "warm-1"}
    assert out["errors"] == 0 and rig.complete == rig.without_heatmap == sent


def test_reduced_decode_benchmark_compares_each_headroom_with_a_full_decode(dataset, bundle_dir):
    """benchmarks.reduced_decode end to end: a row per frame size and headroom; a full decode ("inf") is the exporter's
    own reading, so it changes nothing."""
    proc = subprocess.run([sys.executable, "-m", "benchmarks.reduced_decode", "--bundle", str(bundle_dir), "--data",
                           str(dataset), "--category", "weave", "--sizes", "560x560,700x500"],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [[c.strip() for c in line.split("|")[1:-1]] for line in proc.stdout.splitlines()
            if line.startswith("| ") and not line.startswith("| frame")]
    assert [(r[0], r[1]) for r in rows] == [(size, h) for size in ("560 x 560", "700 x 500") for h in ("1", "2", "inf")]
    assert all(r[2] == "1/1" and r[4] == "0.00 % / 0.00 %" and r[6].startswith("0 / ") for r in rows if r[1] == "inf")
    assert rows[0][2] == "1/4" and rows[1][2] == "1/2", rows  # 560 px for a 128 px model: to 140 px, or to 280
    assert f"CPU: {ov.Core().get_property('CPU', 'FULL_DEVICE_NAME')}; OpenVINO f32 (read back)" in proc.stdout


def test_coreset_report_takes_extraction_and_sampler_repeats_of_different_counts():
    """--extract-repeats and --repeats differ (run_all.sh: 1 and 3): the report pairs nothing across them, so it
    neither raises (it did, before --json was written) nor drops repeats."""
    from benchmarks.coreset import report

    timings = {"extract": [10.0], "extract channels_last": [9.0], "ours": [1.0, 2.0, 3.0],
               "stock (extrapolated)": [4.0, 4.0, 6.0]}
    rows, fit = report(timings, {"ours": {"image_auroc": 1.0, "pixel_auroc": 0.9, "model_bin_mb": 2.0}}, {"ours"},
                       cold=30.0)
    assert fit == [11.0, 12.0, 13.0]
    assert [r[0] for r in rows[1:]] == list(timings) and rows[3][1] == "2.0 [1.0-3.0]", rows


def test_coreset_report_keeps_the_cold_extraction_out_of_the_warm_series():
    """The fit's own first extraction is cold: a row of its own, not a sample of the warm series that the
    channels_last one is compared with, nor of the fit."""
    from benchmarks.coreset import report

    timings = {"extract": [10.0, 12.0], "extract channels_last": [9.0, 11.0], "ours": [1.0],
               "stock (extrapolated)": [4.0]}
    rows, fit = report(timings, {}, {"ours"}, cold=30.0)
    assert rows[0][:2] == ["extract, cold (the fit's own, 1 run)", "30.0"], rows
    assert rows[1][:2] == ["extract", "11.0 [10.0-12.0]"] and fit == [12.0], rows


def test_coreset_ratio_to_stock_is_paired_per_round():
    """"stock time / this" divides each round's stock time by the same round's sampler time (it divided the stock
    median by every round's)."""
    from benchmarks.coreset import report

    timings = {"extract": [10.0], "extract channels_last": [9.0], "ours": [1.0, 4.0, 2.0],
               "stock (extrapolated)": [2.0, 20.0, 2.0]}
    rows, _ = report(timings, {}, {"ours"}, cold=30.0)
    assert rows[3][0] == "ours" and rows[3][2] == "2.0 [1.0-5.0]", rows  # 2/1, 20/4, 2/2


def test_the_console_storms_requests_go_past_a_proxy_set_for_pip(tmp_path, broker, monkeypatch):
    """With http_proxy set (as setup.sh's pip needs it, without no_proxy) benchmarks/console_storm.py sent its
    requests to the console on 127.0.0.1 through the proxy, as scripts/demo.py did."""
    import urllib.request

    from benchmarks.console_storm import _get
    from conftest import write_config
    from scripts.broker import free_port
    from scripts.console_helpers import ConsoleProcess

    for name in ("http_proxy", "HTTP_PROXY"):
        monkeypatch.setenv(name, f"http://127.0.0.1:{free_port()}")  # nothing listens there
    for name in ("no_proxy", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(urllib.request, "_opener", None)  # urlopen's opener, read from the environment at first use
    port = free_port()
    console = ConsoleProcess(write_config(tmp_path / "w", broker.port, tmp_path / "no-bundle", console={"port": port}),
                             tmp_path / "console.log", port, timeout=30)
    try:
        assert _get(f"{console.url}/api/state")["broker"] is True
    finally:
        assert console.stop() == 0


def test_a_roc_plot_of_a_one_class_test_split_says_auroc_is_undefined_without_a_warning(tmp_path):
    """A test split of good images only (or of defects only): sklearn's UndefinedMetricWarning reached stderr from
    the report's ROC plot; the plot now says plainly that AUROC is undefined there."""
    import warnings

    from exporter.report import roc_plot

    rows = [{"model": "patchcore", "category": c, "image_auroc": auroc, "_labels": np.array(labels),
             "_scores": np.array([0.1, 0.5, 0.9])}
            for c, labels, auroc in (("good-only", [0, 0, 0], None), ("defects-only", [1, 1, 1], None),
                                     ("both", [0, 1, 1], 1.0))]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        roc_plot(rows, tmp_path / "roc.png")
    assert (tmp_path / "roc.png").stat().st_size > 0


def test_a_figure_undefined_at_another_precision_reads_n_a_and_a_plot_of_any_name_links_in_the_report():
    """A test split of good images only has no F1 (None): its row in the other-precisions table read "None"."""
    from exporter.report import markdown

    good_only = {"precision": "bf16", "images": 4, "image_f1": None, "detection_rate": {"good": 0.0}}
    row = {"model": "patchcore", "category": "c", "precision": "f32", "device": "a CPU", "image_f1": None,
           "seed_image_auroc": None, "train_s": 8.0, "bundle_bytes": 3_200_000, "detection_rate": {"good": 0.0},
           "training": {}, "other_precisions": {"bf16": good_only},
           "parity": {"max_relative_score_difference": 0.0, "score_rtol": 1e-3, "same_verdicts": True}}
    text = markdown([row], [], ["heatmaps-cable tie.png"], [], "python -m exporter benchmark")
    assert "| patchcore | c | bf16 | n/a | n/a | n/a | n/a | 0.0 |" in text, text
    # a category whose name holds a space: Markdown ends a bare link at the space, and the plot was not shown
    assert "![heatmaps-cable tie.png](heatmaps-cable%20tie.png)" in text, text
