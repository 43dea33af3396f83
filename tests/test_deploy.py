"""deploy/: the files users copy must at least be valid here (what cannot run here is said in deploy/README.md)."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import cv2
import numpy as np
import paho.mqtt.client as mqtt
import pytest
import yaml
from conftest import ROOT, Client, good_png, killed_after, user_props, wait_online, write_config
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from scripts.broker import Broker, broker_readable_dir, free_port, tls_broker
from worker.config import load_config
from worker.wire import valid_id

DEPLOY = ROOT / "deploy"


def test_production_worker_config_validates():
    cfg = load_config(DEPLOY / "worker.yaml", environ={"EDGE_INSPECT__MQTT__PASSWORD": "x"})
    assert cfg.mqtt.tls is not None and cfg.mqtt.port == 8883


def test_the_production_config_keeps_a_lone_workers_frames_across_a_restart_and_offers_the_group_as_an_opt_in(tmp_path):
    """worker.yaml shipped a share group with mqtt.session_expiry_s 0: a worker alone (the common box) lost every
    frame sent while it restarted (a probe: 206 of 300), against the unit's and docs/reliability.md's promise.  Now
    it keeps a persistent session, and the group's settings are commented out, to be set together."""
    text = (DEPLOY / "worker.yaml").read_text()
    cfg = load_config(DEPLOY / "worker.yaml", environ={"EDGE_INSPECT__MQTT__PASSWORD": "x"})
    assert cfg.topics.share_group is None and cfg.mqtt.session_expiry_s > 0
    opted_in = tmp_path / "group.yaml"
    opted_in.write_text(re.sub(r"^(\s*)# ((?:share_group|session_expiry_s|keepalive_s): )", r"\1\2", text, flags=re.M))
    group = load_config(opted_in, environ={"EDGE_INSPECT__MQTT__PASSWORD": "x"})
    assert group.topics.share_group and group.mqtt.session_expiry_s == 0 and group.mqtt.keepalive_s <= 10


def test_every_path_the_production_config_writes_is_one_the_unit_lets_the_worker_write():
    """mqtt.session_file was left at its default, in config.yaml's folder, which the unit makes read-only: the worker
    warned at every connect that it could not remember its subscriptions."""
    cfg = load_config(DEPLOY / "worker.yaml", environ={"EDGE_INSPECT__MQTT__PASSWORD": "x"})
    unit = (DEPLOY / "systemd" / "edge-inspect-worker.service").read_text()
    writable = [Path(p) for line in unit.splitlines() if line.startswith("ReadWritePaths=") for p in line.split("=", 1)[1].split()]
    written = {"store.path": cfg.store.path, "evidence.path": cfg.evidence.path, "spool.path": cfg.spool.path,
               "learning.path": cfg.learning.path, "capture.path": cfg.capture.path,
               "capture.export_path": cfg.capture.export_path, "model.cache_dir": cfg.model.cache_dir,
               "model.rollout_path": cfg.model.rollout_path, "mqtt.session_file": cfg.mqtt.session_file}
    outside = {key: str(path) for key, path in written.items()
               if path is not None and not any(w == path or w in path.parents for w in writable)}
    assert writable and not outside, (writable, outside)


def test_compose_file_wires_the_worker_to_the_broker_and_qdrant():
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    assert set(compose["services"]) == {"mosquitto", "qdrant", "worker", "console"}
    env = compose["services"]["worker"]["environment"]
    assert env["EDGE_INSPECT__STORE__URL"].startswith("http://qdrant:")
    assert "python -m worker --config" in compose["services"]["worker"]["command"]


def test_the_compose_console_logs_in_as_the_acls_console_and_its_page_asks_for_a_login():
    console = yaml.safe_load((DEPLOY / "compose.yaml").read_text())["services"]["console"]
    assert "python -m worker console --config /etc/edge-inspect/config.yaml" in console["command"]
    environ = {k: str(v) for k, v in console["environment"].items() if not str(v).startswith("${")}
    cfg = load_config(DEPLOY / "worker.yaml", environ={**environ, "EDGE_INSPECT__MQTT__PASSWORD": "x",
                                                        "EDGE_INSPECT__CONSOLE__PASSWORD": "y"})
    assert cfg.mqtt.username == "console" and cfg.mqtt.host == "mosquitto" and cfg.console.username
    acl = (DEPLOY / "mosquitto" / "acl").read_text().split("\nuser ")
    rights = next(block for block in acl if block.startswith("console\n"))
    assert "topic write inspect/workers/+/control" in rights
    assert all(p.startswith("127.0.0.1:") for p in console["ports"]), console["ports"]


def test_the_compose_worker_publishes_its_metrics_on_the_boxs_loopback_only():
    """The worker's /metrics and /healthz, which have no login, were published on every address of the box (camera
    ids, counts and models to anyone on the line's network) while the console's page was kept to loopback."""
    worker = yaml.safe_load((DEPLOY / "compose.yaml").read_text())["services"]["worker"]
    assert worker["ports"] and all(p.startswith("127.0.0.1:") for p in worker["ports"]), worker["ports"]


def test_compose_certificate_names_the_broker_as_the_worker_does_and_pip_builds_outside_the_read_only_tree():
    """The certificate was made for ``mqtt`` while the worker connects to ``mosquitto`` (TLS: hostname mismatch),
    and ``pip install '.[worker]'`` ran in the read-only /app mount, where pip's in-tree build cannot write."""
    text = (DEPLOY / "compose.yaml").read_text()
    compose = yaml.safe_load(text)
    worker = compose["services"]["worker"]
    made_for = re.search(r"make-certs\.sh deploy/mosquitto/certs (\S+)", text)
    assert made_for and made_for[1] == worker["environment"]["EDGE_INSPECT__MQTT__HOST"] in compose["services"]
    read_only = [v.split(":")[1] for v in worker["volumes"] if v.startswith("..:") and v.endswith(":ro")]
    assert read_only == ["/app"], worker["volumes"]
    for service, extra in ((worker, "worker"), (compose["services"]["console"], "console")):
        installs = re.findall(rf"pip install [^&]*?'([^'\[]+)\[{extra}\]'", service["command"])
        assert installs and all(i.startswith("/tmp/") for i in installs), installs


def test_compose_says_where_to_put_the_bundle_worker_yaml_names():
    """compose.yaml mounts ./bundles, which compose reads relative to the file (deploy/bundles), where worker.yaml's
    model.bundle lies, and its steps never said to put a bundle there: docker makes an empty folder for a missing
    bind-mount source, and the worker exited 2, "no bundle"."""
    text = (DEPLOY / "compose.yaml").read_text()
    worker = yaml.safe_load(text)["services"]["worker"]
    bundle = load_config(DEPLOY / "worker.yaml", environ={"EDGE_INSPECT__MQTT__PASSWORD": "x"}).model.bundle
    source, target = next((src, Path(dst)) for src, dst, *_ in (v.split(":") for v in worker["volumes"])
                          if Path(dst) in Path(bundle).parents)
    host = (DEPLOY / source / Path(bundle).relative_to(target)).resolve().relative_to(ROOT)
    steps = "\n".join(line for line in text.splitlines() if line.startswith("#"))
    assert f"{host.parent}/" in steps and host.name in steps, (str(host), steps)


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed here")
@pytest.mark.parametrize("unit", ["edge-inspect-worker.service", "edge-inspect-console.service"])
def test_systemd_unit_verifies(unit):
    proc = subprocess.run(["systemd-analyze", "verify", str(DEPLOY / "systemd" / unit)],
                          capture_output=True, text=True, timeout=60)
    problems = [line for line in proc.stderr.splitlines()
                if unit in line and "No such file or directory" not in line]  # not installed here
    assert not problems, proc.stderr


def test_the_unit_leaves_config_errors_down_restarts_the_rest_and_waits_out_the_slowest_stop():
    """The unit restarted exit 2 (a config or bundle error: no restart can mend it) every 5 s until its start limit,
    left the worker down after a stray SIGHUP (exit 0), and its TimeoutStopSec (60 s) was shorter than the stop's
    own bounds, so systemd could SIGKILL a slow stop mid-flush."""
    unit = dict(line.split("=", 1) for line in (DEPLOY / "systemd" / "edge-inspect-worker.service").read_text().splitlines()
                if "=" in line and not line.startswith("#"))
    assert unit["Restart"] == "always" and "2" in unit["RestartPreventExitStatus"].split()
    # Worker.shutdown's steps, each bounded, add up past it (the export in hand, the wait for a broker that is away):
    # one deadline bounds them all, and the dead man's switch armed for the stop fires only past it
    from worker.service import STOP_S, STOPPED_S

    assert int(unit["TimeoutStopSec"]) > STOP_S + STOPPED_S


def test_under_the_journal_lines_carry_their_priority_and_no_timestamp_of_their_own(tmp_path):
    """Under systemd every line carried its own timestamp (two in journalctl) and no syslog priority, so
    ``journalctl -p warning`` missed the worker's warnings and errors.  With stderr the journal's stream
    (JOURNAL_STREAM names its device and inode) each line starts with the sd-daemon ``<N>`` prefix; a stderr that
    is not that stream (a redirected child inherits the variable) keeps the terminal's format."""
    config = tmp_path / "config.yaml"
    config.write_text("model: {bundle: /nonexistent}\nmetrics: {port: not-a-port}\n")
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("EDGE_INSPECT")}, "EDGE_INSPECT_MQTT_PORT": "1"}
    said = {}
    for case in ("journal", "elsewhere"):
        log = tmp_path / f"{case}.log"
        with log.open("wb") as out:
            st = os.fstat(out.fileno())
            stream = f"{st.st_dev}:{st.st_ino}" if case == "journal" else f"{st.st_dev}:{st.st_ino + 1}"
            code = subprocess.run([sys.executable, "-m", "worker", "--config", str(config)], cwd=ROOT, stderr=out,
                                  env={**env, "JOURNAL_STREAM": stream}, timeout=60).returncode
        assert code == 2
        said[case] = log.read_text().splitlines()
    journal, elsewhere = said["journal"], said["elsewhere"]
    assert len(journal) == 2 and journal[0].startswith("<4>WARNING worker.config: EDGE_INSPECT_MQTT_PORT is ignored"), journal
    assert journal[1].startswith(f"<3>error: {config}: metrics.port: "), journal
    assert re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} WARNING worker.config: ", elsewhere[0]), elsewhere
    assert elsewhere[1].startswith("error: "), elsewhere


# -- deploy/camera_publisher.py: a real mosquitto, the publisher as a subprocess, a paho subscriber ----------------

PUBLISHER = DEPLOY / "camera_publisher.py"
# <start time>-<random hex>-<frame number>[-<path under --folder>]
PUBLISHER_ID = re.compile(r"^\d{8}T\d{6}-[0-9a-f]{4}-(\d{8})(?:-(.+))?$")


class Publisher:
    """camera_publisher.py as a process; its output goes to a file (a pipe nobody reads would block it)."""

    def __init__(self, folder: Path, port: int, *args: str) -> None:
        self.log_path = folder / f"publisher-{uuid.uuid4().hex[:8]}.log"
        self.log = self.log_path.open("wb")
        self.proc = subprocess.Popen([sys.executable, str(PUBLISHER), "--port", str(port), *args], cwd=ROOT,
                                     stdout=self.log, stderr=subprocess.STDOUT)

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_output(self, text: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.output():
            assert self.proc.poll() is None, f"the publisher exited ({self.proc.returncode}):\n{self.output()[-3000:]}"
            assert time.monotonic() < deadline, f"no {text!r} within {timeout} s:\n{self.output()[-3000:]}"
            time.sleep(0.05)  # poll interval, with a deadline

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(30)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            self.log.close()


def image_folder(folder: Path, names: list[str]) -> Path:
    png = cv2.imencode(".png", np.full((16, 16, 3), 128, np.uint8))[1].tobytes()  # the publisher never decodes
    for name in names:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(png)
    return folder


def frame_ids(sub: Client, camera: str) -> list[str]:
    with sub.lock:
        return [user_props(m)["frame_id"] for m in sub.messages if m.topic == f"inspect/{camera}/frame"]


def is_frame(camera: str):
    return lambda m: m.topic == f"inspect/{camera}/frame"


@pytest.fixture
def publishers(tmp_path):
    with killed_after(lambda n, port, *args: Publisher(tmp_path, port, *args)) as start:
        yield start


def test_publisher_survives_a_broker_restart_and_stops_cleanly(tmp_path, publishers):
    folder = image_folder(tmp_path / "imgs", ["000.png", "001.png", "002.png"])
    broker = Broker(tmp_path / "broker1")
    port = broker.port
    sub = Client(port)
    try:
        pub = publishers(port, "--camera", "rcam", "--folder", str(folder), "--fps", "10", "--loop")
        sub.wait_for(is_frame("rcam"), timeout=30, count=3)
        sub.close()
        broker.stop()
        pub.wait_output("is away")  # the publisher noticed, and lives on
        broker = Broker(tmp_path / "broker2", port=port)
        sub = Client(port)
        sub.wait_for(is_frame("rcam"), timeout=60, count=3)  # reconnected (paho's backoff is at most 10 s)
        assert pub.proc.poll() is None, pub.output()[-3000:]
        assert pub.stop(signal.SIGTERM) == 0
        out = pub.output()
        assert "Traceback" not in out and "stopped by SIGTERM" in out, out[-3000:]
        assert re.search(r"published \d+ frames to inspect/rcam/frame .*[1-9]\d* dropped", out), out[-3000:]
    finally:
        sub.close()
        broker.stop()


def test_publisher_waits_for_a_broker_that_is_down_at_start(tmp_path, publishers):
    folder = image_folder(tmp_path / "imgs", ["000.png"])
    port = free_port()
    pub = publishers(port, "--camera", "wcam", "--folder", str(folder), "--fps", "5", "--loop")
    pub.wait_output("waiting for the broker")
    broker = Broker(tmp_path / "broker", port=port)
    try:
        sub = Client(port)
        sub.wait_for(is_frame("wcam"), timeout=60, count=2)
        sub.close()
        assert pub.stop(signal.SIGINT) == 0
        assert "Traceback" not in pub.output(), pub.output()[-3000:]
    finally:
        broker.stop()


def test_publisher_ids_never_repeat_across_runs_passes_and_sub_folders(tmp_path, broker, publishers):
    """The worker replaces the record and label of a frame whose (camera, id) comes again: ids must not repeat."""
    folder = image_folder(tmp_path / "imgs", ["a/x/000.png", "b/x/000.png", "b/x/001.png"])
    sub = Client(broker.port)
    try:
        first = publishers(broker.port, "--camera", "icam", "--folder", str(folder), "--fps", "0")
        assert first.proc.wait(60) == 0, first.output()[-3000:]
        second = publishers(broker.port, "--camera", "icam", "--folder", str(folder), "--fps", "0", "--loop",
                            "--limit", "6")
        assert second.proc.wait(60) == 0, second.output()[-3000:]
        sub.wait_for(is_frame("icam"), timeout=30, count=9)
        ids = frame_ids(sub, "icam")
    finally:
        sub.close()
    assert len(ids) == 9 and len(set(ids)) == 9, ids
    assert all(valid_id(i) and PUBLISHER_ID.match(i) for i in ids), ids
    assert sorted(PUBLISHER_ID.match(i).group(2) for i in ids[:3]) == ["a_x_000", "b_x_000", "b_x_001"], ids


@pytest.mark.parametrize("args", [["--camera", "line+1"], ["--camera", "a/b"], ["--camera", ""],
                                  ["--camera", "c", "--prefix", "inspect/"], ["--camera", "c", "--prefix", "a/#"],
                                  ["--camera", "line\x01"], ["--camera", "c", "--prefix", "insp\x7fect"],
                                  ["--camera", "c", "--client-id", "cam\x85"]])
def test_publisher_refuses_a_camera_or_prefix_no_worker_reads(tmp_path, broker, args):
    """A camera id with a wildcard ended in paho's traceback; one of two levels (a/b) or an empty one was published,
    'sent', where no worker reads frames (a helper's probe).  A control character in the camera, prefix or client id:
    mosquitto closed every connection (the camera is in the client id) and the publisher waited for ever."""
    folder = image_folder(tmp_path / "imgs", ["000.png"])
    proc = subprocess.run([sys.executable, str(PUBLISHER), "--port", str(broker.port), "--folder", str(folder), "--fps",
                           "0", *args], cwd=ROOT, capture_output=True, text=True, timeout=20)
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    assert "error: --" in proc.stderr and "Traceback" not in proc.stderr and "sent" not in proc.stdout, proc.stderr


@pytest.mark.parametrize("args", [["--limit", "-1"], ["--jpeg-quality", "101"], ["--fps", "nan"],
                                  ["--ack-timeout", "nan"], ["--fps", "inf"]])
def test_publisher_refuses_numbers_out_of_range(tmp_path, broker, args):
    """--limit -1 sent one frame and stopped (0 is "all"); --fps nan passed the check (NaN fails every comparison)
    and published as fast as it could; --jpeg-quality 101 was taken (OpenCV clamps it with a warning)."""
    folder = image_folder(tmp_path / "imgs", ["000.png", "001.png"])
    proc = subprocess.run([sys.executable, str(PUBLISHER), "--port", str(broker.port), "--camera", "n", "--folder",
                           str(folder), *args], cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    assert "error: --" in proc.stderr and args[0] in proc.stderr and "sent" not in proc.stdout, proc.stderr[-3000:]


def test_publisher_under_paho_1_says_it_needs_paho_2(tmp_path):
    """Under Debian 12's python3-paho-mqtt (1.6.1; its docstring said "needs only paho-mqtt") the publisher ended in
    an AttributeError traceback (a helper's probe with that package).  That package cannot be installed here, so a
    stand-in with its version and without paho 2's CallbackAPIVersion is put first on the path."""
    stub = tmp_path / "paho1" / "paho" / "mqtt"
    stub.mkdir(parents=True)
    (stub.parent / "__init__.py").write_text("")
    (stub / "__init__.py").write_text('__version__ = "1.6.1"\n')
    (stub / "client.py").write_text("MQTTv5 = 5\n\nclass Client:\n    pass\n\nclass MQTTMessageInfo:\n    pass\n")
    (stub / "packettypes.py").write_text("class PacketTypes:\n    PUBLISH = 3\n")
    (stub / "properties.py").write_text("class Properties:\n    def __init__(self, packet_type):\n        pass\n")
    folder = image_folder(tmp_path / "imgs", ["000.png"])
    proc = subprocess.run([sys.executable, str(PUBLISHER), "--port", "1", "--camera", "c", "--folder", str(folder)],
                          cwd=ROOT, capture_output=True, text=True, timeout=30,
                          env={**os.environ, "PYTHONPATH": str(tmp_path / "paho1")})
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    assert "needs paho-mqtt 2.0 or later, not 1.6.1" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


@pytest.mark.parametrize("port", ["0", "-1", "65536"])
def test_publisher_refuses_a_port_no_broker_listens_on(tmp_path, port):
    """--port 0 or less ended in paho's traceback; past 65535 it waited for that broker for ever (a helper's probe)."""
    folder = image_folder(tmp_path / "imgs", ["000.png"])
    proc = subprocess.run([sys.executable, str(PUBLISHER), "--port", port, "--camera", "c", "--folder", str(folder)],
                          cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    assert f"error: --port {port} " in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-3000:]


@pytest.mark.parametrize("how", ["missing folder", "empty folder with --loop", "not a video", "an absolute --glob",
                                 "an empty --glob"])
def test_publisher_refuses_a_source_without_frames(tmp_path, broker, how):
    """An absolute or empty --glob ended in pathlib's traceback (a helper's probe): it is said as the others are."""
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes.png").write_text("not an image")
    images = image_folder(tmp_path / "imgs", ["000.png"])
    source = {"missing folder": ["--folder", str(tmp_path / "nope")],
              "empty folder with --loop": ["--folder", str(tmp_path / "empty"), "--loop"],
              "not a video": ["--video", str(tmp_path / "notes.png")],
              "an absolute --glob": ["--folder", str(images), "--glob", str(images / "*.png")],
              "an empty --glob": ["--folder", str(images), "--glob", ""]}[how]
    proc = subprocess.run([sys.executable, str(PUBLISHER), "--port", str(broker.port), "--camera", "bad", *source],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    assert "error: --" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-3000:]


def test_publisher_skips_hidden_and_vanished_files_and_sends_tiff_and_webp(tmp_path, broker, publishers):
    names = ["000.png", "001.tif", "002.tiff", "003.webp", "004.png", "005.png", "006.png",
             ".hidden.png", "._000.png", ".thumbs/007.png", "notes.txt"]
    folder = image_folder(tmp_path / "imgs", names)
    sub = Client(broker.port)
    try:
        pub = publishers(broker.port, "--camera", "vcam", "--folder", str(folder), "--fps", "2")
        sub.wait_for(is_frame("vcam"), timeout=30)
        (folder / "006.png").unlink()  # an archiver takes it while the publisher runs (it reads 006 3 s later)
        assert pub.proc.wait(60) == 0, pub.output()[-3000:]
        sub.wait_for(is_frame("vcam"), timeout=30, count=6)
        names_sent = [PUBLISHER_ID.match(i).group(2) if PUBLISHER_ID.match(i) else i for i in frame_ids(sub, "vcam")]
    finally:
        sub.close()
    assert names_sent == ["000", "001", "002", "003", "004", "005"], names_sent
    assert "skipped" in pub.output() and "006.png" in pub.output(), pub.output()[-3000:]


def test_publisher_with_loop_waits_for_files_it_cannot_read_yet_instead_of_spinning(tmp_path, broker, publishers):
    """--loop over a folder whose only image was still empty (a camera writing it) read it again at once, without end:
    a core at 100 % and the same "skipped" line thousands of times a second (a helper's probe: 14,000 in 2 s).  Now a
    pass that reads nothing waits a second, a file that stays unreadable is said once, and once written it is sent."""
    folder = tmp_path / "imgs"
    folder.mkdir()
    (folder / "000.png").write_bytes(b"")
    sub = Client(broker.port)
    try:
        pub = publishers(broker.port, "--camera", "ecam", "--folder", str(folder), "--loop", "--fps", "5")
        pub.wait_output("skipped")
        image_folder(folder, ["000.png"])  # the camera finished writing it
        sub.wait_for(is_frame("ecam"), timeout=30)
        out = pub.output()
        assert out.count("skipped") == 1, (out.count("skipped"), out[-2000:])
    finally:
        sub.close()


def test_a_replay_sends_a_frame_the_broker_did_not_acknowledge_once(tmp_path, publishers):
    """--fps 0 (the demo's replay) published a frame again after a hung or lost broker while paho also kept the first
    copy and sent it after the reconnect: the worker scored it twice (a helper's probe: one frame three times).  Now
    the frame paho holds is waited for, and the new broker gets each frame once."""
    folder = image_folder(tmp_path / "imgs", ["000.png", "001.png", "002.png"])
    first = Broker(tmp_path / "broker1")
    port = first.port
    sub = Client(port)
    try:
        pub = publishers(port, "--camera", "rpcam", "--folder", str(folder), "--fps", "0", "--loop", "--quiet")
        sub.wait_for(is_frame("rpcam"), timeout=30, count=3)
        os.kill(first.proc.pid, signal.SIGKILL)  # mid-replay: the frame in flight is never acknowledged
        first.stop()
        sub.close()
        pub.wait_output("the broker is away")
        second = Broker(tmp_path / "broker2", port=port)  # paho tries again 1 s after the loss at the earliest
        sub = Client(port)
        try:
            sub.wait_for(is_frame("rpcam"), timeout=60, count=30)
            assert pub.stop(signal.SIGTERM) == 0, pub.output()[-3000:]
            ids = frame_ids(sub, "rpcam")
        finally:
            second.stop()
    finally:
        sub.close()
        first.stop()
    assert len(ids) == len(set(ids)), sorted(i for i in ids if ids.count(i) > 1)


class Session:
    """A subscriber with a persistent session (clean start false, an hour's expiry), as the worker's default: while it
    is away the broker queues what comes for it, and hands that over when it connects again."""

    def __init__(self, port: int, topic: str) -> None:
        self.port, self.client_id = port, f"session-{uuid.uuid4().hex[:8]}"
        self.messages: list[mqtt.MQTTMessage] = []
        self.client = self._connect(clean=True)
        subscribed = threading.Event()
        self.client.on_subscribe = lambda *args: subscribed.set()
        self.client.subscribe(topic, qos=1)
        assert subscribed.wait(30), "no SUBACK from the broker"

    def _connect(self, clean: bool) -> mqtt.Client:
        client = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2, client_id=self.client_id,
                             protocol=mqtt.MQTTv5)
        client.on_message = lambda _c, _u, msg: self.messages.append(msg)
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 3600
        client.connect("127.0.0.1", self.port, clean_start=clean, properties=props)
        client.loop_start()
        return client

    def away(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def back(self) -> None:
        self.client = self._connect(clean=False)


def test_live_frames_that_waited_for_a_worker_away_are_discarded_not_delivered_late(tmp_path, broker, publishers):
    """The publisher drops frames while the broker is away ("a live camera's old frames are worthless"), but the broker
    queued every frame for a worker away on its persistent session (restarting, down for an hour) and handed them all
    over when it came back: scored and answered as if live (a probe: 5 frames 3 s old, none carried an expiry).  Now a
    live frame carries a message expiry (--max-age, 60 s by default), so the broker discards the ones that waited
    longer; a replay (--fps 0) keeps every frame for the worker."""
    folder = image_folder(tmp_path / "imgs", ["000.png"])
    session = Session(broker.port, "inspect/+/frame")
    session.away()
    for camera, args in (("agedcam", ["--fps", "20", "--max-age", "1"]), ("livecam", ["--fps", "20"]),
                         ("replaycam", ["--fps", "0"])):
        pub = publishers(broker.port, "--camera", camera, "--folder", str(folder), "--loop", "--limit", "3", "--quiet",
                         *args)
        assert pub.proc.wait(60) == 0, pub.output()[-3000:]
    time.sleep(2.5)  # not a synchronisation: the broker's expiry counts whole seconds, and the first frames' must pass
    session.back()
    try:
        deadline = time.monotonic() + 30
        while sum(m.topic == "inspect/replaycam/frame" for m in session.messages) < 3:
            assert time.monotonic() < deadline, [m.topic for m in session.messages]
            time.sleep(0.05)  # poll interval, with a deadline; the queue is delivered in order, the aged frames first
    finally:
        session.away()
    topics = [m.topic for m in session.messages]
    assert topics == ["inspect/livecam/frame"] * 3 + ["inspect/replaycam/frame"] * 3, topics
    expiry = [getattr(m.properties, "MessageExpiryInterval", None) for m in session.messages]
    assert all(e is not None and 50 <= e <= 60 for e in expiry[:3]) and expiry[3:] == [None] * 3, expiry


def test_publisher_says_the_frames_the_broker_refuses_and_does_not_call_them_sent(tmp_path, publishers):
    """mosquitto's ACL drops a frame a camera's login may not write, answering only in the PUBACK ("Not authorized");
    the publisher printed each as sent and exited 0 (a camera started as line2 with line1's login: every frame lost,
    none said).  Now each is counted as refused, the reason and the topic said, and a run with none sent exits 1."""
    files = broker_readable_dir("mosq-acl-")
    try:
        (files / "acl").write_text("pattern write inspect/%u/frame\nuser watcher\ntopic read inspect/#\n")
        (files / "acl").chmod(0o644)
        broker = Broker(tmp_path / "broker", extra=f"acl_file {files / 'acl'}\n")
        sub = Client(broker.port, username="watcher")
        try:
            folder = image_folder(tmp_path / "imgs", ["000.png", "001.png"])
            outcome = {}
            for camera in ("line2", "line1"):
                pub = publishers(broker.port, "--camera", camera, "--username", "line1", "--folder", str(folder),
                                 "--fps", "0")
                outcome[camera] = (pub.proc.wait(60), pub.output())
            sub.wait_for(is_frame("line1"), timeout=30, count=2)
        finally:
            sub.close()
            broker.stop()
    finally:
        shutil.rmtree(files, ignore_errors=True)
    code, out = outcome["line2"]
    assert code == 1 and "\nsent " not in out and "Not authorized" in out and "inspect/line2/frame" in out, out
    assert "2 refused by the broker" in out, out
    code, out = outcome["line1"]
    assert code == 0 and out.count("\nsent ") + out.startswith("sent ") == 2 and "0 refused" in out, out
    assert not frame_ids(sub, "line2")


def _publish_once(args: list[str], env: dict[str, str], timeout: float) -> subprocess.CompletedProcess[str]:
    """The publisher run to its end with ``env`` added; a run that outlasts ``timeout`` fails the test, saying why."""
    try:
        return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, **env})
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"no frame sent within {timeout:g} s: {e.stderr}")


def test_a_client_certificate_without_cafile_connects_with_tls(tmp_path):
    """--certfile/--keyfile without --cafile (a broker whose certificate a system CA signed) connected without TLS:
    the TLS listener closed each try and the publisher waited for ever, "broker down or unreachable".  Now a client
    certificate means TLS, trusting the system's CAs (here SSL_CERT_FILE names the test's CA, as OpenSSL reads it)."""
    files = broker_readable_dir("mosq-tls-")
    try:
        subprocess.run(["bash", str(DEPLOY / "mosquitto" / "make-certs.sh"), str(files)], check=True, capture_output=True)
        broker = tls_broker(tmp_path / "broker", files)
        port = broker.port
        try:
            folder = image_folder(tmp_path / "imgs", ["000.png"])
            # the broker's own certificate stands in for a client's: this listener asks for none and checks none
            args = [sys.executable, str(PUBLISHER), "--host", "localhost", "--port", str(port), "--camera", "tcam",
                    "--folder", str(folder), "--fps", "0", "--certfile", str(files / "server.crt"),
                    "--keyfile", str(files / "server.key")]
            proc = _publish_once(args, {"SSL_CERT_FILE": str(files / "ca.crt")}, 30)
        finally:
            broker.stop()
    finally:
        shutil.rmtree(files, ignore_errors=True)
    assert proc.returncode == 0 and proc.stdout.startswith("sent "), (proc.returncode, proc.stderr[-3000:])


def test_a_file_over_the_brokers_packet_size_is_said_and_the_next_ones_are_sent(tmp_path, publishers):
    """A file over mosquitto's max_packet_size was sent: the broker closed the connection, paho sent it again after
    every reconnect, and no later frame got through; a replay (--fps 0) waited for it for ever.  The broker's Maximum
    Packet Size (its CONNACK) is now kept to: the file is said and counted as refused, and the next ones are sent."""
    folder = image_folder(tmp_path / "imgs", ["001.png", "002.png"])
    (folder / "000.png").write_bytes(np.random.default_rng(0).bytes(300_000))
    broker = Broker(tmp_path / "broker", extra="max_packet_size 200000\n")
    sub = Client(broker.port)
    try:
        pub = publishers(broker.port, "--camera", "bigcam", "--folder", str(folder), "--fps", "0")
        try:
            code = pub.proc.wait(30)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the replay did not end:\n{pub.output()[-3000:]}")
        names = [PUBLISHER_ID.match(i).group(2) for i in frame_ids(sub, "bigcam")]
    finally:
        sub.close()
        broker.stop()
    out = pub.output()
    assert code == 0 and "maximum packet size of 200000" in out and "1 refused by the broker" in out, out[-3000:]
    assert names == ["001", "002"], (names, out[-3000:])


def test_the_cameras_password_can_come_from_the_environment_not_the_process_list(tmp_path, publishers):
    """deploy/README.md's camera passed --password on the command line, which every user of the box reads in ``ps``;
    there was no other way to give it.  $CAMERA_MQTT_PASSWORD now gives it (the README's example uses it)."""
    files = broker_readable_dir("mosq-pass-")
    try:
        subprocess.run(["mosquitto_passwd", "-b", "-c", str(files / "passwords"), "line1", "c1-pass"], check=True,
                       capture_output=True)
        (files / "passwords").chmod(0o644)
        port = free_port()
        broker = Broker(tmp_path / "broker", port=port, listener=(
            f"listener {port} 127.0.0.1\nallow_anonymous false\npassword_file {files / 'passwords'}\n"))
        try:
            folder = image_folder(tmp_path / "imgs", ["000.png"])
            args = [sys.executable, str(PUBLISHER), "--port", str(port), "--camera", "line1", "--username", "line1",
                    "--folder", str(folder), "--fps", "0"]
            proc = _publish_once(args, {"CAMERA_MQTT_PASSWORD": "c1-pass"}, 20)
        finally:
            broker.stop()
    finally:
        shutil.rmtree(files, ignore_errors=True)
    assert proc.returncode == 0 and proc.stdout.startswith("sent "), (proc.returncode, proc.stderr[-3000:])
    assert "CAMERA_MQTT_PASSWORD" in (DEPLOY / "README.md").read_text()


def test_two_publishers_for_one_camera_do_not_disconnect_each_other(tmp_path, broker, publishers):
    folder = image_folder(tmp_path / "imgs", ["000.png", "001.png"])
    sub = Client(broker.port)
    args = ("--camera", "dup", "--folder", str(folder), "--fps", "10", "--loop")
    try:
        first = publishers(broker.port, *args)
        sub.wait_for(is_frame("dup"), timeout=30)
        second = publishers(broker.port, *args)

        def runs_seen(m) -> bool:
            tokens = {i.rsplit("-", 2)[0] for i in frame_ids(sub, "dup")}
            return len(tokens) == 2 and all(
                sum(i.startswith(t) for i in frame_ids(sub, "dup")) >= 10 for t in tokens)

        sub.wait_for(lambda m: runs_seen(m), timeout=30)
        assert first.proc.poll() is None and second.proc.poll() is None, first.output()[-2000:] + second.output()
    finally:
        sub.close()


def test_publisher_after_a_hung_broker_keeps_its_pace_and_says_what_was_not_acknowledged(tmp_path, publishers):
    folder = image_folder(tmp_path / "imgs", ["000.png", "001.png", "002.png"])
    broker = Broker(tmp_path / "broker")
    sub = Client(broker.port)
    fps = 5
    try:
        pub = publishers(broker.port, "--camera", "hcam", "--folder", str(folder), "--fps", str(fps), "--loop",
                         "--ack-timeout", "1")
        sub.wait_for(is_frame("hcam"), timeout=30, count=2)
        os.kill(broker.proc.pid, signal.SIGSTOP)
        try:
            pub.wait_output("was not acknowledged")
            # a few seconds of frames at this pace would be a burst if they were caught up with
            pub.wait_output("dropping frames")
        finally:
            os.kill(broker.proc.pid, signal.SIGCONT)
        before = len(frame_ids(sub, "hcam"))
        got = sub.wait_for(is_frame("hcam"), timeout=60, count=before + 14)[before:before + 14]
        out = pub.output()
        unacked = re.search(r"frame (\S+) was not acknowledged", out).group(1)
        assert f"sent {unacked} " not in out, out[-3000:]
        # after the first few (what was pending when the broker hung), frames come at the pace, not in a burst
        stamps = [float(user_props(m)["captured_at"]) for m in got[4:]]
        assert stamps[-1] - stamps[0] >= 0.7 * (len(stamps) - 1) / fps, stamps
        assert pub.proc.poll() is None
    finally:
        sub.close()
        broker.stop()


def test_the_documented_bridge_brings_query_and_label_answers_to_the_plant(tmp_path, bundle_dir, dataset, worker_factory):
    """deploy/README.md's bridge from a line broker to a plant broker, as written (its TLS and login lines left out:
    no second host here), carried results up but never a query's answer back (a helper's probe): mosquitto bridges
    speak MQTT 3.1.1 unless told, which drops the request's response topic, and no line carried the answers out.
    An operator on the plant broker now gets answers to queries and labels, as the worker's own CLI asks them."""
    from conftest import good_png, wait_online, write_config

    from worker.api_client import ApiClient, ApiError

    text = (DEPLOY / "README.md").read_text()
    block = re.search(r"```\n\s*(connection plant\n.*?)```", text, re.S)
    assert block, "the bridge example is gone from deploy/README.md"
    lines = [line.strip() for line in block.group(1).splitlines()]
    plant = Broker(tmp_path / "plant")
    kept = [f"address 127.0.0.1:{plant.port}" if line.startswith("address ") else line for line in lines
            if line and not line.startswith(("bridge_cafile", "remote_username", "remote_password"))]
    line_broker = Broker(tmp_path / "line", extra="\n".join(kept) + "\n")
    on_plant = Client(plant.port)
    try:
        worker_factory(write_config(tmp_path / "w", line_broker.port, bundle_dir))
        wait_online(on_plant, "inspect")  # the worker's retained availability came up the bridge
        camera = Client(line_broker.port)
        try:
            camera.publish_frame("line1", good_png(dataset).read_bytes(), "f1")
            on_plant.json_on("inspect/line1/result")  # results go up
        finally:
            camera.close()
        plant_cfg = write_config(tmp_path / "plant-operator", plant.port, bundle_dir)
        with ApiClient(load_config(plant_cfg), "plant-test") as operator:
            answer = None
            deadline = time.monotonic() + 60
            while answer is None:  # the bridge's own subscriptions on the plant broker may lag the availability
                try:
                    answer = operator.query({"frame_id": "f1", "camera": "line1", "top_k": 1}, timeout=5)
                except ApiError:
                    if time.monotonic() > deadline:
                        raise
            assert answer.get("ok") is True, answer
            labelled = operator.label({"action": "set", "frame_id": "f1", "camera": "line1", "label": "confirmed_defect"},
                                      timeout=30)
            assert labelled.get("ok") is True, labelled
    finally:
        on_plant.close()
        line_broker.stop()
        plant.stop()


def test_the_publishers_stop_signal_does_not_wait_on_a_lock_the_main_thread_holds():
    """Its handler set a threading.Event, whose lock the main thread holds inside its own Event.wait (the pacing
    between frames): a signal landing there waited for itself forever (the worker's StopSignals has the story)."""
    code = ("import contextlib, signal, sys; sys.path.insert(0, sys.argv[1]); import camera_publisher as cp\n"
            "signal.signal(signal.SIGTERM, cp._on_signal)\n"
            "with getattr(cp.STOP, '_cond', None) or contextlib.nullcontext():  # inside the wait's locked part\n"
            "    signal.raise_signal(signal.SIGTERM)\n"
            "print(cp.STOP.is_set(), cp._stopped_by)\n")
    try:
        done = subprocess.run([sys.executable, "-c", code, str(DEPLOY)], capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        pytest.fail("the publisher's signal handler waited for a lock its own thread held")
    assert done.returncode == 0 and done.stdout.strip() == "True ['SIGTERM']", done


def test_a_worker_in_a_locked_down_service_writes_nothing_outside_its_folders(tmp_path, broker, dataset, bundle_dir):
    """``import openvino`` wrote a client id and stats under ``~/intel`` and sent an "import" event to Google
    Analytics from a forked process (with HOME unusable it logged a line about openvino_telemetry instead).  A worker
    started as a hardened unit starts it (no LANG, a HOME and TMPDIR it must not write, umask 077) scores a frame,
    stops cleanly and leaves its HOME as it found it."""
    home, tmp = tmp_path / "home", tmp_path / "tmp"
    home.mkdir()
    tmp.mkdir(mode=0o555)
    prefix = f"t{uuid.uuid4().hex[:6]}"
    config = write_config(tmp_path / "state", broker.port, bundle_dir, topics={"prefix": prefix})
    env = {"PATH": os.environ["PATH"], "HOME": str(home), "TMPDIR": str(tmp), "PYTHONPATH": str(ROOT),
           "PYTHONDONTWRITEBYTECODE": "1"}
    client = Client(broker.port, prefix)
    log = tmp_path / "worker.log"
    try:
        with log.open("wb") as out:
            proc = subprocess.Popen([sys.executable, "-m", "worker", "--config", str(config)], cwd=ROOT, env=env,
                                    stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                    preexec_fn=lambda: os.umask(0o077))
            try:
                wait_online(client, prefix)
                client.publish_frame("line1", good_png(dataset).read_bytes(), "f1")
                assert client.json_on(f"{prefix}/line1/result")[0]["frame_id"] == "f1"
            finally:
                proc.send_signal(signal.SIGTERM)
                code = proc.wait(60)
    finally:
        client.close()
    said = log.read_text()
    assert code == 0, said[-3000:]
    assert not any(home.iterdir()), sorted(p.name for p in home.rglob("*"))
    assert "telemetry" not in said and "Traceback" not in said, said[-3000:]
