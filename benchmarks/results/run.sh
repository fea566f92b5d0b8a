#!/usr/bin/env bash
# `make results`: the r sweep on the validation split, then the results grid, then
# docs/RESULTS.md. Resumable: stop it at any time and run it again; finished runs are kept.
# The grid runs seeds outermost, so a stopped grid already compares every method on seed 0.
# OUT defaults to runs/results.
set -euo pipefail
PY=${PY:-.venv/bin/python}
OUT=${OUT:-runs/results}
HERE=benchmarks/results
$PY -m dorat compare $HERE/fmnist-sweep.yaml --out "$OUT/sweep" ${DEVICE:+--device $DEVICE}
$PY -m dorat compare $HERE/fmnist.yaml --out "$OUT/grid" ${DEVICE:+--device $DEVICE}
$PY $HERE/write_results.py --sweep "$OUT/sweep" --grid "$OUT/grid" --out docs
