"""Docs that match the code: the configuration reference is generated and must be current."""

from __future__ import annotations

import re
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


def _worker_api() -> str:
    readme = (ROOT / "README.md").read_text()
    return readme[readme.index("### Worker API (MQTT v5)"):readme.index("### Operating it")]


def test_every_error_code_is_in_the_readme_table_and_every_row_is_a_code():
    """The error table is what an integrator matches ``code`` against: a code the worker can publish that it lacks
    is one a PLC's flow cannot handle, a row of no code one it waits for in vain."""
    from worker.wire import ErrorCode

    rows = re.findall(r"^\| `([a-z_]+)` \| ([a-z, ]+) \|", _worker_api(), re.MULTILINE)
    assert sorted(code for code, _ in rows) == sorted(c.value for c in ErrorCode)


def test_every_topic_of_the_api_is_in_the_readme_table():
    """worker/topics.py is every topic the worker reads or writes; the README's table is what integrators read."""
    import worker.topics
    from worker.topics import Topics

    topics = Topics("<prefix>", "<worker_id>")
    names = [topics.frame("<camera>"), topics.result("<camera>"), topics.heatmap("<camera>"),
             topics.error("<camera>"), topics.query, topics.label, topics.availability, topics.model, topics.stats,
             topics.control]
    rows = set(re.findall(r"^\| `(<prefix>/[^`]+)` \|", _worker_api(), re.MULTILINE))
    assert rows == set(names)
    assert all(name in (worker.topics.__doc__ or "") for name in names)  # and the module's own list
