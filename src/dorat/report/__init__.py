"""Reports: Markdown with tables and PNG plots of runs and model cards (``runs``).

Reports read results on disk (dorat.evaluation.results), so they sit below the runs that write
them: a run's end can render its own report (MLflow artifacts). A grid's report
(dorat.compare.report) builds on these. Imports: evaluation, data, attacks, files, errors;
never runs or training (tests/test_layers.py).
"""

from dorat.evaluation.results import RunResult, load_result, read_log
from dorat.report.runs import (
    ATTACK_LABEL,
    check_lines,
    figure_lines,
    main_key,
    pct,
    plot_per_class,
    results_table,
    write_report,
)

__all__ = ["ATTACK_LABEL", "RunResult", "check_lines", "figure_lines", "load_result", "main_key", "pct",
           "plot_per_class", "read_log", "results_table", "write_report"]
