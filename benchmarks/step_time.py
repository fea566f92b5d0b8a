"""Training-step time of each method relative to PGD-AT, measured side by side in one process.

Every round times one optimizer step (attack + loss + weighting + backward + SGD update) of
each method on the same batch, in a rotating order, so that drift in machine speed hits all
methods alike. Reports the median step time and its ratio to `at`.

    python benchmarks/step_time.py                       # Fashion-MNIST, small-cnn, batch 128
    python benchmarks/step_time.py --rounds 5 --json out.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from dorat import config as C
from dorat.objectives import StepContext
from dorat.train import prepare

METHODS = {
    "at": ("at", []),
    "done": ("done", []),
    "done-diag": ("done", ["done.hypergrad=diag"]),
    "done-cid": ("done-cid", ["done.cg_iters=5"]),
    "done-class": ("done-class", []),
    "trades": ("trades", []),
    "mart": ("mart", []),
    "fat": ("fat", []),
    "gairat": ("gairat", ["gairat.burn_in=0"]),
    "mail-at": ("mail-at", ["mail.burn_in=0"]),
    "mail-trades": ("mail-trades", ["mail.burn_in=0"]),
    "wmmr": ("wmmr", []),
    "done-trades": ("done-trades", []),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="fmnist-demo")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--steps", type=int, default=10, help="PGD / barrier steps")
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--json")
    a = ap.parse_args()
    runs = {}
    for name, (method, sets) in METHODS.items():
        cfg = C.resolve(a.config, {"method": method}, [f"attack.steps={a.steps}",
                                                      f"attack.alpha={0.25 / a.steps}", *sets])
        run = prepare(cfg)
        opt = torch.optim.SGD(run.model.parameters(), lr=0.01, momentum=0.9)
        runs[name] = (run, opt)
    run0 = next(iter(runs.values()))[0]
    x = run0.train.x[: a.batch_size].to(run0.device).float() / 255
    y = run0.train.y[: a.batch_size].to(run0.device)
    times: dict[str, list[float]] = {k: [] for k in runs}
    names = list(runs)
    for i in range(a.warmup + a.rounds):
        order = names[i % len(names):] + names[: i % len(names)]
        for name in order:
            run, opt = runs[name]
            gen = torch.Generator(device=run.device).manual_seed(i)
            if run.device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            out = run.method.step(run.model, x, y, StepContext(0, 1, i, gen))
            opt.zero_grad(set_to_none=True)
            out.objective.backward()
            opt.step()
            if run.device.type == "cuda":
                torch.cuda.synchronize()
            if i >= a.warmup:
                times[name].append(time.perf_counter() - t0)
    base = statistics.median(times["at"])
    rows = {k: {"median_s": statistics.median(v), "ratio_to_at": statistics.median(v) / base,
                "examples_per_s": a.batch_size / statistics.median(v)} for k, v in times.items()}
    print(f"{'method':<12} {'step ms':>9} {'ex/s':>8} {'x AT':>6}   (batch {a.batch_size}, "
          f"{a.steps} attack steps, {torch.get_num_threads()} threads, {a.rounds} rounds)")
    for k, r in rows.items():
        print(f"{k:<12} {1e3 * r['median_s']:9.1f} {r['examples_per_s']:8.0f} {r['ratio_to_at']:6.2f}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"settings": vars(a), "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
