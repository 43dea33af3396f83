#!/usr/bin/env bash
# Sets up the machine (scripts/setup.sh), lints and type-checks, and runs the whole test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
# Fast checks first: lint and types (configured in pyproject.toml) fail in seconds, before the slow tests.
printf '\n==> ruff check\n'; .venv/bin/ruff check bundle worker exporter
printf '\n==> mypy\n'; .venv/bin/mypy
printf '\n==> pytest\n'
exec .venv/bin/python -m pytest -q "$@"
