"""`dorat tune`'s outputs: OUT/best.yaml, OUT/tune.md (the trials table), OUT/tune.png (the
objective against each parameter)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import yaml

from dorat import config as cfglib
from dorat.tune.tuner import SURPLUS, Tuner


def best_trial(study: Any) -> Any | None:
    try:
        return study.best_trial
    except ValueError:  # nothing complete, or nothing feasible
        return None


def write_outputs(tuner: Tuner, study: Any, user_split: str, user_every: int) -> Path:
    """OUT/best.yaml, OUT/tune.md and OUT/tune.png from the study as it stands."""
    from dorat.files.checkpoint import write_text_atomic

    tuner.out.mkdir(parents=True, exist_ok=True)
    best = best_trial(study)
    if best is not None:
        run_cfg = cfglib.from_dict(yaml.safe_load((Path(best.user_attrs["run_dir"]) / "config.yaml")
                                                  .read_text()), "the best trial's config.yaml")
        cfg = run_cfg.replace({"eval.split": user_split, "val.every": user_every})
        header = (f"# dorat tune: the best trial ({best.number}) of study '{study.study_name}': "
                  f"{tuner.objective} = {best.value:.2f} on the validation split\n"
                  f"# {', '.join(f'{k}={v}' for k, v in best.params.items())}\n"
                  f"# train it: dorat train --config {tuner.out / 'best.yaml'} --out RUN\n")
        write_text_atomic(tuner.out / "best.yaml", header + cfglib.dump(cfg))
    write_text_atomic(tuner.out / "tune.md", report_markdown(tuner, study, best))
    _plot(tuner, study, tuner.out / "tune.png")
    return tuner.out / "tune.md"


def _state(t: Any) -> str:
    return str(t.state).rpartition(".")[2].lower()


def report_markdown(tuner: Tuner, study: Any, best: Any | None) -> str:
    from optuna.trial import TrialState

    trials = [t for t in study.get_trials(deepcopy=False) if not t.user_attrs.get(SURPLUS)]
    keys = [p.key for p in tuner.space]
    sign = -1 if tuner.direction == "maximize" else 1

    def order(t: Any) -> tuple[int, float]:
        last = max(t.intermediate_values.items())[1] if t.intermediate_values else math.nan
        v = t.value if t.value is not None else last
        return (0 if t.state == TrialState.COMPLETE else 1, sign * v if v == v else math.inf)

    counts = {s: sum(_state(t) == s for t in trials) for s in ("complete", "pruned", "fail", "running")}
    lines = [f"# dorat tune: study '{study.study_name}'", "",
             f"Objective: **{tuner.objective}** ({tuner.direction}), on the validation split"
             + (f"; constraints: {'; '.join(c.text for c in tuner.constraints)}" if tuner.constraints else "")
             + f". Method {tuner.base.method.name}; space: "
             + ", ".join(f"{p.key}={p.describe()}" for p in tuner.space) + ".", "",
             f"{len(trials)} trials: " + ", ".join(f"{n} {s}" for s, n in counts.items() if n) + ".", ""]
    if best is not None:
        lines += [f"Best feasible trial: **{best.number}**, {tuner.objective} = {best.value:.2f} "
                  f"({', '.join(f'{k}={_fmt(v)}' for k, v in best.params.items())}); its config: "
                  "best.yaml.", ""]
    attacks = list(tuner.base.eval.attacks)
    shown = "worst" if len(attacks) > 1 else attacks[0]
    head = ["trial", "state", *keys, str(tuner.objective), "SA", f"RA ({shown})", f"worst class ({shown})",
            f"Tail-30 ({shown})",
            *[f"c{i}" for i in range(len(tuner.constraints))], "epochs"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for t in sorted(trials, key=order):
        ua = t.user_attrs
        ra, kind = ua.get("ra", {}), shown
        epochs = max(t.intermediate_values) if t.intermediate_values else ""
        if t.state == TrialState.COMPLETE:
            epochs = tuner.base.epochs
        row = [str(t.number), _state(t), *(_fmt(t.params.get(k)) for k in keys),
               "" if t.value is None else f"{t.value:.2f}",
               _pct(ua.get("sa")), _pct(ra.get(kind)), _pct(ua.get("worst_class", {}).get(kind)),
               _pct(ua.get("tail30", {}).get(kind)),
               *[_constraint_cell(t, i) for i in range(len(tuner.constraints))], str(epochs)]
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", "c<i>: the constraint's value (<= 0: it holds). Plot: tune.png.", ""]
    return "\n".join(lines)


def _constraint_cell(t: Any, i: int) -> str:
    v = t.constraints.get(f"c{i}") if hasattr(t, "constraints") and isinstance(t.constraints, dict) else None
    if v is None:
        return ""
    return f"{v:+.2f} {'ok' if v <= 0 else 'violated'}"


def _fmt(v: Any) -> str:
    if v is None:
        return ""
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _pct(v: Any) -> str:
    return "" if v is None else f"{100 * float(v):.2f}"


def _plot(tuner: Tuner, study: Any, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.trial import TrialState

    from dorat.files.checkpoint import atomic_path

    trials = study.get_trials(deepcopy=False)
    n = len(tuner.space)
    fig, axes = plt.subplots(1, n, figsize=(4.2 * n, 3.4), squeeze=False)
    for ax, p in zip(axes[0], tuner.space):
        groups: dict[str, tuple[list[Any], list[float]]] = {"feasible": ([], []), "infeasible": ([], []),
                                                           "pruned (last report)": ([], [])}
        for t in trials:
            if p.key not in t.params:
                continue
            if t.state == TrialState.COMPLETE:
                ok = all(v <= 0 for v in (t.constraints or {}).values())
                g = groups["feasible" if ok else "infeasible"]
                g[0].append(t.params[p.key])
                g[1].append(t.value)
            elif t.state == TrialState.PRUNED and t.intermediate_values:
                g = groups["pruned (last report)"]
                g[0].append(t.params[p.key])
                g[1].append(t.intermediate_values[max(t.intermediate_values)])
        for (label, (xs, ys)), style in zip(groups.items(), [dict(marker="o", color="C0"),
                                                            dict(marker="x", color="C3"),
                                                            dict(marker="o", facecolors="none",
                                                                 edgecolors="grey")]):
            if xs:
                ax.scatter([str(x) for x in xs] if p.kind == "categorical" else xs, ys, label=label,
                           **style)
        if p.log:
            ax.set_xscale("log")
        ax.set_xlabel(p.key)
        ax.set_ylabel(f"{tuner.objective} (%)")
        ax.grid(alpha=0.3)
    if axes[0][0].get_legend_handles_labels()[0]:  # nothing to label when no trial finished
        axes[0][0].legend(fontsize=7)
    fig.suptitle(f"study '{study.study_name}': {len(trials)} trials", fontsize=9)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


