"""Training throughput of dorat's hot loop against a textbook loop, side by side (`make bench`).

Contenders, all on the same data, model and attack (small-cnn on Fashion-MNIST, batch 128,
PGD-10 at eps 0.1, step 0.025, all CPU threads by default):

* ``reference``: how tutorials write adversarial training: a DataLoader over a TensorDataset,
  PGD that calls ``loss.backward()`` with the parameters still requiring grad (so every attack
  step also computes weight gradients), then a separate training step;
* dorat ``at`` (and ``at-nchw``: the same without the channels-last default), ``done``,
  ``done`` with ``hypergrad=diag``, ``done-cid`` (barrier lower level + CG-5), ``trades``
  (``--all-methods``: every preset): each through ``dorat.training.trainer.Trainer`` (the loop
  `dorat train` runs, including its per-epoch statistics) fed by ``dorat.data.loader.Batches``.

Timing is interleaved: every round runs ``--steps`` training steps of each contender, in a
rotating order, so drift in machine speed hits all alike; examples/s is the median over rounds.
Also measured: FLOPs of one step (torch.utils.flop_counter, forward and backward of every
attack and training pass) divided by the step time, as a fraction of the float32 GEMM rate
measured here; peak memory (CUDA: per contender; CPU: the process's peak RSS); and evaluation
throughput (PGD-20, 1,000 test points).

    python benchmarks/perf.py --json docs/perf.json --doc docs/PERFORMANCE.md
    python benchmarks/perf.py --all-methods --doc docs/PERFORMANCE.md   # every preset
    python benchmarks/perf.py --smoke          # tiny synthetic run (used by the tests)
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.flop_counter import FlopCounterMode

from dorat import config as C
from dorat.config import Config
from dorat.data.loader import Batches
from dorat.evaluation.evaluate import EvalSettings, run_attacks
from dorat.models import build_model
from dorat.objectives import StepContext
from dorat.runs.run import prepare
from dorat.training.stats import EpochStats
from dorat.training.trainer import Trainer

CONTENDERS = {  # name -> (method, extra config)
    "at": ("at", []),
    "at-nchw": ("at", ["perf.channels_last=off"]),  # what channels-last (the default) buys
    "done": ("done", ["done.warmup=0"]),
    "done-diag": ("done", ["done.warmup=0", "method.hypergrad=diag"]),
    "done-cid": ("done-cid", ["done.warmup=0", "hypergrad.cg_iters=5"]),
    "trades": ("trades", []),
}
MORE = {  # --all-methods: every other preset (burn-ins off, so the reweighting is what is timed)
    "done-class": ("done-class", ["done.warmup=0"]),
    "done-trades": ("done-trades", ["done.warmup=0"]),
    "mart": ("mart", []),
    "fat": ("fat", []),
    "gairat": ("gairat", ["gairat.warmup=0"]),
    "mail-at": ("mail-at", ["mail.warmup=0"]),
    "mail-trades": ("mail-trades", ["mail.warmup=0"]),
    "wmmr": ("wmmr", []),
}
TARGETS = {  # contender -> (compared with, upper bound on the step-time ratio)
    "at": ("reference", 1 / 1.3),  # i.e. at least 1.3x the reference's throughput
    "done": ("at", 1.03),
    "done-diag": ("at", 1.3),
    "done-cid": ("at", 3.0),
}
MARK_BEGIN, MARK_END = "<!-- perf:begin -->", "<!-- perf:end -->"
MARK_ALL_BEGIN, MARK_ALL_END = "<!-- perf-all:begin -->", "<!-- perf-all:end -->"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


class Reference:
    """The textbook loop: DataLoader, PGD with parameter gradients on, separate update."""

    def __init__(self, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int,
                 eps: float, alpha: float, steps: int, device: torch.device) -> None:
        self.model, self.eps, self.alpha, self.steps, self.device = model, eps, alpha, steps, device
        self.opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
        self.loader = DataLoader(TensorDataset(x.float() / 255, y), batch_size=batch, shuffle=True,
                                 drop_last=True)
        self.it: Iterator = iter(self.loader)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        try:
            return next(self.it)
        except StopIteration:
            self.it = iter(self.loader)
            return next(self.it)

    def step(self) -> None:
        x, y = self.next_batch()
        x, y = x.to(self.device), y.to(self.device)
        self.model.train()
        x_adv = (x + torch.empty_like(x).uniform_(-self.eps, self.eps)).clamp(0, 1)
        for _ in range(self.steps):
            x_adv.requires_grad_(True)
            loss = F.cross_entropy(self.model(x_adv), y)
            self.model.zero_grad()
            loss.backward()
            with torch.no_grad():
                x_adv = x_adv + self.alpha * x_adv.grad.sign()
                x_adv = torch.min(torch.max(x_adv, x - self.eps), x + self.eps).clamp(0, 1)
        self.opt.zero_grad()
        F.cross_entropy(self.model(x_adv.detach()), y).backward()
        self.opt.step()


class Dorat:
    """One dorat method through the real training loop (Trainer.step + Batches + stats)."""

    def __init__(self, cfg: Config) -> None:
        self.run = prepare(cfg)
        self.batches = Batches(self.run.train.to(self.run.device), cfg.batch_size, shuffle=True,
                               seed=cfg.seed)
        self.trainer = Trainer(self.run, len(self.batches))
        self.stats = EpochStats(self.run.data.num_classes, self.run.device)
        self.gen = torch.Generator(device=self.run.device).manual_seed(0)
        self.epoch, self.i = 0, 0
        self.it = self.batches.epoch(0)
        self.run.method.weighting.start_epoch(0, 1)

    def step(self) -> None:
        try:
            x, y = next(self.it)
        except StopIteration:
            self.epoch += 1
            self.it = self.batches.epoch(self.epoch)
            x, y = next(self.it)
        self.trainer.step(x, y, StepContext(0, 1, self.i, self.gen), self.stats)
        self.i += 1


def gemm_rate(device: torch.device, sizes: tuple[int, ...] = (1024, 2048, 4096),
              reps: int = 3) -> float:
    """Measured float32 matrix-multiply FLOP/s: the best over sizes and repeats (the machine's
    practical peak for the denominators below)."""
    best = 0.0
    for n in sizes:
        a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
        a @ b
        for _ in range(reps):
            sync(device)
            t0 = time.perf_counter()
            a @ b
            sync(device)
            best = max(best, 2 * n**3 / (time.perf_counter() - t0))
    return best


def step_flops(step: Callable[[], None]) -> float:
    with FlopCounterMode(display=False) as fc:
        step()
    return float(fc.get_total_flops())


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="fmnist-demo")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--attack-steps", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--steps", type=int, default=5, help="training steps per contender per round")
    ap.add_argument("--warmup", type=int, default=1, help="rounds not counted")
    ap.add_argument("--eval-n", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default: all)")
    ap.add_argument("--smoke", action="store_true", help="tiny synthetic data, 1 round (tests)")
    ap.add_argument("--all-methods", action="store_true",
                    help="time every preset (its own table in the doc)")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--doc", help="replace the table between the perf markers in this Markdown file")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    sets = [f"attack.steps={a.attack_steps}", "attack.alpha=0.025", "attack.eps=0.1",
            f"batch_size={a.batch_size}", "log.progress=off", "data.train_subset=null",
            "perf.amp=off"]  # fp32 like the reference loop (bf16 autocast is the default where native)
    flags: dict[str, Any] = {}
    tmp = None
    if a.smoke:
        import numpy as np

        tmp = tempfile.TemporaryDirectory()
        rng = np.random.default_rng(0)
        path = Path(tmp.name) / "smoke.npz"
        np.savez(path, x_train=rng.integers(0, 256, (64, 28, 28), dtype=np.uint8),
                 y_train=np.arange(64) % 10, x_test=rng.integers(0, 256, (40, 28, 28), dtype=np.uint8),
                 y_test=np.arange(40) % 10)
        flags["dataset"] = f"npz:{path}"
        a.rounds, a.steps, a.warmup, a.eval_n = 1, 1, 0, 20
        sets += ["batch_size=16", "attack.steps=2"]
        a.batch_size, a.attack_steps = 16, 2
    contenders: dict[str, Any] = {}
    for name, (method, extra) in {**CONTENDERS, **(MORE if a.all_methods else {})}.items():
        contenders[name] = Dorat(C.resolve(a.config, {**flags, "method": method}, [*sets, *extra]))
    at = contenders["at"].run
    torch.manual_seed(0)
    c, h, _ = at.data.shape
    ref_model = build_model(at.cfg.model, c, h, at.data.num_classes).to(at.device)
    contenders = {"reference": Reference(ref_model, at.train.x, at.train.y, a.batch_size, 0.1, 0.025,
                                         a.attack_steps, at.device), **contenders}
    device = at.device
    names = list(contenders)
    times: dict[str, list[float]] = {k: [] for k in names}
    peak: dict[str, float | None] = {k: None for k in names}
    for r in range(a.warmup + a.rounds):
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            sync(device)
            t0 = time.perf_counter()
            for _ in range(a.steps):
                contenders[name].step()
            sync(device)
            if r >= a.warmup:
                times[name].append((time.perf_counter() - t0) / a.steps)
            if device.type == "cuda":
                peak[name] = max(peak[name] or 0, torch.cuda.max_memory_allocated() / 2**20)
    flops = {k: step_flops(contenders[k].step) for k in names}
    gemm = gemm_rate(device) if not a.smoke else gemm_rate(device, (256,), 1)
    # evaluation throughput: PGD-20 on eval_n test points with the `at` contender's model
    x_te, y_te = at.data.x_test[: a.eval_n], at.data.y_test[: a.eval_n]
    sync(device)
    t0 = time.perf_counter()
    run_attacks(contenders["at"].trainer.model, x_te, y_te, ["pgd"],
                EvalSettings(eps=0.1, steps=20, channels_last=contenders["at"].trainer.channels_last),
                device)
    sync(device)
    eval_rate = len(y_te) / (time.perf_counter() - t0)
    rows = {}
    for k in names:
        t = statistics.median(times[k])
        rows[k] = {"step_ms": 1e3 * t, "examples_per_s": a.batch_size / t,
                   "gflop_per_step": flops[k] / 1e9, "flop_rate_fraction_of_gemm": flops[k] / t / gemm,
                   "peak_mem_mib": peak[k]}
    for k in names:
        rows[k]["vs_reference"] = rows[k]["examples_per_s"] / rows["reference"]["examples_per_s"]
        rows[k]["step_time_x_at"] = rows[k]["step_ms"] / rows["at"]["step_ms"]
    targets = {}
    for k, (other, bound) in TARGETS.items():
        ratio = rows[k]["step_ms"] / rows[other]["step_ms"]
        targets[k] = {"ratio": ratio, "vs": other, "bound": bound, "met": ratio <= bound}
    result = {
        "command": "python benchmarks/perf.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "settings": {"batch_size": a.batch_size, "attack_steps": a.attack_steps, "rounds": a.rounds,
                     "steps_per_round": a.steps, "threads": torch.get_num_threads(),
                     "device": str(device), "torch": torch.__version__, "smoke": a.smoke},
        "gemm_gflops": gemm / 1e9, "eval_pgd20_examples_per_s": eval_rate,
        "process_peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "rows": rows, "targets": targets,
    }
    publish(result, markdown(result), a.json, a.doc,
            *((MARK_ALL_BEGIN, MARK_ALL_END) if a.all_methods else (MARK_BEGIN, MARK_END)))
    if tmp is not None:
        tmp.cleanup()
    return result


def markdown(r: dict[str, Any]) -> str:
    s = r["settings"]
    lines = [f"`{r['command']}` — batch {s['batch_size']}, PGD-{s['attack_steps']}, {s['threads']} "
             f"threads on {s['device']}, torch {s['torch']}; median of {s['rounds']} interleaved "
             f"rounds of {s['steps_per_round']} steps.", "",
             "| loop | step (ms) | examples/s | × reference throughput | step time × at | GFLOP/step "
             "| FLOP rate / GEMM rate | peak memory (MiB) |",
             "|---|---|---|---|---|---|---|---|"]
    for k, v in r["rows"].items():
        mem = "–" if v["peak_mem_mib"] is None else f"{v['peak_mem_mib']:.0f}"
        lines.append(f"| {k} | {v['step_ms']:.1f} | {v['examples_per_s']:.0f} | {v['vs_reference']:.2f} | "
                     f"{v['step_time_x_at']:.2f} | {v['gflop_per_step']:.2f} | "
                     f"{100 * v['flop_rate_fraction_of_gemm']:.1f}% | {mem} |")
    lines += ["", f"float32 GEMM rate measured: {r['gemm_gflops']:.1f} GFLOP/s; evaluation (PGD-20): "
              f"{r['eval_pgd20_examples_per_s']:.0f} examples/s; process peak RSS "
              f"{r['process_peak_rss_mib']:.0f} MiB (CPU memory is not split per loop).", "",
              "| target | measured | met |", "|---|---|---|"]
    for k, t in r["targets"].items():
        what = "at throughput ≥ 1.3× reference" if k == "at" else f"{k} step time ≤ {t['bound']:g}× at"
        measured = (f"{1 / t['ratio']:.2f}× reference" if k == "at" else f"{t['ratio']:.2f}× at")
        lines.append(f"| {what} | {measured} | {'yes' if t['met'] else '**no**'} |")
    return "\n".join(lines)


def publish(result: dict[str, Any], md: str, json_path: str | None, doc: str | None,
            begin: str, end: str) -> None:
    """What every benchmark does with its result: print the table, write the JSON (--json) and
    put the table between the markers in a Markdown file (--doc)."""
    print(md)
    if json_path:
        Path(json_path).write_text(json.dumps(result, indent=2))
    if doc:
        write_doc(Path(doc), md, begin, end)


def write_doc(path: Path, md: str, begin: str = MARK_BEGIN, end: str = MARK_END) -> None:
    text = path.read_text() if path.exists() else ""
    block = f"{begin}\n{md}\n{end}"
    if begin in text and end in text:
        text = text[: text.index(begin)] + block + text[text.index(end) + len(end):]
    else:
        text = text + ("\n" if text else "") + block + "\n"
    path.write_text(text)


if __name__ == "__main__":
    main()
