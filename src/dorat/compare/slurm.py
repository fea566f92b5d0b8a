"""Grids on Slurm through submitit (``dorat compare GRID --out DIR --launcher slurm``).

Each run that is not finished becomes one Slurm job, submitted with submitit: the job unpickles
the run's spec and calls the same ``run_one`` as the local launcher (train or resume, then the
extra evaluations), so a job that is requeued, preempted or cancelled and submitted again
resumes from the run's last checkpoint. The job's stdout/stderr and submitit's files are in
RUN/slurm/. A job that reaches its time limit or is preempted is requeued by submitit's
checkpoint hook (``Checkpointable``), which resubmits the same call: training resumes.

What is running is the engine's answer, not ours: OUT/slurm-jobs.json keeps each run's latest
job id, and `squeue` says whether that job is still pending or running. Re-running the command
skips finished runs (their files), leaves runs whose job is alive alone, and submits the rest
again (failed runs only with --retry-failed). Job states come from `squeue` rather than
submitit's `sacct` queries, so clusters without accounting work too.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dorat.compare.execute import run_one
from dorat.compare.grid import FAILED, RunSpec, _finished
from dorat.errors import ConfigError, DoratError, raise_terminated
from dorat.training.interrupts import also_hold

JOBS = "slurm-jobs.json"
EXTRA = "dorat[slurm]"
# squeue's states of a job that is still the engine's (it will run, runs, or ends right now)
ALIVE = {"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "SUSPENDED", "REQUEUED", "REQUEUE_HOLD",
         "REQUEUE_FED", "RESIZING", "SIGNALING", "STAGE_OUT", "RESV_DEL_HOLD", "STOPPED"}

try:  # submitit is the optional extra: the class must exist (and pickle) either way
    from submitit.helpers import Checkpointable as _JobBase
except ImportError:  # pragma: no cover - exercised only without the extra
    _JobBase = object  # type: ignore[assignment,misc]


@dataclass(frozen=True)
class SlurmOptions:
    """Resources of each run's job (submitit's parameters; ``sbatch``: any other #SBATCH flag)."""

    partition: str | None = None
    time_min: int = 24 * 60
    cpus: int = 1
    gpus: int = 0
    mem_gb: float | None = None
    sbatch: Mapping[str, str] = field(default_factory=dict)
    poll_s: float = 5.0  # squeue polls start at 1 s and grow to 6 x this

    def parameters(self, name: str) -> dict[str, Any]:
        p: dict[str, Any] = {"name": name, "timeout_min": self.time_min, "cpus_per_task": self.cpus,
                             "tasks_per_node": 1, "nodes": 1}
        if self.gpus:
            p["gpus_per_node"] = self.gpus
        if self.mem_gb is not None:
            p["mem_gb"] = self.mem_gb
        if self.partition:
            p["slurm_partition"] = self.partition
        if self.sbatch:
            p["slurm_additional_parameters"] = dict(self.sbatch)
        return p


def options_from_args(a: Any) -> SlurmOptions | None:
    """--slurm-* as SlurmOptions for --launcher slurm; those options without it are an error."""
    given = [f"--{k.replace('_', '-')}" for k in ("slurm_partition", "slurm_time", "slurm_cpus",
                                                  "slurm_gpus", "slurm_mem", "no_wait")
             if getattr(a, k) not in (None, False)] + (["--slurm-sbatch"] if a.slurm_sbatch else [])
    if a.launcher != "slurm":
        if given:
            raise ConfigError(f"{given[0]} is for --launcher slurm")
        return None
    if a.workers != 1:
        raise ConfigError("--workers is for --launcher local; with slurm each run is its own job "
                          "(--slurm-cpus, --slurm-gpus give its resources)")
    time_min, cpus, gpus = (24 * 60 if a.slurm_time is None else a.slurm_time,
                            1 if a.slurm_cpus is None else a.slurm_cpus,
                            0 if a.slurm_gpus is None else a.slurm_gpus)
    for name, v, low in (("--slurm-time", time_min, 1), ("--slurm-cpus", cpus, 1),
                         ("--slurm-gpus", gpus, 0)):
        if v < low:
            raise ConfigError(f"{name} must be at least {low}, got {v}")
    if a.slurm_mem is not None and not a.slurm_mem > 0:
        raise ConfigError(f"--slurm-mem must be a positive number of GB, got {a.slurm_mem}")
    sbatch = {}
    for item in a.slurm_sbatch:
        key, sep, value = item.partition("=")
        if not sep or not key.strip().lstrip("-"):
            raise ConfigError(f"--slurm-sbatch '{item}' must be KEY=VALUE, e.g. account=proj")
        sbatch[key.strip().lstrip("-").replace("-", "_")] = value
    return SlurmOptions(a.slurm_partition, time_min, cpus, gpus, a.slurm_mem, sbatch)


class RunJob(_JobBase):
    """What a Slurm job runs: one run of the grid. Checkpointable: on a time limit or a
    preemption submitit calls ``checkpoint`` and requeues the same call, which resumes the run."""

    def __call__(self, r: RunSpec, evals: list[dict[str, Any]], tag: str, retry_failed: bool) -> str:
        import signal

        import torch

        torch.set_num_threads(max(1, int(os.environ.get("SLURM_CPUS_PER_TASK", "1"))))
        # submitit ignores SIGTERM (its requeue comes with the earlier USR2); a SIGTERM here is
        # scancel's or the kill at the end: stop now, keeping the last checkpoint, instead of
        # training on for KillWait seconds until SIGKILL
        signal.signal(signal.SIGTERM, raise_terminated)
        # submitit's requeue (SIGUSR2 before the time limit, or on preemption) ends the process
        # with sys.exit: it waits for the batch in progress, which the checkpoint then holds
        also_hold(signal.SIGUSR2)
        run_one(r, evals, tag, retry_failed, lambda s: print(s, file=sys.stderr, flush=True))
        return "finished" if (r.path / "metrics.json").is_file() else "not finished"


def check_available() -> Any:
    """submitit and Slurm's commands, or one clear error naming what to install."""
    try:
        import submitit
    except ImportError:
        raise ConfigError(f"--launcher slurm needs submitit: pip install '{EXTRA}' (or pip install "
                          "submitit)") from None
    missing = [c for c in ("sbatch", "squeue") if shutil.which(c) is None]
    if missing:
        raise ConfigError(f"--launcher slurm needs Slurm's {' and '.join(missing)} on PATH; run on a "
                          "machine of the cluster (or use --launcher local)")
    live_jobs()  # the controller answers (else one line, before OUT is made)
    return submitit


def live_jobs() -> dict[str, str]:
    """Job id → state of every job Slurm still holds (squeue)."""
    try:
        p = subprocess.run(["squeue", "-h", "-o", "%i %T"], capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise DoratError(f"squeue failed ({e}); is the Slurm controller reachable?") from None
    if p.returncode != 0:
        raise DoratError(f"squeue failed ({p.stderr.strip() or p.returncode}); is the Slurm "
                         "controller reachable?")
    out = {}
    for line in p.stdout.splitlines():
        jid, _, state = line.strip().partition(" ")
        if state.strip() in ALIVE:
            out[jid] = state.strip()
    return out


def _read_jobs(out: Path) -> dict[str, str]:
    try:
        data = json.loads((out / JOBS).read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        raise DoratError(f"cannot read {out / JOBS} ({e}); delete it if no job of this grid is "
                         "still running") from None
    return {str(k): str(v) for k, v in data.items()} if isinstance(data, dict) else {}


def launch(todo: Sequence[tuple[RunSpec, str]], evals: Sequence[dict[str, Any]], out: Path,
           opts: SlurmOptions, retry_failed: bool, log: Callable[[str], None], wait: bool = True) -> None:
    """Submit a job for every run of ``todo`` that no live job has, then (``wait``) follow the
    jobs until none is left in the queue."""
    from dorat.files.checkpoint import write_json_atomic

    submitit = check_available()
    jobs = _read_jobs(out)
    live = live_jobs()
    watch: dict[str, tuple[RunSpec, str]] = {}
    for r, tag in todo:
        key = str(r.path.relative_to(out))
        old = jobs.get(key)
        if old in live:
            log(f"{tag}: Slurm job {old} is {live[old].lower()}; left to it")
            watch[old] = (r, tag)
            continue
        ex = submitit.AutoExecutor(folder=r.path / "slurm", cluster="slurm")
        ex.update_parameters(**opts.parameters(f"dorat-{r.name}-s{r.seed}"))
        try:
            job = ex.submit(RunJob(), r, list(evals), tag, retry_failed)
        except Exception as e:  # sbatch's refusal (bad partition, limits): its own words
            raise DoratError(f"{tag}: sbatch refused the job ({str(e).strip().splitlines()[-1]}); "
                             "check the --slurm-* options") from None
        jobs[key] = str(job.job_id)
        write_json_atomic(out / JOBS, jobs)
        log(f"{tag}: submitted as Slurm job {job.job_id}" + (f" (job {old} ended before the run "
                                                               "finished)" if old else ""))
        watch[str(job.job_id)] = (r, tag)
    if wait and watch:
        _follow(watch, evals, opts.poll_s, log)


def _follow(watch: dict[str, tuple[RunSpec, str]], evals: Sequence[dict[str, Any]], poll_s: float,
            log: Callable[[str], None]) -> None:
    left, wait = dict(watch), 1.0
    log(f"waiting for {len(left)} Slurm job(s) (Ctrl-C stops waiting; the jobs go on)")
    try:
        while left:
            live = live_jobs()
            for jid in [j for j in left if j not in live]:
                r, tag = left.pop(jid)
                if _finished(r, evals):
                    log(f"{tag}: job {jid} finished the run")
                elif (r.path / FAILED).is_file():
                    log(f"{tag}: job {jid} ended, the run FAILED (see {r.path / FAILED})")
                else:
                    log(f"{tag}: job {jid} ended before the run finished (cancelled, preempted or "
                        f"crashed: see {r.path / 'slurm'}); run the same command again to resubmit it")
            if left:  # soon after a submission, then less often (a long grid polls rarely)
                time.sleep(wait)
                wait = min(wait * 1.5, poll_s * 6)
    except KeyboardInterrupt:
        log("stopped waiting; the Slurm jobs go on. Run the same command again to follow them "
            "and aggregate")
        raise
