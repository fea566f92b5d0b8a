"""Run directories: prepare a run, train it into a directory, reopen and evaluate it.

RUN_DIR layout:
    config.yaml             the full resolved config (a run is fully described by it)
    log.jsonl               one JSON line per finished epoch
    checkpoint.safetensors  model + optimizer + scheduler + method state, written atomically
    model.safetensors       final weights
    weights.safetensors     the last finished epoch's training weights per example, in units
                            of the uniform weight 1/|B| ("w"), with labels ("y"), adversarial
                            losses ("loss") and positions in the training split ("idx")
    metrics.json            final evaluation (SA, RA, per-class, worst class, RA-Tail-30)

This module is the only way in: the CLI, compare and report read run directories through it;
the training loop itself is dorat.training.trainer. Determinism: data order, augmentation and attack
noise of epoch e are pure functions of (seed, e), and the checkpoint holds all other state, so
a run resumed after epoch e ends with the same weights as an uninterrupted one (bitwise on CPU).
"""

from __future__ import annotations

import contextlib
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from dorat import config as cfglib
from dorat.attacks import EVAL_ATTACKS
from dorat.config import Config
from dorat.data import Dataset, check_dataset, load_dataset
from dorat.data.loader import as_unit_images
from dorat.errors import ConfigError, DataError, Terminated
from dorat.evaluation.checks import warning_lines
from dorat.evaluation.evaluate import eps_text, evaluate, settings_from_config, stratified_subset
from dorat.evaluation.probe import ValidationProbe
from dorat.evaluation.results import (  # noqa: F401  (re-exported: their old home)
    RunResult,
    load_metrics,
    load_result,
    read_config,
    read_log,
    run_splits,
)
from dorat.files.checkpoint import load_state, load_weights, write_json_atomic
from dorat.models import build_model, check_fits, use_channels_last
from dorat.objectives import build_method
from dorat.runs import rundir, warmstart
from dorat.runs.rundir import JOURNAL
from dorat.system import distributed
from dorat.system.runtime import machine, resolve_device  # noqa: F401  (resolve_device: its old home)
from dorat.training import advice, tracking
from dorat.training.prepared import Run


def prepare(cfg: Config, d: distributed.Dist | None = None, data: Dataset | None = None,
            model: nn.Module | None = None) -> Run:
    """Load the data (or take ``data``), build the model (or take ``model``) and the method.
    Writes nothing."""
    d = d or distributed.Dist()
    tracking.check_available(cfg.log.tensorboard, cfg.log.mlflow)
    device = distributed.device_for(d, resolve_device(cfg.device))
    if data is None:
        data = load_dataset(cfg.dataset, cfg.data.dir, cfg.data.download)
    else:
        check_dataset(data)
    train, val = run_splits(cfg, data)
    if cfg.eval.split == "val" and val is None:
        raise ConfigError("eval.split=val needs a validation split: set data.val_size (e.g. 5000)")
    y_eval = val.y if cfg.eval.split == "val" and val is not None else data.y_test
    stratified_subset(y_eval, cfg.eval.n, data.num_classes, cfg.eval.seed)  # too small: an error
    if cfg.eval.checks:  # now, not after training
        stratified_subset(y_eval, cfg.eval.check_n, data.num_classes, cfg.eval.seed, "eval.check_n")
    method = build_method(cfg, {"num_classes": data.num_classes, "dist": d,
                                "class_counts": train.class_counts(data.num_classes)})
    if method.weighting.needs_validation():
        ValidationProbe.check(val, data.num_classes, f"method.weighting={cfg.method.weighting}")
    if cfg.val.every:
        ValidationProbe.check(val, data.num_classes, f"val.every={cfg.val.every}")
    torch.manual_seed(cfg.seed)
    if model is None:
        c, h, w = data.shape
        if h != w:
            raise DataError(f"dataset '{data.name}' has {h}×{w} images but the models are built "
                            "for square ones; pad or crop the images to a square")
        try:
            model = build_model(cfg.model, c, h, data.num_classes)
        except ValueError as e:
            raise ConfigError(f"model '{cfg.model}' does not fit dataset '{data.name}': {e}") from None
    model = model.to(device)
    check_fits(model, as_unit_images(train.x[:2]).to(device), data.num_classes,
               f"dataset '{data.name}'")
    return Run(cfg, data, train, val, model, method, device)


def load_run(run_dir: str | Path, device: str | None = "auto",
             overrides: Mapping[str, Any] | None = None, model: nn.Module | None = None,
             weights: str = "last", data: Dataset | None = None) -> Run:
    """A finished run ready for analysis: its config (with ``overrides`` of dotted keys, e.g.
    ``{"eval.n": 1000}``; None values are ignored), data (``data`` when given: the data set the
    config names, already in memory), and the trained model weights (loaded into ``model``
    when given: a model the config cannot rebuild): the last epoch's, or with
    ``weights="best"`` the best probed epoch's (val.keep_best)."""
    run_dir = Path(run_dir)
    cfg = read_config(run_dir)
    updates = {k: v for k, v in {"device": device, **(overrides or {})}.items() if v is not None}
    cfg = cfg.replace(updates)
    if weights == "best" and not (run_dir / "best.safetensors").is_file():
        raise ConfigError(f"{run_dir} has no best.safetensors: it is kept by training with "
                          "--set val.keep_best=ra_pgd (or worst_class_pgd, tail30_pgd, sa)")
    run = prepare(cfg, data=data, model=model)
    load_weights(run_dir / ("best.safetensors" if weights == "best" else "model.safetensors"), run.model)
    run.model.eval()
    return run


def eval_split(run: Run) -> tuple[torch.Tensor, torch.Tensor]:
    """The examples ``eval.split`` names: the test set, or the held-out validation split."""
    if run.cfg.eval.split == "val":
        assert run.val is not None  # prepare() refuses eval.split=val without data.val_size
        return run.val.x, run.val.y
    return run.data.x_test, run.data.y_test


def eval_journal(out: Path) -> Path:
    """Where `dorat eval` keeps its progress beside its output file: the same command resumes it."""
    return out.parent / f".{out.name}.partial.safetensors"


def evaluate_run(run: Run, progress: bool = False, log: Callable[[str], None] | None = None,
                 journal: Path | None = None) -> dict[str, Any]:
    """Evaluate the run's model as its ``eval`` config says (attacks, split, subset).

    ``journal``: a file the evaluation saves its progress in and resumes from (see
    dorat.evaluation.evaluate.run_attacks); deleted when the attacks are done."""
    cfg, e = run.cfg, run.cfg.eval
    settings = settings_from_config(cfg)
    if log is not None:
        log(f"evaluating on {e.n or 'all'} {e.split} examples: "
            f"{', '.join(EVAL_ATTACKS[a][0] for a in e.attacks)} at eps={eps_text(settings.eps)} "
            f"(PGD/CW {settings.steps} steps, {settings.restarts} restart(s)"
            + (f"; AutoAttack {settings.aa_version}" if "aa" in e.attacks else "") + ")"
            + ("; sanity checks on" if e.checks else ""))
    settings.channels_last = use_channels_last(cfg, run.device)
    if settings.channels_last:
        run.model.to(memory_format=torch.channels_last)
    t0 = time.perf_counter()
    x, y = eval_split(run)
    metrics, _ = evaluate(run.model, x, y, run.data.classes, e.attacks, settings, e.n, run.device,
                          progress, checks=e.checks, check_n=e.check_n, journal=journal, log=log)
    metrics["split"] = e.split
    metrics["eval_seconds"] = round(time.perf_counter() - t0, 2)
    metrics["machine"] = machine(run.device.type)
    metrics["method"] = cfg.method.name
    if log is not None:
        for line in warning_lines(metrics.get("checks", [])):
            log(line)
    return metrics


def final_evaluation(run: Run, out: Path, progress: bool, log: Callable[[str], None]
                     ) -> dict[str, Any]:
    metrics = evaluate_run(run, progress, log, journal=out / JOURNAL.format(name="metrics"))
    write_json_atomic(out / "metrics.json", metrics)
    if run.cfg.log.tensorboard:
        tb = tracking.TensorBoard(out, run.data.classes, run.cfg.epochs)
        tb.final(metrics, run.cfg.epochs)
        tb.close()
    return metrics


def _check_parallel(cfg: Config, d: distributed.Dist) -> None:
    if not d.active:
        return
    if cfg.batch_size % d.world:
        raise ConfigError(f"batch_size {cfg.batch_size} (the global batch) must be divisible by "
                          f"the {d.world} processes; set --set batch_size=...")
    if cfg.method.hypergrad != "none":
        raise ConfigError("the implicit hypergradient (method.hypergrad diag/cg, done-cid) is not "
                          "supported under torchrun yet; use one process or method.hypergrad=none")
    if cfg.perf.sync_bn and not torch.cuda.is_available():
        raise ConfigError("perf.sync_bn needs CUDA (SyncBatchNorm has no CPU implementation)")


def train(cfg: Config, out: str | Path, resume: bool = False, overwrite: bool = False,
          stop_after_epoch: int | None = None, log: Callable[[str], None] | None = None,
          data: Dataset | None = None, model: nn.Module | None = None,
          changes: Mapping[str, Any] | None = None,
          on_epoch: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any] | None:
    """Train (or resume) a run in ``out``; returns final metrics (None if stopped early).
    ``on_epoch(record)``: each epoch's log record, once its checkpoint is written (it may raise
    to stop the run there: a tuner's pruner).
    ``data`` and ``model``: in-memory objects instead of what the config names (dorat.fit).
    What happens with what ``out`` already holds (resume, restart, replace beside, report a
    finished run) is `dorat.runs.rundir.plan`; ``changes``: dotted keys to change on resume.

    Launched by torchrun (WORLD_SIZE > 1), every process calls this: data-parallel training,
    rank 0 writes (see dorat.system.distributed)."""
    out = Path(out)
    d = distributed.from_env(cfg.device)
    try:
        with contextlib.ExitStack() as owned:
            if d.main:
                owned.enter_context(rundir.own(out))
            return _train(cfg, out, d, resume, overwrite, stop_after_epoch, log, data, model,
                          changes or {}, on_epoch)
    finally:
        distributed.teardown(d)


def _train(cfg: Config, out: Path, d: distributed.Dist, resume: bool, overwrite: bool,
           stop_after_epoch: int | None, log: Callable[[str], None] | None, data: Dataset | None,
           model: nn.Module | None, changes: Mapping[str, Any],
           on_epoch: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any] | None:
    from dorat.training import trainer

    if not d.main:
        log = lambda s: None  # noqa: E731
    log = log or (lambda s: print(s, file=sys.stderr))
    def decide() -> tuple[str, str, dict[str, Any], dict[str, Any]]:
        p = rundir.plan(out, cfg, resume, overwrite, changes, read_config, log)
        return p.mode, str(p.dir), p.cfg.to_dict(), p.changes  # plain data for the other ranks

    mode, where, flat, changed = distributed.broadcast(d, distributed.on_main(d, decide))
    p = rundir.Plan(mode, cfglib.from_dict(flat, str(out / "config.yaml")), Path(where), changed)
    if p.mode == "finished":
        return load_metrics(out)
    _check_parallel(p.cfg, d)
    run = prepare(p.cfg, d, data, model)
    advice.warn_at_start(run, log)
    client = tracking.connect_mlflow(p.cfg.log.mlflow_uri) if p.cfg.log.mlflow and d.main else None
    state = load_state(p.dir / "checkpoint.safetensors")[0] if p.mode == "resume" else None
    init = None
    if state is None and p.cfg.init is not None:  # a first start from trained weights
        init = warmstart.load_init(p.cfg.init, run.model, p.dir, restart=resume)
        log(f"starting from {init['file']} (sha256 {init['sha256'][:12]}…)")
    if p.changes:
        log(f"resuming with {', '.join(f'{k}={v}' for k, v in p.changes.items())} "
            f"(recorded in {p.dir / rundir.HISTORY})")
    distributed.on_main(d, lambda: rundir.set_up(p, out, cfglib.dump,
                                                 int(state["epoch"]) if state else 0))
    if init is not None:
        distributed.on_main(d, lambda: write_json_atomic(p.dir / warmstart.INIT_FILE, init))
    ml = tracking.MLflow(client, p.dir, p.cfg, run.data.classes, out, log) if client else None
    with _tracked(ml):
        if ml is not None:
            ml.sync()  # epochs a crash kept from MLflow
        if trainer.fit(run, p.dir, state, stop_after_epoch, log, d, _after_epoch(ml, on_epoch)) is None:
            if ml is not None:
                ml.end("KILLED")
            return None

        def finish() -> dict[str, Any]:
            metrics = final_evaluation(run, p.dir, trainer.show_progress(p.cfg), log)
            if ml is not None:
                _mlflow_final(ml, p.dir, out, metrics, p.cfg.epochs)
            if p.replaces:
                rundir.promote(out)
                log(f"the new run replaced the one in {out}")
            return metrics

        return distributed.broadcast(d, distributed.on_main(d, finish))


def _after_epoch(ml: tracking.MLflow | None, on_epoch: Callable[[dict[str, Any]], None] | None
                 ) -> Callable[[dict[str, Any]], None] | None:
    """The hook after each epoch's checkpoint: MLflow's copy of the epoch, then the caller's."""
    if ml is None:
        return on_epoch

    def hook(record: dict[str, Any]) -> None:
        ml.sync()
        if on_epoch is not None:
            try:
                on_epoch(record)
            except BaseException:  # the caller stops the run here (a tuner's pruner)
                ml.end("KILLED")
                raise

    return hook


@contextlib.contextmanager
def _tracked(ml: tracking.MLflow | None) -> Iterator[None]:
    """The MLflow run ends KILLED on a stop (SIGTERM, Ctrl-C, the on_epoch hook's), FAILED on
    an error; a resume sets it RUNNING again."""
    try:
        yield
    except BaseException as e:
        if ml is not None and not ml.ended:
            ml.end("KILLED" if isinstance(e, (Terminated, KeyboardInterrupt)) else "FAILED")
        raise


def _mlflow_final(ml: tracking.MLflow, where: Path, out: Path, metrics: dict[str, Any], epochs: int) -> None:
    """The final numbers and the run's files, with its report (Markdown and PNGs), to MLflow."""
    from dorat.report import write_report

    with tempfile.TemporaryDirectory(prefix="dorat-report-") as tmp:
        report = write_report([where], Path(tmp) / "report", title=f"dorat run {out}")
        files = [where / n for n in ("metrics.json", "config.yaml", "log.jsonl")]
        ml.final(metrics, epochs, files + sorted(report.parent.iterdir()))
