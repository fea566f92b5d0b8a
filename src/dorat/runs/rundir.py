"""A run directory's life: one owner at a time, what `train` does with what is already there, and
a replacement built beside the run it replaces.

``plan`` decides, from the files in RUN and the flags:

- ``--resume`` is idempotent, so a requeued job may always pass it: it continues the
  checkpoint (of an interrupted replacement first), reports a finished run and changes nothing,
  starts again a run stopped before its first checkpoint (from its saved config.yaml), and starts
  a new run in an empty directory. A few keys may change on resume (``RESUMABLE``: the optimizer,
  the epochs, evaluation, logging, performance); the changes are validated, written to
  config.yaml and recorded in RUN/history.jsonl.
- ``--overwrite`` on a directory holding a run builds the new run in RUN/.next while the old one
  stays intact, and replaces it only once the new one has finished (``promote``). The swap is
  journaled (RUN/.next/.complete lists the new files), so a crash during it is completed by the
  next command that owns the directory.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dorat.config import Config
from dorat.errors import ConfigError
from dorat.files import locks
from dorat.files.checkpoint import write_text_atomic
from dorat.training.tracking import MLFLOW_FILE, TB_DIR  # log.mlflow's run id; log.tensorboard's events

RUN_FILES = ("config.yaml", "log.jsonl", "checkpoint.safetensors", "model.safetensors",
             "weights.safetensors", "metrics.json", "init.json", MLFLOW_FILE)
# An evaluation's progress while it runs (RUN/.metrics.partial.safetensors,
# RUN/.eval-NAME.partial.safetensors): resumed after an interruption, deleted when it is done.
JOURNAL = ".{name}.partial.safetensors"
HISTORY = "history.jsonl"  # one line per resume that changed the config
STAGE = ".next"            # a replacement run (--overwrite) while it trains
COMPLETE = ".complete"     # in STAGE: the replacement finished; lists the files to move
# what may change when a run is resumed: nothing that the checkpoint's tensors depend on
RESUMABLE = ("epochs", "device", "data.dir", "optim.", "eval.", "log.", "perf.", "val.")
FIXED = ("optim.ema", "optim.ema_start")  # the weight average in the checkpoint depends on them


@dataclass
class Plan:
    mode: str                  # "new", "resume" or "finished"
    cfg: Config
    dir: Path                  # where training writes: RUN, or RUN/.next for a replacement
    changes: dict[str, Any] = field(default_factory=dict)  # applied to a resumed run's config

    @property
    def replaces(self) -> bool:
        return self.dir.name == STAGE


@contextlib.contextmanager
def own(out: Path) -> Iterator[None]:
    """This process owns ``out`` while it trains (dorat.files.locks): a second `dorat train` or
    `dorat compare` on the same directory is refused instead of mixing two runs in it."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} exists and is not a directory; choose another path")
    with _locked(out, "; wait for it to finish or choose another --out", read_only_ok=False):
        yield


def _locked(path: Path, busy: str, read_only_ok: bool) -> contextlib.ExitStack:
    """locks.own(path) as an ExitStack to enter; another owner is a ConfigError ending in
    ``busy``; a directory that cannot be locked (not writable) is an error, or with
    ``read_only_ok`` an empty stack (nobody can be training in it)."""
    owned = contextlib.ExitStack()
    try:
        owned.enter_context(locks.own(path))
    except locks.Busy as e:
        raise ConfigError(f"{path} is in use by another dorat process"
                          f"{f' (pid {e.pid})' if e.pid else ''}{busy}") from None
    except OSError as e:
        if not read_only_ok:
            raise ConfigError(f"cannot create output directory {path} ({e.strerror}); choose another "
                              "--out") from None
    return owned


def flag_changes(flags: Mapping[str, Any], cfg: Config) -> dict[str, Any]:
    """The command line's flags as changes to a resumed run, like --set (one rule: only the
    RESUMABLE keys may change): each given flag's value as resolved in ``cfg`` (an absolute data
    path), ``--method`` as its preset's label (method.name)."""
    flat = cfg.flat()
    keys = ["method.name" if k == "method" else k for k, v in flags.items()
            if v is not None and k not in ("device", "plugins")]
    return {k: flat[k] for k in keys}


def has_checkpoint(out: Path) -> bool:
    return any((d / "checkpoint.safetensors").is_file() for d in (out / STAGE, out))


def plan(out: Path, cfg: Config, resume: bool, overwrite: bool, changes: Mapping[str, Any],
         read_config: Callable[[Path], Config], log: Callable[[str], None]) -> Plan:
    """What `train` does in ``out`` (see the module docstring). Writes nothing except completing
    a replacement that a crash interrupted. The caller owns ``out`` (`own`, which also checks
    that it is a directory)."""
    if resume and overwrite:
        raise ConfigError("--resume and --overwrite contradict each other: --resume continues the "
                          f"run in {out}, --overwrite replaces it; pass one of them")
    finish_replacement(out)
    stage = out / STAGE
    if resume:
        for where in (stage, out):  # an interrupted replacement first
            if (where / "checkpoint.safetensors").is_file() and not (where / "metrics.json").is_file():
                saved = read_config(where)
                new, diff = _changed(saved, changes, cfg.device)
                return Plan("resume", new, where, diff)
        if (out / "metrics.json").is_file():
            saved = read_config(out)
            _, diff = _changed(saved, changes, cfg.device)  # a change it cannot take is refused
            log(f"{out} holds a finished run: nothing to resume"
                + (f" (not applied: {', '.join(diff)}; `dorat eval` evaluates it with other "
                   "eval.* settings)" if diff else ""))
            return Plan("finished", saved, out)
        for where in (stage, out):
            if (where / "config.yaml").is_file():
                log(f"{where} has no checkpoint yet (it stopped before its first epoch ended): "
                    "starting it again from its saved config.yaml")
                new, _ = _changed(read_config(where), changes, cfg.device)
                return Plan("new", new, where)
        log(f"nothing to resume in {out}: starting a new run")
        return Plan("new", cfg, out)
    present = [f for f in RUN_FILES if (out / f).exists()]
    if present and not overwrite:
        what = "a finished run" if "metrics.json" in present else "an unfinished run"
        raise ConfigError(f"{out} already holds {what}; pass --resume to continue it, --overwrite "
                          "to replace it, or choose another --out")
    return Plan("new", cfg, stage if present else out)


def _changed(saved: Config, changes: Mapping[str, Any], device: str) -> tuple[Config, dict[str, Any]]:
    """The saved config with ``changes`` applied, and the keys whose value changed; changes to
    keys the checkpoint depends on are refused."""
    new = saved.replace({**changes, "device": device})
    before, after = saved.flat(), new.flat()
    diff = {k: after[k] for k in after if after[k] != before.get(k)}
    fixed = [k for k in diff if k in FIXED or not (k in RESUMABLE or k.startswith(RESUMABLE))]
    if fixed:
        raise ConfigError(f"--resume cannot change {', '.join(fixed)}: the checkpoint depends on "
                          "it; start a new run (--overwrite, or another --out). On resume only "
                          "optim.* (but optim.ema*), epochs, eval.*, log.*, perf.*, val.* and "
                          "data.dir may change")
    return new, {k: v for k, v in diff.items() if k != "device"}


def ensure_writable(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"cannot create output directory {out} ({e.strerror}); choose another --out"
                          ) from None
    if not os.access(out, os.W_OK):
        raise ConfigError(f"output directory {out} is not writable; choose another --out")


def set_up(p: Plan, out: Path, dump: Callable[[Config], str], epoch: int) -> None:
    """Prepare ``p.dir`` for training: a new run gets a clean directory and its config.yaml; a
    resumed one loses the temporary files of writes a crash interrupted, and its config.yaml and
    history.jsonl record changed keys (``epoch``: the checkpoint's)."""
    ensure_writable(out)
    files = (*RUN_FILES, JOURNAL.format(name="metrics"), HISTORY)
    if p.mode == "resume":
        for name in files:
            for tmp in p.dir.glob(f".{name}.*.tmp"):
                tmp.unlink(missing_ok=True)
        if p.changes:
            write_text_atomic(p.dir / "config.yaml", dump(p.cfg))
            with open(p.dir / HISTORY, "a") as f:
                f.write(json.dumps({"after_epoch": epoch, "set": p.changes}) + "\n")
        return
    if p.replaces:
        shutil.rmtree(p.dir, ignore_errors=True)  # an earlier replacement that never finished
        ensure_writable(p.dir)
    for f in files:
        (p.dir / f).unlink(missing_ok=True)
    shutil.rmtree(p.dir / TB_DIR, ignore_errors=True)  # an earlier run's curves
    write_text_atomic(p.dir / "config.yaml", dump(p.cfg))


def promote(out: Path) -> None:
    """The finished replacement in RUN/.next becomes the run: first the list of its files is
    written (the journal of the swap), then each moves over the old one, then the old run's
    files it has no counterpart for go."""
    stage = out / STAGE
    names = sorted(p.name for p in stage.iterdir() if p.name != COMPLETE)
    write_text_atomic(stage / COMPLETE, json.dumps(names))
    finish_replacement(out)


def finish_replacement(out: Path) -> None:
    """Complete a swap that ``promote`` journaled (no-op when there is none)."""
    stage = out / STAGE
    try:
        names = json.loads((stage / COMPLETE).read_text())
    except (OSError, ValueError):
        return
    for name in names:
        if (stage / name).is_dir() and (out / name).is_dir():  # tb/: directories do not replace
            shutil.rmtree(out / name)
        if (stage / name).exists():
            os.replace(stage / name, out / name)
    if TB_DIR not in names:
        shutil.rmtree(out / TB_DIR, ignore_errors=True)
    old = [*RUN_FILES, HISTORY, "eval.json", "failed.json"]
    for p in out.iterdir():
        generated = (p.name in old or (p.name.startswith("eval-") and p.name.endswith(".json"))
                     or p.name.endswith(".partial.safetensors"))
        if p.is_file() and generated and p.name not in names:
            p.unlink()
    shutil.rmtree(stage, ignore_errors=True)


@contextlib.contextmanager
def own_finished(run_dir: Path) -> Iterator[None]:
    """Own a finished run to read its result and write beside it (`dorat eval RUN`): a run that
    another process is training is refused, not evaluated at its last checkpoint; a journaled
    ``--overwrite`` swap a crash interrupted is completed first, so the new config never meets
    the old weights; a run stopped before its end is named as such. A directory this process
    cannot write (a read-only copy of results) is read without the lock: nobody trains there."""
    if not run_dir.is_dir():
        yield  # not a run: the reader says so
        return
    with _locked(run_dir, ": it is still training (or being evaluated); evaluate it once that "
                 "has finished", read_only_ok=True):
        if os.access(run_dir, os.W_OK):
            finish_replacement(run_dir)
        if not (run_dir / "model.safetensors").exists() and (run_dir / "checkpoint.safetensors").exists():
            raise ConfigError(f"{run_dir} has not finished training (no model.safetensors yet): "
                              f"finish it with `dorat train --out {run_dir} --resume`")
        yield
