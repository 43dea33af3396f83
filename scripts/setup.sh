#!/usr/bin/env bash
# Sets up this machine for edge-inspect: Debian's mosquitto (and chromium, for the test extra) when missing, a venv in .venv,
# and the project with its extras (default: test = exporter + worker + test tools).
# Idempotent: a second run only checks. Usage: scripts/setup.sh [EXTRA]
set -euo pipefail
cd "$(dirname "$0")/.."
extra="${1:-test}"

step() { printf '\n==> %s\n' "$*"; }

apt_missing=()
command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || apt_missing+=(mosquitto mosquitto-clients)
# the console's browser tests drive Debian's chromium (Playwright's own browser downloads need the internet)
[ "$extra" != test ] || [ -x /usr/bin/chromium ] || apt_missing+=(chromium)
if [ ${#apt_missing[@]} -gt 0 ]; then
  step "installing ${apt_missing[*]} (Debian packages)"
  sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${apt_missing[@]}" >/dev/null
fi

python_bin="$(command -v python3.11 || command -v python3)"
if [ ! -x .venv/bin/python ]; then
  step "creating .venv with $($python_bin --version)"
  "$python_bin" -m venv .venv
fi
if ! .venv/bin/python -c "import sys; import importlib.metadata as m; m.version('edge-inspect')" 2>/dev/null \
   || [ pyproject.toml -nt .venv/.installed-"$extra" ]; then
  step "installing edge-inspect[$extra] into .venv (first time: several minutes, torch is large)"
  .venv/bin/python -m pip install --quiet --upgrade pip
  log="$(mktemp)"
  if ! .venv/bin/python -m pip install --progress-bar off -e ".[$extra]" >"$log" 2>&1; then
    tail -40 "$log"; echo "pip install failed (full log: $log)" >&2; exit 1
  fi
  grep -E '^Successfully' "$log" || true
  .venv/bin/python -c "import openvino, paho.mqtt, qdrant_client" # fails loudly if the install did not work
  touch .venv/.installed-"$extra"
fi
step "setup done"
