"""Aggregation of a grid: mean ± std over seeds per (dataset, setting, method), the Markdown
tables, and the grid's report (results.json, results.md, report.md)."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dorat.attacks import EVAL_ATTACKS
from dorat.compare.grid import FAILED, Grid, _finished
from dorat.evaluation.evaluate import eps_text
from dorat.files.checkpoint import read_json


def flat_metrics(m: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """Scalar metrics of one evaluation: sa, ra.<a>, worst_class.<a>, tail30.<a>."""
    out = {f"{prefix}sa": m["sa"]}
    for group in ("ra", "worst_class", "tail30"):
        for k, v in m[group].items():
            if k != "clean":
                out[f"{prefix}{group}.{k}"] = v
    return out


def mean_std(values: Sequence[float]) -> dict[str, Any]:
    vals = [float(v) for v in values]
    mean = statistics.fmean(vals)
    std = statistics.stdev(vals) if len(vals) > 1 else 0.0
    return {"mean": mean, "std": std, "n": len(vals), "values": vals}


def signed_points(x: float) -> str:
    """A fraction difference as signed points for a table, with a true minus sign ("−1.20");
    a value that rounds to zero prints as "+0.00", never "−0.00"."""
    v = round(100 * x, 2) + 0.0
    return f"{v:+.2f}".replace("-", "−")


def _weights_summary(last_epochs: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """Mean ± std over seeds of the last epoch's ESS and largest weight, and the per-class mean
    weight averaged over seeds (None when no run logged weights)."""
    if not last_epochs:
        return None
    out: dict[str, Any] = {"ess": mean_std([e["ess"] for e in last_epochs]),
                           "w_max": mean_std([e["w_max"] for e in last_epochs])}
    classes = [e["w_class_mean"] for e in last_epochs if e.get("w_class_mean")]
    if classes and len({len(c) for c in classes}) == 1:
        out["class_mean"] = [statistics.fmean(c) for c in zip(*classes)]
    return out


def machine_label(m: dict[str, Any] | None) -> str:
    """One line for a run's ``machine`` record (dorat.system.runtime.machine); runs from before it was
    recorded are 'unrecorded'."""
    if not m:
        return "unrecorded"
    return (f"{m.get('gpu') or m.get('cpu')} ({m.get('threads')} thread(s), torch {m.get('torch')})")


def aggregate(grid: Grid) -> dict[str, Any]:
    """Mean ± std over seeds of every metric, per (dataset, setting, method), and what the
    instance weights were in the last training epoch (``weights``: effective sample size, the
    largest weight, each class's mean weight; 1 everywhere for unweighted methods)."""
    from dorat.evaluation.results import read_log
    from dorat.report.runs import main_key

    rows = []
    for ds, st in grid.groups:
        for name in grid.names:
            runs = [r for r in grid.runs if (r.dataset, r.setting, r.name) == (ds, st, name)]
            if not runs:
                continue
            per_seed: dict[str, list[float]] = {}
            per_class: dict[str, list[list[float]]] = {}
            last_epochs: list[dict[str, Any]] = []
            classes: list[str] = []
            seeds = []
            machines: set[str] = set()  # every machine that trained or evaluated a finished run
            pending = []  # trained, but an extra evaluation is not written yet: left out
            failed = [r.seed for r in runs if (r.path / FAILED).is_file()]
            for r in runs:
                if not _finished(r, grid.evals):
                    if (r.path / "metrics.json").is_file():
                        pending.append(r.seed)
                    continue
                m = read_json(r.path / "metrics.json")
                seeds.append(r.seed)
                classes = m["classes"]
                flat = flat_metrics(m)
                per_class.setdefault("main", []).append(m["per_class"][main_key(m)])
                machines.add(machine_label(m.get("machine")))
                for e in grid.evals:  # all written: the run is finished
                    em = read_json(r.path / f"eval-{e['name']}.json")
                    machines.add(machine_label(em.get("machine")))
                    flat.update(flat_metrics(em, f"{e['name']}:"))
                    per_class.setdefault(e["name"], []).append(em["per_class"][main_key(em)])
                for k, v in flat.items():
                    per_seed.setdefault(k, []).append(v)
                log = read_log(r.path)
                machines.update(machine_label(e.get("machine")) for e in log)
                if log and "ess" in log[-1]:
                    last_epochs.append(log[-1])
            if not seeds and not failed and not pending:
                continue
            rows.append({
                "dataset": ds, "setting": st, "method": name, "seeds": seeds, "failed_seeds": failed,
                "pending_seeds": pending,
                "metrics": {k: mean_std(v) for k, v in per_seed.items()},
                "per_class": {k: [statistics.fmean(c) for c in zip(*v)] for k, v in per_class.items()},
                "per_class_std": {k: [statistics.stdev(c) if len(c) > 1 else 0.0 for c in zip(*v)]
                                  for k, v in per_class.items()},
                "per_class_values": per_class,  # per seed, in the order of "seeds": for pairing
                "classes": classes,
                "weights": _weights_summary(last_epochs),
                "machines": sorted(machines),
                **({"tuned": runs[0].chosen} if runs[0].chosen is not None else {}),
            })
    return {"title": grid.title, "rows": rows, "total_runs": len(grid.runs),
            "finished_runs": sum(_finished(r, grid.evals) for r in grid.runs)}


LABELS = {"sa": "SA", "ra.pgd": "RA-PGD", "ra.cw": "RA-CW", "ra.aa": "RA-AA", "ra.worst": "RA-worst",
          "worst_class.pgd": "worst-class PGD", "tail30.pgd": "Tail-30 PGD",
          "worst_class.worst": "worst-class (all)", "tail30.worst": "Tail-30 (all)",
          "worst_class.aa": "worst-class AA", "tail30.aa": "Tail-30 AA",
          "worst_class.cw": "worst-class CW", "tail30.cw": "Tail-30 CW"}
ORDER = ["sa", "ra.pgd", "ra.cw", "ra.aa", "ra.worst", "worst_class.pgd", "tail30.pgd",
         "worst_class.cw", "tail30.cw", "worst_class.aa", "tail30.aa", "worst_class.worst",
         "tail30.worst"]


def _label(key: str) -> str:
    prefix, _, k = key.rpartition(":")
    base = LABELS.get(k, k)
    return f"{base} [{prefix}]" if prefix else base


def _columns(rows: Sequence[dict[str, Any]]) -> list[str]:
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r["metrics"] if k not in keys]

    def rank(k: str) -> tuple[int, int, str]:
        prefix, _, base = k.rpartition(":")
        return (1 if prefix else 0, ORDER.index(base) if base in ORDER else len(ORDER), prefix)

    return sorted(keys, key=rank)


def markdown_tables(agg: dict[str, Any], columns: Sequence[str] | None = None) -> list[str]:
    """One table per (dataset, setting): mean ± std in %, the best mean per column in bold.
    ``columns`` picks metric keys (e.g. ``["sa", "ra.pgd", "aa1000:ra.aa"]``); default all."""
    lines: list[str] = []
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in agg["rows"]:
        groups.setdefault((r["dataset"], r["setting"]), []).append(r)
    for (ds, st), rows in groups.items():
        cols = [c for c in columns if any(c in r["metrics"] for r in rows)] if columns else _columns(rows)
        best = {c: max((r["metrics"][c]["mean"] for r in rows if c in r["metrics"]), default=None)
                for c in cols}
        head = f"### {ds}" + ("" if st == "default" else f" — {st}")
        lines += [head, "", "| method | seeds | " + " | ".join(_label(c) for c in cols) + " |",
                  "|---|---|" + "---|" * len(cols)]
        for r in rows:
            cells = []
            for c in cols:
                if c not in r["metrics"]:
                    cells.append("–")
                    continue
                ms = r["metrics"][c]
                cell = (f"{100 * ms['mean']:.2f} ± {100 * ms['std']:.2f}" if ms["n"] > 1
                        else f"{100 * ms['mean']:.2f}")
                is_best = len(rows) > 1 and math.isclose(ms["mean"], best[c] or 0, abs_tol=1e-12)
                cells.append(f"**{cell}**" if is_best else cell)
            n_seeds = str(len(r["seeds"])) + "".join(
                f" ({len(r[k])} {what})" for k, what in (("failed_seeds", "failed"),
                                                         ("pending_seeds", "evaluating"))
                if r.get(k))
            lines.append(f"| {r['method']} | {n_seeds} | " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def _under(attacks: Sequence[str]) -> str:
    """What a per-class chart shows: the worst case of several attacks, or the one."""
    names = [EVAL_ATTACKS[a][1] for a in attacks]
    return f"worst case of {' and '.join(names)}" if len(names) > 1 else f"under {names[0]}"


def _settings_lines(grid: Grid) -> list[str]:
    """The budget every run shares, as `dorat report` prints it: ε, attacks, points, steps,
    epochs (from the first run's config; the comparability warnings name any difference)."""
    if not grid.runs:
        return []
    c = grid.runs[0].cfg
    e = c.eval
    eps = c.attack.eps if e.eps is None else e.eps
    attacks = ", ".join(EVAL_ATTACKS[a][0] for a in e.attacks)
    extra = "".join(f"; [{x['name']}]: {', '.join(EVAL_ATTACKS[a][0] for a in x['attacks'])} on "
                    f"{x.get('n') or 'all'} points" for x in grid.evals)
    return [f"Evaluation: ε = {eps_text(eps)} ({c.attack.norm}), {attacks} ({e.steps} steps, {e.restarts} "
            f"restart(s)) on {e.n or 'all'} {e.split} points{extra}. Training: {c.epochs} epochs, "
            f"{c.model}, batch {c.batch_size}, {c.attack.steps}-step training attack.", ""]


def write_outputs(grid: Grid, out: str | Path) -> Path:
    """results.json, results.md and report.md (tables + per-class plot of the means + the
    training and weight plots of each method's first seed). Returns report.md's path."""
    from dorat.evaluation.results import load_result
    from dorat.files.checkpoint import write_json_atomic, write_text_atomic
    from dorat.report.runs import checks_section, figure_lines, plot_per_class

    out = Path(out)
    agg = aggregate(grid)
    write_json_atomic(out / "results.json", agg)
    tables = markdown_tables(agg)
    head = [f"# {grid.title}", "", *_settings_lines(grid),
            f"{agg['finished_runs']} of {agg['total_runs']} runs finished. Mean ± sample std over "
            "seeds, in % (no ± with one seed); the best mean per column is in bold."
            + (" Columns with [name] come from the extra evaluation of that name." if grid.evals
               else ""), ""]
    write_text_atomic(out / "results.md", "\n".join(head + tables))
    lines = head + tables
    for ds, st in grid.groups:
        rows = [r for r in agg["rows"] if (r["dataset"], r["setting"]) == (ds, st) and r["seeds"]]
        if not rows:
            continue
        tag = f"{ds}-{st}".replace("/", "_")
        for key in dict.fromkeys(k for r in rows for k in r["per_class"]):
            png = f"per_class_{tag}_{key}.png"
            what = (f"main evaluation, {_under(grid.runs[0].cfg.eval.attacks)}" if key == "main" else
                    f"evaluation '{key}', " + _under(next(e["attacks"] for e in grid.evals
                                                          if e["name"] == key)))
            plot_per_class([(f"{r['method']} (n={len(r['seeds'])})", r["per_class"][key],
                             r["per_class_std"][key] if len(r["seeds"]) > 1 else None)
                            for r in rows if key in r["per_class"]], rows[0]["classes"], out / png,
                           f"{ds}{'' if st == 'default' else ' / ' + st}: per-class robust accuracy, "
                           f"mean over seeds ({what})", "robust accuracy (%)")
            lines += [f"![per-class robust accuracy, {what}]({png})", ""]
        firsts = []
        for name in grid.names:
            done = [r for r in grid.runs if (r.dataset, r.setting, r.name) == (ds, st, name)
                    and _finished(r, grid.evals)]
            if done:
                firsts.append(load_result(done[0].path, "metrics.json", name=f"{name} s{done[0].seed}"))
        if firsts:
            lines += [f"Training curves and weights (first seed of each method, {ds}/{st}):", ""]
            lines += figure_lines(firsts, out, prefix=f"{tag}_", per_class=False)
    lines += checks_section([load_result(r.path, "metrics.json", name=f"{r.name} s{r.seed}")
                             for r in grid.runs if _finished(r, grid.evals)])
    path = out / "report.md"
    write_text_atomic(path, "\n".join(lines))
    return path

