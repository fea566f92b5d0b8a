"""Why the barrier lower level trains a less robust model (docs/RESULTS.md, the sweep).

    python benchmarks/results/lower_level.py --sweep runs/results/sweep [--n 1000]

For the sweep's DONE r = 2 models trained with the PGD and the barrier-GD lower level, it
attacks n test images with PGD-5 (the training attack), barrier-GD with 5 and 20 steps (the
barrier lower level's training attack) and PGD-20 (the evaluation), and prints each attack's
robust accuracy, mean CE and how much of the ε budget its perturbation uses (mean |δ|/ε and
the fraction of pixels moved by more than 0.9 ε).
"""

from __future__ import annotations

import argparse
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

from dorat.attacks.barrier import Barrier, barrier_attack
from dorat.attacks.pgd import pgd
from dorat.objectives.attacks import BARRIER_GD_LR
from dorat.runs.run import load_run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sweep", type=Path, required=True)
    ap.add_argument("--n", type=int, default=1000)
    a = ap.parse_args()
    torch.manual_seed(0)
    print("| trained with | attack | robust acc. | CE | mean abs(δ)/ε | pixels > 0.9 ε |")
    print("|---|---|---|---|---|---|")
    for name in ("done-r2", "done-r2-barrier"):
        run = load_run(a.sweep / "runs" / "fashion-mnist" / "default" / name / "seed0")
        model, cfg = run.model, run.cfg
        x = run.data.x_test[: a.n].to(run.device).float() / 255
        y = run.data.y_test[: a.n].to(run.device)
        eps, alpha = cfg["attack"]["eps"], cfg["attack"]["alpha"]
        bar = Barrier(eps, cfg["done"]["barrier_c"], cfg["done"]["barrier_lambda"])
        lr = cfg["done"]["barrier_lr"] or BARRIER_GD_LR  # as the barrier-gd lower level trains
        g = torch.Generator(run.device).manual_seed(0)
        attacks = {
            "PGD-5": partial(pgd, eps=eps, alpha=alpha, steps=5, generator=g),
            "barrier-GD-5": partial(barrier_attack, barrier=bar, steps=5, lr=lr, generator=g),
            "barrier-GD-20": partial(barrier_attack, barrier=bar, steps=20, lr=lr, generator=g),
            "PGD-20": partial(pgd, eps=eps, alpha=eps / 4, steps=20, generator=g),
        }
        for attack_name, attack in attacks.items():
            x_adv = attack(model, x, y).x_adv
            rel = (x_adv - x).abs() / eps
            with torch.no_grad():
                logits = model(x_adv)
            acc = (logits.argmax(1) == y).float().mean()
            ce = F.cross_entropy(logits, y)
            print(f"| {name} | {attack_name} | {100 * acc:.1f}% | {ce:.3f} | {rel.mean():.2f} | "
                  f"{100 * (rel > 0.9).float().mean():.1f}% |")


if __name__ == "__main__":
    main()
