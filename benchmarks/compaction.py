"""Batch compaction for FAT's early-stopped PGD (`fat.compact`): the same training with and
without it, side by side in one process.

FAT (Zhang et al. 2020) stops each example's attack τ steps after its first misclassification;
without compaction every later PGD step still runs the forward and backward passes on the whole
batch. With it (dorat.attacks.core.iterate) stopped examples leave the passes. Each round
trains the same run (seed, data, model) from scratch once per contender, in alternating order;
the result is the ratio of the median epoch times and a check that both runs end with the same
weights, bit for bit.

    python benchmarks/compaction.py --doc docs/PERFORMANCE.md --json docs/perf-compaction.json
    python benchmarks/compaction.py --smoke     # tiny synthetic data (used by the tests)
"""

from __future__ import annotations

import argparse
import hashlib
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

from dorat import config as C
from dorat.runs.run import read_log, train

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from perf import publish  # noqa: E402

MARK_BEGIN, MARK_END = "<!-- compaction:begin -->", "<!-- compaction:end -->"


def config(smoke: bool, epochs: int, compact: bool, data: str | None) -> C.Config:
    sets = ["eval.n=100", "eval.checks=false", "eval.steps=5", f"fat.compact={str(compact).lower()}",
            "attack.steps=10", "attack.alpha=0.025", "optim.lr=0.05", "optim.schedule=cosine",
            "perf.amp=off"]  # as measured (fp32); bf16 autocast is the default where native
    if smoke:
        return C.resolve(None, {"dataset": f"npz:{data}", "epochs": epochs, "method": "fat"},
                         [*sets, "eval.n=40", "attack.steps=3"])
    return C.resolve(None, {"dataset": "fashion-mnist", "epochs": epochs, "method": "fat"},
                     [*sets, "data.train_subset=10000"])


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--json")
    ap.add_argument("--doc")
    a = ap.parse_args(argv)
    data = None
    with tempfile.TemporaryDirectory() as tmp:
        if a.smoke:
            sys.path.insert(0, str(ROOT / "tests"))
            from conftest import make_synthetic_npz

            data = str(make_synthetic_npz(Path(tmp) / "toy.npz"))
        seconds: dict[str, list[float]] = {"off": [], "on": []}
        weights: dict[str, set[str]] = {"off": set(), "on": set()}
        for k in range(a.rounds):
            for name in (("off", "on") if k % 2 == 0 else ("on", "off")):
                out = Path(tmp) / f"{name}{k}"
                train(config(a.smoke, a.epochs, name == "on", data), out, log=lambda s: None)
                seconds[name] += [r["seconds"] for r in read_log(out)]
                weights[name].add(digest(out / "model.safetensors"))
    med = {k: statistics.median(v) for k, v in seconds.items()}
    result = {"epoch_seconds": seconds, "median_epoch_seconds": med, "speedup": med["off"] / med["on"],
              "same_weights": weights["off"] == weights["on"] and len(weights["on"]) == 1,
              "setting": "smoke" if a.smoke else "Fashion-MNIST 10k, small-cnn, FAT (PGD-10, tau 0 "
                                                 f"dynamic), {a.epochs} epochs x {a.rounds} rounds"}
    md = (f"| FAT, {result['setting']} | median epoch | |\n|---|---|---|\n"
          f"| without compaction | {med['off']:.2f} s | 1.00× |\n"
          f"| with compaction (`fat.compact`, default) | {med['on']:.2f} s | {result['speedup']:.2f}× |\n\n"
          f"Same final weights with and without: {'yes' if result['same_weights'] else 'NO'}.")
    publish(result, md, a.json, a.doc, MARK_BEGIN, MARK_END)
    return result


if __name__ == "__main__":
    main()
