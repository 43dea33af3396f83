"""The operator console as a process, and Debian's chromium under Playwright: shared by tests, demo and benchmark."""

from __future__ import annotations

import base64
import json
import resource
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")  # Debian's package: Playwright's browser downloads need the internet
# The console is on loopback: a proxy set for pip (http_proxy without no_proxy) must not carry the readiness check.
DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


class ConsoleProcess:
    """``python -m worker console --config FILE``; ready once its API answers and it reached the broker."""

    def __init__(self, config: Path, log: Path, port: int, timeout: float = 30,
                 auth: tuple[str, str] | None = None, open_files: tuple[int, int] | None = None) -> None:
        """``open_files``: the (soft, hard) RLIMIT_NOFILE the console starts with (default: this process's)."""
        self.url = f"http://127.0.0.1:{port}"
        headers = {"Authorization": "Basic " + base64.b64encode(":".join(auth).encode()).decode()} if auth else {}
        self.log_path = log
        self.log = log.open("wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "worker", "console", "--config", str(config)], cwd=ROOT,
                                     stdout=self.log, stderr=subprocess.STDOUT,
                                     preexec_fn=(lambda: resource.setrlimit(resource.RLIMIT_NOFILE, open_files))
                                     if open_files else None)
        deadline = time.monotonic() + timeout
        while True:
            try:
                request = urllib.request.Request(f"{self.url}/api/state", headers=headers)
                if json.loads(DIRECT.open(request, timeout=2).read())["broker"]:
                    return
            except (urllib.error.URLError, ConnectionError):
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the console did not start: {log.read_text()[-2000:]}")
            time.sleep(0.2)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
        code = self.proc.wait(20)
        self.log.close()
        return code


def launch(playwright, width: int = 1280, height: int = 900, **options):
    """A headless chromium context with a new, empty profile (``options``: Playwright's, e.g. http_credentials).

    Playwright makes the profile folder and deletes it when the browser closes (at the latest when its
    ``sync_playwright()`` block ends), so runs leave no profile behind.
    """
    browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
    return browser.new_context(viewport={"width": width, "height": height}, **options)
