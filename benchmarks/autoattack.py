"""AutoAttack through dorat's adapter against a plain pyautoattack call, side by side.

The adapter (dorat.attacks.autoattack) runs AutoAttack with the model's parameters frozen
(requires_grad off): APGD and FAB only need input gradients, and with the weights still
requiring grad every backward they call also computes the weight gradients. Both contenders
get the same model, points, seed and official settings (version standard); rounds alternate
their order, and the result checks that both found the same robust points.

    python benchmarks/autoattack.py --run RUN_DIR --n 100 --doc docs/PERFORMANCE.md --json docs/perf-aa.json
    python benchmarks/autoattack.py --smoke     # tiny synthetic model (used by the tests)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from perf import publish  # noqa: E402  (one way to print and write results for every benchmark)

MARK_BEGIN, MARK_END = "<!-- autoattack:begin -->", "<!-- autoattack:end -->"


def plain_autoattack(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, seed: int,
                     budget: dict[str, int] | None) -> torch.Tensor:
    """AutoAttack as its README calls it: the model as it is, weights requiring grad."""
    from pyautoattack import AutoAttack

    from dorat.attacks.autoattack import _apply_budget

    adversary = AutoAttack(model, eps=eps, norm="Linf", seed=seed, version="standard", device=x.device)
    if budget:
        _apply_budget(adversary, budget)
    with torch.random.fork_rng():
        x_adv, _ = adversary.run_standard_evaluation(x, y, batch_size=len(y))
    with torch.no_grad():
        return model(x_adv).argmax(1) == y


def load_points(a: argparse.Namespace, tmp: Path) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor,
                                                          float, str]:
    from dorat.evaluation.evaluate import stratified_subset
    from dorat.runs.run import load_run

    if a.smoke:  # a quickly trained model on the tests' synthetic data, in tmp
        sys.path.insert(0, str(ROOT / "tests"))
        from conftest import make_synthetic_npz
        from dorat import config as C
        from dorat.runs.run import train

        npz = make_synthetic_npz(tmp / "toy.npz", n_train=256, n_test=64)
        cfg = C.resolve(None, {"dataset": f"npz:{npz}", "epochs": 1, "batch_size": 64},
                        ["attack.steps=2", "eval.n=16", "eval.attacks=pgd", "eval.checks=false"])
        train(cfg, tmp / "run", log=lambda s: None)
        a.run = str(tmp / "run")
    run = load_run(a.run, "cpu")
    idx = stratified_subset(run.data.y_test, a.n, run.data.num_classes, 0)
    x = run.data.x_test[idx].float().div(255)
    return run.model.eval(), x, run.data.y_test[idx], float(run.cfg["attack"]["eps"]), a.run


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from dorat.attacks.autoattack import autoattack_correct

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", help="a finished dorat run (its model, test set and eps)")
    ap.add_argument("--n", type=int, default=100, help="stratified test points")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    ap.add_argument("--smoke", action="store_true", help="tiny synthetic model and AutoAttack budget")
    ap.add_argument("--json")
    ap.add_argument("--doc", help="replace the block between the autoattack markers in this file")
    ap.add_argument("--marker", default="autoattack",
                    help="the markers' name (<!-- NAME:begin --> ... <!-- NAME:end -->)")
    a = ap.parse_args(argv)
    if not a.run and not a.smoke:
        ap.error("--run RUN_DIR is required (or --smoke)")
    if a.threads:
        torch.set_num_threads(a.threads)
    with tempfile.TemporaryDirectory() as tmp:
        model, x, y, eps, where = load_points(a, Path(tmp))
    budget = {"iters": 5, "queries": 50, "targets": 2} if a.smoke else None
    contenders = {
        "pyautoattack, weights requiring grad": lambda: plain_autoattack(model, x, y, eps, 0, budget),
        "dorat adapter, weights frozen": lambda: autoattack_correct(model, x, y, eps, seed=0,
                                                                    batch_size=len(y), budget=budget),
    }
    times: dict[str, list[float]] = {k: [] for k in contenders}
    found: dict[str, torch.Tensor] = {}
    names = list(contenders)
    for i in range(a.rounds):
        for name in names if i % 2 == 0 else names[::-1]:
            for p in model.parameters():
                p.grad = None
            t0 = time.perf_counter()
            found[name] = contenders[name]()
            times[name].append(time.perf_counter() - t0)
            print(f"round {i + 1}: {name}: {times[name][-1]:.1f}s", file=sys.stderr)
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {"run": where, "n": len(y), "eps": eps, "threads": torch.get_num_threads(),
              "smoke": a.smoke, "seconds": times, "median_seconds": med,
              "speedup": med[names[0]] / med[names[1]],
              "same_points": bool(torch.equal(found[names[0]], found[names[1]])),
              "robust_accuracy": float(found[names[1]].float().mean())}
    publish(result, markdown(result), a.json, a.doc, f"<!-- {a.marker}:begin -->",
            f"<!-- {a.marker}:end -->")
    return result


def markdown(r: dict[str, Any]) -> str:
    rows = [f"| {k} | {r['median_seconds'][k]:.1f} | {', '.join(f'{t:.1f}' for t in v)} | "
            f"{r['median_seconds'][next(iter(r['seconds']))] / r['median_seconds'][k]:.2f} |"
            for k, v in r["seconds"].items()]
    what = "smoke run, tiny budget" if r["smoke"] else "AutoAttack standard, official settings"
    return "\n".join([
        f"`python benchmarks/autoattack.py` — {what}; {r['n']} stratified test points of "
        f"`{r['run']}` at ε = {r['eps']}; {r['threads']} thread(s); median of "
        f"{len(next(iter(r['seconds'].values())))} interleaved rounds. Robust accuracy "
        f"{100 * r['robust_accuracy']:.1f}%; both found the same robust points: "
        f"{'yes' if r['same_points'] else 'NO'}.", "",
        "| AutoAttack run as | median (s) | rounds (s) | speed-up |", "|---|---|---|---|", *rows])


if __name__ == "__main__":
    main()
