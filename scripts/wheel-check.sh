#!/usr/bin/env bash
# The wheel works alone: `python -m build` makes an sdist and a wheel; the wheel goes into a fresh
# virtual environment (CPU torch first, as README.md says), and from a directory outside the
# checkout dorat answers --version, --help and --list-keys, trains one epoch on a tiny npz,
# evaluates the run and reports it. Catches package data missing from the wheel (configs/*.yaml,
# methods.yaml, the compare grids) and imports that only work from the source tree.
# Usage: PY=.venv/bin/python bash scripts/wheel-check.sh   (make wheel-check)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
TORCH=${TORCH:-torch==2.13.0}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
"$PY" -m build --sdist --wheel --outdir "$WORK/dist" . > "$WORK/build.log" 2>&1 || {
  cat "$WORK/build.log"; exit 1; }
WHEEL=$(ls "$WORK"/dist/dorat-*.whl)
ls "$WORK"/dist/dorat-*.tar.gz > /dev/null
python3 -m venv "$WORK/venv"
"$WORK/venv/bin/pip" install -q "$TORCH"
"$WORK/venv/bin/pip" install -q "$WHEEL"
cd "$WORK"  # outside the checkout: only the installed wheel can answer
D="$WORK/venv/bin/dorat"
VERSION=$("$WORK/venv/bin/python" -c "import dorat; print(dorat.__version__)")
[ "$("$D" --version)" = "dorat $VERSION" ]
"$D" --help > /dev/null
"$D" train --list-keys | grep -q "done.r"
"$D" train --method done-val --config fmnist-demo --list-keys > /dev/null  # packaged presets
"$WORK/venv/bin/python" - <<'PY'
import numpy as np
rng = np.random.default_rng(0)
y = np.arange(200) % 4
x = (rng.random((200, 16, 16)) * 60 + (y[:, None, None] * 40)).astype(np.uint8)
np.savez("toy.npz", x_train=x, y_train=y, x_test=x[:40], y_test=y[:40])
PY
"$D" train --dataset npz:toy.npz --epochs 1 --out run --set batch_size=50 --set attack.steps=1 \
  --set eval.n=20 --set eval.steps=2 --set eval.checks=false
[ -f run/metrics.json ] && [ -f run/model.safetensors ]
"$D" eval run --attacks pgd --n 20 --steps 2 > /dev/null
[ -f run/eval.json ]
"$D" report run --out rep > /dev/null
[ -f rep/report.md ]
echo "wheel check: $(basename "$WHEEL") installs alone and trains, evaluates and reports (dorat $VERSION)"
