"""scripts/demo.py's worker config: free ports, and every folder the worker writes is the demo's own, reset per run;
its report names the CPU and precision of its figures."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import yaml
from conftest import write_config
from pydantic import BaseModel

from scripts.broker import free_port
from scripts.console_helpers import ConsoleProcess
from scripts.demo import WORKER_STATE, demo_config, replay_fps, reset_worker_state, run, write_report
from worker.config import load_config


def _paths(model: BaseModel, where: str = "") -> dict[str, Path]:
    found: dict[str, Path] = {}
    for name in type(model).model_fields:
        value = getattr(model, name)
        if isinstance(value, Path):
            found[f"{where}{name}"] = value
        elif isinstance(value, BaseModel):
            found |= _paths(value, f"{where}{name}.")
    return found


def test_demo_config_takes_free_ports_and_keeps_every_worker_file_under_out(tmp_path):
    """metrics.port was config.yaml's 9108 (a busy one stopped the demo); every path the worker writes is in
    WORKER_STATE, so a second run starts from none of the first one's labels, spool, captures or rollouts."""
    out = tmp_path / "demo-out"
    out.mkdir()
    config = demo_config(out, 1883, out / "bundles" / "b")
    raw = yaml.safe_load(config.read_text())
    ports = [raw["metrics"]["port"], raw["console"]["port"]]
    assert 9108 not in ports and 8080 not in ports, ports
    for port in ports:
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))  # free when chosen (nothing else here holds it)

    paths = _paths(load_config(config))
    state = {f"{section}.{key}" for section, key in WORKER_STATE}
    written = {key for key in paths if key not in ("model.bundle", "model.cache_dir")}
    assert written == state, written ^ state
    assert all(paths[key] == out / WORKER_STATE[tuple(key.split("."))] for key in state)  # type: ignore[index]

    for rel in WORKER_STATE.values():
        target = out / rel
        if rel.endswith(".json"):
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text("{}")
        else:
            (target / "old").mkdir(parents=True)
    (out / "data" / "weave").mkdir()  # the generated data set and the compiled-model cache stay
    (out / "ov-cache").mkdir()
    reset_worker_state(out)
    assert not any((out / rel).exists() for rel in WORKER_STATE.values())
    assert (out / "data" / "weave").is_dir() and (out / "ov-cache").is_dir()


def test_demo_frames_per_second_start_at_the_publishers_first_frame():
    """The clock starts at the first frame's captured_at (the publisher stamps it as it sends it), not before the
    publisher process was launched, and stops at the last result's published_at."""
    results = [{"captured_at": "1800000010.000", "published_at": "2027-01-15T08:00:11.000+00:00"},
               {"captured_at": "1800000010.500", "published_at": "2027-01-15T08:00:12.000+00:00"}]
    assert replay_fps(results) == 1.0  # 2 results in the 2 s from 08:00:10 (1800000010) to 08:00:12


def test_demo_report_names_the_cpu_and_precision_of_its_figures(bundle_dir, tmp_path):
    """The README quotes the report's AUROC and frames/s: each differs from CPU to CPU and precision to precision, so
    the report names the bundle's measuring CPU and precision (metrics.test) and those the worker served at."""
    manifest = json.loads((bundle_dir / "bundle.json").read_text())
    test = manifest["metrics"]["test"]
    result = {"frame_id": "f0", "score": 1.0, "verdict": "normal", "latency_ms": {"infer": 1, "total": 2},
              "model": {"precision": "bf16"}}  # as a worker serving model.precision bf16 answers
    watcher = SimpleNamespace(total=1, results=[result], errors=[], heatmap_dir=tmp_path)
    report = write_report(tmp_path, manifest, watcher, {}, {"fps": 1.0, "wall_s": 1.0}, "f0",  # type: ignore[arg-type]
                          "Serving CPU").read_text()
    assert f"Quality measured on {test['device']} at {test['precision']}" in report
    assert "frames served on Serving CPU at bf16" in report


def test_the_demos_console_check_goes_past_a_proxy_set_for_pip(tmp_path, broker, monkeypatch):
    """Behind a proxy (http_proxy set, as setup.sh's pip needs it there, without no_proxy) the demo's check that its
    console answers on 127.0.0.1 was sent to the proxy, and the demo stopped: "the console did not start" (a helper's
    probe), though it had."""
    proxy = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    for name in ("http_proxy", "HTTP_PROXY"):
        monkeypatch.setenv(name, proxy)
    for name in ("no_proxy", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
    port = free_port()
    config = write_config(tmp_path / "w", broker.port, tmp_path / "no-bundle", console={"port": port})
    console = ConsoleProcess(config, tmp_path / "console.log", port, timeout=30)
    assert console.stop() == 0


def test_a_command_the_demo_prints_runs_as_it_did_when_pasted_into_a_shell(tmp_path, capfd):
    """The demo printed its commands joined by spaces: pasted, a path with a space (``--out "demo out"``, a data
    folder under ``My Data``) became two arguments, and a quote or ``$`` was read by the shell."""
    folder = tmp_path / "My Data's $HOME"
    folder.mkdir()
    env = {**os.environ, "RAN": str(tmp_path / "ran.jsonl")}
    script = "import json, os, sys; open(os.environ['RAN'], 'a').write(json.dumps(sys.argv[1:]) + '\\n')"
    run([sys.executable, "-c", script, "--data", folder, "a;b"], env=env)
    printed = capfd.readouterr().out.splitlines()[-1]
    assert printed.startswith("$ "), printed
    subprocess.run(["bash", "-c", printed[2:]], check=True, timeout=60, env=env)  # as pasted
    ran, pasted = (json.loads(line) for line in (tmp_path / "ran.jsonl").read_text().splitlines())
    assert pasted == ran == ["--data", str(folder), "a;b"], (ran, pasted)
