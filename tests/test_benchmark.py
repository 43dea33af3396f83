"""The benchmark command on the generated set: report files, absent categories, OpenVINO/torch parity."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import ROOT


def test_benchmark_writes_a_report_with_parity_and_absent_categories(dataset, tmp_path):
    out = tmp_path / "report"
    proc = subprocess.run([sys.executable, "-m", "exporter", "benchmark", "--data", str(dataset), "--models", "patchcore",
                           "--input-size", "128", "--out", str(out)], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert "grid" in report["absent_categories"] and "weave" not in report["absent_categories"]
    (row,) = report["rows"]
    assert row["model"] == "patchcore" and row["category"] == "weave"
    assert row["parity"]["same_verdicts"] and row["parity"]["within_tolerance"], row["parity"]
    assert 0.5 < row["image_auroc"] <= 1 and 0.5 < row["pixel_auroc"] <= 1 and 0 < row["aupro"] <= 1
    assert row["bundle_bytes"] > 0 and set(row["detection_rate"]) == {"good", "hole", "scratch", "smear"}
    text = (out / "report.md").read_text()
    assert "| patchcore | weave |" in text and "Categories absent" in text
    assert f"| {row['aupro']:.4f} |" in text and "AUPRO (FPR <= 0.3)" in text
    for plot in ("roc.png", "heatmaps-weave.png"):
        assert f"]({plot})" in text
        assert 1_000 < (out / plot).stat().st_size < 300_000
    assert (out / "bundles" / "weave-patchcore" / "bundle.json").is_file()
