"""Behaviour preserved across a refactor: train every method preset 2 epochs on a small
stratified Fashion-MNIST subset with a fixed seed, then compare two such directories.

    python benchmarks/behaviour.py run OUT            # every preset into OUT/<preset>
    python benchmarks/behaviour.py compare BEFORE AFTER   # same metrics, same weights?

Run `run` on the old code (PYTHONPATH=old/src) and on the new one, on one machine (CPU kernels
differ between machines), then `compare`. Numbers are deterministic on CPU: a refactor that
preserves behaviour gives identical metrics and bitwise-identical weights.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

# every method preset (a fixed list: the old and the new code run the same), in an order where
# FAAL's init (the PGD-AT run) comes first
PRESETS = ["standard", "at", "trades", "mart", "fat", "fast-at", "n-fgsm", "gairat", "mail-at",
           "mail-trades", "wmmr", "done", "done-fast-at", "done-n-fgsm", "done-cid", "done-class",
           "done-trades", "frl-rw", "frl-rm", "frl-rwrm", "wat", "wat-at", "done-val", "at-cfa",
           "trades-cfa", "dafa", "dafa-at", "faal", "faal-scratch"]
# a validation split for the presets that read one (FRL, WAT, CFA, done-val), the same for all
ARGS = ["--config", "fmnist-demo", "--epochs", "2", "--seed", "0", "--set", "data.train_subset=2000",
        "--set", "data.val_size=500", "--set", "val.n=200", "--set", "eval.n=500",
        "--set", "eval.steps=10", "--set", "eval.check_n=100",
        "--set", "perf.amp=off"]  # fp32, as the directories it is compared with
SINGLE = ["--set", "attack.steps=1"]  # fmnist-demo's 5 steps are refused by the single-step attacks
EXTRA = {"faal": lambda out: ["--init", str(out / "at")],  # FAAL fine-tunes the PGD-AT run
         **{m: lambda out: SINGLE for m in ("fast-at", "n-fgsm", "done-fast-at", "done-n-fgsm")}}
KEYS = ("sa", "ra", "per_class", "worst_class", "tail30", "eps_sweep")


def run(out: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for m in PRESETS:
        if (out / m / "metrics.json").is_file():
            continue
        cmd = [sys.executable, "-m", "dorat", "train", "--method", m, "--out", str(out / m), "--overwrite",
               *ARGS, *(EXTRA[m](out) if m in EXTRA else [])]
        subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL)


def compare(a: Path, b: Path) -> bool:
    import torch
    from safetensors.torch import load_file

    same_all = True
    for m in PRESETS:
        ma, mb = (json.loads((d / m / "metrics.json").read_text()) for d in (a, b))
        wa, wb = (load_file(str(d / m / "model.safetensors")) for d in (a, b))
        metrics = all(ma[k] == mb[k] for k in KEYS)
        weights = wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
        same_all &= metrics and weights
        print(f"{m:12s} SA {100 * ma['sa']:6.2f} -> {100 * mb['sa']:6.2f}   "
              f"RA-PGD {100 * ma['ra']['pgd']:6.2f} -> {100 * mb['ra']['pgd']:6.2f}   "
              f"metrics {'same' if metrics else 'DIFFER'}, "
              f"weights {'bitwise same' if weights else 'DIFFER'}")
    return same_all


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("run").add_argument("out", type=Path)
    c = sub.add_parser("compare")
    c.add_argument("before", type=Path)
    c.add_argument("after", type=Path)
    a = p.parse_args()
    if a.cmd == "run":
        run(a.out)
        return 0
    return 0 if compare(a.before, a.after) else 1


if __name__ == "__main__":
    raise SystemExit(main())
