#!/usr/bin/env bash
# Sets up the machine (scripts/setup.sh) and runs the end-to-end demo. Extra arguments go to scripts/demo.py.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
exec .venv/bin/python -m scripts.demo "$@"
