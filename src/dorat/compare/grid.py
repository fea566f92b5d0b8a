"""The grid spec of `dorat compare`: parse a compare file, expand it into runs, validate them,
and say where each run stands (the file format is in dorat.compare's docstring)."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dorat import config as cfglib
from dorat.compare.tuning import Study, TuneSpec, method_space, parse_tune, read_chosen, study_dir
from dorat.config import Config, parts
from dorat.errors import ConfigError
from dorat.runs import rundir

TOP_KEYS = {"title", "base", "set", "datasets", "model", "settings", "methods", "seeds", "evals",
            "tune"}
METHOD_KEYS = {"name", "method", "set", "settings", "seeds", "space", "init_from"}
EVAL_KEYS = {"name", "attacks", "n", "eps", "steps", "restarts"}
FAILED = "failed.json"  # a run that stopped with an error: skipped until --retry-failed
# may differ between machines and do not change the method (perf.* are execution options)
IGNORED_KEYS = ("device", "data.dir", "log.progress", "log.checkpoint_minutes", "log.tensorboard",
                "log.mlflow", "log.mlflow_uri", "log.mlflow_experiment", "log.mlflow_tags",
                "perf.channels_last", "perf.compile", "perf.compile_backend", "perf.sync_bn",
                "perf.deterministic")


@dataclass
class RunSpec:
    dataset: str
    setting: str
    name: str
    seed: int
    cfg: Config
    path: Path
    waiting: bool = False  # its method's tuning has not chosen yet (dorat.compare.tuning)
    after: Path | None = None  # init_from: the run it starts from, which must finish first
    chosen: dict[str, Any] | None = None  # the tuned values it trains with

    def blocked(self) -> str | None:
        """What this run waits for before it can start (None: nothing)."""
        if self.waiting:
            return "its method's tuning"
        if self.after is not None and not (self.after / "metrics.json").is_file():
            return f"{self.after} (its init) to finish"
        return None


@dataclass
class Grid:
    title: str
    runs: list[RunSpec]
    evals: list[dict[str, Any]]
    groups: list[tuple[str, str]] = field(default_factory=list)  # (dataset, setting) in order
    names: list[str] = field(default_factory=list)  # method names in order
    tune: TuneSpec | None = None  # the tuning budget, the same for every method
    studies: list[Study] = field(default_factory=list)


_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+=-]{0,99}$")


def check_name(name: Any, what: str) -> str:
    """A user-given name that becomes one path component (a method or setting of a grid): letters,
    digits and . _ + = -, not starting with a dot, at most 100 characters; never a path."""
    if not isinstance(name, str) or not _NAME.match(name):
        raise ConfigError(f"{what} {name!r} is not a valid name: use letters, digits and . _ + = - "
                          "(no slashes, not starting with a dot, at most 100 characters); it "
                          "names a directory")
    return name


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
              data_dir: str | None = None, tracking: Mapping[str, Any] | None = None) -> Grid:
    """Parse and validate a compare file into the list of runs (nothing is written)."""
    path = find_compare_file(path)
    spec = cfglib.parse_yaml(cfglib.read_text_file(path, "compare file"), str(path))
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
    for sname in settings:
        check_name(sname, f"{path}: setting")
    methods = spec.get("methods")
    if not methods or not isinstance(methods, list):
        raise ConfigError(f"{path}: methods must be a non-empty list (e.g. [at, done])")
    seeds = _seeds(spec.get("seeds", [0]), f"{path}: seeds")
    base_cfg = cfglib.resolve(base, overrides=common)
    datasets = spec.get("datasets") or [base_cfg.dataset]
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
        check_name(m["name"], f"{path}: method name")
        # a method may have its own seeds (e.g. more seeds for the finalists of a sweep)
        m["seeds"] = _seeds(m["seeds"], f"{path}: {m['name']}.seeds") if "seeds" in m else seeds
        bad = set(m.get("settings") or []) - set(settings)
        if bad:
            raise ConfigError(f"{path}: method {m['name']} names unknown setting(s) {', '.join(bad)}")
        entries.append(m)
    names = [m["name"] for m in entries]
    if len(set(names)) != len(names):
        raise ConfigError(f"{path}: two methods share the name; give each entry a distinct name")
    tune = parse_tune(spec.get("tune"), str(path))
    by_name = {m["name"]: m for m in entries}
    for m in entries:
        m["space"] = method_space(m, str(path))
        if m["space"] and tune is None:
            raise ConfigError(f"{path}: method {m['name']} has a space but the file has no tune block "
                              "(the budget every method is tuned with)")
        dep = m.get("init_from")
        if dep is not None and (dep not in by_name or dep == m["name"] or by_name[dep].get("init_from")):
            raise ConfigError(f"{path}: {m['name']}.init_from must name another method of the file "
                              f"that starts from scratch, got {dep!r}")
    runs, studies = [], []
    groups = [(ds, sname) for ds in datasets for sname in settings]
    out = Path(out)
    # Seeds outermost: the first pass gives every method one finished run, so a grid stopped
    # early already compares all methods.

    def run_dir(ds: str, sname: str, name: str, seed: int) -> Path:
        return out / "runs" / _dirname(ds) / sname / name / f"seed{seed}"

    def build(ds: str, sname: str, m: dict[str, Any], seed: int,
              chosen: dict[str, Any] | None) -> Config:
        # later layers win: common set < dataset/method/seed/model < setting < method set < tuned
        over = {**common, "dataset": ds, "method": m["method"], "seed": seed,
                **({"model": spec["model"]} if spec.get("model") else {}),
                **_mapping(settings[sname], f"{path}: settings.{sname}"),
                **_mapping(m.get("set"), f"{path}: {m['name']}.set"), **(chosen or {})}
        if m.get("init_from"):
            over["init"] = str(run_dir(ds, sname, m["init_from"], seed).resolve())
        try:
            return cfglib.resolve(base, {"device": device, "data.dir": data_dir, **(tracking or {})},
                                  overrides=over)
        except ConfigError as e:
            raise ConfigError(f"{path}: run {ds}/{sname}/{m['name']}: {e}") from None

    chosen: dict[tuple[str, str, str], dict[str, Any] | None] = {}
    if tune is not None:
        for ds, sname in groups:
            for m in entries:
                if m.get("settings") and sname not in m["settings"]:
                    continue
                where = study_dir(out, _dirname(ds), sname, m["name"])
                got = chosen[(ds, sname, m["name"])] = read_chosen(where, tune, {**tune.space, **m["space"]})
                if got is None:
                    dep = m.get("init_from")
                    studies.append(Study(f"{_dirname(ds)}/{sname}/{m['name']}", where,
                                         build(ds, sname, m, tune.seed, None), m["space"],
                                         run_dir(ds, sname, dep, tune.seed) if dep else None))
    for seed in sorted(set().union(*(m["seeds"] for m in entries)), key=_order(seeds)):
        for ds, sname in groups:
            for m in entries:
                if m.get("settings") and sname not in m["settings"] or seed not in m["seeds"]:
                    continue
                dep = m.get("init_from")
                if dep and (seed not in by_name[dep]["seeds"] or (by_name[dep].get("settings")
                                                                  and sname not in by_name[dep]["settings"])):
                    raise ConfigError(f"{path}: {m['name']} starts from {dep}'s run, which the file "
                                      f"does not have for {sname}/seed{seed}")
                picked = chosen.get((ds, sname, m["name"]))
                runs.append(RunSpec(ds, sname, m["name"], seed, build(ds, sname, m, seed, picked),
                                    run_dir(ds, sname, m["name"], seed),
                                    waiting=tune is not None and picked is None,
                                    after=run_dir(ds, sname, dep, seed) if dep else None,
                                    chosen=picked))
    title = str(spec.get("title") or f"dorat compare: {path.stem}")
    return Grid(title, runs, evals, groups, names, tune, studies)


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


def _comparable(cfg: Config) -> dict[str, Any]:
    flat = cfg.flat()
    return {k: v for k, v in flat.items() if k not in IGNORED_KEYS}


def comparability_warnings(grid: Grid) -> list[str]:
    """One line for each key in which the methods of a grid differ (same dataset, setting and
    seed) outside their own parts, naming which methods have which value: then the comparison is
    not about the method alone. A key in a method's own part is that method's business."""
    groups: dict[tuple[str, str, int], list[RunSpec]] = {}
    for r in grid.runs:
        groups.setdefault((r.dataset, r.setting, r.seed), []).append(r)
    seen: set[tuple[str, tuple[tuple[str, tuple[str, ...]], ...]]] = set()
    out = []
    tuned = set(grid.tune.space) if grid.tune is not None else set()  # chosen per method by design
    for runs in groups.values():
        flat = [(r.name, _comparable(r.cfg), cfglib.part_sections(r.cfg.method)) for r in runs]
        for k in sorted({k for _, c, _ in flat for k in c}):
            sec = k.rpartition(".")[0]
            if k in tuned or k == "init":
                continue
            if sec == "method" or (sec in parts.SECTIONS and sec not in cfglib.RUN_SECTIONS
                                   and sec not in cfglib.SHARED_SECTIONS):
                continue  # the method itself, or a part's key: only its own method uses it
            by_value: dict[str, list[str]] = {}
            for name, c, own in flat:
                if sec not in own:
                    by_value.setdefault(repr(c.get(k)), []).append(name)
            if len(by_value) < 2:
                continue
            key = (k, tuple(sorted((v, tuple(n)) for v, n in by_value.items())))
            if key not in seen:
                seen.add(key)
                values = "; ".join(f"{v} in {', '.join(n)}" for v, n in by_value.items())
                out.append(f"warning: the methods differ in {k} outside their own parts ({values}): "
                           "the comparison is not about the method alone")
    return out


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
    if rundir.has_checkpoint(p):  # in RUN, or in RUN/.next for a restart beside a config.yaml
        return "resume"
    return "new"


def selected(r: RunSpec, only: Sequence[str] | None) -> bool:
    """Whether ``only`` (--methods: method names, or SETTING/METHOD for one setting's runs of a
    method) takes run ``r``; everything when ``only`` is empty."""
    return not only or r.name in only or f"{r.setting}/{r.name}" in only


def _validate(grid: Grid, only: Sequence[str] | None) -> list[str]:
    """Check ``only`` and every run's saved config before anything trains; the runs' statuses."""
    known = set(grid.names) | {f"{r.setting}/{r.name}" for r in grid.runs}
    unknown = sorted(set(only or []) - known)
    if unknown:
        raise ConfigError(f"--methods names {', '.join(unknown)}, not in the compare file "
                          f"(it has {', '.join(grid.names)}, each also as SETTING/METHOD)")
    return [_status(r) for r in grid.runs]


def _missing_evals(r: RunSpec, evals: Sequence[dict[str, Any]]) -> list[str]:
    return [e["name"] for e in evals if not (r.path / f"eval-{e['name']}.json").is_file()]


def _finished(r: RunSpec, evals: Sequence[dict[str, Any]]) -> bool:
    """Trained, evaluated, and every extra evaluation written: only such runs are aggregated,
    so each mean in a row is over the same seeds."""
    return (r.path / "metrics.json").is_file() and not _missing_evals(r, evals)

