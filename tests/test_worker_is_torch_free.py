"""The edge box gets no torch and no anomalib: neither by import nor by dependency."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import ROOT

FORBIDDEN = {"torch", "torchvision", "anomalib", "lightning", "timm", "nncf"}


def test_importing_the_worker_imports_no_torch():
    code = (
        "import sys, worker.__main__, worker.service, worker.pipeline, worker.query, worker.console.app, bundle.runtime\n"
        f"bad = sorted(m for m in sys.modules if m.split('.')[0] in {sorted(FORBIDDEN)!r})\n"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_worker_extra_does_not_pull_torch(tmp_path):
    report = tmp_path / "report.json"
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet", "--report",
         str(report), f"{ROOT}[worker]"],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    names = {item["metadata"]["name"].lower().replace("_", "-") for item in json.loads(report.read_text())["install"]}
    assert "openvino" in names and "paho-mqtt" in names and "qdrant-client" in names
    assert not names & FORBIDDEN, sorted(names & FORBIDDEN)
