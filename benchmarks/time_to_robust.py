"""Robustness per CPU-second: validation robust accuracy against training CPU time.

Contenders on the results budget (benchmarks/results/base.yaml: small-cnn, Fashion-MNIST,
ε = 0.1, 8 epochs, 30,000 training images): ``at`` (PGD-5), ``done``, ``fast-at`` (FGSM-RS),
``n-fgsm``, ``done-n-fgsm``, each also with ``perf.amp=bf16`` (``--bf16``). Every run probes
its validation split after each epoch with PGD-20 (``val.every=1``, ``val.steps=20``,
``val.n`` points) — the catastrophic-overfitting guard of the single-step ones reads the same
probe — and the curve is the probe's accuracy against the cumulative training CPU-seconds of
the epochs (log.jsonl's ``cpu_seconds``: the process's CPU time with the probe's own cost left
out; on an idle machine and one thread it equals the wall-clock ``seconds``; unlike them it does
not count time another job holds the core, but cache and memory contention still show: about
10% on a fp32 epoch here, so measure on an otherwise idle machine). Set OMP_NUM_THREADS=1 for
a one-thread measurement. The runs go one after another, alternating the order over ``--rounds``.

Headline: the time a contender needs to reach PGD-AT's final validation robust accuracy within
1 point, as a fraction of PGD-AT's whole training time (issue 32's target: at most 0.35).

    python benchmarks/time_to_robust.py --json docs/perf-time-to-robust.json \\
        --doc docs/PERFORMANCE.md --plot docs/time_to_robust.png --work runs/ttr [--bf16]
    python benchmarks/time_to_robust.py --smoke      # tiny synthetic data (used by the tests)
"""

from __future__ import annotations

import argparse
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

MARK_BEGIN, MARK_END = "<!-- time-to-robust:begin -->", "<!-- time-to-robust:end -->"
METHODS = {"at": [], "done": [], "fast-at": ["attack.steps=1"], "n-fgsm": ["attack.steps=1"],
           "done-n-fgsm": ["attack.steps=1"]}


def curve(log: list[dict[str, Any]]) -> list[tuple[float, float]]:
    """(cumulative training CPU-seconds, probe RA) after each epoch."""
    t, out = 0.0, []
    for r in log:
        t += r["cpu_seconds"]
        out.append((t, r["val_ra_pgd"]))
    return out


def time_to(points: list[tuple[float, float]], level: float) -> float | None:
    return next((t for t, ra in points if ra >= level), None)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bf16", action="store_true", help="also every contender with perf.amp=bf16")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--val-n", type=int, default=1000)
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--json")
    ap.add_argument("--doc")
    ap.add_argument("--plot")
    ap.add_argument("--work", help="keep the runs here (default: a temporary directory); the same "
                                   "command resumes: finished runs are read back, stopped ones resume "
                                   "from their last epoch (each epoch keeps the seconds it was measured in)")
    a = ap.parse_args(argv)
    tmp = tempfile.TemporaryDirectory()
    work = Path(a.work) if a.work else Path(tmp.name)
    base, flags = str(ROOT / "benchmarks" / "results" / "base.yaml"), {}
    sets = ["val.every=1", "val.steps=20", f"val.n={a.val_n}", "eval.n=100", "eval.attacks=[pgd]",
            "eval.checks=false", "log.progress=off"]
    if a.smoke:
        sys.path.insert(0, str(ROOT / "tests"))
        from conftest import make_synthetic_npz

        flags = {"dataset": f"npz:{make_synthetic_npz(Path(tmp.name) / 'toy.npz')}", "epochs": 2}
        sets += ["data.train_subset=null", "data.val_size=80", "val.n=40", "val.steps=2", "eval.n=40",
                 "attack.steps=2"]
    runs = {f"{m}{'+bf16' if amp else ''}": (m, [*extra, *(["perf.amp=bf16"] if amp else [])])
            for amp in ([False, True] if a.bf16 else [False]) for m, extra in METHODS.items()}
    curves: dict[str, list[list[tuple[float, float]]]] = {k: [] for k in runs}
    for r in range(a.rounds):
        order = list(runs) if r % 2 == 0 else list(reversed(runs))
        for name in order:
            method, extra = runs[name]
            cfg = C.resolve(base, {**flags, "method": method}, [*sets, *extra])
            out = work / f"{name}-{r}"
            train(cfg, out, resume=True, log=lambda s: None)
            curves[name].append(curve(read_log(out)))
    # per contender: the median over rounds of each epoch's time and accuracy
    med = {k: [(statistics.median(p[i][0] for p in v), statistics.median(p[i][1] for p in v))
               for i in range(min(len(p) for p in v))] for k, v in curves.items()}
    at_time, at_ra = med["at"][-1]
    level = at_ra - 0.01
    rows = {}
    for k, pts in med.items():
        t = time_to(pts, level)
        rows[k] = {"final_val_ra_pgd20": pts[-1][1], "train_cpu_seconds": pts[-1][0],
                   "cpu_seconds_to_at_minus_1": t, "fraction_of_at_time": None if t is None else t / at_time}
    result = {"settings": {"smoke": a.smoke, "rounds": a.rounds, "val_n": a.val_n, "bf16": a.bf16},
              "at_final_val_ra": at_ra, "level": level, "curves": med, "rows": rows,
              "target_met": any(v["fraction_of_at_time"] is not None and v["fraction_of_at_time"] <= 0.35
                                for k, v in rows.items() if k != "at")}
    lines = ["| contender | final val RA (PGD-20) | training CPU-s | CPU-s to PGD-AT's RA − 1 | × PGD-AT's |",
             "|---|---|---|---|---|"]
    for k, v in rows.items():
        t, frac = v["cpu_seconds_to_at_minus_1"], v["fraction_of_at_time"]
        reached = "not reached" if t is None else f"{t:.0f} s"
        lines.append(f"| {k} | {100 * v['final_val_ra_pgd20']:.2f}% | {v['train_cpu_seconds']:.0f} | "
                     f"{reached} | {'–' if frac is None else f'{frac:.2f}'} |")
    publish(result, "\n".join(lines), a.json, a.doc, MARK_BEGIN, MARK_END)
    if a.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4.2))
        for k, pts in med.items():
            ax.plot([t for t, _ in pts], [100 * ra for _, ra in pts], marker="o", label=k,
                    ls="--" if "bf16" in k else "-")
        ax.axhline(100 * level, color="grey", lw=0.8, ls=":", label="PGD-AT's final RA − 1")
        ax.set_xlabel("training CPU time (s)")
        ax.set_ylabel("validation RA, PGD-20 (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(a.plot, dpi=110)
        plt.close(fig)
    tmp.cleanup()
    return result


if __name__ == "__main__":
    main()
