"""config.yaml: validated at start, errors name the bad key, environment overrides secrets."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest

from conftest import ROOT
from worker.config import ConfigError, MQTTConfig, QueuePolicy, load_config


def test_the_shipped_config_is_valid():
    cfg = load_config(ROOT / "config.yaml", environ={})
    assert cfg.model.bundle == ROOT / "bundles" / "grid-patchcore"  # relative to the file
    assert cfg.limits.queue_policy is QueuePolicy.DROP_OLDEST



def test_a_relative_bundle_path_that_is_a_link_stays_the_link(tmp_path):
    """Deployments switch a `current` link to the next bundle and ask for a reload (or let model.watch_s see it): a
    relative path was resolved at start, so the worker read the bundle the link pointed to then, for ever, where an
    absolute path was followed anew."""
    (tmp_path / "bundles" / "v1").mkdir(parents=True)
    (tmp_path / "bundles" / "current").symlink_to("v1")
    (tmp_path / "config.yaml").write_text("model: {bundle: bundles/current}\n")
    bundle = load_config(tmp_path / "config.yaml", environ={}).model.bundle
    assert bundle.is_absolute() and bundle.is_symlink() and bundle == tmp_path.resolve() / "bundles" / "current"

def test_a_path_under_the_home_folder_is_there_not_beside_the_config(tmp_path, monkeypatch):
    """`~/...` is the home folder in every shell and service file: the worker made a folder named `~` beside
    config.yaml and kept its history, evidence and samples there, where nobody looks."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "config.yaml").write_text("model: {bundle: ~/bundles/grid}\nstore: {path: ~/qdrant}\n"
                                          "evidence: {path: data/evidence}\n")
    cfg = load_config(tmp_path / "config.yaml", environ={"EDGE_INSPECT__CAPTURE__PATH": "~/capture"})
    home = tmp_path / "home"
    assert (cfg.model.bundle, cfg.store.path, cfg.capture.path) == (home / "bundles/grid", home / "qdrant", home / "capture")
    assert cfg.evidence.path == tmp_path.resolve() / "data" / "evidence"  # relative: still beside the file


def test_a_home_path_for_a_user_without_a_home_is_a_config_error(tmp_path, monkeypatch):
    """A container run as a bare uid (no passwd entry) with HOME unset: a ``~/...`` path in config.yaml ended the
    start with pathlib's RuntimeError traceback, exit 1 (restarted for ever); now a ConfigError names the path."""
    import pwd

    def unknown(uid: int) -> pwd.struct_passwd:
        raise KeyError(f"getpwuid(): uid not found: {uid}")

    monkeypatch.delenv("HOME", raising=False)
    monkeypatch.setattr(pwd, "getpwuid", unknown)  # what a uid the system does not know gets
    (tmp_path / "config.yaml").write_text("model: {bundle: ~/bundles/grid}\n")
    with pytest.raises(ConfigError, match="'~' names the home folder.*give the full path"):
        load_config(tmp_path / "config.yaml")


def test_an_empty_path_is_refused_naming_its_key(tmp_path):
    """An empty path is the config file's folder: an override left empty in worker.env to turn the model cache off put
    the cache there, and an empty mqtt.session_file was written as a file beside that folder, outside it."""
    path = tmp_path / "config.yaml"
    path.write_text("model: {bundle: b}\n")
    for variable, key in (("EDGE_INSPECT__MODEL__CACHE_DIR", "model.cache_dir"),
                          ("EDGE_INSPECT__MQTT__SESSION_FILE", "mqtt.session_file")):
        with pytest.raises(ConfigError, match=f"^{variable} \\(environment\\): {key}: Value error, an empty path"):
            load_config(path, environ={variable: ""})
    path.write_text("model: {bundle: ''}\n")
    with pytest.raises(ConfigError, match="model.bundle: Value error, an empty path"):
        load_config(path, environ={})


@pytest.mark.parametrize(
    "text, key",
    [
        ("model: {bundle: b}\nmqtt: {port: 70000}\n", "mqtt.port"),
        ("model: {bundle: b}\nmqtt: {prot: 1883}\n", "mqtt.prot"),
        ("model: {bundle: b}\nlimits: {queue_policy: sometimes}\n", "limits.queue_policy"),
        ("mqtt: {port: 1883}\n", "model"),
        ("model: {bundle: b}\ntopics: {prefix: 'a/#'}\n", "topics.prefix"),
        ("model: {bundle: b}\ntopics: {prefix: '$SYS/inspect'}\n", "topics.prefix"),
        # names that are topic levels: one that could never match a topic is refused, not ignored
        ("model: {bundle: b}\ncameras: {'line/1': {threshold: 3}}\n", "cameras: camera id 'line/1'"),
        ("model: {bundle: b}\ncameras: {'': {threshold: 3}}\n", "cameras: camera id ''"),
        # the models' name for model.bundle's scope: an override under it replaced the model of every camera
        ("model: {bundle: b}\ncameras: {default: {bundle: c, precision: f32}}\n", "cameras.default"),
        ("model: {bundle: b}\ntopics: {cameras: [a, '+']}\n", "topics.cameras"),
        ("model: {bundle: b}\nworker: {id: 'w#1'}\n", "worker.id"),
        ("model: {bundle: b}\ntopics: {share_group: 'g/1'}\n", "topics.share_group"),
        # characters a broker refuses in a topic or client id: passed here, then every connection was closed
        ("model: {bundle: b}\ntopics: {prefix: \"inspect\\r\"}\n", "topics.prefix: Value error, 'inspect\\r' holds '\\r' (U+000D)"),
        ("model: {bundle: b}\nworker: {id: \"w\\tbox1\"}\n", "worker.id: Value error, 'w\\tbox1' holds '\\t' (U+0009)"),
        ("model: {bundle: b}\nmqtt: {client_id: \"edge\\u0085\"}\n", "mqtt.client_id: Value error, 'edge\\x85' holds '\\x85' (U+0085)"),
        # a user name too: the broker closed every connection as a protocol error, and the log blamed a TLS listener
        ("model: {bundle: b}\nmqtt: {username: \"op\\x01\", password: p}\n", "mqtt.username: Value error, 'op\\x01' holds '\\x01' (U+0001)"),
        ("model: {bundle: b}\nmqtt: {username: \"op\\ufffe\"}\n", "mqtt.username: Value error, 'op\\ufffe' holds"),
        ("model: {bundle: b}\ncameras: {a: {topic: \"plant/a\\uffff\"}}\n", "cameras.a.topic: Value error, 'plant/a\\uffff' holds"),
        ("model: {bundle: b}\ntopics: {cameras: [\"cam\\ufdd0\"]}\n", "topics.cameras: Value error, 'cam\\ufdd0' holds"),
        # a NaN threshold passed every frame (and made the store refuse each point); an infinite or astronomic
        # interval overflowed the OS's timers (a traceback at start, or a thread dead)
        ("model: {bundle: b, threshold: .nan}\n", "model.threshold: Input should be a finite number"),
        ("model: {bundle: b}\ncameras: {a: {threshold: -.inf}}\n", "cameras.a.threshold"),
        ("model: {bundle: b}\nworker: {watchdog_s: .inf}\n", "worker.watchdog_s"),
        # shorter than an idle thread's wait for work: the worker exited 3 as stuck at once, at every restart
        ("model: {bundle: b}\nworker: {watchdog_s: 0.01}\n", "worker.watchdog_s: Value error, 0 (off) or at least 1 s"),
        # the request thread looked at the bundles as often as asked: a tiny interval spun it on the files' status
        ("model: {bundle: b, watch_s: 1.0e-9}\n", "model.watch_s: Value error, 0 (off) or at least 0.1 s"),
        # the stats loop published as often as asked: thousands of messages a second to the broker
        ("model: {bundle: b}\nworker: {stats_interval_s: 1.0e-9}\n", "worker.stats_interval_s: Input should be greater than or equal to 0.1"),
        ("model: {bundle: b}\nstore: {flush_s: 1.0e+300}\n", "store.flush_s"),
        ("model: {bundle: b}\nmqtt: {session_expiry_s: 4294967296}\n", "mqtt.session_expiry_s"),
        # settings that contradict each other: the first reconnect waited the longer, then every one the shorter
        ("model: {bundle: b}\nmqtt: {reconnect_min_s: 60}\n", "mqtt.reconnect_min_s (60) is above mqtt.reconnect_max_s (30)"),
        ("model: {bundle: b}\nheatmap: {size: 100000}\n", "heatmap.size"),
        # a typo past any machine: the worker made each inference thread at start (tens of GB, deaf to SIGINT), handed
        # OpenCV a number past a C long, or counted megabytes in bytes to infinity (exit 1 with a traceback)
        ("model: {bundle: b}\nlimits: {inference_threads: 100000000000000000000000}\n", "limits.inference_threads"),
        ("model: {bundle: b}\nlimits: {opencv_threads: 9223372036854775808}\n", "limits.opencv_threads"),
        ("model: {bundle: b}\ncapture: {max_mb: 1.0e+303}\n", "capture.max_mb"),
        ("model: {bundle: b}\nevidence: {anomalous: {max_mb: 1.0e+303}}\n", "evidence.anomalous.max_mb"),
        ("model: {bundle: b}\nstore: {collection: ../../elsewhere}\n", "store.collection"),  # was a path for the store
        # a camera's own frame topic: one exact topic, none of the API's, no other camera's
        ("model: {bundle: b}\ncameras: {a: {topic: 'plant/+/jpeg'}}\n", "cameras.a.topic"),
        ("model: {bundle: b}\ncameras: {a: {topic: '$SYS/x'}}\n", "cameras.a.topic"),
        ("model: {bundle: b}\ncameras: {a: {topic: 'inspect/b/result'}}\n", "cameras.a.topic: 'inspect/b/result' is under"),
        ("model: {bundle: b}\ncameras: {a: {topic: plant/cam}, b: {topic: plant/cam}}\n",
         "cameras.b.topic: 'plant/cam' is camera a's too"),
    ],
)
def test_errors_name_the_bad_key(tmp_path, text, key):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(path, environ={})
    assert key in str(err.value)


def test_not_yaml_and_missing_file(tmp_path):
    (tmp_path / "bad.yaml").write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "bad.yaml", environ={})
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml", environ={})
    (tmp_path / "latin1.yaml").write_bytes("model: {bundle: b}\nworker: {id: K\xf6ln}\n".encode("latin-1"))
    with pytest.raises(ConfigError, match="cannot be read as UTF-8 text"):
        load_config(tmp_path / "latin1.yaml", environ={})


def test_a_config_the_user_may_not_read_is_said_so_not_called_bad_text(tmp_path):
    """config.yaml made 0600 by root (as the environment file is) under a unit that runs the worker as its own user:
    the worker said "cannot be read as UTF-8 text", an encoding fault, and the operator looked at the file's bytes."""
    config = tmp_path / "config.yaml"
    config.write_text("model: {bundle: b}\n")
    config.chmod(0o000)
    # root reads every file: without its capabilities it is held to the modes, as the service's user is
    unprivileged = ["setpriv", "--bounding-set=-all", "--inh-caps=-all"] if os.geteuid() == 0 else []
    if unprivileged and shutil.which("setpriv") is None:
        pytest.skip("running as root without setpriv: the file's mode does not hold root")
    proc = subprocess.run([*unprivileged, sys.executable, "-m", "worker", "--config", str(config)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip() == (f"error: {config}: this user may not read it (Permission denied): make it readable "
                                   "by the worker's and the console's users (secrets belong in their environment "
                                   "files)"), proc.stderr


def test_text_keys_take_their_value_as_written(tmp_path):
    """YAML 1.1 reads `off`, `no` and `007` as false, false and 7: a camera named so, a numeric worker id or password
    would be refused as not text, or lose its zeros. Keys of other types still read YAML's values."""
    path = tmp_path / "c.yaml"
    path.write_text("model: {bundle: 2024}\nworker: {id: 7}\nmqtt: {username: 0042, password: 0123, port: 1884}\n"
                    "topics: {cameras: [no, 007, line1, 'off']}\n"
                    "cameras: {off: {metadata: optional, roi: [0, 0, 64, 48]}, 007: {threshold: 3}}\n"
                    "capture: {enabled: off}\n")
    cfg = load_config(path, environ={})
    assert cfg.topics.cameras == ["no", "007", "line1", "off"] and sorted(cfg.cameras) == ["007", "off"]
    assert (cfg.worker.id, cfg.mqtt.username, cfg.mqtt.secret(), cfg.model.bundle.name) == ("7", "0042", "0123", "2024")
    assert cfg.mqtt.port == 1884 and cfg.cameras["off"].roi == (0, 0, 64, 48) and cfg.cameras["007"].threshold == 3.0
    assert cfg.capture.enabled is False


def test_the_embedded_store_is_bounded_unless_told_otherwise(tmp_path):
    """The embedded engine holds every point in the worker's memory: unbounded by default, a camera logging each
    frame would take the box's memory within days. A server holds a shared history and keeps its own size."""
    path = tmp_path / "c.yaml"
    for store, bound in (("{}", 100_000), ("{max_points: null}", None), ("{max_points: 7}", 7),
                         ("{url: 'http://qdrant:6333'}", None)):
        path.write_text(f"model: {{bundle: b}}\nstore: {store}\n")
        assert load_config(path, environ={}).store.max_points == bound, store


def test_a_key_given_twice_is_refused_with_its_lines(tmp_path):
    """PyYAML keeps the last of two equal keys without a word: the first camera block's settings would be lost."""
    path = tmp_path / "c.yaml"
    path.write_text("model: {bundle: b}\ncameras:\n  line1: {metadata: optional}\n  line1: {heatmap: never}\n")
    with pytest.raises(ConfigError, match=r"'line1' is given twice \(first on line 3\)"):
        load_config(path, environ={})
    path.write_text("model: {bundle: b}\ncameras:\n  line1: &d {metadata: optional, heatmap: never}\n"
                    "  line2: {<<: *d, heatmap: always}\n")  # a merge's keys may be overridden
    line2 = load_config(path, environ={}).cameras["line2"]
    assert (line2.metadata, line2.heatmap) == ("optional", "always")


def test_environment_overrides_and_secrets_stay_secret(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model: {bundle: b}\nmqtt: {username: worker, password: from-file}\n")
    cfg = load_config(path, environ={"EDGE_INSPECT__MQTT__PASSWORD": "s3cret", "EDGE_INSPECT__MQTT__PORT": "8883"})
    assert cfg.mqtt.secret() == "s3cret" and cfg.mqtt.port == 8883
    with pytest.raises(ConfigError, match="model.threshold: Input should be a finite number"):
        load_config(path, environ={"EDGE_INSPECT__MODEL__THRESHOLD": "nan"})
    assert "s3cret" not in repr(cfg) and "s3cret" not in cfg.model_dump_json()
    (tmp_path / "pw").write_text("from-a-file\n")
    path.write_text("model: {bundle: b}\nmqtt: {username: worker, password_file: pw}\n")
    assert load_config(path, environ={}).mqtt.secret() == "from-a-file"


def test_a_bad_environment_override_is_blamed_on_its_variable_and_a_one_underscore_one_is_said(tmp_path, bundle_dir):
    """Under systemd the overrides come from worker.env: a typo there was reported as
    "config.yaml: mqtt.pasword", a key the user then looked for in a file that does not have it, and
    EDGE_INSPECT_METRICS_PORT (one underscore) was ignored without a word."""
    path = tmp_path / "config.yaml"
    path.write_text(json.dumps({"model": {"bundle": str(bundle_dir)}, "metrics": {"port": "not-a-port"}}))
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGE_INSPECT")}
    proc = subprocess.run([sys.executable, "-m", "worker", "--config", str(path)], cwd=ROOT, capture_output=True,
                          text=True, timeout=60, env={**env, "EDGE_INSPECT__MQTT__PASWORD": "x",
                                                      "EDGE_INSPECT_MQTT_KEEPALIVE_S": "10",
                                                      "EDGE_INSPECT_CACHE": str(tmp_path)})  # the exporter's own
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 2 and "EDGE_INSPECT_CACHE" not in proc.stderr, lines
    assert lines[0].endswith("WARNING worker.config: EDGE_INSPECT_MQTT_KEEPALIVE_S is ignored: an override is "
                             "EDGE_INSPECT__<SECTION>__<KEY>, two underscores after the prefix and between the parts "
                             "(EDGE_INSPECT__MQTT__KEEPALIVE_S?)"), lines
    assert lines[1].startswith("error: EDGE_INSPECT__MQTT__PASWORD (environment): mqtt.pasword: Extra inputs are not "
                               f"permitted (did you mean password?); {path}: metrics.port: "), lines


def test_a_password_without_a_user_name_is_refused_not_dropped(tmp_path):
    """MQTT sends no password without a user name: a password set alone (e.g. only EDGE_INSPECT__MQTT__PASSWORD)
    was dropped, and the broker refused an anonymous worker as "Not authorized" with no hint why."""
    path = tmp_path / "c.yaml"
    path.write_text("model: {bundle: b}\n")
    with pytest.raises(ConfigError, match="mqtt.password is set but mqtt.username is not"):
        load_config(path, environ={"EDGE_INSPECT__MQTT__PASSWORD": "s3cret"})
    path.write_text("model: {bundle: b}\nmqtt: {username: w, password: a, password_file: pw}\n")
    with pytest.raises(ConfigError, match="mqtt.password and mqtt.password_file are both set"):
        load_config(path, environ={})


def test_credentials_that_cannot_be_read_stop_the_start_naming_the_key(tmp_path):
    """A missing password file or certificate, or a file that is no certificate, gave a traceback at start. The
    files are read where the worker runs, not when a config is checked (they may exist only there)."""
    from worker.mqtt import MqttLink

    (tmp_path / "not-a-cert.pem").write_text("hello\n")
    cases = {"mqtt.password_file": {"username": "w", "password_file": str(tmp_path / "missing")},
             "mqtt.tls: the certificate files cannot be loaded (ca_file": {"tls": {"ca_file": str(tmp_path / "no.crt")}},
             "mqtt.tls: the certificate files cannot be loaded (cert_file": {"tls": {"cert_file": str(tmp_path / "not-a-cert.pem")}}}
    for said, mqtt in cases.items():
        cfg = MQTTConfig.model_validate(mqtt)  # a valid config: the files are not read here
        with pytest.raises(ConfigError, match=re.escape(said)):
            MqttLink(cfg, "c")


@pytest.mark.parametrize("key", ["evidence.path", "spool.path", "learning.path", "capture.path", "model.cache_dir"])
def test_a_folder_the_worker_cannot_write_stops_the_start_naming_its_key(tmp_path, bundle_dir, capsys, key):
    """A path below a file (or on a read-only mount) gave a traceback from whichever part opened it first."""
    from worker.__main__ import main

    (tmp_path / "a-file").write_text("")
    section, name = key.split(".")
    cfg = {s: {"path": str(tmp_path / s)} for s in ("evidence", "spool", "learning", "capture")}
    cfg["model"] = {"bundle": str(bundle_dir), "cache_dir": str(tmp_path / "ov")}
    cfg["mqtt"] = {"port": 1}
    cfg[section][name] = str(tmp_path / "a-file" / "below")
    (tmp_path / "c.yaml").write_text(json.dumps(cfg))  # JSON is YAML
    assert main(["--config", str(tmp_path / "c.yaml")]) == 2
    assert f"error: {key}: the worker cannot write to {tmp_path / 'a-file' / 'below'} (Not a directory)" \
        in capsys.readouterr().err


def test_a_session_file_the_worker_cannot_write_stops_the_start_naming_its_key(tmp_path, bundle_dir):
    """mqtt.session_file's default lies in config.yaml's folder, read-only under the unit: the worker only warned at
    every connect that it could not remember its subscriptions (and the cleanup of stale ones was off)."""
    (tmp_path / "a-file").write_text("")
    cfg = {s: {"path": str(tmp_path / s)} for s in ("evidence", "spool", "learning", "capture")}
    cfg["model"] = {"bundle": str(bundle_dir), "cache_dir": str(tmp_path / "ov"), "rollout_path": str(tmp_path / "ro")}
    cfg["mqtt"] = {"port": 1, "session_file": str(tmp_path / "a-file" / "below" / "mqtt-session.json")}
    (tmp_path / "c.yaml").write_text(json.dumps(cfg))  # JSON is YAML
    proc = subprocess.run([sys.executable, "-m", "worker", "--config", str(tmp_path / "c.yaml")], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"error: mqtt.session_file: the worker cannot write to {tmp_path / 'a-file' / 'below'} (Not a directory)" \
        in proc.stderr, proc.stderr[-2000:]


def test_a_prefix_with_a_control_character_stops_the_start_with_exit_2_naming_it(tmp_path):
    """topics.prefix with a CR (a Windows-edited environment file) passed the check; the broker then closed every
    connection as malformed and the log blamed "a TLS listener reached without mqtt.tls", for ever."""
    cfg = {"model": {"bundle": str(tmp_path)}, "topics": {"prefix": "inspect\r"}, "mqtt": {"port": 1}}
    (tmp_path / "c.yaml").write_text(json.dumps(cfg))  # JSON is YAML
    proc = subprocess.run([sys.executable, "-m", "worker", "--config", str(tmp_path / "c.yaml")], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "topics.prefix: Value error, 'inspect\\r' holds '\\r' (U+000D)" in proc.stderr, proc.stderr[-2000:]


@pytest.mark.parametrize(("paths", "said"), [
    ({"evidence": "data", "capture": "data"}, "evidence.path ({d}) and capture.path ({d}) overlap"),
    ({"evidence": "data", "spool": "data/spool"}, "evidence.path ({d}) and spool.path ({d}/spool) overlap"),
    ({"learning": "data/x", "store": "data"}, "learning.path ({d}/x) and store.path ({d}) overlap"),
])
def test_folders_that_overlap_stop_the_start(tmp_path, bundle_dir, capsys, paths, said):
    """Each part tidies its own folder: the evidence index took every file two levels down as a frame's and deleted
    the oldest past its budget, the capture sample deleted files it had not kept, so a spool inside the evidence
    folder, or one folder for both, lost one part's files to the other."""
    from worker.__main__ import main

    cfg = {s: {"path": str(tmp_path / s)} for s in ("evidence", "spool", "learning", "capture", "store")}
    cfg.update({s: {"path": str(tmp_path / p)} for s, p in paths.items()})
    cfg["model"] = {"bundle": str(bundle_dir), "cache_dir": str(tmp_path / "ov"), "rollout_path": str(tmp_path / "r")}
    cfg["mqtt"] = {"port": 1}
    (tmp_path / "c.yaml").write_text(json.dumps(cfg))
    assert main(["--config", str(tmp_path / "c.yaml")]) == 2
    assert f"error: {said.format(d=tmp_path / 'data')}: give each its own folder" in capsys.readouterr().err


def test_a_query_image_that_cannot_be_read_is_an_error_line(tmp_path, capsys):
    """worker query --image with a missing file gave a traceback."""
    from worker.__main__ import main

    (tmp_path / "c.yaml").write_text("model: {bundle: b}\n")
    assert main(["query", "--config", str(tmp_path / "c.yaml"), "--image", str(tmp_path / "missing.png")]) == 2
    assert f"error: --image {tmp_path / 'missing.png'}: No such file or directory" in capsys.readouterr().err


def test_an_empty_frame_id_or_camera_on_the_query_command_line_is_an_error(tmp_path, capsys):
    """``--frame-id ""`` listed the latest frames (exit 0), ``--camera ""`` was dropped without a word."""
    from worker.__main__ import main

    (tmp_path / "c.yaml").write_text("model: {bundle: b}\nmqtt: {port: 1}\n")  # nothing is sent: no broker needed
    for flags, named in ((["--frame-id", ""], "--frame-id"), (["--frame-id", "f1", "--camera", ""], "--camera")):
        assert main(["query", "--config", str(tmp_path / "c.yaml"), *flags]) == 2
        assert f"error: {named} is empty" in capsys.readouterr().err


def test_a_query_image_over_the_request_limit_is_refused_before_sending_saying_what_to_do(tmp_path, capsys):
    """A 3.9 MB PNG the worker takes as a camera frame came back as ``bad_request: request is N bytes, limit L``:
    it did not say that base64 adds a third, nor what to do."""
    from worker.__main__ import main
    from worker.wire import MAX_REQUEST_BYTES

    (tmp_path / "c.yaml").write_text("model: {bundle: b}\nmqtt: {port: 1}\n")  # nothing is sent: no broker needed
    image = tmp_path / "big.png"
    image.write_bytes(bytes(MAX_REQUEST_BYTES * 3 // 4 + 1000))
    assert main(["query", "--config", str(tmp_path / "c.yaml"), "--image", str(image)]) == 2
    err = capsys.readouterr().err
    assert f"the worker takes requests up to {MAX_REQUEST_BYTES} bytes: re-encode the image as JPEG" in err, err


def test_a_request_over_the_brokers_packet_size_is_an_error_line(tmp_path, capsys):
    """A query larger than the broker's max_packet_size gave a worker.mqtt.PacketTooLarge traceback."""
    from scripts.broker import Broker
    from worker.__main__ import main

    broker = Broker(tmp_path / "broker", extra="max_packet_size 100000\n")
    try:
        (tmp_path / "c.yaml").write_text(f"model: {{bundle: b}}\nmqtt: {{port: {broker.port}}}\n")
        image = tmp_path / "mid.png"
        image.write_bytes(bytes(200_000))
        assert main(["query", "--config", str(tmp_path / "c.yaml"), "--image", str(image)]) == 2
    finally:
        broker.stop()
    err = capsys.readouterr().err
    assert re.search(r"error: inspect/query: \d+ bytes exceed the broker's maximum packet size 100000 \(its "
                     r"max_packet_size\): send less \(a query image re-encoded as JPEG", err), err


@pytest.mark.parametrize("command", [["query", "--frame-id", "x"], ["labels"],
                                     ["label", "--frame-id", "x", "--camera", "c", "--false-alarm"],
                                     ["reload", "--bundle", "b"], ["status"]])
def test_ctrl_c_in_a_cli_command_is_one_line_and_exit_130(tmp_path, command):
    """Ctrl-C while a command waits for the broker printed a KeyboardInterrupt traceback."""
    (tmp_path / "c.yaml").write_text("model: {bundle: b}\nmqtt: {port: 1}\n")  # nothing listens: it retries
    # a terminal's Ctrl-C: a shell's background job (a CI runner's) ignores SIGINT, and its children inherit that
    proc = subprocess.Popen([sys.executable, "-m", "worker", command[0], "--config", str(tmp_path / "c.yaml"),
                             *command[1:]], stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert proc.stderr is not None
    lines = []
    for line in proc.stderr:  # Ctrl-C once it is waiting: its first "retrying" line
        lines.append(line)
        if "retrying" in line:
            break
    proc.send_signal(signal.SIGINT)
    lines += proc.stderr.readlines()
    assert proc.wait(timeout=30) == 130, "".join(lines)
    said = "error: interrupted (Ctrl-C)" + {"label": ": the label may still be applied",
                                            "reload": ": the reload may still be carried out"}.get(command[0], "")
    assert lines[-1].strip() == said and not any("Traceback" in line for line in lines), "".join(lines)


def test_a_budget_set_in_part_keeps_the_other_documented_defaults(tmp_path):
    """Setting one key of evidence.anomalous (its frame count) dropped the 4000 MB cap that only the section's
    default carried, so the anomalous evidence could fill the disk (a helper's docs audit); each key has its own
    default now, as docs/configuration.md lists it."""
    path = tmp_path / "config.yaml"
    path.write_text("model: {bundle: b}\nevidence:\n  anomalous:\n    max_frames: 30000\n")
    budget = load_config(path, environ={}).evidence.anomalous
    assert (budget.max_frames, budget.max_mb) == (30000, 4000)
    path.write_text("model: {bundle: b}\n")
    assert load_config(path, environ={}).evidence.anomalous.max_mb == 4000
    path.write_text("model: {bundle: b}\nevidence:\n  anomalous:\n    max_mb: null\n")
    assert load_config(path, environ={}).evidence.anomalous.max_mb is None  # no cap, when asked for


_NOT_OURS = ("not a setting of this version, a newer version's config met by a worker rolled back or a typo: "
             "docs/configuration.md lists this version's settings")


def test_a_key_a_newer_version_knows_is_refused_saying_it_is_not_a_setting_of_this_one(tmp_path):
    """A config.yaml written for a newer version (then the box rolled back) was refused with pydantic's "Extra inputs
    are not permitted" alone: the operator could not tell a newer version's key from a damaged file.  The refusal
    stays (a typo must not pass), and says what the key is not and where this version's settings are listed."""
    path = tmp_path / "config.yaml"
    path.write_text("model: {bundle: b}\nlearning: {max_rows: 100, review_quorum: 2}\ntelemetry: {enabled: true}\n")
    with pytest.raises(ConfigError) as refused:
        load_config(path, environ={})
    assert str(refused.value) == (f"{path}: learning.review_quorum: Extra inputs are not permitted ({_NOT_OURS}); "
                                  f"telemetry: Extra inputs are not permitted ({_NOT_OURS})")


def test_a_misspelt_key_is_named_with_the_key_it_may_have_meant(tmp_path):
    """A misspelt key was refused as "Extra inputs are not permitted" alone, in a camera's section too, where the
    operator had to look the keys up in docs/configuration.md."""
    path = tmp_path / "config.yaml"
    path.write_text("model: {bundle: b, treshold: 3}\ncamers: {}\ncameras: {c1: {heatmap_sise: 64}}\n"
                    "learning: {margn: 1}\nstore: {zebra: 1}\n")
    with pytest.raises(ConfigError) as refused:
        load_config(path, environ={"EDGE_INSPECT__MQTT__PASWORD": "x"})
    said = str(refused.value)
    for key, meant in (("model.treshold", "threshold"), ("camers", "cameras"), ("cameras.c1.heatmap_sise", "heatmap_size"),
                       ("learning.margn", "margin"), ("mqtt.pasword", "password")):
        assert f"{key}: Extra inputs are not permitted (did you mean {meant}?)" in said, said
    assert f"store.zebra: Extra inputs are not permitted ({_NOT_OURS})" in said, said  # nothing near it: no guess


def test_a_misspelt_section_in_a_variable_is_named_as_the_variables(tmp_path):
    """A variable whose section is misspelt (``EDGE_INSPECT__CONSOL__PASSWORD``) was refused as config.yaml's key,
    where the operator looked for ``consol`` in vain; the docs say an error in an override names its variable."""
    path = tmp_path / "config.yaml"
    path.write_text("model: {bundle: b}\nevidence: {max_frames: 10}\nzebra: 1\n")
    with pytest.raises(ConfigError) as refused:
        load_config(path, environ={"EDGE_INSPECT__CONSOL__PASSWORD": "x",
                                   "EDGE_INSPECT__EVIDENCE__ANOMALUS__MAX_FRAMES": "5"})
    said = str(refused.value).split("; ")
    assert sorted(said) == sorted([
        "EDGE_INSPECT__CONSOL__PASSWORD (environment): consol: Extra inputs are not permitted (did you mean console?)",
        "EDGE_INSPECT__EVIDENCE__ANOMALUS__MAX_FRAMES (environment): evidence.anomalus: Extra inputs are not permitted "
        "(did you mean anomalous?)",
        f"{path}: zebra: Extra inputs are not permitted ({_NOT_OURS})"]), said  # the file's own error stays the file's


@pytest.mark.parametrize("variable, key", [("EDGE_INSPECT__MQTT__HOST", "mqtt.host"),
                                           ("EDGE_INSPECT__METRICS__HOST", "metrics.host"),
                                           ("EDGE_INSPECT__CONSOLE__HOST", "console.host"),
                                           ("EDGE_INSPECT__STORE__URL", "store.url")])
def test_an_empty_host_or_store_url_is_refused_naming_its_variable(tmp_path, variable, key):
    """A variable left empty in an env file: an empty mqtt.host ended in paho's ValueError traceback, an empty
    metrics.host listened on every address where the docs say loopback, an empty store.url opened the embedded store
    without its max_points bound and without its folder's lock (the config read it as set, the store as unset)."""
    path = tmp_path / "config.yaml"
    path.write_text("model: {bundle: b}\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGE_INSPECT")}
    proc = subprocess.run([sys.executable, "-m", "worker", "--config", str(path)], cwd=ROOT, capture_output=True,
                          text=True, timeout=60, env={**env, variable: ""})
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [f"error: {variable} (environment): {key}: String should have at "
                                                "least 1 character"], proc.stderr


def test_an_environment_list_keeps_its_text_as_written(tmp_path):
    """A list given in the environment was read by plain YAML: camera ids ``007`` and ``off`` became 7 and false and
    were refused, where the same list in config.yaml is taken as written."""
    path = tmp_path / "config.yaml"
    path.write_text("model: {bundle: b}\n")
    cfg = load_config(path, environ={"EDGE_INSPECT__TOPICS__CAMERAS": "[cam1, 007, off]",
                                     "EDGE_INSPECT__CAMERAS__007__THRESHOLD": "28",
                                     "EDGE_INSPECT__MQTT__TLS__CA_FILE": "0123"})
    assert cfg.topics.cameras == ["cam1", "007", "off"]
    assert cfg.cameras["007"].threshold == 28.0
    assert cfg.mqtt.tls is not None and cfg.mqtt.tls.ca_file == tmp_path.resolve() / "0123"


def test_a_section_whose_keys_are_all_commented_out_takes_its_defaults(tmp_path):
    """YAML reads a section with only comments under it as null: it was refused ("Input should be a valid
    dictionary"), a camera with none of its settings left too, and an override into it was "not a section"."""
    path = tmp_path / "config.yaml"
    path.write_text("model:\n  bundle: b\nheatmap:\n  # size: 512\ncameras:\n  line1:\n"
                    "console:\n  # password: x\nmqtt:\n  tls:\n")
    cfg = load_config(path, environ={"EDGE_INSPECT__CONSOLE__PORT": "8081"})
    assert cfg.heatmap.size == load_config(path, environ={}).heatmap.size == type(cfg.heatmap)().size
    assert cfg.cameras["line1"].threshold is None and cfg.console.port == 8081
    assert cfg.mqtt.tls is None  # an optional section left null stays off


def test_a_reload_that_never_reached_the_broker_does_not_say_it_may_be_carried_out(tmp_path, capsys):
    """The note "if the worker took the reload before the wait ran out, it is carried out" was printed when the
    broker could not be reached at all: nothing was sent, nothing can be carried out."""
    from worker.__main__ import main

    (tmp_path / "c.yaml").write_text("model: {bundle: b}\nmqtt: {port: 1}\nquery: {timeout_s: 1}\n")  # nothing listens
    for command in (["reload", "--bundle", "b"], ["rollback"]):
        assert main([command[0], "--config", str(tmp_path / "c.yaml"), *command[1:], "--timeout", "1"]) == 2
        err = capsys.readouterr().err
        assert "error: cannot reach the broker" in err and "note:" not in err, err


def test_a_flush_interval_longer_than_the_watchdog_does_not_restart_the_worker(broker, bundle_dir, dataset, tmp_path,
                                                                               worker_factory):
    """store.flush_s longer than worker.watchdog_s (embeddings written every few minutes, to spare the flash): the
    recorder's wait for the rest of a batch was taken for a stuck thread, and at the first frame the worker exited
    for a restart (code 3), losing the batch, at every frame after each restart too.  A query for that frame waits
    for it (up to 5 s), and that wait was taken for a stuck request thread as well."""
    import uuid

    from conftest import Client, good_png, wait_online, write_config
    from test_worker import _query

    prefix = f"t{uuid.uuid4().hex[:8]}"
    config = write_config(tmp_path, broker.port, bundle_dir, topics={"prefix": prefix}, worker={"watchdog_s": 4},
                          store={"flush_s": 9})
    client = Client(broker.port, prefix)
    worker = worker_factory(config)
    wait_online(client, prefix)
    client.publish_frame("cam1", good_png(dataset).read_bytes(), "f-0")
    client.json_on(f"{prefix}/cam1/result", timeout=60)
    deadline = time.monotonic() + 60
    while not (answer := _query(client, prefix, {"frame_id": "f-0", "camera": "cam1", "top_k": 1}))["ok"]:
        assert worker.proc.poll() is None, worker.output()[-2000:]
        assert answer["error"]["code"] in ("unknown_frame", "empty_store") and time.monotonic() < deadline, answer
        ticks = len(client.wait_for(lambda m: m.topic.endswith("/stats"), timeout=5))  # ask again at the next tick
        client.wait_for(lambda m: m.topic.endswith("/stats"), timeout=5, count=ticks + 1)
    assert worker.stop() == 0 and "stuck" not in worker.output()
    client.close()


def test_a_boolean_where_a_number_is_expected_is_refused_naming_its_key(tmp_path):
    """YAML reads yes, no, on and off as booleans, which a number key took as 1 and 0: ``limits.queue_size: yes``
    was a queue of one frame and ``store.log_normal_every: no`` logged no normal frame, without a word."""
    path = tmp_path / "config.yaml"
    path.write_text("model: {bundle: b}\nlimits: {queue_size: yes}\nstore: {log_normal_every: no}\n"
                    "heatmap: {alpha: on}\nmqtt: {qos: yes}\ncameras: {line1: {roi: [no, 0, 8, 8]}}\n")
    with pytest.raises(ConfigError) as refused:
        load_config(path, environ={})
    for key in ("limits.queue_size", "store.log_normal_every", "heatmap.alpha", "mqtt.qos", "cameras.line1.roi"):
        assert f"{key}: Value error, a boolean" in str(refused.value), (key, str(refused.value))
    path.write_text("model: {bundle: b}\n")
    with pytest.raises(ConfigError, match=r"^EDGE_INSPECT__WORKER__WATCHDOG_S \(environment\): worker.watchdog_s: "
                                          "Value error, a boolean"):
        load_config(path, environ={"EDGE_INSPECT__WORKER__WATCHDOG_S": "off"})
    # a boolean key still takes YAML's booleans, in the file and in an override
    path.write_text("model: {bundle: b}\nmetrics: {enabled: no}\nstore: {hnsw: yes}\nlimits: {queue_size: 8}\n")
    cfg = load_config(path, environ={"EDGE_INSPECT__LEARNING__ENABLED": "off", "EDGE_INSPECT__CAPTURE__ENABLED": "true"})
    assert (cfg.metrics.enabled, cfg.store.hnsw, cfg.learning.enabled, cfg.capture.enabled) == (False, True, False, True)
    assert cfg.limits.queue_size == 8


def test_an_environment_override_unsets_an_optional_path_with_null(tmp_path):
    """An override takes a path as written: ``EDGE_INSPECT__MODEL__CACHE_DIR=null``, meant to turn the model cache off,
    made a folder named ``null`` beside config.yaml and cached there (an empty value is refused), so no override could
    turn off a path key that config.yaml sets."""
    path = tmp_path / "config.yaml"
    path.write_text("model: {bundle: b, cache_dir: cache}\nmqtt: {username: w}\n")
    cfg = load_config(path, environ={"EDGE_INSPECT__MODEL__CACHE_DIR": "null", "EDGE_INSPECT__MODEL__ROLLOUT_PATH": "~",
                                     "EDGE_INSPECT__MQTT__PASSWORD": "null"})
    assert (cfg.model.cache_dir, cfg.model.rollout_path) == (None, None)
    assert cfg.mqtt.secret() == "null"  # a secret is taken as written
    assert load_config(path, environ={}).model.cache_dir == tmp_path.resolve() / "cache"


def test_metrics_and_console_on_one_port_are_refused_naming_both_keys(tmp_path):
    """metrics.port equal to console.port on one host passed the config check; whichever of the worker and the
    console started second then stopped with exit 2."""
    path = tmp_path / "config.yaml"
    for metrics, console in (("{port: 8080}", "{}"), ("{port: 9000, host: 0.0.0.0}", "{port: 9000}"),
                             ("{port: 9000, host: localhost}", "{port: 9000}")):
        path.write_text(f"model: {{bundle: b}}\nmetrics: {metrics}\nconsole: {console}\n")
        with pytest.raises(ConfigError, match="metrics.port and console.port are both"):
            load_config(path, environ={})
    for metrics in ("{port: 8080, enabled: false}", "{port: 8080, host: 127.0.0.2}", "{port: 0}"):
        path.write_text(f"model: {{bundle: b}}\nmetrics: {metrics}\nconsole: {{port: 8080}}\n")
        assert load_config(path, environ={}).console.port == 8080
    path.write_text("model: {bundle: b}\n")
    with pytest.raises(ConfigError, match="metrics.port and console.port are both 8080 on hosts 127.0.0.1 and 127.0.0.1"):
        load_config(path, environ={"EDGE_INSPECT__METRICS__PORT": "8080"})


def test_the_query_table_keeps_its_columns_in_line_with_long_frame_ids():
    """The table's frame_id column was 24 wide: the camera publisher's ids (a token, a counter and the file's name)
    pushed each row's later columns out of line with the header and with each other.  Columns are as wide as their
    longest cell."""
    from worker.__main__ import _hits_table

    hits = [{"similarity": 0.98765, "camera": "cam-line-3", "frame_id": frame_id, "captured_at": "2026-12-07T01:02:03Z",
             "score": score, "verdict": verdict, "label": None}
            for frame_id, score, verdict in (("1733533323-7f3a9c2e-00000042-grid_good_000.png", 0.25, "normal"),
                                             ("f1", 12.5, "anomalous"))]
    lines = _hits_table(hits, compared=True)
    assert len(lines) == 3, lines
    for column in ("camera", "frame_id", "captured_at", "verdict", "label"):
        starts = {line.rindex(cell) for line, cell in zip(lines, (column, *(
            str(hit[column] or "-") for hit in hits)))}
        assert len(starts) == 1, (column, lines)
    assert len({line.index(".") for line in lines[1:]}) == 1, lines  # the similarities' points in line
    assert lines[1].split() == ["0.9877", "cam-line-3", hits[0]["frame_id"], "2026-12-07T01:02:03Z", "0.250", "normal",
                                "-"], lines
