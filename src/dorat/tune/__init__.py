"""`dorat tune`: hyper-parameter search on Optuna (https://optuna.org), scored on the validation
split only.

Each trial is one training run (OUT/trials/NNNN) of the base config with the trial's values of
the ``--space`` keys, evaluated with the config's attacks on the validation split
(``eval.split=val``; the test set is never read). The objective is one metric of that
evaluation (``val.worst_class.pgd``: the accuracy in % of the worst class under PGD). Each epoch
the run probes a fixed stratified validation subset (``val.every``, dorat.evaluation.probe) and reports the
probe's value of the objective (its PGD version for CW or AutoAttack metrics) to Optuna, whose
pruner (median by default) stops trials that fall behind; a pruned trial keeps its run directory
at the epoch it reached.

Constraints (``val.sa >= at.val.sa - 1``) are set on each trial with Optuna's
``Trial.set_constraint`` (feasible when <= 0); the best trial is the best feasible one. A
constraint may name a reference method (``at.``): that method is trained once with the same base
config in OUT/ref-NAME and evaluated the same way.

Scaling out is Optuna's: every `dorat tune` process on one storage URL (SQLite for one machine,
any RDB URL Optuna accepts for several) and study name shares one study. The storage keeps a
heartbeat per running trial; a trial whose process died (killed, node lost) is failed by the next
process that looks and retried with the same values (Optuna's RetryHeartbeatStaleTrialCallback),
and the retry resumes the dead trial's run directory from its last checkpoint. A process stopped
by Ctrl-C or SIGTERM fails its trial at once and enqueues the same retry. ``--trials N`` is the
study's total of finished (complete or pruned) trials, over all processes: a process ends when
the finished trials and those running elsewhere reach N; of two processes that start a trial at
the same moment past N, the later-numbered trial fails unrun (user attribute ``surplus``; not in
the report), so the study ends with exactly N.

Outputs (rewritten by each process when it stops): OUT/best.yaml (the best trial's full config,
for `dorat train --config`), OUT/tune.md (the trials table) and OUT/tune.png (the objective
against each parameter).

Imports: runs and the layers below; compare.tuning builds tuned grids on it
(tests/test_layers.py).
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from dorat import config as cfglib
from dorat.errors import ConfigError, DoratError
from dorat.tune.report import best_trial, write_outputs
from dorat.tune.space import Constraint, Metric, Param, parse_constraint, parse_metric, parse_space
from dorat.tune.tuner import ENVIRONMENT, EXTRA, SURPLUS, Surplus, Tuner, _optuna, surplus  # noqa: F401

STUDY_ATTR = "dorat"  # the study's settings, checked when another process joins it
MAX_FAILED_IN_A_ROW = 3
__all__ = ["Constraint", "Metric", "Param", "Tuner", "parse_constraint", "parse_metric", "parse_space",
           "tune"]


def open_storage(url: str, heartbeat: int = 30) -> Any:
    """Optuna's RDB storage with heartbeats (a dead process's trial is failed and retried), or
    one clear error when the URL cannot be opened."""
    optuna = _optuna()
    import warnings

    from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback

    kwargs: dict[str, Any] = {}
    if url.startswith("sqlite"):
        kwargs["engine_kwargs"] = {"connect_args": {"timeout": 120}}  # writers wait, not fail
    try:
        for attempt in range(5):
            try:
                with warnings.catch_warnings():  # heartbeats and the retry are "experimental"
                    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                    return RDBStorage(url, heartbeat_interval=heartbeat, grace_period=4 * heartbeat,
                                      heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(
                                          max_retry=2), **kwargs)
            except Exception as e:  # another process creating the same schema right now
                racing = any(t in str(e) for t in ("alembic_version", "already exists", "locked"))
                if not racing or attempt == 4:
                    raise
                time.sleep(0.5 + attempt)
        raise AssertionError("unreachable")
    except (ImportError, ModuleNotFoundError) as e:
        raise ConfigError(f"cannot open the Optuna storage {url}: its database driver is missing "
                          f"({e.name or e}); install it, or use sqlite:///PATH") from None
    except Exception as e:  # sqlalchemy's errors: a bad URL, an unreachable server, a bad path
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"cannot open the Optuna storage {url} ({first[:200]}); check the URL, "
                          "e.g. sqlite:///tune.db") from None
    finally:
        optuna.logging.set_verbosity(optuna.logging.WARNING)


def create_study(tuner: Tuner, storage_url: str, study: str, pruner: str, prune_startup: int,
                 prune_warmup: int, seed: int | None, heartbeat: int = 30) -> Any:
    optuna = _optuna()
    storage = open_storage(storage_url, heartbeat)
    pr = (optuna.pruners.MedianPruner(n_startup_trials=prune_startup, n_warmup_steps=prune_warmup)
          if pruner == "median" else optuna.pruners.NopPruner())
    from dorat.tune.sampler import TrialSeededTPE

    sampler = TrialSeededTPE(seed)
    try:
        s = optuna.create_study(storage=storage, study_name=study, direction=tuner.direction,
                                sampler=sampler, pruner=pr, load_if_exists=True)
    except ValueError as e:  # e.g. the study exists with another direction
        raise ConfigError(f"study '{study}' in {storage_url}: {e}") from None
    mine = {**tuner.settings(), "sampler_seed": seed,
            "pruner": {"name": pruner, "startup": prune_startup, "warmup": prune_warmup}}
    theirs = s.user_attrs.get(STUDY_ATTR)
    if theirs is None or any(k not in theirs for k in mine):  # new, or made by an older dorat
        theirs = {**mine, **(theirs or {})}  # that did not record everything: recorded now
        s.set_user_attr(STUDY_ATTR, theirs)
    diff = [f"{k}: {theirs[k]} there, {mine[k]} here" for k in mine if mine[k] != theirs[k] and k != "base"]
    base, other = mine["base"], theirs["base"]
    diff += [f"{k}: {other.get(k)} there, {base.get(k)} here" for k in sorted({*base, *other})
             if base.get(k) != other.get(k)]
    if diff:
        raise ConfigError(f"study '{study}' in {storage_url} was started with other settings "
                          f"({'; '.join(diff[:4])}{'; ...' if len(diff) > 4 else ''}); give the "
                          "same options, or another --study")
    return s


def optimize(tuner: Tuner, study: Any, trials: int) -> None:
    """Run trials until the study holds ``trials`` finished (complete or pruned) ones."""
    from optuna.study import MaxTrialsCallback
    from optuna.trial import TrialState

    states = (TrialState.COMPLETE, TrialState.PRUNED)
    done = len(study.get_trials(deepcopy=False, states=states))
    if done >= trials:
        tuner.log(f"study '{study.study_name}' already has {done} finished trials (--trials {trials})")
        return
    refs = tuner.references()
    tuner.log(f"study '{study.study_name}': {done} of {trials} trials finished; optimizing "
              f"{tuner.objective} ({tuner.direction})")
    failed: list[Any] = []  # this process's failed trials in a row (a broken base config
    # would fail every trial, and failed trials do not count towards --trials)

    def give_up(s: Any, t: Any) -> None:
        if t.user_attrs.get(SURPLUS):
            return
        failed[:] = [*failed, t] if t.state == TrialState.FAIL else []
        if len(failed) >= MAX_FAILED_IN_A_ROW:
            s.stop()

    # after each trial: stop once the finished trials and those other processes are running
    # reach --trials; a trial that two processes started at once past that is failed unrun
    # (Tuner.run_trial: surplus) without Optuna's warning and traceback
    def quiet(record: logging.LogRecord) -> bool:  # Optuna's two "Trial N failed" warnings
        return not any(record.getMessage().startswith(f"Trial {n} failed") for n in tuner.surplus)

    logger = logging.getLogger("optuna.study._optimize")
    logger.addFilter(quiet)
    try:
        study.optimize(lambda t: tuner.run_trial(t, refs, trials), n_trials=None,
                       callbacks=[MaxTrialsCallback(trials, states=(*states, TrialState.RUNNING)),
                                  give_up], catch=(DoratError,), gc_after_trial=True)
    finally:
        logger.removeFilter(quiet)
    if len(failed) >= MAX_FAILED_IN_A_ROW:
        last = failed[-1]
        raise DoratError(f"{len(failed)} trials in a row failed (the last, trial {last.number}: "
                         f"{last.user_attrs.get('error', 'see its messages above')}); fix the base "
                         "config or the space and run the same command again")


def tune(config: str | None, method: str | None, space: Sequence[str], objective: str,
         constraints: Sequence[str] = (), trials: int = 20, storage: str | None = None,
         study: str = "dorat", out: str | Path = "runs/tune", sets: Sequence[str] = (),
         flags: dict[str, Any] | None = None, direction: str = "maximize", pruner: str = "median",
         prune_startup: int = 5, prune_warmup: int = 0, seed: int | None = None,
         heartbeat: int = 30, log: Callable[[str], None] | None = None) -> Path:
    """Run (or join) a study; returns OUT/tune.md. See the module docstring."""
    _optuna()
    out = Path(out)
    user = cfglib.resolve(config, {**(flags or {}), "method": method}, list(sets))
    if user.data.val_size <= 0:
        raise ConfigError("dorat tune scores trials on the validation split: set data.val_size "
                          "(e.g. --set data.val_size=5000)")
    if not space:
        raise ConfigError("give at least one --space KEY=SPEC (e.g. --space r=log:0.25:16)")
    if trials < 1:
        raise ConfigError(f"--trials must be at least 1, got {trials}")
    every = user.val.every or 1
    base = user.replace({"eval.split": "val", "val.every": every}, "dorat tune")
    attacks = list(base.eval.attacks)
    params = [parse_space(s, base) for s in space]
    dup = {p.key for p in params if sum(q.key == p.key for q in params) > 1}
    if dup:
        raise ConfigError(f"--space names {', '.join(sorted(dup))} twice")
    fixed = {"eval.split": "val", "val.every": every}
    tuner = Tuner(base, params, parse_metric(objective, attacks, "--objective"),
                  [parse_constraint(c, attacks) for c in constraints], out, direction,
                  lambda name: cfglib.resolve(config, {**(flags or {}), "method": name}, list(sets), fixed))
    if log is not None:
        tuner.log = log
    if tuner.objective.probe_key is None and pruner != "none":
        tuner.log(f"note: {tuner.objective} has no per-epoch probe value (the probe measures clean "
                  "and PGD accuracy); trials are not pruned")
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"cannot create {out} ({e.strerror}); choose another --out") from None
    url = storage or f"sqlite:///{(out / 'tune.db').resolve()}"
    try:
        s = create_study(tuner, url, study, pruner, prune_startup, prune_warmup, seed, heartbeat)
    except ConfigError:
        if created:  # nothing half-written: the directory this call made goes again
            shutil.rmtree(out, ignore_errors=True)
        raise
    try:
        optimize(tuner, s, trials)
    finally:
        path = write_outputs(tuner, s, user.eval.split, user.val.every)
    best = best_trial(s)
    tuner.log(f"best: trial {best.number}, {tuner.objective} = {best.value:.2f} ({json.dumps(best.params)}); "
              f"config: {out / 'best.yaml'}" if best is not None else "no feasible complete trial yet")
    return path
