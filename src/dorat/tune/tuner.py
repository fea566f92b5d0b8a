"""One `dorat tune` process's trial: the base config with a trial's values, trained in its own
run directory (resumed, or waited for when another process trains it) and scored on the
validation split; trials created past ``--trials`` fail unrun (``surplus``)."""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dorat import config as cfglib
from dorat.errors import ConfigError, DoratError, Terminated
from dorat.training.tracking import with_tags
from dorat.tune.space import Constraint, Metric, Param

EXTRA = "dorat[tune]"
ENVIRONMENT = ("device", "data.dir", "data.download", "log.")  # may differ between processes
SURPLUS = "surplus"  # a trial's user attribute: created past --trials, failed before it ran


def _optuna() -> Any:
    try:
        import optuna
    except ImportError:
        raise ConfigError(f"dorat tune needs Optuna: pip install '{EXTRA}' (or pip install optuna)") from None
    return optuna


@dataclass
class Tuner:
    """One `dorat tune` process: the base config, what to search and how to score it."""

    base: cfglib.Config
    space: list[Param]
    objective: Metric
    constraints: list[Constraint]
    out: Path
    direction: str = "maximize"
    reference: Callable[[str], cfglib.Config] | None = None  # a reference method's config
    log: Callable[[str], None] = lambda s: print(s, file=sys.stderr, flush=True)
    surplus: set[int] = field(default_factory=set)  # trials failed unrun, past --trials

    def settings(self) -> dict[str, Any]:
        """What must agree between processes that share the study: the search, and the whole
        resolved base config but the keys that only say where this process runs (ENVIRONMENT)
        and those the trials set."""
        searched = {p.key for p in self.space}
        base = {k: v for k, v in self.base.flat().items()
                if k not in searched and not (k in ENVIRONMENT or k.startswith(ENVIRONMENT))}
        return json.loads(json.dumps(
            {"objective": str(self.objective), "direction": self.direction,
             "space": {p.key: p.describe() for p in self.space},
             "constraints": [c.text for c in self.constraints],
             "method": self.base.method.name, "base": base}, default=list))

    def references(self) -> dict[str, dict[str, Any]]:
        """Train (or read) each reference method's run, OUT/ref-NAME."""
        out = {}
        for name in sorted({c.rhs.ref for c in self.constraints if isinstance(c.rhs, Metric) and c.rhs.ref}):
            assert self.reference is not None
            cfg = self.reference(name)
            path = self.out / f"ref-{name}"
            self.log(f"reference run {name}: {path}")
            metrics = _train_waiting(cfg, path, self.log)
            out[name] = metrics
        return out

    def trial_dir(self, trial: Any) -> Path:
        """OUT/trials/NNNN; a retry of a dead process's trial (Optuna's heartbeat retry
        copies its user attributes) resumes the dead trial's directory."""
        old = trial.user_attrs.get("run_dir")
        return Path(old) if old else self.out / "trials" / f"{trial.number:04d}"

    def run_trial(self, trial: Any, refs: dict[str, dict[str, Any]], trials: int) -> float:
        """Train and score one trial; ``trials`` is --trials (0: no limit)."""
        optuna = _optuna()
        from dorat.runs.run import train

        ahead = surplus(trial, trials)
        if ahead is not None:
            trial.set_user_attr(SURPLUS, True)
            self.surplus.add(trial.number)
            trial.study.stop()
            self.log(f"[trial {trial.number}] not run: {ahead} trials are finished or running "
                     f"(--trials {trials}); this process stops")
            raise Surplus(f"trial {trial.number} is past --trials {trials}")
        values = {p.key: p.suggest(trial) for p in self.space}
        path = self.trial_dir(trial)
        trial.set_user_attr("run_dir", str(path))
        trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
        tag = f"[trial {trial.number}]"
        try:
            cfg = self.base.replace({**values, "log.mlflow_tags": with_tags(
                self.base.log.mlflow_tags, dorat_study=trial.study.study_name, dorat_trial=trial.number,
                dorat_study_dir=self.out.resolve())}, f"trial {trial.number}")
        except ConfigError as e:
            trial.set_user_attr("error", str(e))
            self.log(f"{tag} {values}: not a valid config ({e})")
            raise
        shown = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items())
        self.log(f"{tag} {shown} -> {path}")
        key = self.objective.probe_key

        def report(record: dict[str, Any]) -> None:
            if key is None or key not in record:
                return
            trial.report(100.0 * record[key], record["epoch"])
            if trial.should_prune():
                raise optuna.TrialPruned(f"pruned after epoch {record['epoch']} ({key} "
                                         f"{100 * record[key]:.2f}%)")

        try:
            metrics = train(cfg, path, resume=True, log=lambda s: self.log(f"{tag} {s}"), on_epoch=report)
        except DoratError as e:  # the trial fails (Optuna catches it); the reason stays with it
            trial.set_user_attr("error", str(e))
            self.log(f"{tag} failed: {e}")
            raise
        except (KeyboardInterrupt, Terminated):  # Ctrl-C, SIGTERM (a scheduler's stop): the trial
            # fails, and the same values come back first for the next process, which resumes
            # this run directory (as Optuna's heartbeat retry does for a process that died)
            trial.study.tell(trial, state=optuna.trial.TrialState.FAIL)
            trial.study.enqueue_trial(values, user_attrs={"run_dir": str(path), "retry_of": trial.number})
            self.log(f"{tag} stopped; the next `dorat tune` on this study resumes it from {path}")
            raise
        assert metrics is not None
        for name in ("sa", "ra", "worst_class", "tail30"):
            trial.set_user_attr(name, metrics[name])
        for i, c in enumerate(self.constraints):
            trial.set_constraint(f"c{i}", c.value(metrics, refs))
        value = self.objective.value(metrics)
        self.log(f"{tag} {self.objective} = {value:.2f}")
        return value


class Surplus(DoratError):
    """A trial created after the study already had --trials trials finished or running."""


def surplus(trial: Any, trials: int) -> int | None:
    """How many trials came before ``trial`` and count towards ``--trials`` (finished, or running
    in some process), when that is already ``trials``; None when ``trial`` is within the limit.

    The storage numbers trials atomically, so of two processes that both saw N - 1 finished trials
    and both asked for one more, only the later-numbered trial is past the limit: the study ends
    with exactly N (the check after each trial alone lets both run)."""
    from optuna.trial import TrialState

    if trials <= 0:
        return None
    states = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)
    ahead = sum(t.number < trial.number and not t.user_attrs.get(SURPLUS)
                for t in trial.study.get_trials(deepcopy=False, states=states))
    return ahead if ahead >= trials else None


def _train_waiting(cfg: cfglib.Config, path: Path, log: Callable[[str], None]) -> dict[str, Any]:
    """Train (or resume, or read) a run; if another tune process is training it, wait for it."""
    from dorat.files import locks
    from dorat.runs.run import load_metrics, train

    waited = False
    while True:
        if (path / "metrics.json").is_file():
            return load_metrics(path)
        try:
            with locks.own(path):
                metrics = train(cfg, path, resume=True, log=log)
                assert metrics is not None
                return metrics
        except locks.Busy:
            if not waited:
                log(f"{path} is being trained by another tune process; waiting for it")
                waited = True
            time.sleep(5)
