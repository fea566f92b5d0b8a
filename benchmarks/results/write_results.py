"""Write docs/RESULTS.md from the aggregated compare outputs (`make results` calls this last).

    python benchmarks/results/write_results.py --sweep benchmarks/results/sweep \
        --grid benchmarks/results/grid --out docs

Copies the aggregated JSON to docs/results/ (committed), regenerates the per-class plots there
and writes RESULTS.md: the protocol, the r sweep on the validation split (and the later check
of r under long-tailed training, --sweep-longtail), the two tables (balanced, long-tailed) and
the hand-written discussion in benchmarks/results/discussion.md. Safe to run on a partial grid:
the tables say how many runs have finished. Where an aggregate's runs are not here (the sweep
ran once, on another machine) its section comes from the committed copy in docs/results/.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
from pathlib import Path

from dorat.compare import markdown_tables, mean_std, signed_points
from dorat.report import plot_per_class

HERE = Path(__file__).parent
SWEEP_COLUMNS = ["sa", "ra.pgd", "ra.cw", "worst_class.pgd", "tail30.pgd", "worst_class.worst",
                 "tail30.worst"]
GRID_COLUMNS = ["sa", "ra.pgd", "ra.cw", "aa1000:ra.aa", "worst_class.pgd", "tail30.pgd",
                "aa1000:worst_class.worst", "aa1000:tail30.worst"]

PROTOCOL = """\
## Protocol

- Fashion-MNIST, ε = 0.1 (ℓ∞), the small CNN; every method gets the same budget
  ([benchmarks/results/base.yaml](../benchmarks/results/base.yaml)): PGD-5 training (step
  0.025), 8 epochs, batch 128, SGD momentum 0.9, lr 0.05 cosine, weight decay 5e-4, gradient
  norm clipped at 5, on a 30,000-image stratified subset of the 55,000 training images left
  after holding out a 5,000-image stratified validation split.
- Cost on this 2-core CPU machine: a PGD-AT epoch takes 76 s alone (2 threads), so one run is
  about 10 minutes on the balanced subset, twice the 5 minutes aimed at. The long-tailed subset
  is 12,257 images, so a run there is about 4 minutes. The grid ran two single-threaded runs at
  a time: balanced PGD-AT and DONE took 14–31 minutes each, and done-cid 55–75. AutoAttack on
  1,000 points took 16–107 minutes per run (median 35).
- Two settings: the balanced subset, and a long-tailed one (ρ = 10, n_c = n_max·ρ^(−c/9));
  the test set stays balanced.
- Seeds 0, 1, 2 per method and setting; mean ± sample std.
- Evaluation: SA, RA-PGD20 and RA-CW (20 steps) on the full 10,000-image test set (exact
  per-class numbers); the columns marked [aa1000] are PGD-20, CW and AutoAttack standard on
  1,000 stratified test points, where "(all)" is the worst case over the three attacks.
- DONE's r, β (normaliser rate), warm-up and lower level were chosen on the validation split
  (sweep below, by the rule written in its file), never on the test set.
- Reproduce: `make results` (resumable; the grid is in
  [benchmarks/results/fmnist.yaml](../benchmarks/results/fmnist.yaml)).
"""


def plot_sweep(sweep: dict, path: Path) -> bool:
    """RA-PGD, Tail-30 and worst-class RA on the validation split against DONE's r (rows
    named done-r<value>), mean ± std over each row's seeds, PGD-AT as a dashed line and band."""
    import re

    from dorat.report.runs import _plt

    pts = sorted((float(m.group(1)), r) for r in sweep["rows"]
                 if (m := re.fullmatch(r"done-r([0-9.]+)", r["method"])))
    at = next((r for r in sweep["rows"] if r["method"] == "at"), None)
    if len(pts) < 2:
        return False
    plt = _plt()
    fig, axes = plt.subplots(1, 4, figsize=(18, 4.2))
    for ax, (key, label) in zip(axes, (("ra.pgd", "RA-PGD"), ("tail30.pgd", "RA-Tail-30 (PGD)"),
                                       ("tail30.worst", "RA-Tail-30 (PGD+CW): the rule"),
                                       ("worst_class.worst", "worst-class RA (PGD+CW)"))):
        ax.errorbar([r for r, _ in pts], [100 * row["metrics"][key]["mean"] for _, row in pts],
                    yerr=[100 * row["metrics"][key]["std"] for _, row in pts], marker="o",
                    capsize=3, color="tab:orange", label="DONE (mean ± std over its seeds)")
        for r, row in pts:
            ax.annotate(f"n={len(row['seeds'])}", (r, 100 * row["metrics"][key]["mean"]),
                        textcoords="offset points", xytext=(4, -12), fontsize=7)
        if at is not None:
            m, sd = (100 * at["metrics"][key][k] for k in ("mean", "std"))
            ax.axhline(m, color="tab:blue", ls="--", label=f"PGD-AT (r = ∞, n={len(at['seeds'])})")
            if sd > 0:
                ax.axhspan(m - sd, m + sd, color="tab:blue", alpha=0.12)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("r (KL temperature, log scale)")
        ax.set_ylabel(f"{label} (%)")
        ax.set_title(label)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("DONE's r on the validation split")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


PAIRED = [("aa1000:ra.aa", "RA-AA"), ("aa1000:worst_class.worst", "worst class (all)"),
          ("aa1000:tail30.worst", "Tail-30 (all)")]


def _pair(d: dict, b: dict, key: str, label: str, vs: str) -> str | None:
    """One paired row: ``d`` minus ``b`` on ``key`` on every seed both have, the mean ± std of the
    differences, seeds won-tied-lost, and ``b``'s own seed spread; None without a common seed."""
    common = [s for s in d["seeds"] if s in b["seeds"]]
    if not common:
        return None
    diff = [d["metrics"][key]["values"][d["seeds"].index(s)]
            - b["metrics"][key]["values"][b["seeds"].index(s)] for s in common]
    ms = mean_std(diff)
    spread = f" ± {100 * ms['std']:.2f}" if ms["n"] > 1 else ""
    signs = [0 if abs(x) <= 1e-9 else 1 if x > 0 else -1 for x in diff]
    record = f"{signs.count(1)}-{signs.count(0)}-{signs.count(-1)}"
    bsd = f"{100 * b['metrics'][key]['std']:.2f}" if len(b["seeds"]) > 1 else ""
    per_seed = ", ".join(f"s{s}: {signed_points(x)}" for s, x in zip(common, diff))
    return (f"| {d['method']} | {label} | {vs} | {per_seed} | "
            f"{signed_points(ms['mean'])}{spread} | {record} | {bsd} |")


PAIRED_HEAD = ["| method | metric | vs | difference (points), per seed | mean ± std | "
               "seeds won-tied-lost | reference's seed std |", "|---|---|---|---|---|---|---|"]


def paired_lines(grid: dict, setting: str) -> list[str]:
    """Each DONE variant against its loss unweighted (PGD-AT; TRADES for done-trades) and against
    the best baseline (highest mean over its seeds) on RA-AA, worst-class and Tail-30 under all
    attacks: the difference on every seed both have, its mean ± std, the seeds won, tied and
    lost, and the baseline's own seed spread."""
    rows = [r for r in grid["rows"] if r["setting"] == setting]
    done = [r for r in rows if r["method"].startswith("done")]
    base = [r for r in rows if not r["method"].startswith("done")]
    if not done or not base:
        return []
    out = list(PAIRED_HEAD)
    for d in done:
        for key, label in PAIRED:
            have = [b for b in base if key in b["metrics"]]
            if key not in d["metrics"] or not have:
                continue
            best = max(have, key=lambda b: b["metrics"][key]["mean"])
            ref = "trades" if "trades" in d["method"] else "at"  # the same loss, unweighted
            against = [b for b in have if b["method"] == ref]
            against += [best] if best["method"] != ref else []
            out += [ln for b in against
                    if (ln := _pair(d, b, key, label, b["method"] + (" (best)" if b is best else "")))]
    return out + [""]


# The robust-fairness rows of issue 31, each against its own loss unweighted; wat-at (WAT's class
# weights on PGD-AT) also against at-x2, PGD-AT at the step WAT's unnormalised weights take, and
# done-val-x2 (done-val at WAT's step) against PGD-AT, at-x2 (the same step, uniform weights) and
# wat-at (the same validation-driven class weighting, by DRO instead of Hedge).
REFERENCES = {"frl-rwrm": ("trades",), "at-cfa": ("at",), "trades-cfa": ("trades",),
              "wat": ("trades",), "dafa": ("trades",), "at-x2": ("at",),
              "wat-at": ("at", "at-x2"), "done-val-x2": ("at", "at-x2", "wat-at")}


def reference_lines(grid: dict, setting: str) -> list[str]:
    """The REFERENCES pairs of ``setting`` on RA-AA, worst class and Tail-30 under all attacks,
    paired by seed as in paired_lines; [] when no pair has both rows."""
    rows = {r["method"]: r for r in grid["rows"] if r["setting"] == setting}
    out = []
    for name, refs in REFERENCES.items():
        for ref in refs:
            d, b = rows.get(name), rows.get(ref)
            if d is None or b is None:
                continue
            out += [ln for key, label in PAIRED if key in d["metrics"] and key in b["metrics"]
                    if (ln := _pair(d, b, key, label, ref))]
    return PAIRED_HEAD + out + [""] if out else []


# Issue 31's target, written before the fairness rows ran: on balanced Fashion-MNIST a method
# reaches worst-class robust accuracy under AutoAttack (worst of all attacks) ≥ 13% with RA-AA ≥
# PGD-AT − 1 and SA ≥ PGD-AT − 2, and no robust-fairness baseline dominates it on the
# (RA-AA, worst-class) plane.
TARGET_WORST, TARGET_RA_DROP, TARGET_SA_DROP = 0.13, 0.01, 0.02
FAIRNESS = ("frl", "cfa", "wat", "dafa")
PLANE = ("aa1000:ra.aa", "aa1000:worst_class.worst")


def target_lines(grid: dict, setting: str = "balanced") -> list[str]:
    """Every row of ``setting`` against the target, on the means over its seeds: each criterion,
    the fairness rows that dominate it on the plane (≥ on both means, > on one), and a verdict
    line. Rows with fewer than 3 seeds are marked provisional."""
    need = ("sa", *PLANE)
    rows = [r for r in grid["rows"] if r["setting"] == setting and all(k in r["metrics"] for k in need)]
    at = next((r for r in rows if r["method"] == "at"), None)
    if at is None:
        return []
    m = {r["method"]: {k: r["metrics"][k] for k in need} for r in rows}
    ra_min = m["at"]["aa1000:ra.aa"]["mean"] - TARGET_RA_DROP
    sa_min = m["at"]["sa"]["mean"] - TARGET_SA_DROP

    def cell(v: dict, ok: bool) -> str:
        spread = f" ± {100 * v['std']:.2f}" if len(v["values"]) > 1 else ""  # no spread from one seed
        return f"{100 * v['mean']:.2f}{spread} {'✓' if ok else '✗'}"

    out = [f"PGD-AT's means set the bars: RA-AA ≥ {100 * ra_min:.2f}, SA ≥ {100 * sa_min:.2f}, and "
           f"worst-class (all attacks) ≥ {100 * TARGET_WORST:.0f}. Means over each row's seeds "
           "(± std); a row with fewer than 3 seeds is provisional.", "",
           "| method | seeds | worst-class (all) [aa1000] | RA-AA [aa1000] | SA | dominated by | target |",
           "|---|---|---|---|---|---|---|"]
    met = []
    for r in rows:
        v = m[r["method"]]
        ok = [v[PLANE[1]]["mean"] >= TARGET_WORST, v[PLANE[0]]["mean"] >= ra_min, v["sa"]["mean"] >= sa_min]
        by = [f["method"] for f in rows if f is not r and any(t in f["method"] for t in FAIRNESS)
              and all(m[f["method"]][k]["mean"] >= v[k]["mean"] for k in PLANE)
              and any(m[f["method"]][k]["mean"] > v[k]["mean"] for k in PLANE)]
        hit = all(ok) and not by and r["method"] != "at"
        met += [r["method"]] if hit else []
        out.append(f"| {r['method']} | {len(r['seeds'])} | {cell(v[PLANE[1]], ok[0])} | "
                   f"{cell(v[PLANE[0]], ok[1])} | {cell(v['sa'], ok[2])} | {', '.join(by) or '–'} | "
                   f"{'met' if hit else 'not met'}{'' if len(r['seeds']) >= 3 else ' (provisional)'} |")
    ours = [x for x in met if x.startswith("done")]
    out += ["", f"**Target {'met' if ours else 'not met'} by a DONE variant**"
            + (f": {', '.join(ours)}." if ours else ".")
            + (f" Rows that meet it: {', '.join(met)}." if met else " No row meets all of it."), ""]
    return out


# Issue 31's discussion: loss × class weighting on the validation split, each cell the row of
# one aggregate (source file, method name); the cells that came from the tuning sweeps are those
# runs, the others are benchmarks/results/fairness-ablation.yaml's.
ABLATION_CELLS = {
    "CE (PGD-AT's)": {"uniform": ("sweep", "at"), "uniform, step × 2": ("ablation", "at-x2"),
                      "WAT (η = 0.2)": ("ablation", "wat-at-e0.2"),
                      "WAT, weights normalised": ("ablation", "wat-at-norm-e0.2"),
                      "done-val (r = 2)": ("fairness", "done-val-r2"),
                      "done-val, r/t (r = 5)": ("fairness", "done-val-t5"),
                      "done-val, r/t, step × 2": ("ablation", "done-val-t5-x2"),
                      "done-mixed-val (r = 2)": ("fairness", "done-mixed-val-r2"),
                      "done-mixed-val, step × 2": ("ablation", "done-mixed-val-x2")},
    "TRADES (β = 6)": {"uniform": ("ablation", "trades"), "uniform, step × 2": ("ablation", "trades-x2"),
                       "WAT (η = 0.2)": ("fairness", "wat-e0.2"),
                       "WAT, weights normalised": ("ablation", "wat-norm-e0.2"),
                       "done-val (r = 2)": ("ablation", "done-val-trades-r2")},
}
ABLATION_METRICS = (("worst_class.worst", "worst class"), ("tail30.worst", "Tail-30"),
                    ("ra.worst", "RA"), ("sa", "SA"))


def ablation_lines(aggs: dict[str, dict | None]) -> list[str]:
    """The loss × weighting table: per cell mean ± std over its seeds (worst class, Tail-30 and RA
    under the worst of PGD-20 and CW, SA; validation split), with the seed count."""
    def row_of(src: str, name: str) -> dict | None:
        agg = aggs.get(src)
        return next((r for r in agg["rows"] if r["method"] == name), None) if agg else None

    cols = list(dict.fromkeys(c for cells in ABLATION_CELLS.values() for c in cells))
    out = ["| loss | metric | " + " | ".join(cols) + " |", "|---|---|" + "---|" * len(cols)]
    for loss, cells in ABLATION_CELLS.items():
        rows = {c: row_of(*cells[c]) if c in cells else None for c in cols}
        if not any(rows.values()):
            continue
        for key, label in ABLATION_METRICS:
            vals = []
            for c in cols:
                r = rows[c]
                if r is None or key not in r["metrics"]:
                    vals.append("–")
                    continue
                v = r["metrics"][key]
                sd = f" ± {100 * v['std']:.1f}" if v["n"] > 1 else ""
                vals.append(f"{100 * v['mean']:.1f}{sd} ({v['n']})")
            out.append(f"| {loss} | {label} | " + " | ".join(vals) + " |")
    return out + [""]


# Who pays for a class-level tilt: these rows against the same step with uniform weights, class
# by class (the AutoAttack evaluation's per-class worst case of all attacks, paired by seed).
CLASS_PAIRS = (("done-val-x2", "at-x2"), ("wat-at", "at-x2"))


def class_pair_lines(grid: dict, setting: str) -> list[str]:
    """Per class: the reference's mean, the row's mean, the difference on every common seed and
    its mean ± std; [] without a common seed."""
    rows = {r["method"]: r for r in grid["rows"] if r["setting"] == setting}
    out: list[str] = []
    for name, ref in CLASS_PAIRS:
        d, b = rows.get(name), rows.get(ref)
        if d is None or b is None or "aa1000" not in d.get("per_class_values", {}) or \
                "aa1000" not in b.get("per_class_values", {}):
            continue
        common = [s for s in d["seeds"] if s in b["seeds"]]
        if not common:
            continue
        pd, pb = (dict(zip(r["seeds"], r["per_class_values"]["aa1000"])) for r in (d, b))
        out += [f"| class | {ref} | {name} | difference (points), per seed | mean ± std |",
                "|---|---|---|---|---|"]
        for c, cls in enumerate(d["classes"]):
            diff = [pd[s][c] - pb[s][c] for s in common]
            ms = mean_std(diff)
            spread = f" ± {100 * ms['std']:.1f}" if ms["n"] > 1 else ""
            out.append(f"| {cls} | {100 * statistics.fmean(pb[s][c] for s in common):.1f} | "
                       f"{100 * statistics.fmean(pd[s][c] for s in common):.1f} | "
                       + ", ".join(f"s{s}: {signed_points(x)}" for s, x in zip(common, diff))
                       + f" | {signed_points(ms['mean'])}{spread} |")
        out.append("")
    return out


# The paired-by-seed sections of RESULTS.md: (table, heading, what it pairs), each per setting.
PAIRED_SECTIONS = (
    (paired_lines, "DONE against its unweighted loss and the best baseline",
     "The best baseline is the non-DONE method with the highest mean on that metric; a difference "
     "counts as established only if it is larger than the seed spread and has the same sign on "
     "every seed."),
    (reference_lines, "The robust-fairness rows against their unweighted loss",
     "Each row against the same loss with uniform weights (TRADES or PGD-AT); `wat-at` also against "
     "`at-x2`, PGD-AT at the step WAT's weights take (its class weights count only where it beats "
     "that), and `done-val-x2` (done-val at that step) against `at-x2` and `wat-at`."),
    (class_pair_lines, "Who pays for the class tilt: per class against at-x2",
     "The class-level weightings at WAT's step against PGD-AT at the same step (`at-x2`), class by "
     "class: robust accuracy on the 1,000 AutoAttack points (100 per class, so 1 point is one "
     "image), worst case of all attacks, means over the common seeds."),
)


def machine_lines(grid: dict) -> list[str]:
    """Which machines computed the rows (CPU kernels differ between machines, so a difference is
    read against the seed spread): every machine label with the rows that have a run from it."""
    by: dict[str, list[str]] = {}
    for r in (r for r in grid["rows"] if r["seeds"]):  # rows with a finished run
        for label in r.get("machines") or ["unrecorded"]:
            by.setdefault(label, []).append(f"{r['setting']}/{r['method']}")
    if not by:
        return []
    out = ["Machines that trained or evaluated the finished runs, as dorat records them in each "
           "run's log and metrics; 'unrecorded' are runs made before it did, all on 2-core CPU "
           "machines of the same kind, 1 thread per worker:", ""]
    out += [f"- {label}: {', '.join(rows)}" for label, rows in sorted(by.items())]
    return out + [""]


def weights_lines(grid: dict, setting: str | None = None) -> list[str]:
    """What every reweighting method's weights were in its last training epoch: effective sample
    size, largest weight, and the classes with the highest and lowest mean weight (the rows of
    one setting, or all rows)."""
    rows = [r for r in grid["rows"] if setting in (None, r["setting"]) and r.get("weights")
            and r["weights"]["ess"]["mean"] < 0.9999 and r["weights"].get("class_mean")]
    if not rows:
        return []
    out = ["| method | ESS (fraction of the batch) | largest weight | heaviest classes | "
           "lightest classes | class max/min |", "|---|---|---|---|---|---|"]
    for r in rows:
        w = r["weights"]
        cm = sorted(zip(w["class_mean"], r["classes"]), reverse=True)
        ess = f"{w['ess']['mean']:.3f}" + (f" ± {w['ess']['std']:.3f}" if w["ess"]["n"] > 1 else "")
        heavy = ", ".join(f"{c} {v:.2f}" for v, c in cm[:3])
        light = ", ".join(f"{c} {v:.2f}" for v, c in cm[:-4:-1])
        out.append(f"| {r['method']} | {ess} | {w['w_max']['mean']:.2f} | {heavy} | {light} | "
                   f"{cm[0][0] / max(cm[-1][0], 1e-12):.2f} |")
    return out + [""]


def plot_rows(rows: list[dict], key: str, path: Path, title: str, ylabel: str) -> bool:
    """Per-class robust accuracy of every row that has evaluation ``key`` (mean over its seeds,
    ± std where it has several) as one grouped-bar plot; False if no row has it."""
    rows = [r for r in rows if key in r["per_class"]]
    if not rows:
        return False
    plot_per_class([(f"{r['method']} (n={len(r['seeds'])})", r["per_class"][key],
                     r["per_class_std"][key] if len(r["seeds"]) > 1 else None) for r in rows],
                   rows[0]["classes"], path, title, ylabel)
    return True


def plot_frontier(rows: list[dict], path: Path, title: str, target: bool = False) -> bool:
    """Every method in the (RA-AA, worst-class RA under all attacks) plane, mean over seeds with
    the seed spread (± std) as error bars, and PGD-AT's point as the reference; ``target``
    shades the region of issue 31's target (its SA bar is in the table, not the plane). False if
    no row has the AutoAttack evaluation."""
    keys = ("aa1000:ra.aa", "aa1000:worst_class.worst")
    rows = [r for r in rows if all(k in r["metrics"] for k in keys)]
    if not rows:
        return False
    from dorat.report.runs import _plt

    plt = _plt()
    fig, ax = plt.subplots(figsize=(11, 6))
    cmap, marks = plt.get_cmap("tab20"), "osD^v<>pPhX*"
    for i, r in enumerate(rows):
        (x, y) = (100 * r["metrics"][k]["mean"] for k in keys)
        (dx, dy) = (100 * r["metrics"][k]["std"] for k in keys)
        ax.errorbar(x, y, xerr=dx, yerr=dy, fmt=marks[i % len(marks)], capsize=3, ms=7,
                    color="black" if r["method"] == "at" else cmap(i % 20),
                    label=f"{r['method']} (n={len(r['seeds'])})")
        if y >= 100 * TARGET_WORST:  # the rows above the worst-class bar are few and apart: named
            ax.annotate(r["method"], (x, y), xytext=(6, 5), textcoords="offset points", fontsize=8)
    at = next((r for r in rows if r["method"] == "at"), None)
    if target and at is not None:
        x0 = 100 * (at["metrics"][keys[0]]["mean"] - TARGET_RA_DROP)
        (lo, hi), top = ax.get_xlim(), max(ax.get_ylim()[1], 100 * TARGET_WORST + 2)
        hi = max(hi, x0 + 1)
        ax.fill_between([x0, hi], 100 * TARGET_WORST, top, color="green", alpha=0.08,
                        label="target: RA-AA ≥ PGD-AT − 1, worst class ≥ 13%")
        ax.set_xlim(lo, hi)
        ax.set_ylim(top=top)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside: no point hidden
    ax.set_xlabel("RA-AA (%), AutoAttack on 1,000 points")
    ax.set_ylabel("worst-class robust accuracy (%), worst of PGD, CW, AutoAttack")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def load_aggregate(runs: Path, committed: Path) -> dict | None:
    """A compare aggregate: RUNS/results.json, copied to ``committed`` (docs/results/), or, when
    its runs are not here (a sweep that ran once, on another machine), the committed copy."""
    src = runs / "results.json"
    if not src.is_file():
        if not committed.is_file():
            return None
        print(f"no runs in {runs}: using the committed {committed}")
        src = committed
    agg = json.loads(src.read_text())
    if src != committed:
        shutil.copy(src, committed)
    return agg


def sweep_tables(agg: dict, finalists_head: str) -> list[str]:
    """A tuning sweep: every candidate on seed 0, then the rows with more seeds (mean ± std)."""
    lines = ["### Every candidate, seed 0", ""] + markdown_tables(seed_view(agg, 0), SWEEP_COLUMNS)[2:]
    finalists = {**agg, "rows": [r for r in agg["rows"] if len(r["seeds"]) > 1]}
    if finalists["rows"]:
        lines += [finalists_head, ""] + markdown_tables(finalists, SWEEP_COLUMNS)[2:]
    return lines


def seed_view(agg: dict, seed: int) -> dict:
    """The aggregate restricted to one seed (rows without it dropped), so that rows with one
    and with several seeds are not compared mean against single run."""
    rows = []
    for r in agg["rows"]:
        if seed not in r["seeds"]:
            continue
        i = r["seeds"].index(seed)
        metrics = {k: {**v, "mean": v["values"][i], "std": 0.0, "n": 1, "values": [v["values"][i]]}
                   for k, v in r["metrics"].items() if len(v["values"]) == len(r["seeds"])}
        rows.append({**r, "seeds": [seed], "failed_seeds": [], "metrics": metrics})
    return {**agg, "rows": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sweep", type=Path, required=True)
    ap.add_argument("--sweep-longtail", type=Path, default=HERE / "sweep-longtail")
    ap.add_argument("--fairness-sweep", type=Path, default=HERE / "fairness-sweep")
    ap.add_argument("--ablation", type=Path, default=HERE / "fairness-ablation")
    ap.add_argument("--grid", type=Path, required=True)
    ap.add_argument("--out", type=Path, default=Path("docs"))
    a = ap.parse_args()
    res = a.out / "results"
    res.mkdir(parents=True, exist_ok=True)
    lines = ["# Results: DONE against the reweighting baselines on Fashion-MNIST", "", PROTOCOL]
    sweep = load_aggregate(a.sweep, res / "sweep.json")
    if sweep is not None:
        lines += ["## DONE's r, β, warm-up and lower level on the validation split", "",
                  "PGD-20 and CW on the 5,000 held-out validation images. "
                  f"{sweep['finished_runs']} of {sweep['total_runs']} sweep runs finished.", ""]
        lines += sweep_tables(sweep, "### The finalists, seeds 0-2 (mean ± std): what the rule was "
                              "applied to")
        if plot_sweep(sweep, res / "sweep_r.png"):
            lines += ["![RA and worst-class RA against r](results/sweep_r.png)", ""]
    lt = load_aggregate(a.sweep_longtail, res / "sweep-longtail.json")
    if lt is not None:
        lines += ["### Long-tailed training (ρ = 10): r checked afterwards on the validation split",
                  "", "Run when the long-tailed test runs showed no method lifting the weak rare classes "
                  "([benchmarks/results/fmnist-longtail-sweep.yaml]"
                  "(../benchmarks/results/fmnist-longtail-sweep.yaml) says why and what). The "
                  "validation split is balanced, like the test set. "
                  f"{lt['finished_runs']} of {lt['total_runs']} runs finished.", ""]
        lines += markdown_tables(lt, SWEEP_COLUMNS)[2:]
        lines += weights_lines(lt)
        if plot_rows(lt["rows"], "main", res / "sweep_longtail_per_class.png",
                     "Long-tailed training: per-class robust accuracy on the validation split "
                     "(worst of PGD-20 and CW)", "robust accuracy (%)"):
            lines += ["![long-tailed sweep, per class](results/sweep_longtail_per_class.png)", ""]
    fair = load_aggregate(a.fairness_sweep, res / "fairness-sweep.json")
    if fair is not None:
        lines += ["## The robust-fairness family's hyper-parameters on the validation split", "",
                  "The values their papers tune (FRL's τ and multiplier steps, WAT's η, CFA's λ1 and FAWA "
                  "threshold, DAFA's λ) "
                  "and done-val's r, with the budget and the rule DONE's r had "
                  "([benchmarks/results/fairness-sweep.yaml](../benchmarks/results/fairness-sweep.yaml)"
                  " names the candidates and why). PGD-20 and CW on the validation split. "
                  f"{fair['finished_runs']} of {fair['total_runs']} runs finished.", ""]
        lines += sweep_tables(fair, "### The finalists, seeds 0-2 (mean ± std)")
    abl = load_aggregate(a.ablation, res / "fairness-ablation.json")
    if abl is not None:
        lines += ["### Loss × class weighting: what lifts the worst class (validation split)", "",
                  "Under the worst of PGD-20 and CW on the 5,000 validation images, mean ± std over "
                  "seeds (the number of seeds in brackets), in %. The uniform-CE cell is PGD-AT of "
                  "DONE's sweep; WAT on TRADES and done-val on CE are the tuning sweep's runs; "
                  "done-mixed-val is what done-val ran as until 2026-12-03 (its class weights "
                  "times DONE's instance tilt inside each class; docs/DONE.md); "
                  "the other cells are [benchmarks/results/fairness-ablation.yaml]"
                  "(../benchmarks/results/fairness-ablation.yaml) "
                  f"({abl['finished_runs']} of {abl['total_runs']} runs finished). The cells come "
                  "from runs made on different days, possibly on different machines of the same "
                  "kind: compare them against the seed spread.", ""]
        lines += ablation_lines({"sweep": sweep, "fairness": fair, "ablation": abl})
    grid = load_aggregate(a.grid, res / "grid.json")
    if grid is not None:
        lines += ["## Test results", "", f"{grid['finished_runs']} of {grid['total_runs']} runs "
                  "finished; a table with fewer than 3 seeds in a row is partial.", ""]
        lines += machine_lines(grid) + markdown_tables(grid, GRID_COLUMNS)
        for setting in ("balanced", "longtail"):
            rows = [r for r in grid["rows"] if r["setting"] == setting]
            png = f"frontier_{setting}.png"
            if plot_frontier(rows, res / png, f"Fashion-MNIST {setting}: average against worst-class "
                             "robustness (mean ± std over seeds)", target=setting == "balanced"):
                lines += [f"![{setting}: RA-AA against worst-class RA](results/{png})", ""]
        target = target_lines(grid)
        if target:
            lines += ["### The target on balanced: worst class ≥ 13% under AutoAttack, not at the "
                      "cost of average robustness", ""] + target
        for table, head, intro in PAIRED_SECTIONS:
            for setting in ("balanced", "longtail"):
                body = table(grid, setting)
                if body:
                    lines += [f"### {head}, {setting}, paired by seed", "", intro, ""] + body
        for setting in ("balanced", "longtail"):
            wl = weights_lines(grid, setting)
            if wl:
                lines += [f"### What the weights did, {setting} (last training epoch, mean over seeds)",
                          "", "Class columns: the mean weight of a class's training examples (uniform "
                          "training = 1). GAIRAT, DONE and FRL normalise the weights to mean 1 in a batch "
                          "and DAFA's class weights average 1 over the classes; MAIL (3·sigmoid, as in "
                          "its official code), WMMR and WAT ((w_y + w_avg)/|B|, 1.7–2× uniform) do not, "
                          "so their scale also lowers or raises the step size.", ""] + wl
        for setting in ("balanced", "longtail"):
            rows = [r for r in grid["rows"] if r["setting"] == setting]
            if not rows:
                continue
            for key, what in (("main", "PGD-20 + CW, full test set"),
                              ("aa1000", "worst of PGD, CW, AutoAttack; 1,000 points")):
                png = f"per_class_{setting}_{key}.png"
                if plot_rows(rows, key, res / png,
                             f"Fashion-MNIST {setting}: per-class robust accuracy ({what})",
                             "robust accuracy (%), mean over seeds"):
                    lines += [f"![{setting} {key}](results/{png})", ""]
    disc = HERE / "discussion.md"
    if disc.is_file():
        lines += [disc.read_text()]
    (a.out / "RESULTS.md").write_text("\n".join(lines))
    print(f"wrote {a.out / 'RESULTS.md'}")


if __name__ == "__main__":
    main()
