"""The shipped broker setup (deploy/mosquitto): TLS only, passwords, per-client ACLs, with the real worker."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import ssl
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from conftest import ROOT, Client, good_png, wait_online, write_config
from scripts.broker import Broker, broker_readable_dir, free_port, tls_broker

DEPLOY = ROOT / "deploy" / "mosquitto"
USERS = {"worker": "w-pass", "operator": "o-pass", "console": "k-pass", "line1": "c1-pass", "line2": "c2-pass"}  # the acl's cameras


@pytest.fixture(scope="module")
def secure_broker(tmp_path_factory):
    """mosquitto with deploy/mosquitto/{mosquitto.conf,acl} as shipped, only paths and port swapped."""
    files = broker_readable_dir("mosq-secure-")
    subprocess.run(["bash", str(DEPLOY / "make-certs.sh"), str(files)], check=True, capture_output=True)
    passwords = files / "passwords"
    for i, (user, secret) in enumerate(USERS.items()):
        subprocess.run(["mosquitto_passwd", "-b"] + (["-c"] if i == 0 else []) + [str(passwords), user, secret],
                       check=True, capture_output=True)
    (files / "acl").write_text((DEPLOY / "acl").read_text())
    for f in files.iterdir():
        f.chmod(0o644)  # readable by the user mosquitto drops to
    port = free_port()
    conf = (DEPLOY / "mosquitto.conf").read_text().replace("/etc/mosquitto/edge-inspect", str(files))
    conf = conf.replace("listener 8883", f"listener {port} 127.0.0.1")
    conf = re.sub(r"(?m)^(persistence|persistence_location|autosave_interval) .*$", "", conf)
    broker = Broker(tmp_path_factory.mktemp("secure"), port=port, listener=conf)
    yield broker, files
    broker.stop()
    shutil.rmtree(files, ignore_errors=True)  # outside pytest's tmp_path (see broker_readable_dir), so ours to remove


DEBIAN_MAIN = Path("/etc/mosquitto/mosquitto.conf")


@pytest.mark.skipif(not DEBIAN_MAIN.is_file(), reason="Debian's mosquitto package (its main config) is not installed")
def test_the_broker_settings_start_under_debians_main_config_as_deploy_readme_installs_them(tmp_path):
    """deploy/README.md copies mosquitto.conf into Debian's conf.d: its persistence_location, which Debian's main
    config sets too, stopped mosquitto at start ("Duplicate persistence_location value").  Debian's main config, paths
    swapped into a folder of the test's, with the shipped settings in its conf.d: the broker starts and takes a TLS
    connection."""
    files = broker_readable_dir("mosq-debian-")
    try:
        subprocess.run(["bash", str(DEPLOY / "make-certs.sh"), str(files)], check=True, capture_output=True)
        subprocess.run(["mosquitto_passwd", "-b", "-c", str(files / "passwords"), "worker", "w-pass"], check=True,
                       capture_output=True)
        (files / "acl").write_text((DEPLOY / "acl").read_text())
        (files / "conf.d").mkdir()
        port = free_port()
        main = DEBIAN_MAIN.read_text()
        for key, value in (("pid_file", files / "mosquitto.pid"), ("persistence_location", f"{files}/"),
                           ("log_dest", f"file {files / 'mosquitto.log'}"), ("include_dir", files / "conf.d")):
            main = re.sub(rf"(?m)^{key} .*$", f"{key} {value}", main)
        (files / "mosquitto.conf").write_text(main)
        (files / "conf.d" / "edge-inspect.conf").write_text(
            (DEPLOY / "mosquitto.conf").read_text().replace("/etc/mosquitto/edge-inspect", str(files))
            .replace("listener 8883", f"listener {port} 127.0.0.1"))
        for f in files.rglob("*"):
            f.chmod(0o777 if f.is_dir() else 0o644)  # readable by the user mosquitto drops to
        broker = subprocess.Popen(["mosquitto", "-c", str(files / "mosquitto.conf")], stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True)
        try:
            deadline = time.monotonic() + 30
            while broker.poll() is None and time.monotonic() < deadline:
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                    break
                except OSError:
                    time.sleep(0.05)  # poll interval of an observable state (the port), with a deadline
            assert broker.poll() is None, broker.communicate()[0][-2000:]
            client, rc = _client(port, files / "ca.crt", "worker", "w-pass")
            client.loop_stop()
            client.disconnect()
            assert rc is not None and not isinstance(rc, Exception) and not rc.is_failure, rc
        finally:
            broker.terminate()
            broker.wait(10)
    finally:
        shutil.rmtree(files, ignore_errors=True)


def test_a_broker_certificate_for_an_address_names_the_address(tmp_path):
    """make-certs.sh wrote its host as a DNS name even for an address (a broker reached as 10.0.0.5): Python's ssl,
    which the worker, the console and the camera publisher use, refused the certificate for that address."""
    for host, entry in (("10.0.0.5", ("IP Address", "10.0.0.5")), ("mqtt.plant.local", ("DNS", "mqtt.plant.local"))):
        out = tmp_path / host
        subprocess.run(["bash", str(DEPLOY / "make-certs.sh"), str(out), host], check=True, capture_output=True)
        names = ssl._ssl._test_decode_cert(str(out / "server.crt"))["subjectAltName"]
        assert entry in names and ("IP Address", "127.0.0.1") in names, names


def _client(port: int, ca, user: str | None, secret: str | None = None, tls: bool = True):
    """Connect and return (client, CONNACK reason code or None when no CONNACK came)."""
    client = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5,
                         client_id=f"{user or 'anon'}-{uuid.uuid4().hex[:6]}")
    result: dict = {}
    done = threading.Event()

    def on_connect(c, userdata, flags, reason_code, properties):
        result["rc"] = reason_code
        done.set()

    client.on_connect = on_connect
    if tls:
        client.tls_set(ca_certs=str(ca), cert_reqs=ssl.CERT_REQUIRED)
    if user:
        client.username_pw_set(user, secret)
    try:
        client.connect("127.0.0.1", port)
    except (OSError, ssl.SSLError) as exc:
        return client, exc
    client.loop_start()
    done.wait(5)
    return client, result.get("rc")


def test_anonymous_and_plaintext_connections_are_refused(secure_broker):
    broker, files = secure_broker
    anon, rc = _client(broker.port, files / "ca.crt", None)
    assert rc is not None and not isinstance(rc, Exception) and rc.is_failure, rc
    anon.loop_stop()
    wrong, rc = _client(broker.port, files / "ca.crt", "line1", "not-the-password")
    assert rc is not None and not isinstance(rc, Exception) and rc.is_failure, rc
    wrong.loop_stop()
    plain, rc = _client(broker.port, None, "line1", USERS["line1"], tls=False)
    assert rc is None or isinstance(rc, Exception), f"plaintext MQTT must not get a CONNACK, got {rc}"
    plain.loop_stop()
    with socket.create_connection(("127.0.0.1", broker.port)) as raw:  # and an unverified TLS peer is not us
        ctx = ssl.create_default_context()
        with pytest.raises(ssl.SSLError):
            ctx.wrap_socket(raw, server_hostname="localhost")


def test_only_cameras_publish_frames(secure_broker):
    """The shipped ACL gave every login a frame topic of its own name (`pattern write inspect/%u/frame`: mosquitto
    applies a pattern to all logins), so the worker, operator and console logins published frames, scored, stored
    and shown as cameras named worker, operator and console."""
    broker, files = secure_broker
    refusals = {}
    for user in ("line1", "worker", "operator", "console"):
        client, rc = _client(broker.port, files / "ca.crt", user, USERS[user])
        assert not rc.is_failure, rc
        acks: dict[int, object] = {}
        client.on_publish = lambda c, u, mid, reason_code, props, acks=acks: acks.__setitem__(mid, reason_code)
        mid = client.publish(f"inspect/{user}/frame", b"not a frame", qos=1).mid
        deadline = time.monotonic() + 30
        while mid not in acks:
            assert time.monotonic() < deadline, f"no PUBACK for {user}"
            time.sleep(0.05)
        refusals[user] = str(acks[mid]) if acks[mid].is_failure else "taken"  # "No matching subscribers": taken
        client.disconnect()
        client.loop_stop()
    assert refusals == {"line1": "taken", "worker": "Not authorized", "operator": "Not authorized",
                        "console": "Not authorized"}


def _run_worker(tmp_path, port: int, files, bundle_dir, prefix: str = "inspect"):
    from conftest import WorkerProcess

    config = write_config(tmp_path, port, bundle_dir, topics={"prefix": prefix},
                          mqtt={"username": "worker", "tls": {"ca_file": str(files / "ca.crt")}})
    env_password = {"EDGE_INSPECT__MQTT__PASSWORD": USERS["worker"]}

    os.environ.update(env_password)
    try:
        return WorkerProcess(config, tmp_path / "worker.log")
    finally:
        del os.environ["EDGE_INSPECT__MQTT__PASSWORD"]


def test_a_worker_the_broker_will_not_take_says_why(secure_broker, broker, bundle_dir, tmp_path):
    """The commonest slips against a secured broker: no `mqtt.tls` for a TLS listener (the broker closes the connection
    before it answers: paho retried without a word, and this worker looked idle), a wrong password, the CA of
    another broker (said as a broker that cannot be reached), and TLS against a listener without it (said as
    "Connection reset by peer" only)."""
    from conftest import WorkerProcess

    secure, files = secure_broker
    other = tmp_path / "other-ca"
    subprocess.run(["bash", str(DEPLOY / "make-certs.sh"), str(other)], check=True, capture_output=True)
    tls = {"ca_file": str(files / "ca.crt")}
    plain = write_config(tmp_path / "plain", secure.port, bundle_dir,
                         mqtt={"username": "worker", "password": USERS["worker"], "reconnect_max_s": 1})
    wrong = write_config(tmp_path / "wrong", secure.port, bundle_dir,
                         mqtt={"username": "worker", "password": "not-it", "tls": tls})
    untrusted = write_config(tmp_path / "untrusted", secure.port, bundle_dir,
                             mqtt={"username": "worker", "password": "not-it", "tls": {"ca_file": str(other / "ca.crt")}})
    tls_to_plain = write_config(tmp_path / "tls-to-plain", broker.port, bundle_dir, mqtt={"tls": tls})
    workers = {"the connection was closed before the broker answered": WorkerProcess(plain, tmp_path / "plain.log"),
               "broker refused the connection: Not authorized (as user 'worker')": WorkerProcess(wrong,
                                                                                                 tmp_path / "wrong.log"),
               "the broker's certificate is not trusted (": WorkerProcess(untrusted, tmp_path / "untrusted.log"),
               "the TLS handshake failed (": WorkerProcess(tls_to_plain, tmp_path / "tls-to-plain.log")}
    try:
        deadline = time.monotonic() + 120
        for line, worker in workers.items():
            while line not in worker.output():
                assert time.monotonic() < deadline and worker.proc.poll() is None, worker.output()[-2000:]
                time.sleep(0.1)
        assert "not-it" not in workers["broker refused the connection: Not authorized (as user 'worker')"].output()
    finally:
        codes = [worker.stop() for worker in workers.values()]
    assert codes == [0, 0, 0, 0]


def test_a_cli_the_broker_refuses_says_why_at_once(secure_broker, bundle_dir, tmp_path):
    """A wrong password for `python -m worker label` was retried in silence for the whole request timeout and then
    said as "cannot reach the broker"; the broker's refusal is final for those credentials, so it is said at once."""
    secure, files = secure_broker
    config = write_config(tmp_path, secure.port, bundle_dir, query={"timeout_s": 600},
                          mqtt={"username": "operator", "password": "not-it", "tls": {"ca_file": str(files / "ca.crt")}})
    done = subprocess.run([sys.executable, "-m", "worker", "label", "--config", str(config), "--frame-id", "f1",
                           "--camera", "cam1", "--false-alarm"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert "error: the broker refused the connection: Not authorized (as user 'operator')" in done.stderr, done.stderr
    assert "not-it" not in done.stderr


def test_a_cli_given_the_wrong_ca_says_why_at_once(secure_broker, tmp_path):
    """A broker certificate that fails verification (the CA of another broker, a host name it does not name) was said
    only once the command's whole request timeout had passed, as for a broker that might yet answer."""
    secure, files = secure_broker
    other = tmp_path / "other-ca"
    subprocess.run(["bash", str(DEPLOY / "make-certs.sh"), str(other)], check=True, capture_output=True)
    config = write_config(tmp_path, secure.port, tmp_path / "no-bundle", query={"timeout_s": 600},
                          mqtt={"username": "operator", "password": USERS["operator"],
                                "tls": {"ca_file": str(other / "ca.crt")}})
    done = subprocess.run([sys.executable, "-m", "worker", "status", "--config", str(config)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert "error: cannot reach the broker: the broker's certificate is not trusted (" in done.stderr, done.stderr


def test_the_console_says_the_broker_refused_it(secure_broker, bundle_dir, tmp_path):
    """The console keeps trying (the page shows the link), and says why it has none: the refusal names the login."""
    from starlette.testclient import TestClient

    from worker.config import load_config
    from worker.console.app import create_app

    secure, files = secure_broker
    config = write_config(tmp_path, secure.port, bundle_dir,
                          mqtt={"username": "operator", "password": "not-it", "tls": {"ca_file": str(files / "ca.crt")}})
    with TestClient(create_app(load_config(config)), base_url="http://127.0.0.1:8080") as http:  # a loopback Host
        deadline = time.monotonic() + 60
        while not (state := http.get("/api/state").json())["broker_problem"]:
            assert time.monotonic() < deadline, state
            time.sleep(0.1)
    assert not state["broker"]
    assert state["broker_problem"] == "the broker refused the connection: Not authorized (as user 'operator')"


def test_acls_confine_cameras_and_the_worker_serves_over_tls(secure_broker, bundle_dir, dataset, tmp_path):
    broker, files = secure_broker
    ca = files / "ca.crt"
    operator, rc = _client(broker.port, ca, "operator", USERS["operator"])
    assert not rc.is_failure
    seen: list[mqtt.MQTTMessage] = []
    operator.on_message = lambda c, u, m: seen.append(m)
    operator.subscribe("inspect/#", qos=1)
    worker = _run_worker(tmp_path, broker.port, files, bundle_dir)
    try:
        deadline = time.monotonic() + 120
        while not any(m.topic == "inspect/workers/w-test/availability" and m.payload == b"online" for m in seen):
            assert time.monotonic() < deadline and worker.proc.poll() is None, worker.output()[-2000:]
            time.sleep(0.1)
        assert "s3cret" not in worker.output() and USERS["worker"] not in worker.output()
        while not any(m.topic == "inspect/workers/w-test/stats" and json.loads(m.payload)["own_announcement_read_back"]
                      for m in seen):
            assert time.monotonic() < deadline, "the worker reads its own topics back"
            time.sleep(0.1)

        camera, rc = _client(broker.port, ca, "line1", USERS["line1"])
        assert not rc.is_failure
        acks: dict[int, object] = {}
        camera.on_publish = lambda c, u, mid, reason_code, props: acks.__setitem__(mid, reason_code)
        leaked: list[mqtt.MQTTMessage] = []
        camera.on_message = lambda c, u, m: leaked.append(m)
        frame = good_png(dataset).read_bytes()

        def publish(topic: str, frame_id: str) -> int:
            props = Properties(PacketTypes.PUBLISH)
            props.UserProperty = [("frame_id", frame_id), ("captured_at", str(time.time()))]
            return camera.publish(topic, frame, qos=1, properties=props).mid

        own = publish("inspect/line1/frame", "own")
        spoof = publish("inspect/line2/frame", "spoofed")
        camera.subscribe("inspect/#", qos=1)  # mosquitto grants it, but must deliver nothing it may not read
        deadline = time.monotonic() + 60
        while len(acks) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not acks[own].is_failure
        assert acks[spoof].is_failure, "a camera must not publish as another camera"

        while not any(m.topic == "inspect/line1/result" for m in seen):
            assert time.monotonic() < deadline, "the worker must serve over TLS with its password"
            time.sleep(0.1)
        time.sleep(1)
        results = [json.loads(m.payload) for m in seen if m.topic.endswith("/result")]
        assert [r["frame_id"] for r in results] == ["own"]
        assert not [m.topic for m in leaked if not m.topic.endswith("/frame")], "a camera must not read results"
        camera.loop_stop()
        stats = [json.loads(m.payload) for m in seen if m.topic == "inspect/workers/w-test/stats"][-1]
        assert (stats["publishes_refused"], stats["subscriptions_refused"]) == (0, {})
    finally:
        worker.stop()
        operator.loop_stop()




def test_the_console_login_controls_the_worker_and_a_login_that_may_not_is_told_at_once(secure_broker, bundle_dir,
                                                                                       tmp_path):
    """Under the shipped ACL no login the console could use might send its reloads, rollbacks and capture exports:
    the broker refused each in its PUBACK, and the console and the CLI waited out their timeout (two minutes for
    a reload) to say "no answer", and that a refused rollback might still be carried out. The ACL has a `console`
    login now, and a refused request is said at once, with the topic and the broker's reason."""
    from starlette.testclient import TestClient

    from worker.config import load_config
    from worker.console.app import create_app

    broker, files = secure_broker
    operator, rc = _client(broker.port, files / "ca.crt", "operator", USERS["operator"])
    assert not rc.is_failure
    online = threading.Event()
    operator.on_message = lambda c, u, m: online.set() if m.payload == b"online" else None
    operator.subscribe("inspect/workers/w-test/availability", qos=1)
    worker = _run_worker(tmp_path, broker.port, files, bundle_dir)

    def config(user: str):
        return write_config(tmp_path / user, broker.port, bundle_dir, query={"timeout_s": 600},
                            mqtt={"username": user, "password": USERS[user], "tls": {"ca_file": str(files / "ca.crt")}})

    def cli(user: str, command: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "worker", command, "--config", str(config(user)), "--timeout",
                               "600"], cwd=ROOT, capture_output=True, text=True, timeout=120)

    try:
        assert online.wait(120), worker.output()[-2000:]
        refused = cli("operator", "rollback")
        assert refused.returncode == 2, refused.stderr
        assert ("error: the broker refused the request on inspect/workers/w-test/control (Not authorized), so no "
                "worker got it: its ACL must let user 'operator' write that topic") in refused.stderr, refused.stderr
        assert "note:" not in refused.stderr  # nothing reached the worker: nothing to be carried out later
        status = cli("console", "status")
        assert status.returncode == 0 and json.loads(status.stdout)["ok"], status.stderr
        with TestClient(create_app(load_config(config("operator"))), base_url="http://127.0.0.1:8080") as http:
            answer = http.post("/api/models/rollback", json={})
        assert answer.status_code == 403 and answer.json()["error"]["code"] == "broker_refused", answer.text
    finally:
        operator.loop_stop()
        assert worker.stop() == 0
    assert "Not authorized" not in worker.output()  # the worker was asked nothing it could not answer


def test_a_prefix_the_acl_does_not_cover_is_said(secure_broker, bundle_dir, tmp_path):
    """topics.prefix changed and the shipped ACL not: mosquitto's acl_file takes the worker's subscriptions and drops
    every message on them, and refuses its publishes in the PUBACK only; the worker ran online-looking and deaf."""
    broker, files = secure_broker
    worker = _run_worker(tmp_path, broker.port, files, bundle_dir, prefix="plant")
    try:
        deadline = time.monotonic() + 120
        for line in ("the broker refused 1 message(s) this worker published, the last on "
                     "plant/workers/w-test/availability (Not authorized)",
                     "this worker's own 'online' on plant/workers/w-test/availability did not come back"):
            while line not in worker.output():
                assert time.monotonic() < deadline and worker.proc.poll() is None, worker.output()[-3000:]
                time.sleep(0.1)
    finally:
        assert worker.stop() == 0


def test_subscriptions_the_broker_refuses_are_said_and_taken_once_allowed(bundle_dir, dataset, tmp_path,
                                                                          worker_factory):
    """A prefix changed in config.yaml and not in the broker's access rules: a broker refuses the subscriptions in
    its SUBACK only and keeps the connection, so the worker was online, healthy and never got a frame, without a
    word.  It names the topics and the reason, lists them in its stats, and takes them once they are allowed,
    without a restart.  mosquitto's dynamic security plugin refuses in the SUBACK (its `acl_file` grants every
    subscription and drops what may not be read, which no client can tell; deploy/README.md)."""
    files = broker_readable_dir("mosq-dynsec-")
    rules = files / "dynamic-security.json"
    subprocess.run(["mosquitto_ctrl", "dynsec", "init", str(rules), "admin", "admin-pass"], check=True,
                   capture_output=True)
    rules.chmod(0o666)  # the plugin saves every change, as the user mosquitto drops to
    files.chmod(0o777)
    broker = Broker(tmp_path / "broker", extra="plugin /usr/lib/x86_64-linux-gnu/mosquitto_dynamic_security.so\n"
                                               f"plugin_opt_config_file {rules}\n")

    def dynsec(*command: str) -> None:
        subprocess.run(["mosquitto_ctrl", "-h", "127.0.0.1", "-p", str(broker.port), "-u", "admin", "-P",
                        "admin-pass", "dynsec", *command], check=True, capture_output=True, timeout=30)

    for user, secret, subscribe in (("worker", "w-pass", "inspect/#"), ("observer", "o-pass", "#")):
        dynsec("createClient", user, "-p", secret)
        dynsec("createRole", user)
        dynsec("addRoleACL", user, "subscribePattern", subscribe, "allow")
        dynsec("addRoleACL", user, "publishClientSend", "#", "allow")
        dynsec("addClientRole", user, user)
    observer = Client(broker.port, prefix="plant", username="observer", password="o-pass")
    try:
        worker = worker_factory(write_config(tmp_path / "w", broker.port, bundle_dir, topics={"prefix": "plant"},
                                             mqtt={"username": "worker", "password": "w-pass"}))
        wait_online(observer, "plant")
        stats = json.loads(observer.wait_for(lambda m: m.topic == "plant/workers/w-test/stats"
                                             and json.loads(m.payload)["subscriptions_refused"])[0].payload)
        assert stats["subscriptions_refused"] == {t: "Not authorized" for t in (
            "plant/+/frame", "plant/query", "plant/label", "plant/workers/w-test/control",
            "plant/workers/w-test/availability")}
        # the worker says a SUBACK's news after it records it: the stats can carry the record before the log has it
        worker.wait_output("the broker refused to subscribe this worker to plant/+/frame (Not authorized)")

        dynsec("addRoleACL", "worker", "subscribePattern", "plant/#", "allow")
        observer.messages.clear()
        observer.wait_for(lambda m: m.topic == "plant/workers/w-test/stats"
                          and json.loads(m.payload)["subscriptions_refused"] == {})
        worker.wait_output("the broker now takes the subscription to plant/+/frame")
        observer.publish_frame("cam1", good_png(dataset).read_bytes(), "once-allowed")
        assert observer.json_on("plant/cam1/result")[0]["frame_id"] == "once-allowed"
        assert worker.stop() == 0
    finally:
        observer.close()
        broker.stop()
        shutil.rmtree(files, ignore_errors=True)


def test_a_client_key_with_a_pass_phrase_is_refused_at_once_not_asked_for_on_a_terminal(tmp_path):
    """A client certificate whose key is encrypted: OpenSSL asked for its pass phrase on the terminal, so a worker,
    console or command started from a shell waited at "Enter PEM pass phrase:", and a service (no terminal) stopped
    with "[Errno 22] Invalid argument".  Run on a terminal of the test's own, the command ends at once naming the key;
    the same key decrypted logs in to a broker that requires a client certificate."""
    from worker.api_client import ApiClient
    from worker.config import load_config

    files = broker_readable_dir("mosq-client-cert-")
    try:
        subprocess.run(["bash", str(DEPLOY / "make-certs.sh"), str(files)], check=True, capture_output=True)
        for command in (["openssl", "req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=worker", "-keyout",
                         "client.key", "-out", "client.csr"],
                        ["openssl", "x509", "-req", "-in", "client.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
                         "-CAcreateserial", "-days", "2", "-out", "client.crt"],
                        ["openssl", "pkey", "-in", "client.key", "-aes256", "-passout", "pass:not-asked",
                         "-out", "encrypted.key"]):
            subprocess.run(command, cwd=files, check=True, capture_output=True)
        broker = tls_broker(tmp_path / "broker", files, "require_certificate true\n")
        port = broker.port
        try:
            def config(key: str) -> Path:
                return write_config(tmp_path / key, port, tmp_path / "no-bundle", query={"timeout_s": 5}, mqtt={"tls": {
                    "ca_file": str(files / "ca.crt"), "cert_file": str(files / "client.crt"),
                    "key_file": str(files / key)}})

            main, terminal = os.openpty()
            name = os.ttyname(terminal)
            # a session of its own whose controlling terminal is ours, as a shell's is: OpenSSL asks on it
            proc = subprocess.Popen([sys.executable, "-m", "worker", "--config", str(config("encrypted.key")),
                                     "status"], cwd=ROOT, stdin=terminal, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True, start_new_session=True,
                                    preexec_fn=lambda: os.close(os.open(name, os.O_RDWR)))
            os.close(terminal)
            try:
                _, err = proc.communicate(timeout=60)
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
                os.close(main)
            assert proc.returncode == 2, err
            assert f"mqtt.tls: the client key {files / 'encrypted.key'} is encrypted with a pass phrase" in err, err

            client = ApiClient(load_config(config("client.key")), "status")
            try:
                client.link.start()
                assert client.link.wait_connected(30), client.link.problem
            finally:
                client.close()
        finally:
            broker.stop()
    finally:
        shutil.rmtree(files, ignore_errors=True)  # outside pytest's tmp_path (see broker_readable_dir)


def test_a_broker_certificate_out_of_date_by_this_boxs_clock_names_the_clock_not_the_ca_file(tmp_path):
    """A certificate's dates are read by the box's clock, which on an edge box without NTP yet can be years off: the
    worker, console and commands said the CA file or the host name was wrong, the two things that were right."""
    from worker.api_client import ApiClient
    from worker.config import load_config

    files = broker_readable_dir("mosq-expired-")
    try:
        subprocess.run(["bash", str(DEPLOY / "make-certs.sh"), str(files)], check=True, capture_output=True)
        (files / "server.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
        for command in (["openssl", "req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=localhost", "-keyout",
                         "server.key", "-out", "server.csr"],
                        ["openssl", "x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
                         "-CAcreateserial", "-days", "-1", "-extfile", "server.ext", "-out", "server.crt"]):
            subprocess.run(command, cwd=files, check=True, capture_output=True)  # valid until a day before it was made
        broker = tls_broker(tmp_path / "broker", files)
        port = broker.port
        try:
            config = write_config(tmp_path, port, tmp_path / "no-bundle", mqtt={"tls": {"ca_file": str(files / "ca.crt")}})
            client = ApiClient(load_config(config), "status")
            try:
                client.link.start()
                deadline = time.monotonic() + 30
                while not client.link.problem:
                    assert time.monotonic() < deadline, "no connection attempt failed"
                    time.sleep(0.05)
                problem = client.link.problem
            finally:
                client.close()
        finally:
            broker.stop()
    finally:
        shutil.rmtree(files, ignore_errors=True)  # outside pytest's tmp_path (see broker_readable_dir)
    assert "the broker's certificate is not trusted (certificate has expired): its validity dates are read by this " \
           "box's clock" in problem, problem
    assert "ca_file" not in problem, problem
