#!/usr/bin/env bash
# `make results`: the r sweep on the validation split, then the results grid. Resumable: stop it
# at any time and run it again; finished runs are kept. OUT defaults to runs/results.
set -euo pipefail
PY=${PY:-.venv/bin/python}
OUT=${OUT:-runs/results}
HERE=benchmarks/results
$PY -m dorat compare $HERE/fmnist-sweep.yaml --out "$OUT/sweep" ${DEVICE:+--device $DEVICE}
# Baselines first (they do not depend on the sweep), then everything.
$PY -m dorat compare $HERE/fmnist.yaml --out "$OUT/grid" ${DEVICE:+--device $DEVICE} \
    --methods at,trades,mart,gairat,mail-at,mail-trades,wmmr
$PY -m dorat compare $HERE/fmnist.yaml --out "$OUT/grid" ${DEVICE:+--device $DEVICE}
$PY benchmarks/results/write_results.py --sweep "$OUT/sweep" --grid "$OUT/grid" --out docs
