"""Reports: a Markdown file with the results table and PNG plots (matplotlib, no display).

``write_report(run_dirs, out)`` reads each RUN_DIR (config.yaml, log.jsonl, the metrics file,
weights.safetensors), or a card JSON from `dorat eval --model`, and writes ``out/report.md`` with:

* a table: SA, RA per attack, RA of the worst case, worst-class RA and RA-Tail-30 per run,
  plus any failed sanity check;
* ``per_class.png``: per-class robust accuracy as grouped bars across runs;
* ``training.png``: loss and train clean / adversarial accuracy over epochs;
* ``weights.png`` (when a run reweights): effective sample size over epochs, mean weight per
  class over epochs, and a histogram of the last epoch's weights.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dorat.attacks import EVAL_ATTACKS
from dorat.errors import DoratError
from dorat.evaluation.card import is_card, read_card
from dorat.evaluation.evaluate import eps_text
from dorat.evaluation.results import RunResult, load_result

ATTACK_LABEL = {**{k: short for k, (_, short) in EVAL_ATTACKS.items()}, "worst": "worst"}


def pct(v: float | None) -> str:
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.2f}"


def main_key(metrics: dict[str, Any]) -> str:
    """The table's headline attack: the worst case if several attacks ran, else the only one."""
    return "worst" if "worst" in metrics["ra"] else next(iter(metrics["ra"]), "clean")


def _unique_names(results: Sequence[RunResult]) -> None:
    seen: dict[str, int] = {}
    for r in results:
        if r.name in seen:
            seen[r.name] += 1
            r.name = f"{r.name}-{seen[r.name]}"
        else:
            seen[r.name] = 0


def results_table(results: Sequence[RunResult]) -> list[str]:
    attacks: list[str] = []
    for r in results:
        attacks += [a for a in r.metrics["ra"] if a != "worst" and a not in attacks]
    has_worst = any("worst" in r.metrics["ra"] for r in results)
    cols = ["run", "method", "SA"] + [f"RA-{ATTACK_LABEL.get(a, a)}" for a in attacks]
    cols += ["RA-worst"] if has_worst else []
    cols += ["worst class", "RA-Tail-30", "n"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in results:
        m = r.metrics
        key = main_key(m)
        pc = m["per_class"][key]
        wi = min(range(len(pc)), key=lambda i: (math.isnan(pc[i]), pc[i]))
        row = [r.name, str(m["method"] if "method" in m else r.config.method.name), pct(m["sa"])]
        row += [pct(m["ra"].get(a)) for a in attacks]
        row += [pct(m["ra"].get("worst"))] if has_worst else []
        row += [f"{pct(m['worst_class'][key])} ({m['classes'][wi]})", pct(m["tail30"][key]), str(m["n"])]
        lines.append("| " + " | ".join(row) + " |")
    return lines


# ----------------------------------------------------------------------------- plots

def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"font.size": 11, "axes.titlesize": 13, "axes.labelsize": 11,
                         "legend.fontsize": 9, "figure.dpi": 110})
    return plt


def _save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path)
    _plt().close(fig)
    return path


def plot_per_class(series: Sequence[tuple[str, Sequence[float], Sequence[float] | None]],
                   classes: Sequence[str], path: Path, title: str, ylabel: str) -> Path:
    """Grouped bars: one group per class, one bar per series (label, values[, std])."""
    plt = _plt()
    k = max(1, len(series))
    width = 0.8 / k
    fig, ax = plt.subplots(figsize=(max(8.0, 0.9 * len(classes) + 1.2 * k), 4.8))
    # the default cycle repeats after 10 colours: more series than that take tab20's 20
    colors = plt.get_cmap("tab20").colors if k > 10 else [None] * k
    for j, (label, vals, err) in enumerate(series):
        xs = [i - 0.4 + width * (j + 0.5) for i in range(len(classes))]
        ax.bar(xs, [100 * v for v in vals], width, label=label, color=colors[j % len(colors)],
               yerr=[100 * e for e in err] if err is not None else None, capsize=2)
    ax.set_xticks(range(len(classes)))
    ax.set_xticklabels(classes, rotation=30, ha="right")
    ax.set_ylabel(ylabel)
    ax.set_ylim(0, 100)
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(ncol=min(5, k), loc="upper left", bbox_to_anchor=(0, -0.22), frameon=False)
    return _save(fig, path)


def plot_training(results: Sequence[RunResult], path: Path) -> Path:
    """Loss, clean and adversarial training accuracy over epochs; with a per-epoch validation
    probe (val.every, val.keep_best, the catastrophic-overfitting guard) a fourth panel: the
    probe's PGD accuracy (solid) and worst class (dashed), guard events as red crosses."""
    plt = _plt()
    from matplotlib.ticker import MaxNLocator

    probed = [r for r in results if any("val_ra_pgd" in x for x in r.log)]
    fig, axes = plt.subplots(1, 4 if probed else 3, figsize=(20 if probed else 15, 4.2))
    for r in results:
        ep = [x["epoch"] for x in r.log]
        axes[0].plot(ep, [x["loss"] for x in r.log], marker="o", label=r.name)
        axes[1].plot(ep, [100 * x["train_acc_clean"] for x in r.log], marker="o", label=r.name)
        axes[2].plot(ep, [100 * x["train_acc_adv"] for x in r.log], marker="o", label=r.name)
    for i, r in enumerate(probed):
        rows = [x for x in r.log if "val_ra_pgd" in x]
        ep = [x["epoch"] for x in rows]
        line, = axes[3].plot(ep, [100 * x["val_ra_pgd"] for x in rows], marker="o", label=r.name)
        axes[3].plot(ep, [100 * x["val_worst_class_pgd"] for x in rows], ls="--", color=line.get_color())
        co = [x for x in rows if x.get("co_event")]
        label = "catastrophic overfitting" if i == 0 and co else None
        axes[3].scatter([x["epoch"] for x in co], [100 * x["val_ra_pgd"] for x in co], marker="x",
                        s=90, color="red", zorder=3, label=label)
    titles = ["training loss (unweighted mean of each example's loss)", "train accuracy, clean",
              "train accuracy, adversarial (training attack)", "probe: PGD accuracy (-- worst class)"]
    for ax, t, yl in zip(axes, titles, ["loss", "accuracy (%)", "accuracy (%)", "accuracy (%)"]):
        ax.set_title(t)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(yl)
        ax.grid(alpha=0.3)
    axes[0].legend()
    if probed:
        axes[3].legend(fontsize=7)
    return _save(fig, path)


def guard_lines(results: Sequence[RunResult]) -> list[str]:
    """The catastrophic-overfitting guard's events, one line per run that had one."""
    out = []
    for r in results:
        ev = [x for x in r.log if x.get("co_event")]
        if ev:
            back = ev[-1].get("co_restored_to")
            out.append(f"- **{r.name}**: catastrophic overfitting detected at epoch(s) "
                       f"{', '.join(str(x['epoch']) for x in ev)}"
                       + (f"; stopped, final model = epoch {back}'s weights" if back else "; not restored"))
    return ["Catastrophic-overfitting guard:", "", *out, ""] if out else []


def plot_weights(results: Sequence[RunResult], classes: Sequence[str], path: Path) -> Path:
    """ESS over epochs (all runs), mean weight per class over epochs and last-epoch histogram
    (one row per reweighting run)."""
    plt = _plt()
    from matplotlib.ticker import MaxNLocator

    rw = [r for r in results if r.reweights]
    fig, axes = plt.subplots(len(rw), 3, figsize=(16, 4.0 * len(rw)), squeeze=False)
    cmap = plt.get_cmap("tab10" if len(classes) <= 10 else "tab20")
    for row, r in zip(axes, rw):
        ep = [x["epoch"] for x in r.log]
        for other in results:
            oe = [x["epoch"] for x in other.log]
            row[0].plot(oe, [x.get("ess", 1.0) for x in other.log], marker="o",
                        lw=2.5 if other is r else 1, alpha=1 if other is r else 0.45, label=other.name)
        row[0].set_ylim(0, 1.05)
        row[0].xaxis.set_major_locator(MaxNLocator(integer=True))
        row[1].xaxis.set_major_locator(MaxNLocator(integer=True))
        row[0].set_title(f"{r.name}: effective sample size")
        row[0].set_xlabel("epoch")
        row[0].set_ylabel("ESS / batch size")
        row[0].legend()
        wc = [x.get("w_class_mean", []) for x in r.log]
        for c in range(len(classes)):
            row[1].plot(ep, [w[c] if c < len(w) else math.nan for w in wc], marker=".",
                        color=cmap(c % cmap.N), label=classes[c])
        row[1].axhline(1.0, color="grey", lw=1, ls="--")
        row[1].set_title(f"{r.name}: mean weight per class")
        row[1].set_xlabel("epoch")
        row[1].set_ylabel("weight (1 = uniform)")
        row[1].legend(ncol=2, fontsize=8)
        if r.weights is not None:
            w = r.weights["w"].numpy()
            row[2].hist(w, bins=50, color="tab:blue")
            row[2].axvline(1.0, color="grey", lw=1, ls="--", label="uniform")
            row[2].set_yscale("log")
            row[2].set_title(f"{r.name}: weights in the last epoch")
            row[2].set_xlabel("weight (1 = uniform)")
            row[2].set_ylabel("examples (log scale)")
            row[2].legend(title=f"{len(w)} examples, max {w.max():.1f}")
        else:
            row[2].set_axis_off()
    return _save(fig, path)


# per-class parameters a method logs each epoch (dorat.objectives.fairness, done), with labels
CLASS_PARAMS = {"class_eps_scale": "attack radius multiplier (ε_c / ε)",
                "class_w_clean": "clean-term class weight", "class_w_boundary": "boundary-term class weight",
                "class_w": "class weight", "class_loss": "class loss the DRO weights",
                "class_acc": "running class accuracy", "class_beta": "TRADES β_c (CFA's CCR)"}


def class_param_keys(r: RunResult) -> list[str]:
    return [k for k in CLASS_PARAMS if any(k in x for x in r.log)]


def plot_class_params(results: Sequence[RunResult], classes: Sequence[str], path: Path) -> Path:
    """Each class-level parameter a run logs (margins, class weights, class losses), per class
    over the epochs: one row per run, one panel per parameter."""
    plt = _plt()
    rows = [(r, class_param_keys(r)) for r in results if class_param_keys(r)]
    ncol = max(len(k) for _, k in rows)
    fig, axes = plt.subplots(len(rows), ncol, figsize=(5.5 * ncol, 3.8 * len(rows)), squeeze=False)
    cmap = plt.get_cmap("tab10" if len(classes) <= 10 else "tab20")
    for row, (r, keys) in zip(axes, rows):
        for ax, key in zip(row, keys):
            pts = [(x["epoch"], x[key]) for x in r.log if key in x]
            for c in range(len(classes)):
                ax.plot([e for e, _ in pts], [v[c] if c < len(v) else math.nan for _, v in pts],
                        marker=".", color=cmap(c % cmap.N), label=classes[c])
            ax.set_title(f"{r.name}: {CLASS_PARAMS[key]}", fontsize=10)
            ax.set_xlabel("epoch")
        row[0].legend(ncol=2, fontsize=7)
        for ax in row[len(keys):]:
            ax.set_axis_off()
    return _save(fig, path)


def plot_top_weighted(r: RunResult, path: Path, k: int = 24) -> Path | None:
    """The k training examples with the largest weight in the last epoch, with label, weight
    and adversarial loss: are they hard, or mislabelled?"""
    if r.weights is None or "idx" not in r.weights or bool((r.weights["idx"] < 0).any()):
        return None
    from dorat.data import load_dataset
    from dorat.evaluation.results import run_splits

    try:  # the run's training split, rebuilt from its config (skipped if the data is not here)
        cfg = r.config
        data = load_dataset(cfg.dataset, cfg.data.dir, allow_download=False)
        train, _ = run_splits(cfg, data)
    except DoratError:
        return None
    w = r.weights["w"]
    top = w.argsort(descending=True)[:k]
    plt = _plt()
    cols = 8
    rows = (len(top) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(1.9 * cols, 2.3 * rows), squeeze=False)
    for ax in axes.flat:
        ax.set_axis_off()
    for ax, j in zip(axes.flat, top.tolist()):
        i = int(r.weights["idx"][j])
        img = train.x[i].float().div(255).permute(1, 2, 0).squeeze(-1).numpy()
        ax.imshow(img, cmap="gray" if img.ndim == 2 else None, vmin=0, vmax=1)
        loss = f", ℓ {float(r.weights['loss'][j]):.1f}" if "loss" in r.weights else ""
        ax.set_title(f"{data.classes[int(train.y[i])]}\nw {float(w[j]):.0f}×{loss}", fontsize=9)
    fig.suptitle(f"{r.name}: the {len(top)} most weighted training examples of the last epoch "
                 "(label, weight in units of uniform, adversarial loss)", fontsize=11)
    return _save(fig, path)


# ----------------------------------------------------------------------------- report

def checks_section(results: Sequence[RunResult]) -> list[str]:
    """The report's sanity-check lines: the failed checks, or how many runs ran them."""
    failed = check_lines(results)
    if failed:
        return ["## Sanity checks that failed", "", *failed, ""]
    ran = sum(1 for r in results if r.metrics.get("checks"))
    return [f"All sanity checks passed ({ran} of {len(results)} runs ran them)." if ran
            else "No sanity checks were run." if results else "No run has finished yet.", ""]


def check_lines(results: Sequence[RunResult]) -> list[str]:
    out = []
    for r in results:
        for c in r.metrics.get("checks", []):
            if not c["ok"]:
                out.append(f"- **{r.name}**: check `{c['name']}` failed ({c['detail']}); "
                           f"suggests {c['suggests']}")
    return out


def figure_lines(results: Sequence[RunResult], out: Path, prefix: str = "",
                 per_class: bool = True) -> list[str]:
    """Per-class, training and weight plots for ``results``; returns the Markdown lines."""
    classes = results[0].metrics["classes"]
    key = main_key(results[0].metrics)
    same = all(r.metrics["classes"] == classes for r in results)
    lines = []
    if same and per_class:
        plot_per_class([(r.name, r.metrics["per_class"].get(key, r.metrics["per_class"]["clean"]), None)
                        for r in results], classes, out / f"{prefix}per_class.png",
                       f"Per-class robust accuracy ({ATTACK_LABEL.get(key, key)}, "
                       f"ε={eps_text(results[0].metrics['settings']['eps'])})", "robust accuracy (%)")
        lines += [f"![per-class robust accuracy]({prefix}per_class.png)", ""]
    if any(r.log for r in results):
        plot_training(results, out / f"{prefix}training.png")
        lines += [f"![training curves]({prefix}training.png)", "", *guard_lines(results)]
    if same and any(class_param_keys(r) for r in results):
        plot_class_params(results, classes, out / f"{prefix}class_params.png")
        lines += ["Class-level parameters over the epochs (margins, class weights, class losses):", "",
                  f"![class parameters]({prefix}class_params.png)", ""]
    if same and any(r.reweights for r in results):
        plot_weights(results, classes, out / f"{prefix}weights.png")
        lines += ["Weight diagnostics of the reweighting runs (weights in units of the uniform "
                  "weight 1/|B|):", "", f"![weights]({prefix}weights.png)", ""]
        for r in results:
            png = f"{prefix}top_weighted_{r.name.replace(' ', '_')}.png"
            if r.reweights and plot_top_weighted(r, out / png) is not None:
                lines += [f"![most weighted examples of {r.name}]({png})", ""]
    return lines


def card_result(path: Path) -> RunResult:
    """A card from `dorat eval --model` as a row of the report (no config, log or weights)."""
    return RunResult(path.stem, path, None, read_card(path), path.name)


def _described(r: RunResult) -> str:
    if r.config is None:  # a card
        m = r.metrics.get("model", {})
        return (f"`{r.name}` = {r.path} (card: {r.metrics.get('dataset')}, model {m.get('factory')}"
                + (f", weights {m['weights']}" if m.get("weights") else "") + ")")
    c = r.config
    return (f"`{r.name}` = {r.path} ({r.metrics_file}, {c.get('dataset')}, {c.get('model')}, "
            f"{c.get('epochs')} epochs, seed {c.get('seed')})")


def write_report(run_dirs: Sequence[str | Path], out: str | Path, metrics_file: str = "auto",
                 title: str = "dorat report") -> Path:
    """Write ``out/report.md`` (and its PNGs) for the given runs; returns the report's path."""
    from dorat.files.checkpoint import write_text_atomic

    if not run_dirs:
        raise DoratError("name at least one RUN_DIR to report on")
    results = [card_result(Path(d)) if is_card(Path(d)) else load_result(d, metrics_file)
               for d in run_dirs]
    _unique_names(results)
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DoratError(f"cannot create report directory {out} ({e.strerror}); choose another --out"
                         ) from None
    s = results[0].metrics["settings"]
    lines = [f"# {title}", ""]
    lines += [f"Evaluation: ε = {eps_text(s['eps'])} ({s['norm']}), PGD-{s['steps']} / CW with "
              f"{s['restarts']} restart(s), AutoAttack {s.get('aa_version', 'standard')} where listed; "
              "RA-worst counts an example as robust only if it survives every attack run. "
              "Worst class and RA-Tail-30 (mean of the ⌈0.3·C⌉ weakest classes) are under "
              "RA-worst when several attacks ran.", ""]
    lines += results_table(results) + [""]
    lines += ["Runs: " + "; ".join(_described(r) for r in results), ""]
    lines += checks_section(results)
    lines += ["## Plots", ""] + figure_lines(results, out)
    path = out / "report.md"
    write_text_atomic(path, "\n".join(lines))
    return path
