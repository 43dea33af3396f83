#!/usr/bin/env bash
# Performance benchmarks of issue #4, one after the other; tables on stdout, JSON under $OUT.
# Needs ../shared/data/mvtec/grid. On 2 shared cores the whole run takes tens of minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
OUT=${OUT:-/tmp/edge-inspect-bench}
mkdir -p "$OUT"
"$PY" -m benchmarks.coreset --ratio 0.01 --repeats 3 --json "$OUT/coreset.json" 2>"$OUT/coreset.log"
"$PY" -m benchmarks.throughput --int8 --rounds 3 --json "$OUT/throughput.json" 2>"$OUT/throughput.log"
"$PY" -m benchmarks.startup --repeats 3 --json "$OUT/startup.json" 2>"$OUT/startup.log"
"$PY" -m benchmarks.latency --config 640:7616 --config 512:1500:screen=500 --config 256:1500 --repeats 5 \
    >"$OUT/latency.md" 2>"$OUT/latency.log"
