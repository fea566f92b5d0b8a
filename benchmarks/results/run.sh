#!/usr/bin/env bash
# `make results`: the results grid, then docs/RESULTS.md. Resumable: stop it at any time and run
# it again; finished runs are kept, and interrupted ones resume where they stopped (after the
# batch in progress on SIGTERM or Ctrl-C; after the last checkpoint on a kill -9).
# The grid runs seeds outermost, so a stopped grid already compares every method on seed 0.
#
# The runs live in $OUT/grid (default benchmarks/results/grid). Their small files (config, log,
# metrics, evaluations) are meant to be committed as runs finish, so that the grid goes on from
# any clone, on any machine (weights and checkpoints are git-ignored; a finished run whose
# model is gone is only redone if an evaluation is still missing).
# WORKERS processes share the grid (default 2: on 2 CPU cores two single-threaded workers
# train faster than one two-threaded process; on GPUs each worker takes one GPU in turn).
# The r sweep on the validation split ran once; its aggregate is docs/results/sweep.json.
# SWEEP=1 runs it again into $OUT/sweep first (23 runs), and the long-tailed check of r
# (fmnist-longtail-sweep.yaml, 20 runs) into $OUT/sweep-longtail.
set -euo pipefail
PY=${PY:-.venv/bin/python}
HERE=benchmarks/results
OUT=${OUT:-$HERE}
WORKERS=${WORKERS:-2}
if [ "${SWEEP:-0}" = 1 ]; then
  $PY -m dorat compare $HERE/fmnist-sweep.yaml --out "$OUT/sweep" --workers "$WORKERS" ${DEVICE:+--device $DEVICE}
  $PY -m dorat compare $HERE/fmnist-longtail-sweep.yaml --out "$OUT/sweep-longtail" --workers "$WORKERS" ${DEVICE:+--device $DEVICE}
fi
# FIRST=balanced/wat-at,... runs those rows (compare --methods) before the rest of the grid.
if [ -n "${FIRST:-}" ]; then
  $PY -m dorat compare $HERE/fmnist.yaml --out "$OUT/grid" --workers "$WORKERS" --methods "$FIRST" ${DEVICE:+--device $DEVICE}
fi
$PY -m dorat compare $HERE/fmnist.yaml --out "$OUT/grid" --workers "$WORKERS" ${DEVICE:+--device $DEVICE}
$PY $HERE/write_results.py --sweep "$OUT/sweep" --sweep-longtail "$OUT/sweep-longtail" --grid "$OUT/grid" --out docs
