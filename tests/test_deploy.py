"""deploy/: the files users copy must at least be valid here (what cannot run here is said in deploy/README.md)."""

from __future__ import annotations

import shutil
import subprocess

import pytest
import yaml

from conftest import ROOT
from worker.config import load_config

DEPLOY = ROOT / "deploy"


def test_production_worker_config_validates():
    cfg = load_config(DEPLOY / "worker.yaml", environ={"EDGE_INSPECT__MQTT__PASSWORD": "x"})
    assert cfg.mqtt.tls is not None and cfg.mqtt.port == 8883 and cfg.topics.share_group


def test_compose_file_wires_the_worker_to_the_broker_and_qdrant():
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    assert set(compose["services"]) == {"mosquitto", "qdrant", "worker"}
    env = compose["services"]["worker"]["environment"]
    assert env["EDGE_INSPECT__STORE__URL"].startswith("http://qdrant:")
    assert "python -m worker --config" in compose["services"]["worker"]["command"]


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed here")
def test_systemd_unit_verifies():
    proc = subprocess.run(["systemd-analyze", "verify", str(DEPLOY / "systemd" / "edge-inspect-worker.service")],
                          capture_output=True, text=True, timeout=60)
    problems = [line for line in proc.stderr.splitlines()
                if "edge-inspect-worker.service" in line and "No such file or directory" not in line]  # not installed here
    assert not problems, proc.stderr
