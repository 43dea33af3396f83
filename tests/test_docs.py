"""Docs that match the code: the configuration reference is generated and must be current."""

from __future__ import annotations

import subprocess
import sys

from conftest import ROOT


def test_configuration_reference_is_current():
    proc = subprocess.run([sys.executable, "-m", "scripts.config_docs", "--check"], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


def test_readme_names_the_two_commands_and_ci_runs_the_test_one():
    readme = (ROOT / "README.md").read_text()
    assert "bash scripts/demo.sh" in readme and "bash scripts/test.sh" in readme
    assert "bash scripts/test.sh" in (ROOT / ".ci" / "run").read_text()
