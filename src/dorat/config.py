"""Run configuration: typed sections, presets as data, one validation, a frozen result.

A run is fully described by its resolved config (saved as RUN_DIR/config.yaml). Layers, later
wins: the section defaults < the method preset (``method: done`` names a row of
configs/methods.yaml: its parts and overrides) < the YAML file (``--config``) < CLI flags <
``--set key=value`` < ``overrides``. The keys are the fields of the sections in this module
and of the registered parts (dorat.parts), so a typo is an error, never a silently ignored
setting; renamed keys of older versions are read as their new names (``ALIASES``).
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from dorat import parts
from dorat.attacks import attack_names_problem
from dorat.errors import ConfigError
from dorat.parts import nonneg, opt, positive, section, unit

DEVICES = ("auto", "cpu", "cuda", "mps")


@section("")
@dataclass(frozen=True)
class RunConfig:
    dataset: str = opt("fashion-mnist", "dataset name or npz:PATH (see `dorat data list`)")
    model: str = opt("small-cnn", "a registered model, or module:factory returning an nn.Module")
    seed: int = opt(0, "fixes data order, initialisation and attack noise", nonneg)
    device: str = opt("auto", "auto = CUDA when present, else CPU", choices=DEVICES)
    epochs: int = opt(10, "training epochs", positive)
    batch_size: int = opt(128, "the global mini-batch", positive)
    plugins: list[str] = opt([], "modules imported before the run is built (they register parts)")


@section("method")
@dataclass(frozen=True)
class MethodConfig:
    name: str = opt("at", "the method's label (a preset name, or attack×loss×weighting)")
    attack: str = opt("pgd", "the training attack (lower level): a registered attack")
    loss: str = opt("ce", "the per-example loss: a registered loss")
    weighting: str = opt("uniform", "the instance weighting: a registered weighting")
    hypergrad: str = opt("none", "implicit hypergradient through the barrier lower level: "
                                 "none, diag or cg")


@section("data")
@dataclass(frozen=True)
class DataConfig:
    dir: str | None = opt(None, "dataset directory (else $DORAT_DATA, ~/.cache/dorat, ...)")
    train_subset: int | None = opt(None, "use N training examples (stratified)", positive)
    imbalance_ratio: float = opt(1.0, "long-tailed training set: n_max/n_min",
                                 lambda v: None if v >= 1 else "must be >= 1")
    val_size: int = opt(0, "held-out validation examples from train (stratified)", nonneg)
    augment: str = opt("auto", "auto: crop+flip for CIFAR-like data, crop for digits",
                       choices=("auto", "none", "crop-flip", "crop"))
    download: bool = opt(True, "download a missing dataset (with checksums)")


@section("optim")
@dataclass(frozen=True)
class OptimConfig:
    lr: float = opt(0.1, "SGD learning rate", positive)
    momentum: float = opt(0.9, "SGD momentum", unit)
    nesterov: bool = opt(False, "Nesterov momentum")
    weight_decay: float = opt(5e-4, "L2 weight decay", nonneg)
    schedule: str = opt("piecewise", "learning-rate schedule (stepped per batch)",
                        choices=("piecewise", "cosine", "onecycle", "constant"))
    milestones: list[float] = opt([0.5, 0.75], "piecewise: fractions of training")
    gamma: float = opt(0.1, "piecewise: factor at each milestone", positive)
    grad_clip: float | None = opt(None, "clip the gradient norm at this value", positive)


@section("eval")
@dataclass(frozen=True)
class EvalConfig:
    attacks: list[str] = opt(["pgd"], "pgd, cw, aa (AutoAttack)", attack_names_problem)
    n: int | None = opt(None, "stratified test subset size (null: all)", positive)
    eps: float | None = opt(None, "threat radius (null: attack.eps)", unit)
    norm: str | None = opt(None, "threat norm (null: attack.norm)", choices=("linf", "l2"))
    steps: int = opt(20, "PGD/CW iterations", positive)
    alpha: float | None = opt(None, "PGD/CW step (null: eps/4)", positive)
    restarts: int = opt(1, "random restarts per attack", positive)
    batch_size: int = opt(500, "evaluation batch", positive)
    seed: int = opt(0, "attack noise and the stratified subset", nonneg)
    aa_version: str = opt("standard", "AutoAttack version (official settings)",
                          choices=("standard", "plus", "rand"))
    checks: bool = opt(True, "run the sanity checks (an ε sweep with PGD)")
    check_n: int = opt(200, "stratified points for the ε sweep", positive)
    split: str = opt("test", "val: the held-out data.val_size split (tuning without the test set)",
                     choices=("test", "val"))


@section("log")
@dataclass(frozen=True)
class LogConfig:
    progress: str = opt("auto", "progress bars (auto: on a terminal)", choices=("auto", "on", "off"))


@section("perf")
@dataclass(frozen=True)
class PerfConfig:
    channels_last: str = opt("auto", "channels-last memory format; auto = on for CPU and CUDA "
                             "(1.7x faster PGD-AT steps for small-cnn on CPU, docs/PERFORMANCE.md)",
                             choices=("auto", "on", "off"))
    amp: str = opt("off", "bf16 autocast for forward passes", choices=("off", "bf16"))
    compile: bool = opt(False, "torch.compile the model")
    compile_backend: str = opt("inductor", "torch.compile backend")
    sync_bn: bool = opt(False, "SyncBatchNorm under torchrun (CUDA only)")
    deterministic: bool = opt(False, "torch deterministic algorithms (bitwise-reproducible GPU "
                                     "runs, slower; CPU runs already are)")


def _ensure_parts() -> None:
    import dorat.models  # noqa: F401
    import dorat.objectives  # noqa: F401  registers the built-in parts


# -- renamed keys ----------------------------------------------------------------------------

def _same(v: Any) -> Any:
    return v


def _share(v: Any) -> Any:
    """An old burn-in (a fraction of the epochs) as the warm-up convention's share, 'N%'."""
    return f"{100 * v:g}%" if isinstance(v, (int, float)) and not isinstance(v, bool) else v


# old dotted key -> (new dotted key, value map). Older config.yaml files and --set still work.
ALIASES: dict[str, tuple[str, Any]] = {
    "done.lower": ("method.attack", _same),
    "done.hypergrad": ("method.hypergrad", _same),
    "done.cg_iters": ("hypergrad.cg_iters", _same),
    "done.cg_damping": ("hypergrad.damping", _same),
    "done.barrier_c": ("barrier.c", _same),
    "done.barrier_lambda": ("barrier.lam", _same),
    "done.barrier_steps": ("barrier.steps", _same),
    "done.barrier_lr": ("barrier.lr", _same),
    "done.warmup_epochs": ("done.warmup", _same),
    "gairat.burn_in": ("gairat.warmup", _share),
    "mail.burn_in": ("mail.warmup", _share),
    "wmmr.burn_in": ("wmmr.warmup", _share),
}


# -- presets as data -------------------------------------------------------------------------

@dataclass(frozen=True)
class Preset:
    name: str
    help: str
    attack: str
    loss: str
    weighting: str
    hypergrad: str = "none"
    set: Mapping[str, Any] = None  # type: ignore[assignment]

    @property
    def parts(self) -> dict[str, str]:
        return {"attack": self.attack, "loss": self.loss, "weighting": self.weighting,
                "hypergrad": self.hypergrad}


PRESETS: dict[str, Preset] = {}
PART_KEYS = ("attack", "loss", "weighting", "hypergrad")


def register_preset(name: str, attack: str, loss: str, weighting: str, hypergrad: str = "none",
                    help: str = "", set: Mapping[str, Any] | None = None) -> Preset:
    """Add a method preset: a name for parts + config overrides (dotted keys)."""
    p = Preset(name, help, attack, loss, weighting, hypergrad, dict(set or {}))
    PRESETS[name] = p
    return p


def _load_presets() -> None:
    if PRESETS:
        return
    text = resources.files("dorat").joinpath("configs", "methods.yaml").read_text()
    for name, row in yaml.safe_load(text).items():
        register_preset(name, **row)


def presets() -> dict[str, Preset]:
    _load_presets()
    parts.load_plugins()
    return PRESETS


def method_names() -> list[str]:
    return list(presets())


def get_preset(name: str) -> Preset:
    table = presets()
    if name not in table:
        raise ConfigError(f"unknown method '{name}'; choose one of {', '.join(table)} (or compose "
                          "one with --set method.attack=... method.loss=... method.weighting=...)")
    return table[name]


# -- the frozen config -----------------------------------------------------------------------

class Section(Mapping[str, Any]):
    """A read-only config section: ``cfg.attack.eps`` or ``cfg.attack["eps"]``."""

    __slots__ = ("_name", "_values")

    def __init__(self, name: str, values: dict[str, Any]) -> None:
        object.__setattr__(self, "_name", name)
        object.__setattr__(self, "_values", values)

    def __getattr__(self, key: str) -> Any:
        try:
            return self._values[key]
        except KeyError:
            raise AttributeError(f"config section '{self._name}' has no key '{key}'") from None

    def __setattr__(self, key: str, value: Any) -> None:
        raise AttributeError("a resolved config is frozen: use Config.replace(...)")

    def __getitem__(self, key: str) -> Any:
        return self._values[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __repr__(self) -> str:
        return f"Section({self._name!r}, {self._values!r})"


def _freeze(v: Any) -> Any:
    return tuple(v) if isinstance(v, list) else v


class Config(Section):
    """The resolved, validated, frozen config of a run: ``cfg.seed``, ``cfg.attack.eps``,
    ``cfg.section("my-part").x``, ``cfg.get("done.r")``; ``replace`` gives a new one."""

    def __init__(self, flat: dict[str, Any]) -> None:
        tree: dict[str, Any] = {}
        for sec, keys in parts.SECTIONS.items():
            if sec == "":
                tree.update({k: _freeze(flat[k]) for k in keys})
            else:
                tree[sec] = Section(sec, {k: _freeze(flat[f"{sec}.{k}"]) for k in keys})
        super().__init__("", tree)

    def section(self, name: str) -> Section:
        return self._values[name]

    def get(self, dotted: str, default: Any = None) -> Any:  # type: ignore[override]
        sec, _, key = dotted.rpartition(".")
        node = self._values[sec] if sec else self
        return node._values.get(key, default) if isinstance(node, Section) else default

    def flat(self) -> dict[str, Any]:
        return dict(_flatten(self.to_dict()))

    def to_dict(self) -> dict[str, Any]:
        def plain(v: Any) -> Any:
            if isinstance(v, Section):
                return {k: plain(x) for k, x in v.items()}
            return list(v) if isinstance(v, tuple) else v

        return {k: plain(v) for k, v in self._values.items()}

    def replace(self, updates: Mapping[str, Any], source: str | None = None) -> Config:
        """A new config with ``updates`` (dotted keys) applied and validated."""
        flat = self.flat()
        _merge(flat, updates, source)
        return _validated(flat)


def _flatten(d: Mapping[str, Any], prefix: str = "") -> Iterable[tuple[str, Any]]:
    for k, v in d.items():
        if isinstance(v, Mapping):
            yield from _flatten(v, prefix + str(k) + ".")
        else:
            yield prefix + str(k), v


def all_keys() -> list[str]:
    _ensure_parts()
    return [k.dotted for k in parts.all_keys()]


def _lookup(key: str) -> parts.Key:
    sec, _, name = key.rpartition(".")
    k = parts.SECTIONS.get(sec, {}).get(name)
    if k is None:
        if key in parts.SECTIONS:
            raise ConfigError(f"config key '{key}' is a section; set one of its keys, e.g. '{key}.…'")
        close = difflib.get_close_matches(key, all_keys(), n=3)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise ConfigError(f"unknown config key '{key}'.{hint} Run `dorat train --list-keys` to "
                          "see every key.")
    return k


def _merge(flat: dict[str, Any], updates: Mapping[str, Any], source: str | None) -> None:
    """Validate and apply ``updates`` (nested or dotted) to ``flat``; errors name ``source``."""
    if not isinstance(updates, Mapping):
        raise ConfigError(f"{source}: expected a mapping of config keys, got {type(updates).__name__}")
    for key, value in _flatten(updates):
        try:
            if key in ALIASES:
                key, fn = ALIASES[key]
                value = fn(value)
            if key == "method":  # a preset name: its label here, its parts and set in the base
                key = "method.name"
            flat[key] = _lookup(key).coerce(value)
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}" if source else str(e)) from None


def _defaults() -> dict[str, Any]:
    return {k.dotted: k.coerce(k.default) if k.default is not None else None for k in parts.all_keys()}


def _validated(flat: dict[str, Any]) -> Config:
    """Cross-key checks of the chosen parts (each part's ``check(cfg)``), then freeze."""
    cfg = Config(flat)
    for kind in PART_KEYS:
        cls = parts.get(kind, cfg.method[kind])
        check = getattr(cls, "check", None)
        if check is not None:
            check(cfg)
    return cfg


def parse_set(item: str) -> tuple[str, Any]:
    """Parse one ``key=value`` (value in YAML syntax: 0.1, true, [0.5, 0.75], null)."""
    if "=" not in item:
        raise ConfigError(f"--set expects key=value, got '{item}' (e.g. --set attack.eps=0.1)")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def preset_names() -> list[str]:
    files = resources.files("dorat").joinpath("configs")
    return sorted(p.name[:-5] for p in files.iterdir() if p.name.endswith(".yaml")
                  and p.name != "methods.yaml")


def load_yaml(name_or_path: str) -> tuple[dict[str, Any], str]:
    """Read a config preset by name (``fmnist-demo``) or a YAML file by path."""
    path = Path(name_or_path)
    if path.is_file():
        text, source = path.read_text(), str(path)
    else:
        res = resources.files("dorat").joinpath("configs", f"{name_or_path}.yaml")
        if not res.is_file() or name_or_path == "methods":
            raise ConfigError(f"config '{name_or_path}' is neither a file nor a preset; "
                              f"presets: {', '.join(preset_names())}")
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


def _layer_get(layer: Mapping[str, Any], key: str) -> Any:
    """A dotted or nested key's value in a raw layer (None when absent)."""
    flat = dict(_flatten(layer)) if isinstance(layer, Mapping) else {}
    return flat.get(key)


def resolve(config: str | None = None, flags: Mapping[str, Any] | None = None,
            sets: list[str] | None = None, overrides: Mapping[str, Any] | None = None) -> Config:
    """Build the validated, frozen config from a YAML file or preset, CLI flags (None = not
    given), ``--set`` items and ``overrides`` (dotted keys, applied last, None = null)."""
    layers: list[tuple[Mapping[str, Any], str | None]] = []
    if config:
        data, source = load_yaml(config)
        layers.append((data, source))
    layers.append(({k: v for k, v in (flags or {}).items() if v is not None}, None))
    layers.append((dict(parse_set(s) for s in sets or []), None))
    layers.append((dict(overrides or {}), None))
    return _resolve_layers(layers)


def from_dict(data: Mapping[str, Any], source: str) -> Config:
    """A config from a complete or partial mapping (e.g. a saved config.yaml)."""
    return _resolve_layers([(data, source)])


def _resolve_layers(layers: list[tuple[Mapping[str, Any], str | None]]) -> Config:
    for data, source in layers:
        if not isinstance(data, Mapping):
            raise ConfigError(f"{source}: expected a mapping of config keys, got {type(data).__name__}")
    plugins: list[str] = []
    for data, _ in layers:
        p = _layer_get(data, "plugins")
        plugins += [p] if isinstance(p, str) else list(p or [])
    parts.load_plugins(plugins)
    _ensure_parts()
    # The preset: the last layer naming one (``method: done`` or ``method.name``) wins.
    name = "at"
    for data, _ in layers:
        for key in ("method", "method.name"):
            v = _layer_get(data, key)
            if isinstance(v, str):
                name = v
    explicit_name = any(_layer_get(d, "method.name") is not None for d, _ in layers)
    preset = get_preset(name) if not explicit_name or name in presets() else None
    flat = _defaults()
    if preset is not None:
        base = {"method.name": name, **{f"method.{k}": v for k, v in preset.parts.items()},
                **preset.set}
        _merge(flat, base, f"method preset {name}")
    for data, source in layers:
        _merge(flat, data, source)
    chosen = {k: flat[f"method.{k}"] for k in PART_KEYS}
    if preset is not None and not explicit_name and chosen != preset.parts:
        flat["method.name"] = "×".join(v for k, v in chosen.items() if k != "hypergrad" or v != "none")
    return _validated(flat)


def dump(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False, default_flow_style=None)


def describe_keys() -> list[str]:
    """`dorat train --list-keys`: every key with its type, default and one-line help."""
    lines = []
    for k in parts.all_keys():
        default = k.coerce(k.default) if k.default is not None else None
        lines.append(f"{k.dotted}: {k.type_name} = {default!r}" + (f"  # {k.help}" if k.help else ""))
    return lines
