"""`dorat compare --workers N` against one process: wall time of the same small grid, interleaved.

On a CPU, a small convnet does not use two threads well (a 128-image batch of 28x28 images is
too little work to split), so two single-threaded processes, each on its own run, may finish a
grid sooner than one two-threaded process that runs the runs one after another. This measures
it on the grid the results use (small-cnn, Fashion-MNIST, PGD-5 training, PGD-20 + CW and
AutoAttack evaluation), shrunk to a few minutes: every round trains and evaluates the same
runs from scratch once per contender, in alternating order, and the median round time is
reported; the speed-up is the ratio of medians.

    python benchmarks/workers.py --doc docs/PERFORMANCE.md --json docs/perf-workers.json
    python benchmarks/workers.py --smoke      # tiny synthetic grid (used by the tests)
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from dorat.compare import available_cores

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from perf import publish  # noqa: E402  (one way to print and write results for every benchmark)

MARK_BEGIN, MARK_END = "<!-- workers:begin -->", "<!-- workers:end -->"


def grid_file(where: Path, smoke: bool, runs: int) -> Path:
    """A compare file of ``runs`` PGD-AT runs (seeds 0..runs-1) on a slice of the results grid."""
    if smoke:
        sys.path.insert(0, str(ROOT / "tests"))
        from conftest import make_synthetic_npz

        npz = make_synthetic_npz(where / "toy.npz", n_train=256, n_test=64)
        sets = {"dataset": f"npz:{npz}", "epochs": 1, "batch_size": 64, "attack.steps": 2,
                "eval.n": 32, "eval.steps": 3, "eval.checks": False}
        evals: list[dict[str, Any]] = []
    else:
        sets = {"epochs": 1, "data.train_subset": 3000, "eval.n": 1000, "eval.checks": False}
        evals = [{"name": "aa100", "attacks": ["aa"], "n": 100}]
    spec = {"title": "workers benchmark", "base": str(ROOT / "benchmarks/results/base.yaml"),
            "set": sets, "methods": ["at"], "seeds": list(range(runs)), "evals": evals}
    f = where / "grid.yaml"
    f.write_text(yaml.safe_dump(spec, sort_keys=False))
    return f


def run_once(grid: Path, out: Path, workers: int) -> float:
    cmd = [sys.executable, "-m", "dorat", "compare", str(grid), "--out", str(out),
           "--workers", str(workers), "--device", "cpu"]
    env = dict(os.environ)
    env.pop("OMP_NUM_THREADS", None)  # one process: all the cores; workers: compare splits them
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, default=2, help="the contender's number of processes")
    ap.add_argument("--runs", type=int, default=2, help="runs in the grid (a multiple of --workers)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--smoke", action="store_true", help="tiny synthetic grid, for the tests")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--doc", help="replace the block between the workers markers in this file")
    a = ap.parse_args(argv)
    cores = available_cores()  # what compare splits between its workers
    times: dict[str, list[float]] = {"1": [], str(a.workers): []}
    with tempfile.TemporaryDirectory() as tmp:
        grid = grid_file(Path(tmp), a.smoke, a.runs)
        for i in range(a.rounds):
            order = [1, a.workers] if i % 2 == 0 else [a.workers, 1]  # alternate who goes first
            for w in order:
                out = Path(tmp) / f"out-{i}-{w}"
                times[str(w)].append(run_once(grid, out, w))
                print(f"round {i + 1}: --workers {w}: {times[str(w)][-1]:.1f}s", file=sys.stderr)
    med = {w: statistics.median(t) for w, t in times.items()}
    result = {"cores": cores, "runs": a.runs, "rounds": a.rounds, "smoke": a.smoke,
              "seconds": times, "median_seconds": med,
              "speedup": med["1"] / med[str(a.workers)], "workers": a.workers}
    publish(result, markdown(result), a.json, a.doc, MARK_BEGIN, MARK_END)
    return result


def markdown(r: dict[str, Any]) -> str:
    w = str(r["workers"])
    what = ("a tiny synthetic grid (smoke run)" if r["smoke"] else
            f"{r['runs']} PGD-AT runs of the results grid's budget shrunk to 1 epoch on 3,000 images, "
            "each evaluated with PGD-20 + CW on 1,000 test points and AutoAttack on 100")
    rows = [f"| `--workers 1` ({r['cores']} threads) | {r['median_seconds']['1']:.1f} | "
            f"{', '.join(f'{t:.1f}' for t in r['seconds']['1'])} | 1.00 |",
            f"| `--workers {w}` ({max(1, r['cores'] // r['workers'])} thread(s) each) | "
            f"{r['median_seconds'][w]:.1f} | {', '.join(f'{t:.1f}' for t in r['seconds'][w])} | "
            f"{r['speedup']:.2f} |"]
    return "\n".join([
        f"`python benchmarks/workers.py` — {what}; {r['cores']} cores; median of {r['rounds']} "
        "interleaved rounds.", "",
        "| grid run as | median wall time (s) | rounds (s) | speed-up |", "|---|---|---|---|", *rows])


if __name__ == "__main__":
    main()
