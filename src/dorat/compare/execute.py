"""Executing a grid: each run trained (or resumed) and evaluated in a run directory, in this
process or in N worker processes that split the grid by owning one run directory at a time
(dorat.locks).

This is the seam a launcher plugs into: ``run_grid`` walks the runs and ``_do_run`` does one."""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from dorat import locks
from dorat.compare.grid import (
    FAILED,
    Grid,
    RunSpec,
    _finished,
    _missing_evals,
    _status,
    _validate,
    find_compare_file,
)
from dorat.errors import DoratError


def run_grid(grid: Grid, log: Callable[[str], None] | None = None, progress: bool = False,
             only: Sequence[str] | None = None, retry_failed: bool = False) -> None:
    """Train and evaluate every run of the grid that has not finished yet (only the methods
    named in ``only``, when given). A run that fails with a user-level error (diverged loss,
    bad value) is recorded in RUN/failed.json and the grid goes on; failed runs are skipped
    on later calls unless ``retry_failed``. A run that another live process owns (dorat.locks)
    is left to it."""
    log = log or (lambda s: print(s, file=sys.stderr))
    statuses = _validate(grid, only)
    todo = sum(not _finished(r, grid.evals) for r in grid.runs)
    log(f"{grid.title}: {len(grid.runs)} runs, {len(grid.runs) - todo} finished, {todo} to go"
        + (f" (running only {', '.join(only)})" if only else ""))
    for i, (r, st) in enumerate(zip(grid.runs, statuses)):
        if only and r.name not in only:
            continue
        tag = f"[{i + 1}/{len(grid.runs)}] {r.dataset}/{r.setting}/{r.name}/seed{r.seed}"
        if st == "failed" and not retry_failed:
            log(f"{tag}: failed earlier ({_failure(r)}); skipped (--retry-failed to try again)")
            continue
        if _finished(r, grid.evals):
            continue
        try:
            r.path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise DoratError(f"cannot create {r.path} ({e.strerror}); choose another --out"
                             ) from None
        try:
            with locks.own(r.path):
                st = _status(r)  # again, as owner: another process may have finished it
                if st == "failed" and not retry_failed:
                    log(f"{tag}: failed in another compare ({_failure(r)}); skipped")
                    continue
                _do_run(r, grid.evals, st, tag, log, progress)
        except locks.Busy as e:
            log(f"{tag}: another process{f' (pid {e.pid})' if e.pid else ''} is running it; "
                "left to that one")


def _do_run(r: RunSpec, evals: Sequence[dict[str, Any]], st: str, tag: str,
            log: Callable[[str], None], progress: bool) -> None:
    """Train (or resume) one run, then its missing extra evaluations. Holds the run's lock."""
    from dorat.checkpoint import write_json_atomic
    from dorat.run import train

    if st == "failed":  # only reached with retry_failed
        (r.path / FAILED).unlink()
        st = "resume" if (r.path / "checkpoint.safetensors").is_file() else "new"
    missing = _missing_evals(r, evals)
    if st == "done" and missing and not (r.path / "model.safetensors").is_file():
        log(f"{tag}: finished, but its model file is gone and evaluation(s) {', '.join(missing)} "
            "are missing: training it again")
        st = "new"
    if st != "done":
        log(f"{tag}: {'resuming' if st == 'resume' else 'training'}")
        t0 = time.perf_counter()
        r.cfg = r.cfg.replace({"log.progress": "on" if progress else "off"})
        for stale in r.path.glob("eval-*.json"):  # belong to an earlier, unfinished model
            stale.unlink()
        try:
            train(r.cfg, r.path, resume=st == "resume", overwrite=st == "new", log=log)
        except DoratError as e:
            r.path.mkdir(parents=True, exist_ok=True)
            write_json_atomic(r.path / FAILED, {"error": str(e)})
            log(f"{tag}: FAILED ({e}); recorded in {r.path / FAILED}, going on")
            return
        log(f"{tag}: finished in {time.perf_counter() - t0:.0f}s")
    for e in evals:
        _extra_eval(r, e, log, tag, progress)


def _failure(r: RunSpec) -> str:
    try:
        return str(json.loads((r.path / FAILED).read_text())["error"])
    except (OSError, ValueError, KeyError):
        return "unreadable failed.json"


def _extra_eval(r: RunSpec, e: dict[str, Any], log: Callable[[str], None], tag: str,
                progress: bool) -> None:
    from dorat.checkpoint import write_json_atomic
    from dorat.run import evaluate_run, load_run
    from dorat.rundir import JOURNAL

    target = r.path / f"eval-{e['name']}.json"
    if target.is_file():
        return
    over = {f"eval.{k}": v for k, v in e.items() if k != "name"}
    over["data.dir"] = r.cfg.data.dir
    log(f"{tag}: evaluation '{e['name']}' ({', '.join(e.get('attacks', r.cfg.eval.attacks))})")
    run = load_run(r.path, r.cfg.device, over)
    metrics = evaluate_run(run, progress=progress, log=log,
                           journal=r.path / JOURNAL.format(name=f"eval-{e['name']}"))
    write_json_atomic(target, metrics)


def available_cores() -> int:
    """The CPU cores this process may run on (its affinity mask where the OS has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def worker_env(k: int, workers: int, device: str | None,
               environ: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of worker k of ``workers``: its share of the CPU threads, and on CUDA
    machines one GPU (round robin over the visible ones)."""
    env = dict(os.environ if environ is None else environ)
    env["OMP_NUM_THREADS"] = str(max(1, available_cores() // workers))
    if device in (None, "auto", "cuda"):
        import torch

        if torch.cuda.is_available() and torch.cuda.device_count() > 0:
            visible = env.get("CUDA_VISIBLE_DEVICES")
            ids = ([v for v in visible.split(",") if v.strip()] if visible
                   else [str(i) for i in range(torch.cuda.device_count())])
            env["CUDA_VISIBLE_DEVICES"] = ids[k % len(ids)]
    return env


def _run_workers(path: str | Path, out: Path, workers: int, device: str | None,
                 data_dir: str | None, only: Sequence[str] | None, retry_failed: bool,
                 log: Callable[[str], None] | None, plugins: Sequence[str] = ()) -> None:
    """Start ``workers`` `dorat compare` processes on the same OUT (the run locks split the
    grid between them), pass their messages on with a [wK] prefix, and wait for all."""
    import subprocess
    import threading

    log = log or (lambda s: print(s, file=sys.stderr, flush=True))
    cmd = [sys.executable, "-m", "dorat", "compare", str(find_compare_file(path)), "--out", str(out),
           "--no-aggregate"]
    cmd += ["--device", device] if device else []
    cmd += ["--data-dir", data_dir] if data_dir else []
    cmd += ["--methods", ",".join(only)] if only else []
    cmd += ["--retry-failed"] if retry_failed else []
    cmd += [a for m in plugins for a in ("--plugin", m)]
    procs, pumps = [], []
    for k in range(workers):
        p = subprocess.Popen(cmd, env=worker_env(k, workers, device), stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True, bufsize=1)
        procs.append(p)

        def pump(p: subprocess.Popen = p, k: int = k) -> None:
            assert p.stderr is not None
            for line in p.stderr:
                log(f"[w{k + 1}] {line.rstrip()}")

        t = threading.Thread(target=pump, daemon=True)
        t.start()
        pumps.append(t)
    try:
        codes = [p.wait() for p in procs]
    except BaseException:  # Ctrl-C or SIGTERM (a Slurm job's end): stop the workers too; each
        for p in procs:    # keeps its last checkpoint, the next compare resumes them
            if p.poll() is None:
                p.terminate()
        for p in procs:
            p.wait()
        raise
    for t in pumps:
        t.join()
    bad = [(k + 1, c) for k, c in enumerate(codes) if c != 0]
    if bad:
        raise DoratError("compare worker(s) " + ", ".join(f"w{k} (exit {c})" for k, c in bad)
                         + " stopped; their messages are above. Run the same command again: "
                         "finished runs are kept and interrupted ones resume")
