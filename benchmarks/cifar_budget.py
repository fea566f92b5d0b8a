"""Which model and schedule fit a CIFAR-10 PGD-AT run into ~30 minutes of one CPU core: the
candidates' training throughput through dorat's own loop, side by side, against the machine's
measured one-thread GEMM and convolution rates (fp32 and bf16).

Every candidate trains with the configuration of ``configs/cifar10-cpu.yaml`` (PGD-5 at ε = 8/255,
batch 128, the default precision: bf16 autocast where the CPU has it, channels-last) on random
32×32 RGB images (throughput does not depend on the pixels; the accuracies come from real runs,
docs/PERFORMANCE.md). Timing is interleaved: each round runs ``--steps`` steps of every candidate
in a rotating order; examples/s is the median over rounds. FLOPs of one training step come from
torch.utils.flop_counter (every forward and backward of the attack and the update).

    python benchmarks/cifar_budget.py --doc docs/PERFORMANCE.md --json docs/perf-cifar.json
    python benchmarks/cifar_budget.py --smoke     # tiny, for the tests
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from perf import Dorat, publish, step_flops  # noqa: E402  (the same loop and outputs as make bench)

from dorat import config as C  # noqa: E402

MODELS = ["vgg8-w16", "vgg8-w32", "resnet20", "preact-resnet18-w16", "preact-resnet18"]
MARK_BEGIN, MARK_END = "<!-- cifar-budget:begin -->", "<!-- cifar-budget:end -->"
TRAIN_N = 50_000  # CIFAR-10's training images (minus data.val_size when one is held out)


def _best_rate(fn: Any, flops: float, reps: int) -> float:
    fn()
    best = 0.0
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = max(best, flops / (time.perf_counter() - t0))
    return best


def machine_rates(reps: int = 3, small: bool = False) -> dict[str, float]:
    """One-thread practical peaks (FLOP/s): GEMM 1024² (fp32, bf16) and a 3×3 convolution of 64
    channels on 16×16 maps, batch 128, channels-last (fp32, bf16 autocast) with its backward."""
    n = 256 if small else 1024
    a, b = torch.randn(n, n), torch.randn(n, n)
    out = {"gemm_fp32": _best_rate(lambda: a @ b, 2 * n**3, reps),
           "gemm_bf16": _best_rate(lambda: a.bfloat16() @ b.bfloat16(), 2 * n**3, reps)}
    batch, c, s = (8, 16, 8) if small else (128, 64, 16)
    x = torch.randn(batch, c, s, s).contiguous(memory_format=torch.channels_last).requires_grad_(True)
    w = torch.randn(c, c, 3, 3).contiguous(memory_format=torch.channels_last).requires_grad_(True)
    fwd = 2 * batch * c * c * 9 * s * s

    def conv(bf16: bool) -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            y = F.conv2d(x, w, padding=1)
        y.float().sum().backward()

    out["conv_fp32"] = _best_rate(lambda: conv(False), 3 * fwd, reps)  # forward + 2 backward convs
    out["conv_bf16"] = _best_rate(lambda: conv(True), 3 * fwd, reps)
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=3, help="training steps per candidate per round")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--budget-minutes", type=float, default=30.0)
    ap.add_argument("--smoke", action="store_true", help="two tiny models, one round (tests)")
    ap.add_argument("--json")
    ap.add_argument("--doc", help="replace the block between the cifar-budget markers in this file")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    models = a.models.split(",")
    batch = 128
    if a.smoke:
        models, a.rounds, a.steps, batch = ["vgg8-w16", "resnet20"], 1, 1, 8
    with tempfile.TemporaryDirectory() as tmp:
        rng = np.random.default_rng(0)
        npz = Path(tmp) / "rgb32.npz"
        images = rng.integers(0, 256, (4 * batch + 20, 32, 32, 3), dtype=np.uint8)
        np.savez(npz, x_train=images[:-20], y_train=np.arange(4 * batch) % 10, x_test=images[-20:],
                 y_test=np.arange(20) % 10)
        sets = ["log.progress=off", f"batch_size={batch}", "data.augment=crop-flip"]
        if a.smoke:
            sets.append("attack.steps=1")
        base = C.resolve("cifar10-cpu", {"dataset": f"npz:{npz}"}, sets)
        contenders = {m: Dorat(base.replace({"model": m})) for m in models}
        times: dict[str, list[float]] = {m: [] for m in models}
        for r in range(a.rounds + 1):  # round 0 warms up
            order = models[r % len(models):] + models[: r % len(models)]
            for m in order:
                t0 = time.perf_counter()
                for _ in range(a.steps):
                    contenders[m].step()
                if r:
                    times[m].append((time.perf_counter() - t0) / a.steps)
        flops = {m: step_flops(contenders[m].step) for m in models}
        bf16 = contenders[models[0]].trainer.bf16
        rates = machine_rates(1 if a.smoke else 3, a.smoke)
    peak = rates["conv_bf16" if bf16 else "conv_fp32"]
    rows = {}
    for m in models:
        t = statistics.median(times[m])
        ex_s = batch / t
        epoch_min = TRAIN_N / ex_s / 60
        net = contenders[m].trainer.model
        rows[m] = {"params": sum(p.numel() for p in net.parameters()), "step_ms": 1e3 * t,
                   "examples_per_s": ex_s, "gflop_per_example": flops[m] / batch / 1e9,
                   "epoch_minutes": epoch_min, "epochs_in_budget": a.budget_minutes / epoch_min,
                   "flop_rate_gflops": flops[m] / t / 1e9, "fraction_of_conv_peak": flops[m] / t / peak}
    args = " ".join(argv if argv is not None else sys.argv[1:])
    result = {"command": f"python benchmarks/cifar_budget.py {args}",
              "threads": a.threads, "batch": batch, "attack_steps": base.attack.steps, "bf16": bf16,
              "torch": torch.__version__, "rounds": a.rounds, "budget_minutes": a.budget_minutes,
              "machine_gflops": {k: v / 1e9 for k, v in rates.items()}, "rows": rows, "smoke": a.smoke}
    publish(result, markdown(result), a.json, a.doc, MARK_BEGIN, MARK_END)
    return result


def markdown(r: dict[str, Any]) -> str:
    g = r["machine_gflops"]
    lines = [f"`{r['command']}` — PGD-{r['attack_steps']} training steps of batch {r['batch']} through "
             f"dorat's loop, {r['threads']} thread(s), {'bf16 autocast' if r['bf16'] else 'fp32'}, "
             f"channels-last, torch {r['torch']}; median of {r['rounds']} interleaved rounds. Machine, "
             f"one thread: GEMM {g['gemm_fp32']:.0f} GFLOP/s fp32, {g['gemm_bf16']:.0f} bf16; 3×3 conv "
             f"(64 ch, 16×16, batch 128, forward + backward) {g['conv_fp32']:.0f} fp32, "
             f"{g['conv_bf16']:.0f} bf16.", "",
             f"| model | parameters | GFLOP / example (train step) | examples/s | epoch of 50k (min) | "
             f"epochs in {r['budget_minutes']:g} min | GFLOP/s | of the conv peak |",
             "|---|---|---|---|---|---|---|---|"]
    for m, v in r["rows"].items():
        lines.append(f"| {m} | {v['params'] / 1e6:.2f} M | {v['gflop_per_example']:.2f} | "
                     f"{v['examples_per_s']:.0f} | {v['epoch_minutes']:.1f} | {v['epochs_in_budget']:.1f} | "
                     f"{v['flop_rate_gflops']:.0f} | {100 * v['fraction_of_conv_peak']:.0f}% |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
