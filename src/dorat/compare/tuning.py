"""A compare grid's tuning step: every method tuned by `dorat tune`'s machinery (dorat.tune: Optuna,
the validation split only) with the *same* budget, then the grid trains the chosen setting on
every seed.

The compare file states the budget once, before any run, for every method:

    tune:
      trials: 12                      # finished trials per method (the same for every method)
      epochs: 4                       # a trial's length (the same for all; at most the run's own)
      seed: 0                         # the trials' data seed and the TPE sampler's seed
      objective: val.worst_class.worst  # a validation metric (dorat tune's --objective)
      space: {optim.lr: "log:0.02:0.2", optim.ema: "0,0.995"}   # every method's common space
      set: {}                         # optional: keys for the trials only
      pruner: median                  # median (prune_startup, prune_warmup) or none
    methods:
      - {name: at, method: at}                                  # lr and averaging only
      - {name: trades, method: trades, space: {trades.beta: "1:8"}}   # + its own parameter

Each (dataset, setting, method) has its study in OUT/tune/<dataset>/<setting>/<method>/ (Optuna
SQLite storage tune.db, trials/NNNN, tune.md, tune.png) and, once it holds ``trials`` finished
trials, chosen.json: the best trial's values, its objective value and the budget. The grid's runs
of that method then use the chosen values (recorded in results.json and tuning.md); a method
whose tuning is not done waits. Several `dorat compare` processes on one OUT share each study
(Optuna's storage) and split the runs (dorat.files.locks). A method with ``init_from: NAME`` starts
from the grid's own NAME run of the same data set, setting and seed (FAAL fine-tuning PGD-AT):
its trials and runs wait for that run.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dorat import config as cfglib
from dorat.errors import ConfigError, DoratError
from dorat.files.checkpoint import read_json, write_json_atomic

TUNE_KEYS = {"trials", "epochs", "seed", "objective", "space", "set", "pruner", "prune_startup",
             "prune_warmup"}
CHOSEN = "chosen.json"


@dataclass(frozen=True)
class TuneSpec:
    """The tuning budget of a grid: the same for every method."""

    trials: int
    epochs: int | None
    seed: int
    objective: str
    space: dict[str, str]
    set: dict[str, Any] = field(default_factory=dict)
    pruner: str = "median"
    prune_startup: int = 5
    prune_warmup: int = 0

    def budget(self) -> dict[str, Any]:
        """What every method's tuning must share (recorded in each chosen.json and compared)."""
        return {"trials": self.trials, "epochs": self.epochs, "seed": self.seed,
                "objective": self.objective, "common_space": dict(self.space), "set": dict(self.set),
                "pruner": self.pruner, "prune_startup": self.prune_startup,
                "prune_warmup": self.prune_warmup, "sampler": "TPE"}


def parse_tune(v: Any, where: str) -> TuneSpec | None:
    if v is None:
        return None
    if not isinstance(v, dict) or set(v) - TUNE_KEYS:
        raise ConfigError(f"{where}: tune must be a mapping with keys {', '.join(sorted(TUNE_KEYS))}"
                          f"; got {v!r}")
    missing = [k for k in ("trials", "objective") if k not in v]
    if missing:
        raise ConfigError(f"{where}: tune needs {' and '.join(missing)} (the budget and the "
                          "validation metric every method is tuned for)")
    trials, epochs, seed = v["trials"], v.get("epochs"), v.get("seed", 0)
    for name, x, low in (("trials", trials, 1), ("seed", seed, 0),
                         ("prune_startup", v.get("prune_startup", 5), 0),
                         ("prune_warmup", v.get("prune_warmup", 0), 0)):
        if not isinstance(x, int) or isinstance(x, bool) or x < low:
            raise ConfigError(f"{where}: tune.{name} must be an integer >= {low}, got {x!r}")
    if epochs is not None and (not isinstance(epochs, int) or isinstance(epochs, bool) or epochs < 1):
        raise ConfigError(f"{where}: tune.epochs must be a positive integer, got {epochs!r}")
    if v.get("pruner", "median") not in ("median", "none"):
        raise ConfigError(f"{where}: tune.pruner must be median or none, got {v['pruner']!r}")
    space = v.get("space") or {}
    if not isinstance(space, dict) or not all(isinstance(s, (str, int, float)) for s in space.values()):
        raise ConfigError(f"{where}: tune.space maps config keys to specs (log:LOW:HIGH, LOW:HIGH, "
                          "int:LOW:HIGH or A,B,C)")
    sets = v.get("set") or {}
    if not isinstance(sets, dict):
        raise ConfigError(f"{where}: tune.set must be a mapping of config keys")
    return TuneSpec(trials, epochs, seed, str(v["objective"]), {k: str(s) for k, s in space.items()},
                    sets, v.get("pruner", "median"), v.get("prune_startup", 5), v.get("prune_warmup", 0))


def method_space(m: Mapping[str, Any], where: str) -> dict[str, str]:
    space = m.get("space") or {}
    if not isinstance(space, dict):
        raise ConfigError(f"{where}: {m['name']}.space maps config keys to specs "
                          "(e.g. {done.r: log:0.5:8})")
    return {k: str(s) for k, s in space.items()}


def study_dir(out: Path, dirname: str, setting: str, name: str) -> Path:
    return out / "tune" / dirname / setting / name


def read_chosen(path: Path, spec: TuneSpec, space: Mapping[str, str]) -> dict[str, Any] | None:
    """The chosen values of a finished study, None before; a study run with another budget or
    space than the compare file now states is an error (results would mix budgets)."""
    f = path / CHOSEN
    if not f.is_file():
        return None
    try:
        chosen = read_json(f)
        budget, their_space, params = chosen["budget"], chosen["space"], chosen["params"]
    except (ValueError, KeyError, TypeError):
        raise ConfigError(f"{f} is damaged; delete it to choose again from the study") from None
    if budget != spec.budget() or their_space != dict(space):
        raise ConfigError(f"{f} was tuned with another budget or space than the compare file now "
                          "states; the budget is fixed before any run: use a new --out, or delete "
                          f"{path} to tune again")
    return params


@dataclass
class Study:
    """One method's tuning in one (data set, setting)."""

    name: str
    path: Path
    base: cfglib.Config  # the method's run config at the tuning seed, before the trials' changes
    space: dict[str, str]
    waits_for: Path | None = None  # init_from's run (at the tuning seed), which must finish first


def run_study(st: Study, spec: TuneSpec, log: Callable[[str], None]) -> bool:
    """Tune one method until its study holds ``spec.trials`` finished trials, then write
    chosen.json; False when it waits for its init_from run."""
    from dorat.tune import Tuner, create_study, optimize, parse_metric, parse_space
    from dorat.tune.report import best_trial, write_outputs

    if (st.path / CHOSEN).is_file():
        return True
    if st.waits_for is not None and not (st.waits_for / "metrics.json").is_file():
        log(f"tuning {st.name}: waits for {st.waits_for} (its init) to finish")
        return False
    every = st.base.val.every or 1
    # a trial is never longer than the method's run (FAAL fine-tunes for 2 epochs)
    updates = {**spec.set, "eval.split": "val", "val.every": every,
               **({"epochs": min(spec.epochs, st.base.epochs)} if spec.epochs else {})}
    try:
        base = st.base.replace(updates, f"tune block of {st.name}")
    except ConfigError as e:
        raise ConfigError(f"tuning {st.name}: {e}") from None
    if base.data.val_size <= 0:
        raise ConfigError(f"tuning {st.name}: trials are scored on the validation split: set "
                          "data.val_size in the grid (or tune.set)")
    space = {**spec.space, **st.space}
    params = [parse_space(f"{k}={v}", base) for k, v in space.items()]
    tuner = Tuner(base, params, parse_metric(spec.objective, list(base.eval.attacks), "tune.objective"),
                  [], st.path, log=lambda s: log(f"tuning {st.name}: {s}"))
    st.path.mkdir(parents=True, exist_ok=True)
    study = create_study(tuner, f"sqlite:///{(st.path / 'tune.db').resolve()}", st.name, spec.pruner,
                         spec.prune_startup, spec.prune_warmup, spec.seed)
    try:
        optimize(tuner, study, spec.trials)
    finally:
        write_outputs(tuner, study, base.eval.split, every)
    from optuna.trial import TrialState

    done = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))]
    if len(done) < spec.trials:  # another process is still running some of them
        log(f"tuning {st.name}: {len(done)} of {spec.trials} trials finished; the rest run elsewhere")
        return False
    best = best_trial(study)
    if best is None:
        raise DoratError(f"tuning {st.name}: no trial of {st.path} completed (all pruned or failed); "
                         "see its tune.md")
    chosen = {"method": st.name, "params": dict(best.params), "value": best.value, "trial": best.number,
              "finished_trials": len(done), "space": space, "budget": spec.budget()}
    write_json_atomic(st.path / CHOSEN, chosen)
    log(f"tuning {st.name}: chose {best.params} ({spec.objective} = {best.value:.2f}, trial "
        f"{best.number} of {len(done)})")
    return True


def tuning_markdown(spec: TuneSpec, rows: list[tuple[str, str, str, dict[str, Any] | None]]) -> str:
    """OUT/tuning.md: the budget (one for all) and each method's chosen values."""
    b = spec.budget()
    lines = ["# Tuning", "",
             f"Every method: {b['trials']} finished trials of Optuna's TPE sampler (seed {b['seed']}; "
             + ("TPE's first 10 proposals are random, so this is a seeded random search), "
                if b["trials"] <= 10 else "the first 10 proposals are random), ")
             + f"{b['epochs'] or 'full-length'}-epoch trials on the validation split, objective "
             f"`{b['objective']}`, pruner {b['pruner']}; common space "
             + (", ".join(f"`{k}` {v}" for k, v in b["common_space"].items()) or "none") + ".", "",
             "| data set | setting | method | own space | chosen | objective (val, %) |",
             "|---|---|---|---|---|---|"]
    for ds, setting, name, chosen in rows:
        if chosen is None:
            lines.append(f"| {ds} | {setting} | {name} | | (tuning) | |")
            continue
        own = {k: v for k, v in chosen["space"].items() if k not in b["common_space"]}
        lines.append(f"| {ds} | {setting} | {name} | {', '.join(f'`{k}` {v}' for k, v in own.items())} "
                     f"| {', '.join(f'{k}={_fmt(v)}' for k, v in chosen['params'].items())} | "
                     f"{chosen['value']:.2f} |")
    return "\n".join(lines) + "\n"


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)
