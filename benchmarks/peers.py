"""dorat against the trainers users would pick instead, side by side in one process.

Training throughput at the same model (small-cnn), data (Fashion-MNIST), batch (128), ε (0.1)
and attack (PGD-10, step ε/4, uniform random start), one process, interleaved rounds:

* ``dorat``: PGD-AT through dorat's training loop (`dorat.training.trainer.Trainer`, as in perf.py),
  in fp32, and ``dorat-bf16`` with ``perf.amp=bf16`` (``--bf16``; a different precision, so a
  row of its own: whether bf16 keeps the robustness is issue 32's bf16 validation);
* ``torchattacks``: the loop most research code (and MAIR) writes: ``torchattacks.PGD`` makes
  the adversarial batch (model in eval mode during the attack, its default), then one SGD step
  on CE — DataLoader batches, as those scripts do;
* ``art``: IBM ART's ``AdversarialTrainerMadryPGD`` on a ``PyTorchClassifier`` (its own
  PGD and batching over NumPy arrays), one epoch per round over the same images.

Each contender trains ``--n`` images per round; examples/s is the median over rounds. Also the
evaluation: dorat's PGD-20 (``dorat.evaluation.evaluate.run_attacks``) against ``torchattacks.PGD``
(20 steps, step ε/4) on the same test points, examples/s. Peers that are not installed are
skipped with a message (``pip install torchattacks adversarial-robustness-toolbox``; torchattacks
with ``--no-deps``: it asks for torchvision, which it does not import).

    python benchmarks/peers.py --json docs/perf-peers.json --doc docs/PERFORMANCE.md
    python benchmarks/peers.py --smoke        # tiny synthetic data (used by the tests)
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
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from dorat import config as C
from dorat.evaluation.evaluate import EvalSettings, run_attacks
from dorat.models import build_model

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from perf import Dorat, publish  # noqa: E402

MARK_BEGIN, MARK_END = "<!-- peers:begin -->", "<!-- peers:end -->"
EPS, STEPS, LR = 0.1, 10, 0.01


def _optional(name: str) -> Any | None:
    try:
        return __import__(name)
    except ImportError:
        print(f"peers: {name} is not installed; skipped (pip install "
              f"{'adversarial-robustness-toolbox' if name == 'art' else name})", file=sys.stderr)
        return None


class DoratLoop:
    def __init__(self, cfg: C.Config, batch: int) -> None:
        self.d, self.batch = Dorat(cfg), batch

    def epoch(self, n: int) -> None:
        for _ in range(n // self.batch):
            self.d.step()


class TorchattacksLoop:
    def __init__(self, ta: Any, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int) -> None:
        self.model = model
        self.atk = ta.PGD(model, eps=EPS, alpha=EPS / 4, steps=STEPS, random_start=True)
        self.opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9, weight_decay=5e-4)
        self.loader = DataLoader(TensorDataset(x, y), batch_size=batch, shuffle=True, drop_last=True)

    def epoch(self, n: int) -> None:
        for i, (x, y) in enumerate(self.loader):
            if i * len(y) >= n:
                break
            self.model.train()
            x_adv = self.atk(x, y)
            self.opt.zero_grad()
            F.cross_entropy(self.model(x_adv), y).backward()
            self.opt.step()


class ARTLoop:
    def __init__(self, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int) -> None:
        from art.defences.trainer import AdversarialTrainerMadryPGD
        from art.estimators.classification import PyTorchClassifier

        clf = PyTorchClassifier(model, loss=torch.nn.CrossEntropyLoss(),
                                optimizer=torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9,
                                                          weight_decay=5e-4),
                                input_shape=tuple(x.shape[1:]), nb_classes=int(y.max()) + 1,
                                clip_values=(0.0, 1.0), device_type="cpu")
        self.trainer = AdversarialTrainerMadryPGD(clf, nb_epochs=1, batch_size=batch, eps=EPS,
                                                  eps_step=EPS / 4, max_iter=STEPS, num_random_init=1)
        self.x, self.y = x.numpy(), y.numpy()

    def epoch(self, n: int) -> None:
        self.trainer.fit(self.x[:n], self.y[:n])


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=2048, help="training images per contender per round")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--eval-n", type=int, default=500)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--bf16", action="store_true", help="also dorat with perf.amp=bf16")
    ap.add_argument("--json")
    ap.add_argument("--doc")
    a = ap.parse_args(argv)
    flags: dict[str, Any] = {"method": "at"}
    tmp = tempfile.TemporaryDirectory()
    if a.smoke:
        sys.path.insert(0, str(ROOT / "tests"))
        from conftest import make_synthetic_npz

        flags["dataset"] = f"npz:{make_synthetic_npz(Path(tmp.name) / 'toy.npz', n_train=256)}"
        a.n, a.rounds, a.eval_n, a.batch_size = 64, 1, 32, 32
    sets = [f"attack.steps={STEPS}", f"attack.alpha={EPS / 4}", f"attack.eps={EPS}",
            f"batch_size={a.batch_size}", "log.progress=off", "data.train_subset=null",
            "perf.amp=off"]  # the `dorat` row is fp32, like the peers; `dorat-bf16` is its own row
    cfg = C.resolve("fmnist-demo", flags, sets)
    ours = DoratLoop(cfg, a.batch_size)
    run = ours.d.run
    x = run.train.x[: a.n].float().div(255) if run.train.x.dtype == torch.uint8 else run.train.x[: a.n]
    x = x if x.dim() == 4 else x.unsqueeze(1)
    y = run.train.y[: a.n]
    c, h, _ = run.data.shape

    def fresh() -> torch.nn.Module:
        torch.manual_seed(0)
        return build_model(cfg.model, c, h, run.data.num_classes)

    contenders: dict[str, Any] = {"dorat": ours}
    if a.bf16:
        contenders["dorat-bf16"] = DoratLoop(C.resolve("fmnist-demo", flags, [*sets, "perf.amp=bf16"]),
                                             a.batch_size)
    ta = _optional("torchattacks")
    if ta is not None:
        contenders["torchattacks"] = TorchattacksLoop(ta, fresh(), x, y, a.batch_size)
    if _optional("art") is not None:
        contenders["art"] = ARTLoop(fresh(), x, y, a.batch_size)
    names = list(contenders)
    seconds: dict[str, list[float]] = {k: [] for k in names}
    for r in range(a.rounds + 1):  # round 0 warms up
        for name in names[r % len(names):] + names[: r % len(names)]:
            t0 = time.perf_counter()
            contenders[name].epoch(a.n)
            if r:
                seconds[name].append(time.perf_counter() - t0)
    done = (a.n // a.batch_size) * a.batch_size
    rate = {k: done / statistics.median(v) for k, v in seconds.items()}
    # evaluation: PGD-20 on the same test points, dorat's evaluator vs torchattacks
    model = ours.d.trainer.model.eval()
    xt, yt = run.data.x_test[: a.eval_n], run.data.y_test[: a.eval_n]
    ev: dict[str, float] = {}
    t0 = time.perf_counter()
    settings = EvalSettings(eps=EPS, steps=20, channels_last=ours.d.trainer.channels_last)
    run_attacks(model, xt, yt, ["pgd"], settings, run.device)
    ev["dorat"] = len(yt) / (time.perf_counter() - t0)
    if ta is not None:
        xf = xt.float().div(255) if xt.dtype == torch.uint8 else xt
        xf = (xf if xf.dim() == 4 else xf.unsqueeze(1)).contiguous()
        atk = ta.PGD(model, eps=EPS, alpha=EPS / 4, steps=20, random_start=True)
        t0 = time.perf_counter()
        for b in range(0, len(yt), 500):
            atk(xf[b:b + 500], yt[b:b + 500])
        ev["torchattacks"] = len(yt) / (time.perf_counter() - t0)
    result = {
        "settings": {"n": a.n, "rounds": a.rounds, "batch_size": a.batch_size, "eps": EPS, "steps": STEPS,
                     "threads": torch.get_num_threads(), "torch": torch.__version__, "smoke": a.smoke,
                     "versions": {k: getattr(sys.modules.get(m), "__version__", None)
                                  for k, m in (("torchattacks", "torchattacks"), ("art", "art"))}},
        "train_examples_per_s": rate, "train_seconds": seconds,
        "train_speedup": {k: rate["dorat"] / v for k, v in rate.items() if k not in ("dorat", "dorat-bf16")},
        "train_speedup_bf16": {k: rate["dorat-bf16"] / v for k, v in rate.items() if k not in (
            "dorat", "dorat-bf16")} if "dorat-bf16" in rate else None,
        "eval_pgd20_examples_per_s": ev,
        "eval_speedup": {k: ev["dorat"] / v for k, v in ev.items() if k != "dorat"},
    }
    rows = [f"| {k} | {rate[k]:.0f} | {rate['dorat'] / rate[k]:.2f}× |" for k in names if k != "dorat-bf16"]
    if "dorat-bf16" in rate:
        rows += [f"| dorat-bf16 (vs {k}) | {rate['dorat-bf16']:.0f} | {rate['dorat-bf16'] / rate[k]:.2f}× |"
                 for k in names if k not in ("dorat", "dorat-bf16")]
    cmd = (f"python benchmarks/peers.py --n {a.n} --rounds {a.rounds} --eval-n {a.eval_n}"
           + (f" --batch-size {a.batch_size}" if a.batch_size != 128 else "") + (" --bf16" if a.bf16 else ""))
    md = (f"`{cmd}` — {torch.get_num_threads()} thread(s); training: {a.n} images per contender "
          f"per round, median of {a.rounds} interleaved round(s); evaluation: {len(yt)} test points.\n\n"
          "| PGD-AT training (small-cnn, batch 128, PGD-10, ε 0.1) | examples/s | dorat's speed-up |\n"
          "|---|---|---|\n" + "\n".join(rows) + "\n\n"
          "| PGD-20 evaluation, same points | examples/s | dorat's speed-up |\n|---|---|---|\n"
          + "\n".join(f"| {k} | {v:.0f} | {ev['dorat'] / v:.2f}× |" for k, v in ev.items()))
    publish(result, md, a.json, a.doc, MARK_BEGIN, MARK_END)
    tmp.cleanup()
    return result


if __name__ == "__main__":
    main()
