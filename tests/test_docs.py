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


def test_the_reference_writer_refuses_arguments_it_does_not_know():
    """``--help`` or a typo of ``--check`` rewrote docs/configuration.md (any argument but --check did)."""
    out = ROOT / "docs" / "configuration.md"
    before = out.stat().st_mtime_ns
    for args, code in ((["--help"], 0), (["--chek"], 2)):
        proc = subprocess.run([sys.executable, "-m", "scripts.config_docs", *args], cwd=ROOT, capture_output=True,
                              text=True, timeout=60)
        assert proc.returncode == code and "usage: python -m scripts.config_docs" in proc.stdout + proc.stderr, proc
    assert out.stat().st_mtime_ns == before
