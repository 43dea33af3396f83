"""Fixtures: a real mosquitto on a free loopback port, a generated dataset, a tiny real bundle, a worker process."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
import yaml
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

import worker.mqtt  # noqa: F401  (its lenient string reader: the test clients receive the fuzzed frames too)
from scripts.broker import Broker

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
GRID = SHARED / "mvtec"


@pytest.fixture(scope="session")
def broker(tmp_path_factory):
    b = Broker(tmp_path_factory.mktemp("broker"))
    yield b
    b.stop()


@pytest.fixture(scope="session")
def dataset(tmp_path_factory) -> Path:
    from exporter.synthetic import generate

    root = tmp_path_factory.mktemp("data")
    generate(root, "weave", size=128, n_train=32, n_test=4, seed=1)
    return root


def good_png(dataset: Path) -> Path:
    """The generated set's first good test image by name: the same file on every run (a directory's listing order
    is the file system's, and varies between runs)."""
    return min((dataset / "weave" / "test" / "good").glob("*.png"))


def train_bundle(dataset: Path, out: Path, *flags: str) -> Path:
    """The session bundle's ``exporter train`` (128 px, 5 % coreset on the generated weave), with ``flags`` added.

    Every one of its 16 x 16 patches is a bank-extension candidate (K = 256, not the default's share of the frame),
    so a bundle with rows in its extension computes exactly the PatchCore of bank + rows, which the extension and
    fold tests compare with."""
    proc = subprocess.run(
        [sys.executable, "-m", "exporter", "train", "--data", str(dataset), "--category", "weave",
         "--out", str(out), "--input-size", "128", "--coreset-ratio", "0.05", "--extension-candidates", "256", *flags],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == str(out)
    # what the libraries say that no user can act on is left out (python -m exporter -v shows it)
    noise = [line for line in proc.stderr.splitlines() if any(
        said in line for said in ("FutureWarning", "Unexpected keys", "No CUDA runtime", "timm.models"))]
    assert not noise, noise
    return out


@pytest.fixture(scope="session")
def bundle_dir(dataset, tmp_path_factory) -> Path:
    """A real PatchCore bundle trained on the generated set through the CLI (seconds)."""
    return train_bundle(dataset, tmp_path_factory.mktemp("bundles") / "weave-patchcore")


class Client:
    """A paho client (MQTT v5 unless ``protocol`` says otherwise) that records everything under the prefix."""

    def __init__(self, port: int, prefix: str = "inspect", protocol: int = mqtt.MQTTv5,
                 username: str | None = None, password: str | None = None) -> None:
        self.prefix = prefix
        self.messages: list[mqtt.MQTTMessage] = []
        self.lock = threading.Condition()
        self.client = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2,
                                  client_id=f"test-{uuid.uuid4().hex[:8]}", protocol=protocol)
        if username is not None:
            self.client.username_pw_set(username, password)
        self.client.on_message = self._on_message
        subscribed = threading.Event()
        self.client.on_subscribe = lambda *args: subscribed.set()
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        self.client.subscribe(f"{prefix}/#", qos=1)
        assert subscribed.wait(30), "no SUBACK from the broker"

    def _on_message(self, client, userdata, msg) -> None:
        with self.lock:
            self.messages.append(msg)
            self.lock.notify_all()

    def publish_frame(self, camera: str, data: bytes, frame_id: str | None, captured_at: str | None = "now",
                      extra: dict | None = None, wait: bool = True) -> None:
        props = Properties(PacketTypes.PUBLISH)
        user = []
        if frame_id is not None:
            user.append(("frame_id", frame_id))
        if captured_at is not None:
            user.append(("captured_at", str(time.time()) if captured_at == "now" else captured_at))
        user += list((extra or {}).items())
        if user:
            props.UserProperty = user
        info = self.client.publish(f"{self.prefix}/{camera}/frame", data, qos=1, properties=props)
        if wait:  # without waiting, paho keeps QoS 1 messages queued while disconnected and sends them later
            info.wait_for_publish(5)

    def wait_for(self, predicate, timeout: float = 90, count: int = 1) -> list[mqtt.MQTTMessage]:
        deadline = time.monotonic() + timeout
        with self.lock:
            while True:
                found = [m for m in self.messages if predicate(m)]
                if len(found) >= count:
                    return found
                left = deadline - time.monotonic()
                if left <= 0:
                    topics = sorted({m.topic for m in self.messages})
                    raise AssertionError(f"timed out: {len(found)}/{count} matching messages; topics seen: {topics}")
                self.lock.wait(left)

    def json_on(self, topic: str, timeout: float = 90, count: int = 1) -> list[dict]:
        return [json.loads(m.payload) for m in self.wait_for(lambda m: m.topic == topic, timeout, count)]

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def user_props(msg: mqtt.MQTTMessage) -> dict[str, str]:
    return dict(getattr(msg.properties, "UserProperty", None) or [])


class WorkerProcess:
    def __init__(self, config: Path, log: Path) -> None:
        self.log_path = log
        self.log = log.open("wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "worker", "--config", str(config)], cwd=ROOT,
                                     stdout=self.log, stderr=subprocess.STDOUT)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        code = self.proc.wait(timeout)
        self.log.close()
        return code

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_output(self, text: str, timeout: float = 30) -> None:
        """Until the worker's log holds ``text`` (polled, with a deadline; fails at once when the worker ended)."""
        deadline = time.monotonic() + timeout
        while text not in self.output():
            assert time.monotonic() < deadline and self.proc.poll() is None, self.output()[-3000:]
            time.sleep(0.05)  # poll interval for the log, with a deadline


def write_config(folder: Path, port: int, bundle: Path, **sections) -> Path:
    cfg = {
        "worker": {"id": "w-test", "stats_interval_s": 1},
        "mqtt": {"port": port, "client_id": f"w-{uuid.uuid4().hex[:8]}"},
        "model": {"bundle": str(bundle), "cache_dir": str(folder / "ov-cache"), "rollout_path": str(folder / "rollout")},
        "store": {"path": str(folder / "qdrant"), "flush_s": 0.1},
        "evidence": {"path": str(folder / "evidence"), "max_frames": 100},
        "limits": {"max_frame_bytes": 2_000_000},
        "spool": {"path": str(folder / "spool")},
        "learning": {"path": str(folder / "extensions")},
        "capture": {"path": str(folder / "capture"), "export_path": str(folder / "training")},
        "metrics": {"enabled": False},
    }
    for key, value in sections.items():
        cfg.setdefault(key, {}).update(value)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def wait_online(client: Client, prefix: str, worker_id: str = "w-test", timeout: float = 120) -> None:
    client.wait_for(lambda m: m.topic == f"{prefix}/workers/{worker_id}/availability" and m.payload == b"online",
                    timeout=timeout)


def start_on_embedded_store(folder: Path, port: int, bundle: Path, prefix: str, spool: Path, client: Client,
                            worker_factory) -> tuple[WorkerProcess, Path]:
    """The store is back: a worker on the embedded store (``folder``/qdrant) with the same spool, returned once
    the spooled backlog is written (or 60 s have passed; the caller asserts what is left)."""
    store_dir = folder / "qdrant"
    config = write_config(folder / "b", port, bundle, topics={"prefix": prefix}, store={"path": str(store_dir)},
                          spool={"path": str(spool), "retry_s": 0.5})
    client.messages.clear()
    worker = worker_factory(config)
    wait_online(client, prefix)
    deadline = time.monotonic() + 60
    while list(spool.glob("*.json")) and time.monotonic() < deadline:
        time.sleep(0.05)  # poll interval while the recorder replays, with a deadline
    return worker, store_dir


@contextmanager
def killed_after(make: Callable[[int], Any]) -> Iterator[Callable[[int], Any]]:
    """``start(n)`` = ``make(n)`` (n: how many were started before), each still running at the end killed."""
    started: list = []

    def start(*args: Any) -> Any:
        process = make(len(started), *args)
        started.append(process)
        return process

    yield start
    for process in started:
        if process.proc.poll() is None:
            process.stop(signal.SIGKILL)


@pytest.fixture
def worker_factory(tmp_path):
    with killed_after(lambda n, config: WorkerProcess(config, tmp_path / f"worker{n}.log")) as start:
        yield start


@pytest.fixture
def small_disk(tmp_path):
    """A 100 MB tmpfs: a disk that can really fill up (root only; skipped where mounting is not allowed)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=100m", "tmpfs", str(mount)], capture_output=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {made.stderr.decode(errors='replace').strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.fixture
def small_ext4_disk(tmp_path):
    """A 100 MB ext4 on a loop device: a disk that fills up as most do, where a new folder needs a block of its own
    (tmpfs needs none); root only, skipped where loop mounts are not allowed."""
    image, mount = tmp_path / "ext4.img", tmp_path / "ext4"
    mount.mkdir()
    with image.open("wb") as fh:
        fh.truncate(100 << 20)
    for argv in (["mkfs.ext4", "-q", "-F", "-m", "0", str(image)], ["mount", "-o", "loop", str(image), str(mount)]):
        made = subprocess.run(argv, capture_output=True)
        if made.returncode != 0:
            pytest.skip(f"cannot make an ext4 disk here ({argv[0]}): {made.stderr.decode(errors='replace').strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def fill_disk(folder: Path) -> Path:
    """Write a file until the disk refuses more: in megabytes, then in pages, so not even a small file fits."""
    filler = folder / "filler"
    with filler.open("wb", buffering=0) as fh:  # unbuffered: nothing is left to write (and refused) at the close
        for chunk in (1 << 20, 1 << 12):
            try:
                while True:
                    fh.write(bytes(chunk))
            except OSError:
                pass
    return filler


DAMAGE = ("empty", "cut", "header")


def damage(path: Path, how: str) -> None:
    """What a power cut can leave of a file written without fsync: nothing, its first half, or a garbled byte in
    its NumPy header (numpy then raises EOFError, ValueError, or tokenize's TokenError: none is an OSError)."""
    data = path.read_bytes()
    if how == "empty":
        path.write_bytes(b"")
    elif how == "cut":
        path.write_bytes(data[: len(data) // 2])
    else:
        path.write_bytes(data[:11] + b"(" + data[12:])  # an unclosed bracket where the header's dict opens
