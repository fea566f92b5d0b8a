"""Runs: a run directory is a run, from its config to its metrics.

``run``: ``prepare`` builds and checks everything a run needs before anything is written,
``train`` trains (or resumes) it into its directory and evaluates it, ``load_run`` and
``load_result`` reopen it, ``evaluate_run`` evaluates it again. ``rundir`` plans what a
directory becomes (new, resumed, overwritten through a staged replacement) and owns it while
it changes; ``warmstart`` starts a run from another run's or a file's weights (``--init``).

Imports: training, objectives, evaluation, models, data, config, files, system, errors; the
CLI, the API, reports, tuning and grids import it (tests/test_layers.py).
"""

from dorat.runs.run import (
    Run,
    RunResult,
    evaluate_run,
    load_metrics,
    load_result,
    load_run,
    prepare,
    read_config,
    read_log,
    train,
)

__all__ = ["Run", "RunResult", "evaluate_run", "load_metrics", "load_result", "load_run", "prepare",
           "read_config", "read_log", "train"]
