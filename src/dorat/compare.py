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

Several compare processes may share one OUT: each run is taken under its own lock
(RUN/.compare.lock), so they split the grid between them. ``workers=N`` (``--workers N``)
starts N such processes and splits the machine between them: on CPU each gets cores/N threads
(small models use 2 single-threaded processes better than one with 2 threads), with CUDA
each gets one GPU in turn.

Aggregation: for every (dataset, setting, method) and every metric, the mean and sample std
(ddof = 1) over the seeds that finished; OUT/results.json, OUT/results.md (best mean per column
in bold) and OUT/report.md with the per-class plot of the means.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dorat import config as cfglib
from dorat.errors import ConfigError, DoratError
from dorat.objectives import check_method

TOP_KEYS = {"title", "base", "set", "datasets", "model", "settings", "methods", "seeds", "evals"}
METHOD_KEYS = {"name", "method", "set", "settings", "seeds"}
EVAL_KEYS = {"name", "attacks", "n", "eps", "steps", "restarts"}
# may differ between machines and do not change the method (perf.* are execution options)
FAILED = "failed.json"  # a run that stopped with an error: skipped until --retry-failed
LOCK = ".compare.lock"  # RUN/.compare.lock: the pid of the compare process working on that run
IGNORED_KEYS = ("device", "data.dir", "log.progress", "perf.channels_last", "perf.compile",
                "perf.compile_backend", "perf.sync_bn", "perf.deterministic")


@dataclass
class RunSpec:
    dataset: str
    setting: str
    name: str
    seed: int
    cfg: dict[str, Any]
    path: Path


@dataclass
class Grid:
    title: str
    runs: list[RunSpec]
    evals: list[dict[str, Any]]
    groups: list[tuple[str, str]] = field(default_factory=list)  # (dataset, setting) in order
    names: list[str] = field(default_factory=list)  # method names in order


def _mapping(v: Any, what: str) -> dict[str, Any]:
    if v is None:
        return {}
    if not isinstance(v, dict):
        raise ConfigError(f"{what} must be a mapping of config keys, got {v!r}")
    return v


def bundled_names() -> list[str]:
    from importlib import resources

    d = resources.files("dorat").joinpath("configs", "compare")
    return sorted(p.name[:-5] for p in d.iterdir() if p.name.endswith(".yaml"))


def find_compare_file(name_or_path: str | Path) -> Path:
    """A compare file by path, or one shipped with dorat by name (e.g. ``demo``)."""
    from importlib import resources

    path = Path(name_or_path)
    if path.is_file():
        return path
    res = resources.files("dorat").joinpath("configs", "compare", f"{name_or_path}.yaml")
    if res.is_file():
        return Path(str(res))
    raise ConfigError(f"compare file {name_or_path} does not exist (bundled: {', '.join(bundled_names())})")


def load_grid(path: str | Path, out: str | Path, device: str | None = None,
              data_dir: str | None = None) -> Grid:
    """Parse and validate a compare file into the list of runs (nothing is written)."""
    path = find_compare_file(path)
    spec = cfglib.parse_yaml(path.read_text(), str(path))
    if not isinstance(spec, dict):
        raise ConfigError(f"{path}: expected a mapping with keys {', '.join(sorted(TOP_KEYS))}")
    unknown = set(spec) - TOP_KEYS
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) {', '.join(sorted(unknown))}; "
                          f"allowed: {', '.join(sorted(TOP_KEYS))}")
    base = spec.get("base")
    if base is not None and (path.parent / str(base)).is_file():
        base = str(path.parent / str(base))
    common = _mapping(spec.get("set"), f"{path}: set")
    settings = spec.get("settings") or {"default": {}}
    if not isinstance(settings, dict):
        raise ConfigError(f"{path}: settings must map a name to config overrides")
    methods = spec.get("methods")
    if not methods or not isinstance(methods, list):
        raise ConfigError(f"{path}: methods must be a non-empty list (e.g. [at, done])")
    seeds = _seeds(spec.get("seeds", [0]), f"{path}: seeds")
    base_cfg = cfglib.resolve(base, overrides=common)
    datasets = spec.get("datasets") or [base_cfg["dataset"]]
    evals = spec.get("evals") or []
    for e in evals:
        if not isinstance(e, dict) or "name" not in e or set(e) - EVAL_KEYS:
            raise ConfigError(f"{path}: each entry of evals needs a name and only keys "
                              f"{', '.join(sorted(EVAL_KEYS))}; got {e!r}")
    if len({e["name"] for e in evals}) != len(evals):
        raise ConfigError(f"{path}: two evals share a name")
    entries = []
    for m in methods:
        if isinstance(m, str):
            m = {"name": m, "method": m}
        if not isinstance(m, dict) or set(m) - METHOD_KEYS or "method" not in m:
            raise ConfigError(f"{path}: a method entry is a preset name or a mapping with 'method' "
                              f"and optional {', '.join(sorted(METHOD_KEYS - {'method'}))}; got {m!r}")
        m.setdefault("name", m["method"])
        # a method may have its own seeds (e.g. more seeds for the finalists of a sweep)
        m["seeds"] = _seeds(m["seeds"], f"{path}: {m['name']}.seeds") if "seeds" in m else seeds
        bad = set(m.get("settings") or []) - set(settings)
        if bad:
            raise ConfigError(f"{path}: method {m['name']} names unknown setting(s) {', '.join(bad)}")
        entries.append(m)
    names = [m["name"] for m in entries]
    if len(set(names)) != len(names):
        raise ConfigError(f"{path}: two methods share the name; give each entry a distinct name")
    runs = []
    groups = [(ds, sname) for ds in datasets for sname in settings]
    out = Path(out)
    # Seeds outermost: the first pass gives every method one finished run, so a grid stopped
    # early already compares all methods.
    for seed in sorted(set().union(*(m["seeds"] for m in entries)), key=_order(seeds)):
        for ds, sname in groups:
            for m in entries:
                if m.get("settings") and sname not in m["settings"] or seed not in m["seeds"]:
                    continue
                # later layers win: common set < dataset/method/seed/model < setting < method set
                over = {**common, "dataset": ds, "method": m["method"], "seed": seed,
                        **({"model": spec["model"]} if spec.get("model") else {}),
                        **_mapping(settings[sname], f"{path}: settings.{sname}"),
                        **_mapping(m.get("set"), f"{path}: {m['name']}.set")}
                try:
                    cfg = cfglib.resolve(base, {"device": device, "data.dir": data_dir},
                                         overrides=over)
                    check_method(cfg)
                except ConfigError as e:
                    raise ConfigError(f"{path}: run {ds}/{sname}/{m['name']}: {e}") from None
                runs.append(RunSpec(ds, sname, m["name"], seed, cfg,
                                    out / "runs" / _dirname(ds) / sname / m["name"] / f"seed{seed}"))
    title = str(spec.get("title") or f"dorat compare: {path.stem}")
    return Grid(title, runs, evals, groups, names)


def _seeds(v: Any, where: str) -> list[int]:
    if not isinstance(v, list) or not v or not all(isinstance(s, int) and not isinstance(s, bool)
                                                   and s >= 0 for s in v):
        raise ConfigError(f"{where} must be a non-empty list of non-negative integers, got {v!r}")
    if len(set(v)) != len(v):
        raise ConfigError(f"{where} lists a seed twice: {v!r}")
    return v


def _order(seeds: list[int]) -> Callable[[int], tuple[int, int]]:
    """The file's seeds in their order first, then seeds only some methods have, ascending."""
    return lambda s: (seeds.index(s), 0) if s in seeds else (len(seeds), s)


def _dirname(name: str) -> str:
    """A dataset name as one directory name (npz:/data/x.npz -> npz_data_x.npz)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "dataset"


def _comparable(cfg: dict[str, Any]) -> dict[str, Any]:
    flat = dict(cfglib._flatten(cfg))
    return {k: v for k, v in flat.items() if k not in IGNORED_KEYS}


def _status(run: RunSpec) -> str:
    p = run.path
    if (p / "config.yaml").is_file():
        saved = cfglib.from_dict(cfglib.load_yaml(str(p / "config.yaml"))[0], str(p / "config.yaml"))
        a, b = _comparable(saved), _comparable(run.cfg)
        diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
        if diff:
            raise ConfigError(
                f"{p} holds a run with a different config ({', '.join(diff[:5])}); the compare file "
                "changed since it ran: use a new --out, or delete that run directory to redo it")
    if (p / "metrics.json").is_file():
        return "done"
    if (p / FAILED).is_file():
        return "failed"
    if (p / "checkpoint.safetensors").is_file():
        return "resume"
    return "new"


def run_grid(grid: Grid, log: Callable[[str], None] | None = None, progress: bool = False,
             only: Sequence[str] | None = None, retry_failed: bool = False) -> None:
    """Train and evaluate every run of the grid that has not finished yet (only the methods
    named in ``only``, when given). A run that fails with a user-level error (diverged loss,
    bad value) is recorded in RUN/failed.json and the grid goes on; failed runs are skipped
    on later calls unless ``retry_failed``. A run that another live compare process holds
    (RUN/.compare.lock) is left to it."""
    log = log or (lambda s: print(s, file=sys.stderr))
    statuses = _validate(grid, only)
    todo = sum(not _finished(r, grid.evals) for r in grid.runs)
    log(f"{grid.title}: {len(grid.runs)} runs, {len(grid.runs) - todo} finished, {todo} to go"
        + (f" (running only {', '.join(only)})" if only else ""))
    for i, (r, st) in enumerate(zip(grid.runs, statuses)):
        if only and r.name not in only:
            continue
        tag = f"[{i + 1}/{len(grid.runs)}] {r.dataset}/{r.setting}/{r.name}/seed{r.seed}"
        if st == "failed" and not retry_failed:
            log(f"{tag}: failed earlier ({_failure(r)}); skipped (--retry-failed to try again)")
            continue
        if _finished(r, grid.evals):
            continue
        with _run_lock(r.path) as holder:
            if holder:
                log(f"{tag}: another compare (pid {holder}) is running it; left to that one")
                continue
            st = _status(r)  # again, under the lock: another process may have finished it
            if st == "failed" and not retry_failed:
                log(f"{tag}: failed in another compare ({_failure(r)}); skipped")
                continue
            _do_run(r, grid.evals, st, tag, log, progress)


def _validate(grid: Grid, only: Sequence[str] | None) -> list[str]:
    """Check ``only`` and every run's saved config before anything trains; the runs' statuses."""
    unknown = sorted(set(only or []) - set(grid.names))
    if unknown:
        raise ConfigError(f"--methods names {', '.join(unknown)}, not in the compare file "
                          f"(it has {', '.join(grid.names)})")
    return [_status(r) for r in grid.runs]


def _missing_evals(r: RunSpec, evals: Sequence[dict[str, Any]]) -> list[str]:
    return [e["name"] for e in evals if not (r.path / f"eval-{e['name']}.json").is_file()]


def _finished(r: RunSpec, evals: Sequence[dict[str, Any]]) -> bool:
    """Trained, evaluated, and every extra evaluation written: only such runs are aggregated,
    so each mean in a row is over the same seeds."""
    return (r.path / "metrics.json").is_file() and not _missing_evals(r, evals)


def _do_run(r: RunSpec, evals: Sequence[dict[str, Any]], st: str, tag: str,
            log: Callable[[str], None], progress: bool) -> None:
    """Train (or resume) one run, then its missing extra evaluations. Holds the run's lock."""
    from dorat.checkpoint import write_text_atomic
    from dorat.train import train

    if st == "failed":  # only reached with retry_failed
        (r.path / FAILED).unlink()
        st = "resume" if (r.path / "checkpoint.safetensors").is_file() else "new"
    missing = _missing_evals(r, evals)
    if st == "done" and missing and not (r.path / "model.safetensors").is_file():
        log(f"{tag}: finished, but its model file is gone and evaluation(s) {', '.join(missing)} "
            "are missing: training it again")
        st = "new"
    if st != "done":
        log(f"{tag}: {'resuming' if st == 'resume' else 'training'}")
        t0 = time.perf_counter()
        r.cfg["log"]["progress"] = "on" if progress else "off"
        for stale in r.path.glob("eval-*.json"):  # belong to an earlier, unfinished model
            stale.unlink()
        try:
            train(r.cfg, r.path, resume=st == "resume", overwrite=st == "new", log=log)
        except DoratError as e:
            r.path.mkdir(parents=True, exist_ok=True)
            write_text_atomic(r.path / FAILED, json.dumps({"error": str(e)}, indent=2))
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
    from dorat.checkpoint import write_text_atomic
    from dorat.train import JOURNAL, evaluate_run, load_run

    target = r.path / f"eval-{e['name']}.json"
    if target.is_file():
        return
    over = {f"eval.{k}": v for k, v in e.items() if k != "name"}
    over["data.dir"] = r.cfg["data"]["dir"]
    log(f"{tag}: evaluation '{e['name']}' ({', '.join(e.get('attacks', r.cfg['eval']['attacks']))})")
    run = load_run(r.path, r.cfg["device"], over)
    metrics = evaluate_run(run, progress=progress, log=log,
                           journal=r.path / JOURNAL.format(name=f"eval-{e['name']}"))
    write_text_atomic(target, json.dumps(metrics, indent=2))


# ----------------------------------------------------------------------------- aggregation

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


def aggregate(grid: Grid) -> dict[str, Any]:
    """Mean ± std over seeds of every metric, per (dataset, setting, method), and what the
    instance weights were in the last training epoch (``weights``: effective sample size, the
    largest weight, each class's mean weight; 1 everywhere for unweighted methods)."""
    from dorat.report import main_key, read_log

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
            pending = []  # trained, but an extra evaluation is not written yet: left out
            failed = [r.seed for r in runs if (r.path / FAILED).is_file()]
            for r in runs:
                if not _finished(r, grid.evals):
                    if (r.path / "metrics.json").is_file():
                        pending.append(r.seed)
                    continue
                m = json.loads((r.path / "metrics.json").read_text())
                seeds.append(r.seed)
                classes = m["classes"]
                flat = flat_metrics(m)
                per_class.setdefault("main", []).append(m["per_class"][main_key(m)])
                for e in grid.evals:  # all written: the run is finished
                    em = json.loads((r.path / f"eval-{e['name']}.json").read_text())
                    flat.update(flat_metrics(em, f"{e['name']}:"))
                    per_class.setdefault(e["name"], []).append(em["per_class"][main_key(em)])
                for k, v in flat.items():
                    per_seed.setdefault(k, []).append(v)
                log = read_log(r.path)
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
                "classes": classes,
                "weights": _weights_summary(last_epochs),
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


def write_outputs(grid: Grid, out: str | Path) -> Path:
    """results.json, results.md and report.md (tables + per-class plot of the means + the
    training and weight plots of each method's first seed). Returns report.md's path."""
    from dorat.checkpoint import write_text_atomic
    from dorat.report import check_lines, figure_lines, load_result, plot_per_class

    out = Path(out)
    agg = aggregate(grid)
    write_text_atomic(out / "results.json", json.dumps(agg, indent=2))
    tables = markdown_tables(agg)
    head = [f"# {grid.title}", "",
            f"{agg['finished_runs']} of {agg['total_runs']} runs finished. Mean ± sample std over "
            "seeds, in % (no ± with one seed); the best mean per column is in bold. Columns "
            "with [name] come from the extra evaluation of that name.", ""]
    write_text_atomic(out / "results.md", "\n".join(head + tables))
    lines = head + tables
    for ds, st in grid.groups:
        rows = [r for r in agg["rows"] if (r["dataset"], r["setting"]) == (ds, st) and r["seeds"]]
        if not rows:
            continue
        tag = f"{ds}-{st}".replace("/", "_")
        for key in dict.fromkeys(k for r in rows for k in r["per_class"]):
            png = f"per_class_{tag}_{key}.png"
            what = "main evaluation" if key == "main" else f"evaluation '{key}'"
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
    failed_checks = check_lines([load_result(r.path, "metrics.json", name=f"{r.name} s{r.seed}")
                                 for r in grid.runs if _finished(r, grid.evals)])
    lines += (["## Sanity checks that failed", ""] + failed_checks + [""]) if failed_checks else [
        "All sanity checks of the finished runs passed (or none ran).", ""]
    path = out / "report.md"
    write_text_atomic(path, "\n".join(lines))
    return path


@contextlib.contextmanager
def _run_lock(path: Path) -> Iterator[int]:
    """Hold RUN/.compare.lock while one process trains and evaluates that run. Yields 0 when
    this process holds it, else the pid of the live process that does (nothing is done then).
    A lock left by a process that died (kill -9, a reboot) is taken over; the lock names the
    process by pid and start time, so a reused pid does not keep a dead lock alive, and a dead
    process its parent has not reaped yet (a zombie) holds no lock."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DoratError(f"cannot create {path} ({e.strerror}); choose another --out") from None
    lock = path / LOCK
    while True:
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            break
        except FileExistsError:
            try:
                owner = lock.read_text().split()
                age = time.time() - lock.stat().st_mtime
            except OSError:
                continue  # released meanwhile: try again
            if not owner and age < 10:  # created, not written yet: its owner is writing it
                time.sleep(0.1)
                continue
            if owner and owner[0].isdigit() and _alive(int(owner[0]), owner[1:2]):
                yield int(owner[0])
                return
            lock.unlink(missing_ok=True)  # stale
    with os.fdopen(fd, "w") as f:
        f.write(" ".join([str(os.getpid()), *_start_time(os.getpid())]))
    try:
        yield 0
    finally:
        lock.unlink(missing_ok=True)


def _proc_stat(pid: int) -> list[str]:
    """Fields 3... of /proc/PID/stat (Linux; the name in (...) may hold spaces), else nothing."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return []


_START = slice(19, 20)  # field 22 of /proc/PID/stat, the start time, as a 0- or 1-item list


def _start_time(pid: int) -> list[str]:
    """The process's start time in clock ticks since boot (Linux), else nothing."""
    return _proc_stat(pid)[_START]


def _alive(pid: int, start: list[str] | None = None) -> bool:
    if pid == os.getpid():
        return False  # our own lock, left by an earlier call that died in this process
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    stat = _proc_stat(pid)
    if stat[:1] == ["Z"]:
        return False  # exited, not yet reaped by its parent (a killed compare worker)
    now = stat[_START]
    return not (start and now and start != now)  # the pid was reused by another process


def compare(path: str | Path, out: str | Path, device: str | None = None, data_dir: str | None = None,
            log: Callable[[str], None] | None = None, progress: bool = False,
            aggregate_only: bool = False, only: Sequence[str] | None = None,
            retry_failed: bool = False, workers: int = 1, aggregate: bool = True) -> Path:
    """Run (or continue) the grid, then aggregate; returns the report's path. ``workers`` > 1
    runs the grid in that many processes (see the module docstring); ``aggregate=False`` only
    trains (what each worker does)."""
    grid = load_grid(path, out, device, data_dir)
    out = Path(out)
    if not aggregate_only:
        _validate(grid, only)  # before anything is written, and once, not once per worker
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DoratError(f"cannot create {out} ({e.strerror}); choose another --out") from None
    if not aggregate_only:  # aggregating only reads finished runs: fine beside a running compare
        if workers > 1:
            _run_workers(path, out, workers, device, data_dir, only, retry_failed, log)
        else:
            run_grid(grid, log, progress, only, retry_failed)
    return write_outputs(grid, out) if aggregate else out / "report.md"


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


def _run_workers(path: str | Path, out: Path, workers: int, device: str | None,
                 data_dir: str | None, only: Sequence[str] | None, retry_failed: bool,
                 log: Callable[[str], None] | None) -> None:
    """Start ``workers`` `dorat compare` processes on the same OUT (the run locks split the
    grid between them), pass their messages on with a [wK] prefix, and wait for all."""
    import subprocess
    import threading

    log = log or (lambda s: print(s, file=sys.stderr, flush=True))
    cmd = [sys.executable, "-m", "dorat", "compare", str(find_compare_file(path)), "--out", str(out),
           "--no-aggregate"]
    cmd += ["--device", device] if device else []
    cmd += ["--data-dir", data_dir] if data_dir else []
    cmd += ["--methods", ",".join(only)] if only else []
    cmd += ["--retry-failed"] if retry_failed else []
    procs, pumps = [], []
    for k in range(workers):
        p = subprocess.Popen(cmd, env=worker_env(k, workers, device), stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True, bufsize=1)
        procs.append(p)

        def pump(p: subprocess.Popen = p, k: int = k) -> None:
            assert p.stderr is not None
            for line in p.stderr:
                log(f"[w{k + 1}] {line.rstrip()}")

        t = threading.Thread(target=pump, daemon=True)
        t.start()
        pumps.append(t)
    codes = [p.wait() for p in procs]
    for t in pumps:
        t.join()
    bad = [(k + 1, c) for k, c in enumerate(codes) if c != 0]
    if bad:
        raise DoratError("compare worker(s) " + ", ".join(f"w{k} (exit {c})" for k, c in bad)
                         + " stopped; their messages are above. Run the same command again: "
                         "finished runs are kept and interrupted ones resume")
