"""glibc's default allocator against dorat's setting (dorat.system.runtime.tune_allocator), interleaved.

The allocator is process-wide, so each contender is a fresh process running the same work: a
short `dorat train` (small-cnn, batch 128, PGD-5), `dorat eval` with PGD-20 and CW on 1,000
test points (batch 500, the results grid's evaluation), and AutoAttack through dorat's adapter
on 500 points at batch 500 with a reduced budget (same sub-attacks and tensor sizes as the
official settings, far fewer iterations). One contender runs with ``DORAT_MALLOC=system``
(glibc's defaults), the other without (dorat's setting). Rounds alternate the order; the
median per part is reported, with the page faults the process took in it, and whether both
produced bitwise the same weights, evaluation numbers and AutoAttack verdicts.

    python benchmarks/allocator.py --threads 1 --doc docs/PERFORMANCE.md --json docs/perf-alloc.json
    python benchmarks/allocator.py --smoke      # tiny synthetic run (used by the tests)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from perf import publish  # noqa: E402  (one way to print and write results for every benchmark)

MARK_BEGIN, MARK_END = "<!-- allocator:begin -->", "<!-- allocator:end -->"
CONTENDERS = {"glibc defaults (DORAT_MALLOC=system)": "system", "dorat (tune_allocator)": "auto"}
PARTS = ("train", "eval PGD-20 + CW", "AutoAttack (reduced budget)")


def child(a: argparse.Namespace) -> None:
    """One contender: the three parts in this process; prints one JSON line."""
    from dorat.system.runtime import tune_allocator

    state = tune_allocator()  # DORAT_MALLOC=system leaves glibc alone
    import torch

    from dorat.attacks.autoattack import autoattack_correct
    from dorat.cli import main as cli
    from dorat.evaluation.evaluate import stratified_subset
    from dorat.runs.run import load_run

    work = Path(a.child)
    sets = (["--config", str(ROOT / "benchmarks/results/base.yaml"), "--set", "eval.checks=false",
             "--set", "eval.attacks=pgd", "--set", "eval.n=16"]  # the results grid's budget
            + (["--dataset", f"npz:{a.npz}", "--set", "batch_size=64", "--set", "attack.steps=2",
                "--set", "data.train_subset=256", "--set", "data.val_size=0"]
               if a.smoke else ["--set", f"data.train_subset={a.train_n}"]))
    parts: dict[str, dict[str, float]] = {}

    def timed(name: str, fn: Any) -> Any:
        f0, t0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
        out = fn()
        parts[name] = {"seconds": time.perf_counter() - t0,
                       "page_faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0}
        return out

    run = work / "run"
    timed(PARTS[0], lambda: cli(["train", "--method", "at", "--epochs", "1", "--out", str(run),
                                 "--overwrite", "--device", "cpu", *sets]))
    n_eval, n_aa = (32, 32) if a.smoke else (1000, 500)
    timed(PARTS[1], lambda: cli(["eval", str(run), "--attacks", "pgd,cw", "--n", str(n_eval),
                                 "--no-checks", "--out", str(work / "eval.json"), "--device", "cpu"]))
    loaded = load_run(run, "cpu")
    idx = stratified_subset(loaded.data.y_test, n_aa, loaded.data.num_classes, 0)
    x, y = loaded.data.x_test[idx].float().div(255), loaded.data.y_test[idx]
    budget = {"iters": 3, "queries": 20, "targets": 2} if a.smoke else {"iters": 10, "queries": 300}
    correct = timed(PARTS[2], lambda: autoattack_correct(
        loaded.model.eval(), x, y, float(loaded.cfg["attack"]["eps"]), batch_size=500, budget=budget))
    metrics = json.loads((work / "eval.json").read_text())
    metrics.pop("eval_seconds", None)
    digest = "/".join(hashlib.sha256(b).hexdigest()[:12] for b in (
        b"".join(t.numpy().tobytes() for t in loaded.model.state_dict().values()),
        json.dumps(metrics, sort_keys=True).encode(), correct.numpy().tobytes()))
    print(json.dumps({"allocator": state, "parts": parts, "digest": digest,
                      "threads": torch.get_num_threads(),
                      "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def run_contender(setting: str, a: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    env = dict(os.environ)
    env["DORAT_MALLOC"] = setting
    if a.threads:
        env["OMP_NUM_THREADS"] = str(a.threads)
    work = tmp / setting
    work.mkdir(exist_ok=True)
    cmd = [sys.executable, __file__, "--child", str(work), "--train-n", str(a.train_n)]
    if a.smoke:
        cmd += ["--smoke", "--npz", str(a.npz)]
    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, help="OMP_NUM_THREADS of the contenders (default: all)")
    ap.add_argument("--train-n", type=int, default=1280, help="training images (one epoch)")
    ap.add_argument("--smoke", action="store_true", help="tiny synthetic run, for the tests")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--doc", help="replace the block between the allocator markers in this file")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--npz", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        child(a)
        return {}
    names = list(CONTENDERS)
    rounds: dict[str, list[dict[str, Any]]] = {k: [] for k in names}
    with tempfile.TemporaryDirectory() as tmp:
        if a.smoke:
            sys.path.insert(0, str(ROOT / "tests"))
            from conftest import make_synthetic_npz

            a.npz = make_synthetic_npz(Path(tmp) / "toy.npz", n_train=256, n_test=64)
        for i in range(a.rounds):
            for name in names if i % 2 == 0 else names[::-1]:
                rounds[name].append(run_contender(CONTENDERS[name], a, Path(tmp)))
                took = sum(p["seconds"] for p in rounds[name][-1]["parts"].values())
                print(f"round {i + 1}: {name}: {took:.1f}s", file=sys.stderr)
    med = {k: {p: {m: statistics.median(r["parts"][p][m] for r in v) for m in ("seconds", "page_faults")}
               for p in PARTS} for k, v in rounds.items()}
    base, ours = names
    result = {
        "threads": rounds[base][0]["threads"], "smoke": a.smoke, "rounds": rounds, "median": med,
        "allocator": {k: v[0]["allocator"] for k, v in rounds.items()},
        "speedup": {p: med[base][p]["seconds"] / med[ours][p]["seconds"] for p in PARTS},
        "bitwise_identical": len({r["digest"] for v in rounds.values() for r in v}) == 1,
        "peak_rss_mib": {k: max(r["peak_rss_mib"] for r in v) for k, v in rounds.items()},
    }
    publish(result, markdown(result), a.json, a.doc, MARK_BEGIN, MARK_END)
    return result


def markdown(r: dict[str, Any]) -> str:
    names = list(r["median"])
    rows = [f"| {p} | " + " | ".join(f"{r['median'][k][p]['seconds']:.1f} s, "
                                      f"{r['median'][k][p]['page_faults'] / 1e3:,.0f}k faults"
                                      for k in names) + f" | {r['speedup'][p]:.2f} |" for p in PARTS]
    what = "smoke run" if r["smoke"] else ("small-cnn on Fashion-MNIST; train: 1 epoch of PGD-5 AT; "
                                           "eval: 1,000 points; AutoAttack: 500 points, 10 iterations, "
                                           "300 Square queries")
    return "\n".join([
        f"`python benchmarks/allocator.py` — {what}; {r['threads']} thread(s); fresh process per "
        f"contender, median of {len(r['rounds'][names[0]])} interleaved rounds. Bitwise-identical "
        f"weights, metrics and AutoAttack verdicts: {'yes' if r['bitwise_identical'] else 'NO'}. "
        f"Peak RSS: " + ", ".join(f"{k} {v:.0f} MiB" for k, v in r["peak_rss_mib"].items()) + ".", "",
        f"| part | {' | '.join(names)} | speed-up |", "|---|---|---|---|", *rows])


if __name__ == "__main__":
    main()
