"""The training loop: the schedule, the step (attack + loss + weighting + backward + update),
per-epoch statistics, logs and checkpoints. Run directories, preparation and evaluation are
dorat.runs.run's; ``dorat.runs.run.train`` calls :func:`fit`.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from tqdm import tqdm

from dorat.config import Config
from dorat.data.loader import Batches, resolve_augment
from dorat.errors import CheckpointError, ConfigError, DoratError, Terminated
from dorat.evaluation.probe import ClassStats, ValidationProbe
from dorat.files.checkpoint import (
    json_text,
    load_state_dict_checked,
    raise_if_full,
    save_state,
    save_weights,
    write_text_atomic,
)
from dorat.models import use_channels_last
from dorat.models.averaging import EMA
from dorat.objectives import StepContext
from dorat.objectives.attacks import SingleStep
from dorat.system import distributed
from dorat.system.runtime import machine, use_bf16
from dorat.training import advice, midepoch
from dorat.training.guard import Watch
from dorat.training.interrupts import HeldStops
from dorat.training.prepared import Run
from dorat.training.stats import EpochStats
from dorat.training.tracking import TensorBoard


def show_progress(cfg: Config) -> bool:
    return cfg.log.progress == "on" or (cfg.log.progress == "auto" and sys.stderr.isatty())


def _meta(cfg: Config) -> dict[str, str]:
    return {"method": cfg.method.name, "model": cfg.model, "dataset": cfg.dataset}


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


class Trainer:
    """The hot loop of one run: model wrappers (DDP, compile), optimizer, schedule, and
    ``step`` = attack + loss + weighting + backward + update, with no host sync.

    ``fit`` drives it epoch by epoch; benchmarks/perf.py times it against other loops."""

    def __init__(self, run: Run, steps_per_epoch: int, d: distributed.Dist | None = None) -> None:
        d = d or distributed.Dist()
        cfg, model = run.cfg, run.model
        perf, o = cfg.perf, cfg.optim
        self.method, self.grad_clip = run.method, o.grad_clip
        if perf.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS needs it
            torch.use_deterministic_algorithms(True)
            torch.backends.cudnn.benchmark = False
        self.channels_last = use_channels_last(cfg, run.device)
        if self.channels_last:
            model.to(memory_format=torch.channels_last)
        self.train_model = distributed.wrap(d, model, perf.sync_bn)
        self.model = distributed.unwrap(self.train_model)  # SyncBatchNorm makes a new module
        self.attack_model: nn.Module = self.model
        if perf.compile:
            backend = perf.compile_backend
            self.train_model = torch.compile(self.train_model, backend=backend)  # type: ignore[assignment]
            # under DDP the attack runs on the plain module, compiled separately
            self.attack_model = (torch.compile(self.model, backend=backend) if d.active
                                 else self.train_model)
        self.bf16 = use_bf16(perf.amp, run.device.type)
        self.autocast = torch.autocast(run.device.type, dtype=torch.bfloat16, enabled=self.bf16)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=o.lr, momentum=o.momentum,
                                         nesterov=o.nesterov and o.momentum > 0,
                                         weight_decay=o.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(
            o.schedule, cfg.epochs * steps_per_epoch, list(o.milestones), o.gamma))
        self.ema = (EMA(self.model, o.ema, o.ema_start, cfg.epochs, steps_per_epoch)
                    if o.ema else None)  # weight averaging (dorat.models.averaging)

    def eval_model(self) -> nn.Module:
        """The model the probe, best.safetensors and the end use: the average under optim.ema."""
        return self.model if self.ema is None else self.ema.sync()

    def state(self, epochs_done: int) -> dict[str, Any]:
        """What a checkpoint holds: model, optimizer, schedule, the weighting's state."""
        return {"epoch": epochs_done, "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "method": self.method.weighting.state_dict(),
                **({"ema": self.ema.state_dict()} if self.ema is not None else {})}

    def step(self, x: torch.Tensor, y: torch.Tensor, ctx: StepContext, stats: EpochStats | None,
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
        if self.ema is not None:
            self.ema.update(model, ctx.step)
        if stats is not None:  # clean accuracy of the updated model, for the epoch's log line
            with torch.no_grad(), self.autocast:
                model.eval()
                clean_correct = self.attack_model(x).argmax(1) == y
                model.train()
            stats.add(res.loss, res.weights, y, res.logits_adv, clean_correct, idx)


def fit(run: Run, out: Path, state: dict[str, Any] | None, stop_after_epoch: int | None,
        log: Callable[[str], None], d: distributed.Dist | None = None,
        on_epoch: Callable[[dict[str, Any]], None] | None = None) -> bool | None:
    """Train ``run`` epoch by epoch into ``out`` (from ``state``, a checkpoint); True when all
    epochs are done and model.safetensors is written, None when stopped after
    ``stop_after_epoch``. ``on_epoch(record)``: called on the main process with each epoch's
    log record once its checkpoint is written (e.g. a tuner's pruner; it may raise to stop)."""
    d = d or distributed.Dist()
    cfg, method, device = run.cfg, run.method, run.device
    perf = cfg.perf
    augment = resolve_augment(cfg.data.augment, run.data.augment)
    batches = Batches(run.train.to(device), cfg.batch_size, shuffle=True, seed=cfg.seed,
                      augment=augment, drop_last=d.active, shard=(d.rank, d.world))
    steps_per_epoch = len(batches)
    epochs = cfg.epochs
    trainer = Trainer(run, steps_per_epoch, d)
    run.model = model = trainer.model  # the evaluation uses the module that was trained
    optimizer, scheduler = trainer.optimizer, trainer.scheduler
    start_epoch = 0
    mid: midepoch.Resumed | None = None  # from a checkpoint taken within epoch start_epoch + 1
    if state is not None:
        try:
            load_state_dict_checked(model, state["model"], str(out / "checkpoint.safetensors"))
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            if trainer.ema is not None:
                trainer.ema.load_state_dict(state["ema"])
            _apply_optim_config(trainer, cfg)
            start_epoch = int(state["epoch"])
            if state.get("mid_epoch") is None:
                method.weighting.load_state_dict(state["method"])
            else:
                mid = midepoch.restore(state["mid_epoch"], d, steps_per_epoch, method.weighting,
                                       run.data.num_classes, device)
        except (KeyError, ValueError, TypeError, IndexError, AttributeError, RuntimeError) as e:
            raise CheckpointError(f"checkpoint in {out} does not fit this run ({e})") from None
        log(f"resuming {out} after epoch {start_epoch}/{epochs}"
            + (f" and {mid.step}/{steps_per_epoch} batches of the next" if mid else ""))
        distributed.on_main(d, lambda: _truncate_log(out / "log.jsonl", start_epoch))
    progress = d.main and show_progress(cfg)
    extras = [k for k, v in (("channels-last", trainer.channels_last), ("bf16", trainer.bf16),
                             ("compiled", perf.compile)) if v]
    log(f"training {cfg.method.name} ({' × '.join(method.describe().values())}) on {run.data.name} "
        f"[{len(run.train)} train examples] with {cfg.model} on {device}"
        + (f" x {d.world} processes" if d.active else "") + (f" ({', '.join(extras)})" if extras else ""))
    watch = Watch.build(cfg, out, isinstance(method.attack, SingleStep), log, _meta(cfg), start_epoch)
    probe, every, on_train = None, cfg.val.every or (1 if watch is not None else 0), False
    if method.weighting.needs_validation() or every:
        v = cfg.val
        split, on_train = (run.val, False) if run.val is not None and len(run.val) else (run.train, True)
        probe = ValidationProbe(split, run.data.num_classes, cfg.attack.eps, cfg.attack.norm, v.n,
                                v.steps, v.batch_size, cfg.seed, device, trainer.channels_last)
        if on_train and watch is not None and watch.keep is not None:
            log(f"warning: val.keep_best={cfg.val.keep_best} without a validation split picks "
                "best.safetensors on a fixed subset of the training split; set data.val_size")
        if v.n > len(split):
            log(f"warning: val.n={v.n} is more than the {'training' if on_train else 'validation'} "
                f"split's {len(split)} examples: the probe uses all of them")
    tb = TensorBoard(out, run.data.classes, start_epoch) if cfg.log.tensorboard and d.main else None
    host = machine(device.type)  # per epoch: a resumed run may go on on another machine
    every_s = 60 * cfg.log.checkpoint_minutes
    held = HeldStops()  # a stop within an epoch checkpoints the batches done (dorat.training.midepoch)
    try:
        warned = False  # _warn_unstored, at the first checkpoint within an epoch
        concentrated: str | None = None  # advice.concentration, once a run
        for epoch in range(start_epoch, epochs):
            measured: list[tuple[float, float]] = []  # the probe's (wall, CPU) seconds this epoch
            after: list[ClassStats] = []  # a probe the weighting took after this epoch's training
            t0, c0 = time.perf_counter(), time.process_time()  # before a probe start_epoch may take
            gen = torch.Generator(device=device)
            first = mid.step if mid is not None and epoch == start_epoch else 0
            if first:  # within this epoch: its start (and the weighting's) is in the state
                stats = mid.stats
                gen.set_state(mid.gen_state)
                t0, c0, measured = t0 - mid.seconds, c0 - mid.cpu_seconds, list(mid.measured)
            else:
                method.weighting.start_epoch(epoch, epochs, None if probe is None else partial(
                    _measure, probe, model, epoch, measured))
                stats = EpochStats(run.data.num_classes, device)
                gen.manual_seed(cfg.seed * 1_000_003 + 20 * 7919 + epoch)
            model.train()
            bar = tqdm(batches.indexed(epoch, first), total=steps_per_epoch, initial=first,
                       disable=not progress, desc=f"epoch {epoch + 1}/{epochs}", leave=False,
                       unit="batch")
            saved = time.perf_counter()
            held.hold()  # a stop from here waits for the batch in progress (or the epoch's end)
            for i, (x, y, idx) in enumerate(bar, start=first):
                trainer.step(x, y, StepContext(epoch, epochs, epoch * steps_per_epoch + i, gen),
                             stats, idx)
                if i + 1 == steps_per_epoch:
                    break  # a stop in the last batch waits for the epoch's own checkpoint
                due = bool(every_s) and time.perf_counter() - saved >= every_s
                halt, save = midepoch.decide(d, held, due, i + 1, device)
                if save:
                    if not warned:
                        _warn_unstored(method.weighting, cfg.method.weighting, log)
                        warned = True
                    mine = midepoch.rank_state(gen, stats, method.weighting, measured,
                                               time.perf_counter() - t0, time.process_time() - c0)
                    midepoch.save(out, _meta(cfg), partial(trainer.state, epoch), d, i + 1, mine)
                    saved = time.perf_counter()
                if halt:
                    bar.close()
                    log(f"stopped in epoch {epoch + 1} after batch {i + 1}/{steps_per_epoch}; "
                        "the checkpoint holds it")
                    _stop(held, d)
            bar.close()
            method.weighting.end_epoch(epoch, epochs, None if probe is None else partial(
                _measure, probe, model, epoch, measured, after), model)
            val = {}
            judged = trainer.eval_model()  # what the probe, best.safetensors and the guard judge
            if every and ((epoch + 1) % every == 0 or epoch + 1 == epochs):
                val = (after[-1] if after and judged is model
                       else _measure(probe, judged, epoch, measured)).summary()
                val.update({"probe_split": "train"} if on_train else {})
            stats.reduce(d)
            summary = stats.summary()
            if not math.isfinite(summary["loss"]):
                raise DoratError(
                    f"training diverged at epoch {epoch + 1} (loss is {summary['loss']}); " + (
                        f"the last good checkpoint in {out} (epoch {epoch}) is kept: continue with a "
                        "lower rate (--resume --set optim.lr=...) or check the data" if epoch else
                        "no epoch finished, so there is no checkpoint to continue from: train again "
                        "with a lower rate (--overwrite --set optim.lr=...) or check the data"))
            # training time without the probe's: wall-clock, and this process's CPU time (all its
            # threads), which does not count time other processes hold the cores
            seconds = time.perf_counter() - t0 - sum(w for w, _ in measured)
            cpu = time.process_time() - c0 - sum(c for _, c in measured)
            record = {
                "epoch": epoch + 1, "lr": optimizer.param_groups[0]["lr"], **summary,
                "seconds": round(seconds, 3), "cpu_seconds": round(cpu, 3),
                "examples_per_s": round(stats.n / max(seconds, 1e-9), 1), "machine": host,
                **method.weighting.epoch_log(),
                **val, **({"val_seconds": round(sum(w for w, _ in measured), 3)} if measured else {}),
            }
            if not concentrated and (concentrated := advice.concentration(record, cfg.method.weighting)):
                log(concentrated)
            stop = watch is not None and watch.after_epoch(record, judged, d.main)
            state_now = trainer.state(epoch + 1) if d.main else {}
            gathered = stats.gathered(d)
            distributed.on_main(d, partial(_write_epoch, out, record, gathered, state_now, cfg))
            if tb is not None:
                tb.epoch(record, gathered)
            if on_epoch is not None and d.main:
                on_epoch(record)
            log(f"epoch {epoch + 1}/{epochs}: loss {summary['loss']:.4f}  "
                f"train clean {100 * summary['train_acc_clean']:.1f}%  "
                f"adv {100 * summary['train_acc_adv']:.1f}%  lr {record['lr']:.4g}  "
                f"{seconds:.1f}s ({record['examples_per_s']:.0f} ex/s)")
            if midepoch.stop_at_epoch_end(d, held, device):
                log(f"stopped after epoch {epoch + 1}")
                _stop(held, d)
            held.release()  # the next epoch's start (a probe) stops at once
            if stop:
                break
            if stop_after_epoch is not None and epoch + 1 >= stop_after_epoch and epoch + 1 < epochs:
                return None
    finally:
        held.release()
        if tb is not None:
            tb.close()

    if trainer.ema is not None:  # the final model is the average (the guard may restore another)
        model.load_state_dict(trainer.ema.avg)
        log(f"the final model is the weight average (optim.ema={cfg.optim.ema})")
    final = None if watch is not None and watch.final(model) else method.weighting.final_state()
    if watch is not None and watch.restored_to is not None:
        log(f"the final model is epoch {watch.restored_to}'s (the catastrophic-overfitting guard "
            "stopped the run)")
    elif method.weighting.final_message:
        log(method.weighting.final_message)
    if final is not None:
        model.load_state_dict(final)
        log(f"the final model is {cfg.method.weighting}'s weight average, not the last epoch's weights")
    distributed.on_main(d, lambda: save_weights(out / "model.safetensors", model, meta=_meta(cfg)))
    return True


def _stop(held: HeldStops, d: distributed.Dist) -> None:
    """Stop as the held signal's handler says; under torchrun every rank stops, also one that
    received no signal or whose handler returned."""
    held.stop()
    if d.active:
        raise Terminated


def _apply_optim_config(trainer: Trainer, cfg: Config) -> None:
    """After loading a checkpoint: the optimizer follows the run's config, which a resume may
    have changed (optim.lr, momentum, weight decay, the schedule or the epochs). With an
    unchanged config this recomputes the very same values, so a resume stays bitwise exact."""
    o, sched = cfg.optim, trainer.scheduler
    sched.base_lrs = [o.lr for _ in sched.base_lrs]
    for g, lmbda in zip(trainer.optimizer.param_groups, sched.lr_lambdas):
        g.update(initial_lr=o.lr, lr=o.lr * lmbda(sched.last_epoch), momentum=o.momentum,
                 weight_decay=o.weight_decay, nesterov=o.nesterov and o.momentum > 0)
    sched._last_lr = [g["lr"] for g in trainer.optimizer.param_groups]  # what get_last_lr() says


def _measure(probe: ValidationProbe, model: nn.Module, epoch: int, seconds: list[tuple[float, float]],
             keep: list[ClassStats] | None = None) -> ClassStats:
    c0 = time.process_time()
    stats = probe.measure(model, epoch)
    seconds.append((stats.seconds, time.process_time() - c0))
    if keep is not None:
        keep.append(stats)
    return stats


def _write_epoch(out: Path, record: dict[str, Any], weights: dict[str, torch.Tensor],
                 state: dict[str, Any], cfg: Config) -> None:
    # Log line first, then the checkpoint: after a crash between the two, resume drops the line
    # of the epoch the checkpoint does not hold.
    try:
        with open(out / "log.jsonl", "a") as f:
            f.write(json_text(record, indent=None) + "\n")
    except OSError as e:  # a torn last line is dropped on resume, like a line ahead of the checkpoint
        raise_if_full(e, out / "log.jsonl")
        raise
    save_state(out / "weights.safetensors", weights, meta={"epoch": str(record["epoch"])})
    save_state(out / "checkpoint.safetensors", state, meta=_meta(cfg))


def _warn_unstored(weighting: Any, name: str, log: Callable[[str], None]) -> None:
    """At the first checkpoint within an epoch: what it will not hold (a plug-in's state in a
    form a checkpoint cannot store, e.g. a numpy array)."""
    lost = weighting.unstored_attrs()
    if lost:
        log(f"warning: the weighting '{name}' keeps {', '.join(lost)} in a form a checkpoint "
            "cannot store (only tensors, numbers, strings, None and lists/tuples/dicts of them), so "
            "a resume within an epoch starts without it; override its step_state and "
            "load_step_state (docs/ARCHITECTURE.md)")


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
