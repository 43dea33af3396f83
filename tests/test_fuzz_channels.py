"""Property-based fuzzing of every input channel against a real worker, a real console and a real mosquitto.

Frame user properties and payloads, JSON envelopes (a camera with payload: json_envelope), topic levels, query,
control and label requests, and the availability topic the worker reads back, drawn from the strategies of
benchmarks/fuzz.py (which runs >= 10,000 of them; figures in docs/reliability.md).  After each batch the canaries
(a QoS 1 frame from another camera, a control status, a query) must be answered; at the end no QoS 1 message may
be left unacknowledged and the frame counters must add up.  The console's inputs (camera frames and heatmaps, results,
errors, a worker's status messages, HTTP requests), drawn from benchmarks/console_fuzz.py, must leave it showing a
canary after each batch, with no traceback and no HTTP 500.
"""

from __future__ import annotations

import json
import signal
import uuid

import psutil
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from benchmarks import console_fuzz
from benchmarks.fuzz import CHANNELS, ENVELOPE_CAMERA, Fuzzer, message, tracebacks_in, unacked_after_stop
from conftest import WorkerProcess, write_config
from scripts.broker import free_port
from scripts.console_helpers import ConsoleProcess

PREFIX = f"y{uuid.uuid4().hex[:6]}"
WORKER_ID = "w-test"
_totals = {"batches": 0, "sent": 0}
CONSOLE_PREFIX = f"x{uuid.uuid4().hex[:6]}"
_console_batches = [0]


@pytest.fixture(scope="module")
def fuzzed(broker, bundle_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("fuzzch")
    client_id = f"fuzzch-{uuid.uuid4().hex[:6]}"
    config = write_config(folder, broker.port, bundle_dir, topics={"prefix": PREFIX},
                          mqtt={"client_id": client_id, "session_expiry_s": 600},
                          limits={"max_frame_bytes": 200_000}, store={"log_normal_every": 0},
                          metrics={"enabled": False, "max_cameras": 8},
                          cameras={ENVELOPE_CAMERA: {"payload": "json_envelope"}})
    fuzzer = Fuzzer(broker.port, PREFIX, WORKER_ID)
    worker = WorkerProcess(config, folder / "worker.log")
    assert fuzzer.wait(f"{PREFIX}/workers/{WORKER_ID}/availability", 120, lambda p: p == b"online")
    yield fuzzer, worker, client_id
    fuzzer.client.loop_stop()
    if worker.proc.poll() is None:
        worker.stop(signal.SIGKILL)


@settings(max_examples=12, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large])
@given(batch=st.lists(message(PREFIX, WORKER_ID), min_size=10, max_size=25))
def test_every_channel_fuzzed_and_the_canaries_are_answered(fuzzed, batch):
    fuzzer, worker, _ = fuzzed
    for info in [fuzzer.publish(m) for m in batch]:
        info.wait_for_publish(30)
    assert fuzzer.canaries(90) == 3, worker.output()[-3000:]
    assert worker.proc.poll() is None
    _totals["batches"] += 1
    _totals["sent"] += len(batch)


def test_fuzzing_left_nothing_unacknowledged_and_every_channel_was_reached(fuzzed, broker):
    fuzzer, worker, client_id = fuzzed
    assert _totals["batches"] >= 12, "the fuzz test above must have run first"
    assert all(fuzzer.counts[c] > 0 for c in CHANNELS), fuzzer.counts
    rss_mb = psutil.Process(worker.proc.pid).memory_info().rss / 1e6
    assert worker.stop() == 0
    assert not tracebacks_in(worker.output()), worker.output()[-3000:]  # no message may be an internal_error (a bug)
    final = json.loads(worker.output().split("stopped: ", 1)[1].split("; ", 1)[0])
    for camera, c in final.items():
        assert c["received"] == c["processed"] + c["errored"] + c["dropped"] + c["duplicates"], (camera, c)
    assert len(final) <= 8 + 1  # metrics.max_cameras, then metrics.OTHER
    assert unacked_after_stop(broker.port, client_id, f"{PREFIX}/workers/{WORKER_ID}/control") == 0
    print(f"\nFIGURES fuzz channels: {_totals['sent']} messages {fuzzer.counts}, 0 unacked, RSS {rss_mb:.0f} MB")


@pytest.fixture(scope="module")
def console_fuzzed(broker, tmp_path_factory):
    folder = tmp_path_factory.mktemp("cfuzz")
    port = free_port()
    config = write_config(folder, broker.port, folder / "no-bundle", topics={"prefix": CONSOLE_PREFIX},
                          limits={"max_frame_bytes": 200_000}, query={"timeout_s": 1},
                          console={"port": port, "control_timeout_s": 1, "max_workers": 8})
    console = ConsoleProcess(config, folder / "console.log", port)
    fuzzer = console_fuzz.ConsoleFuzzer(broker.port, CONSOLE_PREFIX, port)
    yield fuzzer, console
    fuzzer.client.loop_stop()
    console.stop()


@settings(max_examples=10, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large])
@given(batch=st.lists(console_fuzz.message(CONSOLE_PREFIX), min_size=10, max_size=25))
def test_every_console_input_fuzzed_and_the_canary_is_shown(console_fuzzed, batch):
    fuzzer, console = console_fuzzed
    for info in [fuzzer.publish(m) for m in batch]:
        if info is not None:
            info.wait_for_publish(30)
    assert fuzzer.canary(60), console.log_path.read_text()[-3000:]
    assert not fuzzer.failed, fuzzer.failed
    _console_batches[0] += 1


def test_console_fuzzing_reached_every_input_and_logged_no_traceback(console_fuzzed):
    fuzzer, console = console_fuzzed
    assert _console_batches[0] >= 10, "the console fuzz test above must have run first"
    assert all(fuzzer.counts[c] > 0 for c in console_fuzz.CHANNELS), fuzzer.counts
    assert console.stop() == 0
    log = console.log_path.read_text(errors="replace")
    assert not tracebacks_in(log), log[-3000:]
