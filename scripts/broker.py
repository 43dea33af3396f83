"""A throwaway mosquitto on a free 127.0.0.1 port, from a generated config; stopped by PID.

Used by the tests, the demo and the benchmarks (never by the worker itself).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def broker_readable_dir(prefix: str = "mosquitto-") -> Path:
    """A fresh folder that mosquitto can read and write after dropping root to user 'mosquitto'."""
    folder = Path(tempfile.mkdtemp(prefix=prefix))
    folder.chmod(0o777)
    return folder


def mosquitto_path() -> str:
    exe = shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None)
    if exe is None:
        raise RuntimeError("mosquitto is not installed: apt-get install mosquitto (scripts/setup.sh does this)")
    return exe


class Broker:
    def __init__(self, folder: Path, extra: str = "", port: int | None = None, listener: str | None = None,
                 persistence_dir: Path | None = None) -> None:
        """``listener`` replaces the default anonymous plain listener (e.g. for TLS); ``extra`` is appended.

        ``persistence_dir`` keeps sessions and queued messages across a stop and a restart on the same
        port (a clean SIGTERM saves them); like every file the broker reads, it must be reachable by the
        user mosquitto drops to when started as root (see :func:`broker_readable_dir`).
        """
        self.port = port or free_port()
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.conf = self.folder / "mosquitto.conf"
        default = f"listener {self.port} 127.0.0.1\nallow_anonymous true\n"
        persistence = (f"persistence true\npersistence_location {persistence_dir}/\n" if persistence_dir
                       else "persistence false\n")
        self.conf.write_text((listener or default) + persistence + extra)
        self.log_path = self.folder / "mosquitto.log"
        self._log = self.log_path.open("ab")
        self.proc = subprocess.Popen([mosquitto_path(), "-c", str(self.conf)], stdout=self._log,
                                     stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), 0.2).close()
                return
            except OSError:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"mosquitto exited: {self.log_path.read_text()}") from None
                time.sleep(0.05)
        self.stop()
        raise RuntimeError("mosquitto did not start listening within 10 s")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


def tls_broker(folder: Path, certs: Path, listener_extra: str = "") -> Broker:
    """A broker whose one listener is TLS on 127.0.0.1, with ``certs``' server.crt and server.key and ca.crt as its
    CA (``listener_extra``: e.g. ``require_certificate true``); the files are made readable by the user mosquitto
    drops to (``certs`` from :func:`broker_readable_dir`)."""
    for f in certs.iterdir():
        f.chmod(0o644)
    port = free_port()
    return Broker(folder, port=port, listener=(
        f"listener {port} 127.0.0.1\nallow_anonymous true\n{listener_extra}cafile {certs / 'ca.crt'}\n"
        f"certfile {certs / 'server.crt'}\nkeyfile {certs / 'server.key'}\n"))
