"""Reports: Markdown with tables and PNG plots of runs and model cards (``runs``).

A grid's report (dorat.compare.report) builds on these. Imports: runs, evaluation, data,
attacks, files, errors (tests/test_layers.py).
"""

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
from dorat.runs.run import RunResult, load_result, read_log

__all__ = ["ATTACK_LABEL", "RunResult", "check_lines", "figure_lines", "load_result", "main_key", "pct",
           "plot_per_class", "read_log", "results_table", "write_report"]
