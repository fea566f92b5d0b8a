"""Run configuration: a nested dict with a fixed schema.

A run is fully described by its resolved config (saved as RUN_DIR/config.yaml). Layers, later
wins: built-in defaults < preset YAML (``--config``) < CLI flags < ``--set key=value``.
Every key is known in advance, so a typo is an error, not a silently ignored setting.
"""

from __future__ import annotations

import copy
import difflib
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from dorat.errors import ConfigError


@dataclass(frozen=True)
class Opt:
    """One config leaf: default value, kind and an optional check returning an error or None."""

    default: Any
    kind: str  # int | float | bool | str | list[float] | list[str] | any
    check: Callable[[Any], str | None] | None = None
    optional: bool = False  # None allowed
    help: str = ""


def _pos(v: Any) -> str | None:
    return None if v > 0 else "must be > 0"


def _nonneg(v: Any) -> str | None:
    return None if v >= 0 else "must be >= 0"


def _unit(v: Any) -> str | None:
    return None if 0 <= v <= 1 else "must be in [0, 1]"


def _choice(*names: str) -> Callable[[Any], str | None]:
    def check(v: Any) -> str | None:
        return None if v in names else f"must be one of {', '.join(names)}"

    return check


def _attack_list(v: Any) -> str | None:
    bad = [a for a in v if a not in ("pgd", "cw", "aa")]
    if bad:
        return f"unknown attack(s) {', '.join(map(str, bad))}; available: pgd, cw, aa"
    if not v:
        return "name at least one attack (pgd, cw, aa)"
    if len(set(v)) != len(v):
        return "names an attack twice"
    return None


def _beta(v: Any) -> str | None:
    return None if 0 < v <= 1 else "must be in (0, 1]"


SCHEMA: dict[str, Any] = {
    "method": Opt("at", "str", help="training method preset (see `dorat train --help`)"),
    "dataset": Opt("fashion-mnist", "str"),
    "model": Opt("small-cnn", "str"),
    "seed": Opt(0, "int", _nonneg),
    "device": Opt("auto", "str", _choice("auto", "cpu", "cuda", "mps")),
    "epochs": Opt(10, "int", _pos),
    "batch_size": Opt(128, "int", _pos),
    "data": {
        "dir": Opt(None, "str", optional=True, help="dataset directory (else $DORAT_DATA, ...)"),
        "train_subset": Opt(None, "int", _pos, optional=True, help="use N training examples"),
        "imbalance_ratio": Opt(1.0, "float", lambda v: None if v >= 1 else "must be >= 1"),
        "val_size": Opt(0, "int", _nonneg, help="held-out validation examples from train"),
        "augment": Opt("auto", "str", _choice("auto", "none", "crop-flip", "crop")),
        "download": Opt(True, "bool"),
    },
    "optim": {
        "lr": Opt(0.1, "float", _pos),
        "momentum": Opt(0.9, "float", _unit),
        "nesterov": Opt(False, "bool"),
        "weight_decay": Opt(5e-4, "float", _nonneg),
        "schedule": Opt("piecewise", "str", _choice("piecewise", "cosine", "onecycle", "constant")),
        "milestones": Opt([0.5, 0.75], "list[float]", help="piecewise: fractions of training"),
        "gamma": Opt(0.1, "float", _pos),
        "grad_clip": Opt(None, "float", _pos, optional=True),
    },
    "attack": {  # the training attack (lower level)
        "norm": Opt("linf", "str", _choice("linf", "l2")),
        "eps": Opt(0.1, "float", lambda v: None if 0 <= v <= 1 else "must be in [0, 1]"),
        "alpha": Opt(0.01, "float", _pos, help="step size"),
        "steps": Opt(10, "int", _pos),
        "random_start": Opt(True, "bool"),
        "loss": Opt("ce", "str", _choice("ce", "margin")),
        "bn_mode": Opt("eval", "str", _choice("eval", "train")),
    },
    "eval": {
        "attacks": Opt(["pgd"], "list[str]", _attack_list, help="pgd, cw, aa (AutoAttack)"),
        "n": Opt(None, "int", _pos, optional=True, help="stratified test subset size"),
        "eps": Opt(None, "float", _unit, optional=True, help="default: attack.eps"),
        "norm": Opt(None, "str", _choice("linf", "l2"), optional=True),
        "steps": Opt(20, "int", _pos),
        "alpha": Opt(None, "float", _pos, optional=True, help="default: eps/4"),
        "restarts": Opt(1, "int", _pos),
        "batch_size": Opt(500, "int", _pos),
        "seed": Opt(0, "int", _nonneg),
        "aa_version": Opt("standard", "str", _choice("standard", "plus", "rand"),
                          help="AutoAttack version (official settings)"),
        "checks": Opt(True, "bool", help="run the sanity checks (an ε sweep with PGD)"),
        "check_n": Opt(200, "int", _pos, help="stratified points for the ε sweep"),
        "split": Opt("test", "str", _choice("test", "val"),
                     help="val: the held-out data.val_size split (for tuning without the test set)"),
    },
    "log": {
        "progress": Opt("auto", "str", _choice("auto", "on", "off")),
    },
    "perf": {
        "channels_last": Opt("auto", "str", _choice("auto", "on", "off"),
                             help="channels-last memory format; auto = on for CPU and CUDA (measured "
                                  "1.7x faster PGD-AT steps for small-cnn on CPU, docs/PERFORMANCE.md)"),
        "amp": Opt("off", "str", _choice("off", "bf16"), help="bf16 autocast for forward passes"),
        "compile": Opt(False, "bool", help="torch.compile the model"),
        "compile_backend": Opt("inductor", "str", help="torch.compile backend"),
        "sync_bn": Opt(False, "bool", help="SyncBatchNorm under torchrun (CUDA only)"),
        "deterministic": Opt(False, "bool", help="torch deterministic algorithms (bitwise-"
                                                 "reproducible GPU runs, slower; CPU runs already are)"),
    },
    "trades": {"beta": Opt(6.0, "float", _nonneg, help="TRADES/MART-style KL weight beta_T")},
    "mart": {"beta": Opt(6.0, "float", _nonneg, help="MART's KL weight beta_M")},
    "fat": {
        "tau": Opt(0, "int", _nonneg, help="extra PGD steps after the first misclassification"),
        "dynamic_tau": Opt(True, "bool", help="official schedule: tau+1 from 5/12, tau+2 from 3/4"),
    },
    "gairat": {
        "lam": Opt(-1.0, "float", help="Lambda in tanh(Lambda + 5(1 - 2 kappa/K))"),
        "burn_in": Opt(0.5, "float", _unit, help="fraction of epochs of plain AT first"),
    },
    "mail": {
        "bias": Opt(-1.5, "float"),
        "slope": Opt(1.0, "float", _pos),
        "burn_in": Opt(0.625, "float", _unit, help="official: 75 of 120 epochs"),
    },
    "wmmr": {
        "alpha": Opt(0.5, "float", _nonneg),
        "burn_in": Opt(0.0, "float", _unit),
    },
    "done": {  # DONE: KL-DRO instance weights (METHODS.md §1)
        "r": Opt(1.0, "float", _pos, help="KL temperature: large = uniform (PGD-AT), small = worst case"),
        "beta": Opt(0.2, "float", _beta, help="running-average rate of the normaliser u_t"),
        "warmup_epochs": Opt(1, "int", _nonneg, help="plain AT epochs before reweighting"),
        "level": Opt("instance", "str", _choice("instance", "class", "mixed")),
        "class_prior": Opt("train", "str", _choice("train", "uniform"),
                           help="class and mixed levels: the centre of the KL ball over classes, "
                                "the training class frequencies or uniform (the balanced test "
                                "distribution: on long-tailed data, class-balanced weights at "
                                "large r); not in the paper"),
        "target_ess": Opt(None, "float", lambda v: None if 0 < v <= 1 else "must be in (0, 1]",
                          optional=True, help="adapt r between epochs to this ESS/|B|"),
        "max_weight": Opt(None, "float", lambda v: None if v >= 1 else "must be >= 1", optional=True,
                          help="cap each weight at this multiple of the uniform weight (outliers, "
                               "label noise); not in the paper"),
        "lower": Opt("pgd", "str", _choice("pgd", "barrier-gd", "barrier-adam")),
        "hypergrad": Opt("none", "str", _choice("none", "diag", "cg")),
        "cg_iters": Opt(5, "int", _pos),
        "cg_damping": Opt(0.1, "float", _nonneg, help="added to the Hessian in diag and cg"),
        "barrier_c": Opt(1e-4, "float", _pos, help="log-barrier weight c"),
        "barrier_lambda": Opt(0.0, "float", _nonneg, help="quadratic regulariser lambda"),
        "barrier_steps": Opt(None, "int", _pos, optional=True, help="default: attack.steps"),
        "barrier_lr": Opt(None, "float", _pos, optional=True,
                          help="default: 100 for barrier-gd, attack.alpha for barrier-adam"),
    },
}


def defaults() -> dict[str, Any]:
    def build(node: Any) -> Any:
        if isinstance(node, Opt):
            return copy.deepcopy(node.default)
        return {k: build(v) for k, v in node.items()}

    return build(SCHEMA)


def _leaf_keys(node: dict[str, Any], prefix: str = "") -> Iterable[str]:
    for k, v in node.items():
        if isinstance(v, Opt):
            yield prefix + k
        else:
            yield from _leaf_keys(v, prefix + k + ".")


def all_keys() -> list[str]:
    return list(_leaf_keys(SCHEMA))


def _lookup_opt(key: str) -> Opt:
    node: Any = SCHEMA
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            close = difflib.get_close_matches(key, all_keys(), n=3)
            hint = f" Did you mean: {', '.join(close)}?" if close else ""
            raise ConfigError(
                f"unknown config key '{key}'.{hint} "
                "Run `dorat train --list-keys` to see every key."
            )
        node = node[part]
    if not isinstance(node, Opt):
        raise ConfigError(f"config key '{key}' is a section; set one of its keys, e.g. '{key}.…'")
    return node


def _coerce(key: str, opt: Opt, value: Any) -> Any:
    if value is None:
        if opt.optional:
            return None
        raise ConfigError(f"config key '{key}' cannot be empty (null); give a {opt.kind} value")
    try:
        if opt.kind == "int":
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            out: Any = int(value)
        elif opt.kind == "float":
            if isinstance(value, bool):
                raise ValueError
            out = float(value)
            if not math.isfinite(out):
                raise ValueError
        elif opt.kind == "bool":
            if not isinstance(value, bool):
                raise ValueError
            out = value
        elif opt.kind == "str":
            if isinstance(value, bool):  # YAML 1.1 reads on/off/yes/no as booleans
                value = "on" if value else "off"
            if not isinstance(value, str):
                raise ValueError
            out = value
        elif opt.kind == "list[float]":
            if isinstance(value, (int, float)):
                value = [value]
            out = [float(v) for v in value]
        elif opt.kind == "list[str]":
            if isinstance(value, str):
                value = [s for s in value.split(",") if s]
            out = [str(v) for v in value]
        else:
            out = value
    except (TypeError, ValueError):
        raise ConfigError(
            f"config key '{key}' must be {opt.kind}, got {value!r}; fix it with --set {key}=VALUE"
        ) from None
    if opt.check is not None:
        problem = opt.check(out)
        if problem:
            raise ConfigError(f"config key '{key}' {problem}, got {value!r}")
    return out


def set_key(cfg: dict[str, Any], key: str, value: Any) -> None:
    """Set a dotted key after checking that it exists and the value is valid."""
    opt = _lookup_opt(key)
    parts = key.split(".")
    node = cfg
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = _coerce(key, opt, value)


def get_key(cfg: dict[str, Any], key: str) -> Any:
    node: Any = cfg
    for part in key.split("."):
        node = node[part]
    return node


def _flatten(d: dict[str, Any], prefix: str = "") -> Iterable[tuple[str, Any]]:
    for k, v in d.items():
        if isinstance(v, dict):
            yield from _flatten(v, prefix + str(k) + ".")
        else:
            yield prefix + str(k), v


def merge(cfg: dict[str, Any], updates: dict[str, Any], source: str | None) -> None:
    """Merge updates, nested (a YAML file) or with dotted keys (flags, --set), validating every
    leaf; errors name ``source`` when given."""
    if not isinstance(updates, dict):
        raise ConfigError(f"{source}: expected a mapping of config keys, got {type(updates).__name__}")
    for key, value in _flatten(updates):
        try:
            set_key(cfg, key, value)
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}" if source else str(e)) from None


def parse_set(item: str) -> tuple[str, Any]:
    """Parse one ``key=value`` (value in YAML syntax: 0.1, true, [0.5, 0.75], null)."""
    if "=" not in item:
        raise ConfigError(f"--set expects key=value, got '{item}' (e.g. --set attack.eps=0.1)")
    key, raw = item.split("=", 1)
    key = key.strip()
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key, value


def preset_names() -> list[str]:
    files = resources.files("dorat").joinpath("configs")
    return sorted(p.name[:-5] for p in files.iterdir() if p.name.endswith(".yaml"))


def load_yaml(name_or_path: str) -> tuple[dict[str, Any], str]:
    """Read a preset by name (``fmnist-demo``) or a YAML file by path."""
    path = Path(name_or_path)
    if path.is_file():
        text, source = path.read_text(), str(path)
    else:
        res = resources.files("dorat").joinpath("configs", f"{name_or_path}.yaml")
        if not res.is_file():
            raise ConfigError(
                f"config '{name_or_path}' is neither a file nor a preset; "
                f"presets: {', '.join(preset_names())}"
            )
        text, source = res.read_text(), f"preset {name_or_path}"
    return parse_yaml(text, source), source


def parse_yaml(text: str, source: str) -> Any:
    """``yaml.safe_load`` with one clear error naming the file, line and column."""
    try:
        return yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        what = getattr(e, "problem", None) or str(e).splitlines()[0]
        context = getattr(e, "context", None)
        what = f"{context}: {what}" if context else what
        raise ConfigError(f"{source}: not valid YAML{where} ({what}); fix the YAML syntax "
                          "there (indentation, a missing ':' or quote)") from None


def resolve(
    config: str | None = None,
    flags: dict[str, Any] | None = None,
    sets: list[str] | None = None,
    overrides: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Build a validated config from defaults, a preset, CLI flags (None = not given),
    --set items and ``overrides`` (dotted keys, applied last, None = null)."""
    layers: list[tuple[dict[str, Any], str | None]] = []  # (values, source named in errors)
    if config:
        data, source = load_yaml(config)
        layers.append((data, source))
    layers.append(({k: v for k, v in (flags or {}).items() if v is not None}, None))
    sets_dict: dict[str, Any] = {}
    for item in sets or []:
        key, value = parse_set(item)
        sets_dict[key] = value
    layers.append((sets_dict, None))
    layers.append((dict(overrides or {}), None))

    def build(method_layer: dict[str, Any]) -> dict[str, Any]:
        cfg = defaults()
        for data, source in [(method_layer, None), *layers]:
            merge(cfg, data, source)
        return cfg

    # A method preset sets its own defaults (e.g. done-cid: barrier lower level + CG), which the
    # YAML, the flags and --set can still override.
    cfg = build({})
    from dorat.objectives.methods import preset_overrides

    overrides = preset_overrides(cfg["method"])
    return build(overrides) if overrides else cfg


def from_dict(data: dict[str, Any], source: str) -> dict[str, Any]:
    cfg = defaults()
    merge(cfg, data, source)
    return cfg


def dump(cfg: dict[str, Any]) -> str:
    return yaml.safe_dump(cfg, sort_keys=False, default_flow_style=None)
