"""`dorat compare`: a fair grid of runs (same data, model, budget, seeds), aggregated.

A compare file (YAML) names the grid:

    title: AT vs DONE on Fashion-MNIST        # optional
    base: fmnist-demo                         # preset or YAML path (relative to this file)
    set: {epochs: 5}                          # optional dotted overrides for every run
    datasets: [fashion-mnist]                 # optional, default the base's dataset
    model: small-cnn                          # optional, default the base's model
    settings:                                 # optional named variants of the data/budget
      balanced: {}
      longtail: {data.imbalance_ratio: 10}
    methods:                                  # presets, or a named preset with overrides
      - at
      - {name: done-r2, method: done, set: {done.r: 2.0}, settings: [balanced]}
      - {name: done-r4, method: done, set: {done.r: 4.0}, seeds: [0, 1, 2, 3, 4]}  # own seeds
    seeds: [0, 1, 2]
    evals:                                    # optional extra evaluations per run
      - {name: aa1000, attacks: [pgd, cw, aa], n: 1000}

Runs go to OUT/runs/<dataset>/<setting>/<name>/seed<k>, seeds outermost. A finished run
(metrics.json present) is skipped, an interrupted one resumed from its checkpoint, so the
command can be stopped and restarted at any time. A run whose saved config differs from what
the compare file now asks for is an error (results would silently mix). Each extra evaluation
writes RUN/eval-<name>.json, also skipped when present. A finished run whose model file is gone
(e.g. only its small result files were kept in git) but that still misses an extra evaluation
is trained again.

``workers=N`` (``--workers N``) runs the grid in a pool of N local processes and splits the
machine between them: on CPU each gets cores/N threads (small models use 2 single-threaded
processes better than one with 2 threads), with CUDA each gets one GPU in turn. Several compare
commands may also share one OUT: each run is owned by one process while it trains
(dorat.files.locks), so they split the grid between them.

Aggregation: for every (dataset, setting, method) and every metric, the mean and sample std
(ddof = 1) over the seeds that finished; OUT/results.json, OUT/results.md (best mean per column
in bold) and OUT/report.md with the per-class plot of the means.

The grid's report is compare.report. Imports: tune, report, runs and every layer below; only
the CLI imports it (tests/test_layers.py).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from dorat.compare.execute import available_cores, pending, run_grid, worker_env
from dorat.compare.grid import Grid, RunSpec, _validate, comparability_warnings, find_compare_file, load_grid
from dorat.compare.report import (
    aggregate,
    flat_metrics,
    markdown_tables,
    mean_std,
    signed_points,
    write_outputs,
)
from dorat.compare.slurm import SlurmOptions
from dorat.compare.slurm import check_available as check_slurm
from dorat.compare.slurm import launch as launch_slurm
from dorat.compare.tuning import CHOSEN, run_study, study_dir, tuning_markdown
from dorat.errors import DoratError


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def compare(path: str | Path, out: str | Path, device: str | None = None, data_dir: str | None = None,
            log: Callable[[str], None] | None = None, progress: bool = False,
            aggregate_only: bool = False, only: Sequence[str] | None = None,
            retry_failed: bool = False, workers: int = 1, plugins: Sequence[str] = (),
            slurm: SlurmOptions | None = None, wait: bool = True,
            tracking: Mapping[str, Any] | None = None) -> Path:
    """Run (or continue) the grid, then aggregate; returns the report's path. ``workers`` > 1
    runs the grid in that many processes (see the module docstring). ``plugins``: modules the
    workers import first (the runs' configs name their own plug-ins too). ``slurm``: each run a
    Slurm job through submitit (dorat.compare.slurm), followed until the jobs end unless
    ``wait`` is False. ``tracking``: log.* flags for every run (``--log mlflow``: each run an
    MLflow run tagged with the grid, its dataset, setting and method)."""
    log = log or _stderr
    grid = load_grid(path, out, device, data_dir, tracking)
    for line in comparability_warnings(grid):
        log(line)
    out = Path(out)
    if not aggregate_only:
        _validate(grid, only)  # before anything is written
        if slurm is not None:
            check_slurm()  # before anything is written or submitted
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DoratError(f"cannot create {out} ({e.strerror}); choose another --out") from None
    if not aggregate_only:  # aggregating only reads finished runs: fine beside a running compare
        # passes until nothing more can start: a tuning step chooses values, runs wait for their
        # method's tuning or for the run they start from (init_from; dorat.compare.tuning)
        while True:
            before = _progress(grid)
            for st in grid.studies:
                if not only or st.name.rpartition("/")[2] in only:
                    run_study(st, grid.tune, log)  # type: ignore[arg-type]
            grid = load_grid(path, out, device, data_dir, tracking)
            if slurm is not None:
                launch_slurm(pending(grid, log, only, retry_failed), grid.evals, out, slurm,
                             retry_failed, log, wait)
                break
            run_grid(grid, log, progress and workers == 1, only, retry_failed, workers, device, plugins)
            grid = load_grid(path, out, device, data_dir, tracking)
            if not any(r.blocked() for r in grid.runs) or _progress(grid) == before:
                break
    if grid.tune is not None:
        write_tuning(grid, out)
    return write_outputs(grid, out)


def _progress(grid: Grid) -> tuple[int, int]:
    """(methods tuned, runs trained): a pass that moves neither ends the loop."""
    return (sum(r.chosen is not None for r in grid.runs),
            sum((r.path / "metrics.json").is_file() for r in grid.runs))


def write_tuning(grid: Grid, out: Path) -> None:
    """OUT/tuning.md and OUT/tuning.json: the one budget and each method's chosen values."""
    from dorat.compare.grid import _dirname
    from dorat.files.checkpoint import read_json, write_json_atomic, write_text_atomic

    assert grid.tune is not None
    rows, records = [], []
    for ds, setting in grid.groups:
        for name in grid.names:
            if not any((r.dataset, r.setting, r.name) == (ds, setting, name) for r in grid.runs):
                continue
            f = study_dir(out, _dirname(ds), setting, name) / CHOSEN
            chosen = read_json(f) if f.is_file() else None
            rows.append((ds, setting, name, chosen))
            records.append({"dataset": ds, "setting": setting, "method": name, "chosen": chosen})
    # one budget for all: load_grid (read_chosen) refuses a chosen.json made with another one
    write_json_atomic(out / "tuning.json", {"budget": grid.tune.budget(), "methods": records})
    write_text_atomic(out / "tuning.md", tuning_markdown(grid.tune, rows))


__all__ = ["Grid", "RunSpec", "aggregate", "available_cores", "compare", "find_compare_file",
           "flat_metrics", "load_grid", "markdown_tables", "mean_std", "run_grid", "signed_points",
           "worker_env", "write_outputs"]
