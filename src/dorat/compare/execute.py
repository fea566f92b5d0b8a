"""Executing a grid: each run trained (or resumed) and evaluated in its run directory.

``pending`` lists the runs still to do and ``run_one`` does one; the launchers run it: in this
process, in a local multiprocessing pool (``run_grid`` with workers > 1), or as Slurm jobs
through submitit (dorat.compare.slurm). Each run is owned by one process while it trains
(dorat.files.locks: a kernel lock, released however the process ends)."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from dorat.compare.grid import (
    FAILED,
    Grid,
    RunSpec,
    _finished,
    _missing_evals,
    _status,
    _validate,
    selected,
)
from dorat.errors import DoratError, raise_terminated
from dorat.files import locks
from dorat.runs import rundir
from dorat.training.tracking import with_tags


def pending(grid: Grid, log: Callable[[str], None], only: Sequence[str] | None = None,
            retry_failed: bool = False) -> list[tuple[RunSpec, str]]:
    """The runs still to do, each with its tag for the log ("[3/8] dataset/setting/name/seedK");
    failed runs only with ``retry_failed``."""
    statuses = _validate(grid, only)
    todo = sum(not _finished(r, grid.evals) for r in grid.runs)
    log(f"{grid.title}: {len(grid.runs)} runs, {len(grid.runs) - todo} finished, {todo} to go"
        + (f" (running only {', '.join(only)})" if only else ""))
    out = []
    for i, (r, st) in enumerate(zip(grid.runs, statuses)):
        if not selected(r, only):
            continue
        tag = f"[{i + 1}/{len(grid.runs)}] {r.dataset}/{r.setting}/{r.name}/seed{r.seed}"
        if st == "failed" and not retry_failed:
            log(f"{tag}: failed earlier ({_failure(r)}); skipped (--retry-failed to try again)")
        elif _finished(r, grid.evals):
            continue
        elif r.blocked() is not None:
            log(f"{tag}: waits for {r.blocked()}")
        else:
            out.append((r, tag))
    return out


def run_one(r: RunSpec, evals: Sequence[dict[str, Any]], tag: str, retry_failed: bool,
            log: Callable[[str], None], progress: bool = False) -> None:
    """One run of a grid, as every launcher runs it (in this process, a local worker process or
    a Slurm job): owned by this process while it trains (dorat.files.locks), then evaluated. A run
    that another live process owns is left to it."""
    from dorat.config.parts import load_plugins

    load_plugins(r.cfg.plugins)  # in a fresh process (worker, Slurm job): the run's own parts
    try:
        r.path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DoratError(f"cannot create {r.path} ({e.strerror}); choose another --out") from None
    try:
        with locks.own(r.path):
            st = _status(r)  # again, as owner: another process may have finished it
            if _finished(r, evals):
                return
            if st == "failed" and not retry_failed:
                log(f"{tag}: failed in another compare ({_failure(r)}); skipped")
                return
            _do_run(r, evals, st, tag, log, progress)
    except locks.Busy as e:
        log(f"{tag}: another process{f' (pid {e.pid})' if e.pid else ''} is running it; "
            "left to that one")


def run_grid(grid: Grid, log: Callable[[str], None] | None = None, progress: bool = False,
             only: Sequence[str] | None = None, retry_failed: bool = False, workers: int = 1,
             device: str | None = None, plugins: Sequence[str] = ()) -> None:
    """Train and evaluate every run of the grid that has not finished yet (only the methods
    named in ``only``, when given), in this process or in ``workers`` local processes (a
    multiprocessing pool: each run in a fresh process with its share of the CPU threads, or
    one GPU of the machine's in turn). A run that fails with a user-level error (diverged loss,
    bad value) is recorded in RUN/failed.json and the grid goes on; failed runs are skipped on
    later calls unless ``retry_failed``. (The slurm launcher takes ``pending`` runs instead:
    dorat.compare.slurm.)"""
    log = log or (lambda s: print(s, file=sys.stderr, flush=True))
    todo = pending(grid, log, only, retry_failed)
    if workers <= 1 or len(todo) <= 1:
        for r, tag in todo:
            run_one(r, grid.evals, tag, retry_failed, log, progress)
        return
    _pool(todo, grid.evals, retry_failed, workers, device, plugins, log)


def _pool(todo: Sequence[tuple[RunSpec, str]], evals: Sequence[dict[str, Any]], retry_failed: bool,
          workers: int, device: str | None, plugins: Sequence[str], log: Callable[[str], None]) -> None:
    """The runs in a pool of ``workers`` spawned processes (concurrent.futures; a fresh process
    per run where Python allows it). Each run takes a free slot k, which gives its CPU threads
    and GPU (worker_env) and its [wK] tag. Ctrl-C or SIGTERM stops the workers (each keeps its
    last checkpoint); a worker that dies (killed, out of memory) is one clear error."""
    import multiprocessing as mp
    import threading
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    ctx = mp.get_context("spawn")
    slots, lines = ctx.Queue(), ctx.Queue()  # free slots; the workers' messages for ``log``
    # set on a stop: the runs the pool had already queued (a stopped worker exits cleanly, so
    # the pool starts new workers for them) then end at once instead of training
    stopping = ctx.Event()
    for k in range(workers):
        slots.put(k)

    def pump() -> None:
        for line in iter(lines.get, None):
            log(line)

    printer = threading.Thread(target=pump, daemon=True)
    printer.start()
    extra = {"max_tasks_per_child": 1} if sys.version_info >= (3, 11) else {}
    ex = ProcessPoolExecutor(min(workers, len(todo)), mp_context=ctx, initializer=_worker_init,
                             initargs=(slots, lines, list(plugins), stopping), **extra)
    errors = []
    try:
        futures = [ex.submit(_worker_job, r, list(evals), tag, retry_failed, workers, device)
                   for r, tag in todo]
        for (_, tag), f in zip(todo, futures):
            try:
                f.result()
            except DoratError as e:  # a problem of the grid itself (e.g. an unwritable --out)
                errors.append(f"{tag}: {e}")
            except BrokenProcessPool:
                raise DoratError(f"a compare worker died while running {tag} or a run beside it "
                                 "(killed, or out of memory?); run the same command again: finished "
                                 "runs are kept and interrupted ones resume") from None
    except BaseException:  # Ctrl-C or SIGTERM (a Slurm job's end): stop the workers too
        stopping.set()
        _terminate(ex)
        raise
    finally:
        ex.shutdown(wait=True, cancel_futures=True)
        lines.put(None)
        printer.join()
    if errors:
        raise DoratError(f"{len(errors)} run(s) could not be done: " + "; ".join(errors))


def _terminate(ex: Any) -> None:
    if hasattr(ex, "terminate_workers"):  # Python 3.14
        ex.terminate_workers()
        return
    for p in list((getattr(ex, "_processes", None) or {}).values()):
        if p.is_alive():
            p.terminate()


_SLOTS: Any = None
_LINES: Any = None
_STOPPING: Any = None


def _worker_init(slots: Any, lines: Any, plugins: list[str], stopping: Any) -> None:
    global _SLOTS, _LINES, _STOPPING
    from dorat.config.parts import load_plugins

    _SLOTS, _LINES, _STOPPING = slots, lines, stopping
    # SIGTERM (the parent's stop, or the process group's) ends the batch in progress and
    # checkpoints the epoch so far (dorat.training.interrupts), instead of killing the worker outright
    signal.signal(signal.SIGTERM, raise_terminated)
    load_plugins(plugins)


def _worker_job(r: RunSpec, evals: list[dict[str, Any]], tag: str, retry_failed: bool, workers: int,
                device: str | None) -> None:
    """A pool worker's run: its slot's threads and GPU, its messages prefixed [wK]; nothing
    once the grid is stopping."""
    if _STOPPING.is_set():
        return
    k = _SLOTS.get()
    try:
        os.environ.update(worker_env(k, workers, device))
        import torch

        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
        run_one(r, evals, tag, retry_failed, lambda s: _LINES.put(f"[w{k + 1}] {s}"))
    finally:
        _SLOTS.put(k)


def _do_run(r: RunSpec, evals: Sequence[dict[str, Any]], st: str, tag: str,
            log: Callable[[str], None], progress: bool) -> None:
    """Train (or resume) one run, then its missing extra evaluations. Holds the run's lock."""
    from dorat.files.checkpoint import write_json_atomic
    from dorat.runs.run import train

    if st == "failed":  # only reached with retry_failed
        (r.path / FAILED).unlink()
        st = "resume" if rundir.has_checkpoint(r.path) else "new"
    missing = _missing_evals(r, evals)
    if st == "done" and missing and not (r.path / "model.safetensors").is_file():
        log(f"{tag}: finished, but its model file is gone and evaluation(s) {', '.join(missing)} "
            "are missing: training it again")
        st = "new"
    if st != "done":
        log(f"{tag}: {'resuming' if st == 'resume' else 'training'}")
        t0 = time.perf_counter()
        r.cfg = r.cfg.replace({"log.progress": "on" if progress else "off", "log.mlflow_tags": with_tags(
            r.cfg.log.mlflow_tags, dorat_grid=r.path.parents[4].resolve(), dorat_grid_dataset=r.dataset,
            dorat_grid_setting=r.setting, dorat_grid_method=r.name)})
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
    from dorat.files.checkpoint import write_json_atomic
    from dorat.runs.run import evaluate_run, load_run
    from dorat.runs.rundir import JOURNAL

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
