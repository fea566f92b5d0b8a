"""The training loop: schedule, checkpoint/resume, per-epoch logging, final evaluation.

RUN_DIR layout:
    config.yaml             the full resolved config (a run is fully described by it)
    log.jsonl               one JSON line per finished epoch
    checkpoint.safetensors  model + optimizer + scheduler + method state, written atomically
    model.safetensors       final weights
    weights.safetensors     the last finished epoch's training weights per example, in units
                            of the uniform weight 1/|B| ("w"), with labels ("y"), adversarial
                            losses ("loss") and positions in the training split ("idx")
    metrics.json            final evaluation (SA, RA, per-class, worst class, RA-Tail-30)

Determinism: data order, augmentation and attack noise of epoch e are pure functions of
(seed, e), and the checkpoint holds all other state, so a run resumed after epoch e ends with
the same weights as an uninterrupted one (bitwise on CPU).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from tqdm import tqdm

from dorat import config as cfglib
from dorat import distributed
from dorat.checkpoint import (
    load_state,
    load_state_dict_checked,
    save_state,
    save_weights,
    write_text_atomic,
)
from dorat.checks import warning_lines
from dorat.data import Dataset, load_dataset
from dorat.data.loader import Batches, Split, make_splits, resolve_augment
from dorat.errors import CheckpointError, ConfigError, DoratError
from dorat.evaluate import ATTACK_NAMES, evaluate, settings_from_config
from dorat.models import build_model
from dorat.objectives import Method, StepContext, build_method, check_method
from dorat.objectives.base import ess_from_moments

RUN_FILES = ("config.yaml", "log.jsonl", "checkpoint.safetensors", "model.safetensors",
             "weights.safetensors", "metrics.json")
# An evaluation's progress while it runs (RUN/.metrics.partial.safetensors,
# RUN/.eval-NAME.partial.safetensors): resumed after an interruption, deleted when it is done.
JOURNAL = ".{name}.partial.safetensors"


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device 'cuda' requested but CUDA is not available; use --device cpu")
    if name == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("device 'mps' requested but MPS is not available; use --device cpu")
    return torch.device(name)


def lr_lambda(schedule: str, total_steps: int, milestones: list[float], gamma: float
              ) -> Callable[[int], float]:
    """Multiplier of the base lr at global step t (stepped once per batch)."""
    T = max(1, total_steps)
    if schedule == "constant":
        return lambda t: 1.0
    if schedule == "piecewise":
        marks = sorted(int(round(m * T)) for m in milestones)
        return lambda t: gamma ** sum(t >= m for m in marks)
    if schedule == "cosine":
        return lambda t: 0.5 * (1 + math.cos(math.pi * min(t, T) / T))
    if schedule == "onecycle":  # linear warm-up to the peak at 40% of training, then down to 0
        peak = 0.4 * T
        return lambda t: t / peak if t < peak else max(0.0, (T - t) / (T - peak))
    raise ConfigError(f"unknown schedule '{schedule}'")


@dataclass
class Run:
    """Everything a training run needs, built and validated before anything is written."""

    cfg: dict[str, Any]
    data: Dataset
    train: Split
    val: Split | None
    model: nn.Module
    method: Method
    device: torch.device


def run_splits(cfg: dict[str, Any], data: Dataset) -> tuple[Split, Split | None]:
    """The run's training split and held-out validation split, as its config defines them."""
    d = cfg["data"]
    return make_splits(data.x_train, data.y_train, data.num_classes, cfg["seed"],
                       val_size=d["val_size"], train_subset=d["train_subset"],
                       imbalance_ratio=d["imbalance_ratio"])


def prepare(cfg: dict[str, Any], d: distributed.Dist | None = None) -> Run:
    """Validate the config, load data, build model and method. Writes nothing."""
    device = distributed.device_for(d or distributed.Dist(), resolve_device(cfg["device"]))
    check_method(cfg)  # an unknown method fails before data is read
    data = load_dataset(cfg["dataset"], cfg["data"]["dir"], cfg["data"]["download"])
    train, val = run_splits(cfg, data)
    if cfg["eval"]["split"] == "val" and val is None:
        raise ConfigError("eval.split=val needs a validation split: set data.val_size (e.g. 5000)")
    method = build_method(cfg, {"num_classes": data.num_classes,
                                "class_counts": train.class_counts(data.num_classes)})
    torch.manual_seed(cfg["seed"])
    c, h, w = data.shape
    try:
        model = build_model(cfg["model"], c, h, data.num_classes)
    except ValueError as e:
        raise ConfigError(f"model '{cfg['model']}' does not fit dataset '{data.name}': {e}") from None
    return Run(cfg, data, train, val, model.to(device), method, device)


def load_run(run_dir: str | Path, device: str = "auto",
             overrides: dict[str, Any] | None = None) -> Run:
    """A finished run ready for analysis: its config (with ``overrides`` of dotted keys, e.g.
    ``{"eval.n": 1000}``), data, and the trained model weights."""
    from dorat.checkpoint import load_weights

    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise DoratError(f"{run_dir} is not a dorat run (no config.yaml); pass a train --out dir")
    data, source = cfglib.load_yaml(str(run_dir / "config.yaml"))
    cfg = cfglib.from_dict(data, source)
    for key, value in {"device": device, **(overrides or {})}.items():
        if value is not None:
            cfglib.set_key(cfg, key, value)
    run = prepare(cfg)
    load_weights(run_dir / "model.safetensors", run.model)
    run.model.eval()
    return run


class _Stats:
    """Per-epoch sums kept on the device (no host sync per step)."""

    def __init__(self, num_classes: int, device: torch.device) -> None:
        z = lambda: torch.zeros((), device=device, dtype=torch.float64)  # noqa: E731
        self.loss, self.correct_adv, self.correct_clean, self.n = z(), z(), z(), 0
        self.w_max, self.batches = z(), 0
        self.w_moments: list[torch.Tensor] = []  # per batch: Σw, Σw², |B| (global under DDP)
        self.grad_norm_max, self.clipped, self.clip_used = z(), z(), False
        self.w_class = torch.zeros(num_classes, device=device, dtype=torch.float64)
        self.n_class = torch.zeros(num_classes, device=device, dtype=torch.float64)
        self.w_all: list[torch.Tensor] = []  # per example of the epoch: weight, label, loss,
        self.y_all: list[torch.Tensor] = []  # and position in the training split
        self.loss_all: list[torch.Tensor] = []
        self.idx_all: list[torch.Tensor] = []

    def add(self, loss: torch.Tensor, w: torch.Tensor, y: torch.Tensor,
            logits_adv: torch.Tensor | None, clean_correct: torch.Tensor,
            idx: torch.Tensor | None = None) -> None:
        b = len(y)
        self.loss += loss.double().sum()
        if logits_adv is not None:
            self.correct_adv += (logits_adv.argmax(1) == y).double().sum()
        self.correct_clean += clean_correct.double().sum()
        self.n += b
        wd = w.double() * b  # in units of the uniform weight 1/|B|
        wf = w.double()
        self.w_moments.append(torch.stack([wf.sum(), (wf * wf).sum(), wf.new_tensor(float(b))]))
        self.w_max = torch.maximum(self.w_max, wd.max())
        self.w_class.index_add_(0, y, wd)
        self.n_class.index_add_(0, y, torch.ones_like(wd))
        self.w_all.append(wd.float())
        self.y_all.append(y)
        self.loss_all.append(loss.detach().float())
        self.idx_all.append(idx if idx is not None else torch.full_like(y, -1))
        self.batches += 1

    def add_grad_norm(self, norm: torch.Tensor, clip: float) -> None:
        self.clip_used = True
        self.grad_norm_max = torch.maximum(self.grad_norm_max, norm.double())
        self.clipped += (norm > clip).double()

    def reduce(self, d: distributed.Dist) -> None:
        """Sum (max) the epoch's numbers over ranks; every rank then logs the same."""
        if not d.active:
            return
        sums = torch.stack([self.loss, self.correct_adv, self.correct_clean,
                            torch.tensor(float(self.n), device=self.loss.device, dtype=torch.float64)])
        distributed.all_sum(d, sums)
        self.loss, self.correct_adv, self.correct_clean = sums[:3]
        self.n = int(sums[3])
        if self.w_moments:  # the ESS of each global batch: its moments summed over ranks
            moments = distributed.all_sum(d, torch.stack(self.w_moments))
            self.w_moments = list(moments)
        distributed.all_sum(d, self.w_class)
        distributed.all_sum(d, self.n_class)
        maxes = distributed.all_max(d, torch.stack([self.w_max, self.grad_norm_max]))
        self.w_max, self.grad_norm_max = maxes[0], maxes[1]

    def gathered(self, d: distributed.Dist) -> dict[str, torch.Tensor]:
        """The epoch's per-example weights, labels, losses and split positions of all ranks."""
        parts = {"w": self.w_all, "y": self.y_all, "loss": self.loss_all, "idx": self.idx_all}
        return {k: distributed.all_gather_cat(d, torch.cat(v)).cpu() for k, v in parts.items()}

    def _ess(self) -> float:
        """Mean over batches of ESS/|B| (each batch the global one under DDP)."""
        if not self.w_moments:
            return 1.0
        m = torch.stack(self.w_moments)
        return float(ess_from_moments(m[:, 0], m[:, 1], m[:, 2]).mean())

    def summary(self) -> dict[str, Any]:
        n = max(self.n, 1)
        wc = (self.w_class / self.n_class.clamp_min(1)).tolist()
        out = {
            "loss": float(self.loss) / n,
            "train_acc_clean": float(self.correct_clean) / n,
            "train_acc_adv": float(self.correct_adv) / n,
            "ess": self._ess(),
            "w_max": float(self.w_max),
            "w_class_mean": [round(v, 5) for v in wc],
        }
        if self.clip_used:  # with optim.grad_clip: how hard clipping worked this epoch
            out["grad_norm_max"] = float(self.grad_norm_max)
            out["clipped_frac"] = float(self.clipped) / max(self.batches, 1)
        return out


def _check_run_dir(out: Path, resume: bool, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} exists and is not a directory; choose another path")
    if resume:
        if not (out / "checkpoint.safetensors").exists():
            raise CheckpointError(
                f"nothing to resume in {out} (no checkpoint.safetensors); drop --resume to start"
            )
        return
    present = [f for f in RUN_FILES if (out / f).exists()]
    if present and not overwrite:
        what = "a finished run" if "metrics.json" in present else "an unfinished run"
        raise ConfigError(
            f"{out} already holds {what}; pass --resume to continue it, --overwrite to replace it, "
            "or choose another --out"
        )


def _ensure_writable(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"cannot create output directory {out} ({e.strerror}); choose another --out"
                          ) from None
    if not os.access(out, os.W_OK):
        raise ConfigError(f"output directory {out} is not writable; choose another --out")


def train(
    cfg: dict[str, Any],
    out: str | Path,
    resume: bool = False,
    overwrite: bool = False,
    stop_after_epoch: int | None = None,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any] | None:
    """Train (or resume) a run in ``out``; returns final metrics (None if stopped early).

    Launched by torchrun (WORLD_SIZE > 1), every process calls this: data-parallel training,
    rank 0 writes (see dorat.distributed)."""
    out = Path(out)
    d = distributed.from_env(cfg["device"])
    try:
        if not d.main:
            log = lambda s: None  # noqa: E731
        log = log or (lambda s: print(s, file=sys.stderr))
        distributed.on_main(d, lambda: _check_run_dir(out, resume, overwrite))
        if resume:
            saved = cfglib.load_yaml(str(out / "config.yaml"))[0]
            device_override = cfg["device"]
            cfg = cfglib.from_dict(saved, f"{out}/config.yaml")
            cfg["device"] = device_override
        _check_parallel(cfg, d)
        run = prepare(cfg, d)
        state = None
        if resume:
            state, _ = load_state(out / "checkpoint.safetensors")

        def setup_dir() -> None:
            files = (*RUN_FILES, JOURNAL.format(name="metrics"))
            if resume:
                for name in files:  # temporary files of writes a crash interrupted
                    for tmp in out.glob(f".{name}.*.tmp"):
                        tmp.unlink(missing_ok=True)
            _ensure_writable(out)
            if overwrite and not resume:
                for f in files:
                    (out / f).unlink(missing_ok=True)
            if not resume:
                write_text_atomic(out / "config.yaml", cfglib.dump(cfg))

        distributed.on_main(d, setup_dir)
        return _fit(run, out, state, stop_after_epoch, log, d)
    finally:
        distributed.teardown(d)


def _check_parallel(cfg: dict[str, Any], d: distributed.Dist) -> None:
    if not d.active:
        return
    if cfg["batch_size"] % d.world:
        raise ConfigError(f"batch_size {cfg['batch_size']} (the global batch) must be divisible by "
                          f"the {d.world} processes; set --set batch_size=...")
    if cfg["done"]["hypergrad"] != "none" and cfg["method"].startswith("done"):
        raise ConfigError("the implicit hypergradient (done.hypergrad diag/cg, done-cid) is not "
                          "supported under torchrun yet; use one process or done.hypergrad=none")
    if cfg["perf"]["sync_bn"] and not torch.cuda.is_available():
        raise ConfigError("perf.sync_bn needs CUDA (SyncBatchNorm has no CPU implementation)")


def use_channels_last(cfg: dict[str, Any], device: torch.device) -> bool:
    """perf.channels_last: on, off, or auto = on for CPU and CUDA (all dorat models are convnets
    on 4-D images; on CPU oneDNN's convolutions and max-pooling are much faster in NHWC)."""
    setting = cfg["perf"]["channels_last"]
    return setting == "on" or (setting == "auto" and device.type in ("cpu", "cuda"))


class Trainer:
    """The hot loop of one run: model wrappers (DDP, compile), optimizer, schedule, and
    ``step`` = attack + loss + weighting + backward + update, with no host sync.

    ``_fit`` drives it epoch by epoch; benchmarks/perf.py times it against other loops."""

    def __init__(self, run: Run, steps_per_epoch: int, d: distributed.Dist | None = None) -> None:
        d = d or distributed.Dist()
        cfg, model = run.cfg, run.model
        perf, o = cfg["perf"], cfg["optim"]
        self.method, self.grad_clip = run.method, o["grad_clip"]
        if perf["deterministic"]:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS needs it
            torch.use_deterministic_algorithms(True)
            torch.backends.cudnn.benchmark = False
        self.channels_last = use_channels_last(cfg, run.device)
        if self.channels_last:
            model.to(memory_format=torch.channels_last)
        self.train_model = distributed.wrap(d, model, perf["sync_bn"])
        self.model = distributed.unwrap(self.train_model)  # SyncBatchNorm makes a new module
        self.attack_model: nn.Module = self.model
        if perf["compile"]:
            backend = perf["compile_backend"]
            self.train_model = torch.compile(self.train_model, backend=backend)  # type: ignore[assignment]
            # under DDP the attack runs on the plain module, compiled separately
            self.attack_model = (torch.compile(self.model, backend=backend) if d.active
                                 else self.train_model)
        self.autocast = torch.autocast(run.device.type, dtype=torch.bfloat16, enabled=perf["amp"] == "bf16")
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=o["lr"], momentum=o["momentum"],
                                         nesterov=o["nesterov"] and o["momentum"] > 0,
                                         weight_decay=o["weight_decay"])
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(
            o["schedule"], cfg["epochs"] * steps_per_epoch, o["milestones"], o["gamma"]))

    def step(self, x: torch.Tensor, y: torch.Tensor, ctx: StepContext, stats: _Stats | None,
             idx: torch.Tensor | None = None) -> None:
        model, method = self.model, self.method
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with self.autocast:
            res = method.step(self.train_model, x, y, ctx, attack_model=self.attack_model)
        self.optimizer.zero_grad(set_to_none=True)
        res.objective.backward()
        if self.grad_clip:
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), self.grad_clip)
            if stats is not None:
                stats.add_grad_norm(norm, self.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        if stats is not None:  # clean accuracy of the updated model, for the epoch's log line
            with torch.no_grad(), self.autocast:
                model.eval()
                clean_correct = self.attack_model(x).argmax(1) == y
                model.train()
            stats.add(res.loss, res.weights, y, res.logits_adv, clean_correct, idx)


def _fit(run: Run, out: Path, state: dict[str, Any] | None, stop_after_epoch: int | None,
         log: Callable[[str], None], d: distributed.Dist | None = None) -> dict[str, Any] | None:
    d = d or distributed.Dist()
    cfg, method, device = run.cfg, run.method, run.device
    perf = cfg["perf"]
    augment = resolve_augment(cfg["data"]["augment"], run.data.augment)
    batches = Batches(run.train.to(device), cfg["batch_size"], shuffle=True, seed=cfg["seed"],
                      augment=augment, drop_last=d.active, shard=(d.rank, d.world))
    steps_per_epoch = len(batches)
    epochs = cfg["epochs"]
    trainer = Trainer(run, steps_per_epoch, d)
    run.model = model = trainer.model  # the evaluation uses the module that was trained
    optimizer, scheduler = trainer.optimizer, trainer.scheduler
    start_epoch = 0
    if state is not None:
        try:
            load_state_dict_checked(model, state["model"], str(out / "checkpoint.safetensors"))
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            method.weighting.load_state_dict(state["method"])
            start_epoch = int(state["epoch"])
        except (KeyError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"checkpoint in {out} does not fit this run ({e})") from None
        log(f"resuming {out} after epoch {start_epoch}/{epochs}")
        distributed.on_main(d, lambda: _truncate_log(out / "log.jsonl", start_epoch))
    progress = d.main and (cfg["log"]["progress"] == "on" or (
        cfg["log"]["progress"] == "auto" and sys.stderr.isatty()))
    extras = [k for k, v in (("channels-last", trainer.channels_last), ("bf16", perf["amp"] == "bf16"),
                             ("compiled", perf["compile"])) if v]
    log(f"training {cfg['method']} ({method.describe()}) on {run.data.name} "
        f"[{len(run.train)} train examples] with {cfg['model']} on {device}"
        + (f" x {d.world} processes" if d.active else "") + (f" ({', '.join(extras)})" if extras else ""))
    for epoch in range(start_epoch, epochs):
        method.weighting.start_epoch(epoch)
        stats = _Stats(run.data.num_classes, device)
        gen = torch.Generator(device=device)
        gen.manual_seed(cfg["seed"] * 1_000_003 + 20 * 7919 + epoch)
        model.train()
        t0 = time.perf_counter()
        bar = tqdm(batches.indexed(epoch), total=steps_per_epoch, disable=not progress,
                   desc=f"epoch {epoch + 1}/{epochs}", leave=False, unit="batch")
        for i, (x, y, idx) in enumerate(bar):
            trainer.step(x, y, StepContext(epoch, epochs, epoch * steps_per_epoch + i, gen), stats, idx)
        bar.close()
        stats.reduce(d)
        summary = stats.summary()
        if not math.isfinite(summary["loss"]):
            raise DoratError(
                f"training diverged at epoch {epoch + 1} (loss is {summary['loss']}); the last good "
                f"checkpoint in {out} is kept: lower optim.lr or check the data, then --resume"
            )
        seconds = time.perf_counter() - t0
        record = {
            "epoch": epoch + 1, "lr": optimizer.param_groups[0]["lr"], **summary,
            "seconds": round(seconds, 3), "examples_per_s": round(stats.n / max(seconds, 1e-9), 1),
            **method.weighting.epoch_log(),
        }
        state_now = {
            "epoch": epoch + 1, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "method": method.weighting.state_dict(),
        } if d.main else {}
        distributed.on_main(d, partial(_write_epoch, out, record, stats.gathered(d), state_now, cfg))
        log(f"epoch {epoch + 1}/{epochs}: loss {summary['loss']:.4f}  "
            f"train clean {100 * summary['train_acc_clean']:.1f}%  "
            f"adv {100 * summary['train_acc_adv']:.1f}%  lr {record['lr']:.4g}  "
            f"{seconds:.1f}s ({record['examples_per_s']:.0f} ex/s)")
        if stop_after_epoch is not None and epoch + 1 >= stop_after_epoch and epoch + 1 < epochs:
            return None

    def finish() -> dict[str, Any]:
        save_weights(out / "model.safetensors", model,
                     meta={"model": cfg["model"], "dataset": cfg["dataset"], "method": cfg["method"]})
        return final_evaluation(run, out, progress, log)

    return distributed.broadcast(d, distributed.on_main(d, finish))


def _write_epoch(out: Path, record: dict[str, Any], weights: dict[str, torch.Tensor],
                 state: dict[str, Any], cfg: dict[str, Any]) -> None:
    # Log line first, then the checkpoint: after a crash between the two, resume drops the line
    # of the epoch the checkpoint does not hold.
    with open(out / "log.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")
    save_state(out / "weights.safetensors", weights, meta={"epoch": str(record["epoch"])})
    save_state(out / "checkpoint.safetensors", state,
               meta={"method": cfg["method"], "model": cfg["model"], "dataset": cfg["dataset"]})


def _truncate_log(path: Path, epochs_done: int) -> None:
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["epoch"] <= epochs_done:
                keep.append(line)
        except (ValueError, KeyError):
            break  # a torn last line from a crash
    write_text_atomic(path, "".join(k + "\n" for k in keep))


def eval_split(run: Run) -> tuple[torch.Tensor, torch.Tensor]:
    """The examples ``eval.split`` names: the test set, or the held-out validation split."""
    if run.cfg["eval"]["split"] == "val":
        assert run.val is not None  # prepare() refuses eval.split=val without data.val_size
        return run.val.x, run.val.y
    return run.data.x_test, run.data.y_test


def evaluate_run(run: Run, progress: bool = False,
                 log: Callable[[str], None] | None = None,
                 journal: Path | None = None) -> dict[str, Any]:
    """Evaluate the run's model as its ``eval`` config says (attacks, split, subset).

    ``journal``: a file the evaluation saves its progress in and resumes from (see
    dorat.evaluate.run_attacks); deleted when the attacks are done."""
    cfg = run.cfg
    settings = settings_from_config(cfg)
    if log is not None:
        n = cfg["eval"]["n"] or "all"
        log(f"evaluating on {n} {cfg['eval']['split']} examples: "
            f"{', '.join(ATTACK_NAMES[a] for a in cfg['eval']['attacks'])} at eps={settings.eps} "
            f"(PGD/CW {settings.steps} steps, {settings.restarts} restart(s)"
            + (f"; AutoAttack {settings.aa_version}" if "aa" in cfg["eval"]["attacks"] else "") + ")"
            + ("; sanity checks on" if cfg["eval"]["checks"] else ""))
    settings.channels_last = use_channels_last(cfg, run.device)
    if settings.channels_last:
        run.model.to(memory_format=torch.channels_last)
    t0 = time.perf_counter()
    x, y = eval_split(run)
    metrics, _ = evaluate(run.model, x, y, run.data.classes, cfg["eval"]["attacks"], settings,
                          cfg["eval"]["n"], run.device, progress, checks=cfg["eval"]["checks"],
                          check_n=cfg["eval"]["check_n"], journal=journal, log=log)
    metrics["split"] = cfg["eval"]["split"]
    metrics["eval_seconds"] = round(time.perf_counter() - t0, 2)
    metrics["method"] = cfg["method"]
    if log is not None:
        for line in warning_lines(metrics.get("checks", [])):
            log(line)
    return metrics


def final_evaluation(run: Run, out: Path, progress: bool, log: Callable[[str], None]
                     ) -> dict[str, Any]:
    metrics = evaluate_run(run, progress, log, journal=out / JOURNAL.format(name="metrics"))
    write_text_atomic(out / "metrics.json", json.dumps(metrics, indent=2))
    return metrics
