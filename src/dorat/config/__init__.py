"""Run configuration: typed sections, presets as data, one validation, a frozen result.

A run is fully described by its resolved config (saved as RUN_DIR/config.yaml). Layers, later
wins: the section defaults < the method preset (``method: done`` names a row of
configs/methods.yaml: its parts and overrides) < the YAML file (``--config``) < CLI flags <
``--set key=value`` < ``overrides``. The keys are the fields of the sections in this module
and of the registered parts (dorat.config.parts), so a typo is an error, never a silently ignored
setting; renamed keys of older versions are read as their new names (``ALIASES``).

Submodules: ``parts`` (the registry of parts and sections), ``presets`` (configs/methods.yaml),
``sections`` (the run's own sections), ``yamlfile`` (strict YAML reading). Imports: attacks
(the names of the evaluation attacks), errors. The built-in parts register themselves when
imported; this layer names them in ``BUILTIN_PARTS`` without importing them
(tests/test_layers.py).
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Iterable, Iterator, Mapping
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from dorat.config import parts
from dorat.config.presets import (  # noqa: F401  (re-exported: the config's API)
    PART_KEYS,
    PRESETS,
    SHARED_SECTIONS,
    Preset,
    get_preset,
    method_names,
    part_sections,
    presets,
    register_preset,
)
from dorat.config.yamlfile import DuplicateKey, read_text_file, safe_load  # noqa: F401
from dorat.errors import ConfigError

# The modules whose import registers the built-in parts and sections. The config layer sits
# below them (tests/test_layers.py) and knows them by name only, as it knows plug-ins: each
# registers itself into dorat.config.parts when imported.
BUILTIN_PARTS = ("dorat.config.sections",  # the run's own sections (data, optim, eval, ...)
                 "dorat.models",           # the model names
                 "dorat.objectives",       # attacks, losses, weightings
                 "dorat.evaluation.probe")  # the val section


def _ensure_parts() -> None:
    for name in BUILTIN_PARTS:
        importlib.import_module(name)


# -- renamed keys ----------------------------------------------------------------------------

def _same(v: Any, flat: dict[str, Any]) -> Any:
    return v


def _share(v: Any, flat: dict[str, Any]) -> Any:
    """An old burn-in (a fraction of the epochs) as the warm-up convention's share, 'N%'."""
    return f"{100 * v:g}%" if isinstance(v, (int, float)) and not isinstance(v, bool) else v


_OLD_DONE = ("done", "done-cid", "done-class")  # the presets that read done.lower, done.hypergrad


def _if_done(v: Any, flat: dict[str, Any]) -> Any:
    """done.lower and done.hypergrad acted only in these presets; elsewhere they were ignored."""
    return v if flat.get("method.name") in _OLD_DONE else _IGNORED


_IGNORED = object()

# old dotted key -> (new dotted key, value map). Older config.yaml files and --set still work.
ALIASES: dict[str, tuple[str, Any]] = {
    "done.lower": ("method.attack", _if_done),
    "done.hypergrad": ("method.hypergrad", _if_done),
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


# -- the frozen config -----------------------------------------------------------------------

class Section(Mapping[str, Any]):
    """A read-only config section: ``cfg.attack.eps`` or ``cfg.attack["eps"]``."""

    __slots__ = ("_name", "_values")

    def __init__(self, name: str, values: dict[str, Any]) -> None:
        object.__setattr__(self, "_name", name)
        object.__setattr__(self, "_values", values)

    def __reduce__(self) -> tuple[Any, ...]:
        """Pickled as it is (a worker process or a Slurm job gets the very same config), without
        re-resolving it: a plug-in's section need not be registered to unpickle it."""
        return (_restore, (type(self), self._name, self._values))

    def __getattr__(self, key: str) -> Any:
        if key.startswith("__") or key in Section.__slots__:  # not set yet (copy, pickle)
            raise AttributeError(key)
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


def _restore(cls: type, name: str, values: dict[str, Any]) -> Section:
    _ensure_parts()  # a fresh process: the registry that replace() and validation read
    obj = object.__new__(cls)
    object.__setattr__(obj, "_name", name)
    object.__setattr__(obj, "_values", values)
    return obj


def _freeze(v: Any) -> Any:
    return tuple(v) if isinstance(v, list) else v


RUN_SECTIONS = ("", "method", "data", "optim", "eval", "val", "log", "perf")  # first in config.yaml


class Config(Section):
    """The resolved, validated, frozen config of a run: ``cfg.seed``, ``cfg.attack.eps``,
    ``cfg.section("my-part").x``, ``cfg.get("done.r")``; ``replace`` gives a new one."""

    def __init__(self, flat: dict[str, Any]) -> None:
        tree: dict[str, Any] = {}
        for sec in ordered_sections():
            keys = parts.SECTIONS[sec]
            if sec == "":
                tree.update({k: _freeze(flat[k]) for k in keys})
            else:
                tree[sec] = Section(sec, {k: _freeze(flat[f"{sec}.{k}"]) for k in keys})
        super().__init__("", tree)

    def section(self, name: str) -> Section:
        return self._values[name]

    def get(self, dotted: str, default: Any = None) -> Any:  # type: ignore[override]
        sec, _, key = dotted.rpartition(".")
        node = self._values.get(sec) if sec else self
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
    return [k.dotted for k in ordered_keys()]


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
                value = fn(value, flat)
                if value is _IGNORED:
                    continue
            if key == "method":  # a preset name: its label here, its parts and set in the base
                key = "method.name"
            flat[key] = _lookup(key).coerce(value)
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}" if source else str(e)) from None


def ordered_sections() -> list[str]:
    """The run's own sections first, then the parts' (in registration order)."""
    _ensure_parts()
    first = [s for s in RUN_SECTIONS if s in parts.SECTIONS]
    return first + [s for s in parts.SECTIONS if s not in RUN_SECTIONS]


def ordered_keys() -> list[parts.Key]:
    return [k for sec in ordered_sections() for k in parts.SECTIONS[sec].values()]


def _defaults() -> dict[str, Any]:
    return {k.dotted: k.coerce(k.default) if k.default is not None else None for k in ordered_keys()}


def _validated(flat: dict[str, Any]) -> Config:
    """Cross-key checks of the chosen parts (each part's ``check(cfg)``), then freeze."""
    cfg = Config(flat)
    for kind in PART_KEYS:
        cls = parts.get(kind, cfg.method[kind])
        check = getattr(cls, "check", None)
        if check is not None:
            check(cfg)
    return cfg


def _check_preset(preset: Preset) -> None:
    """A preset changes the method and nothing else: it sets keys of its own parts only."""
    own = part_sections(preset.parts)
    bad = [k for k in preset.set if (ALIASES.get(k, (k,))[0]).rpartition(".")[0] not in own]
    if bad:
        raise ConfigError(f"method preset '{preset.name}' sets {', '.join(bad)}, outside its own "
                          f"parts ({', '.join(sorted(own)) or 'none'}); presets change the method only")


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
        text, source = read_text_file(path, "config file"), str(path)
    else:
        res = resources.files("dorat").joinpath("configs", f"{name_or_path}.yaml")
        if not res.is_file() or name_or_path == "methods":
            raise ConfigError(f"config '{name_or_path}' is neither a file nor a preset; "
                              f"presets: {', '.join(preset_names())}")
        text, source = res.read_text(), f"preset {name_or_path}"
    return parse_yaml(text, source), source


def parse_yaml(text: str, source: str) -> Any:
    """``safe_load`` with one clear error naming the file, line and column."""
    try:
        return safe_load(text) or {}
    except DuplicateKey as e:
        raise ConfigError(f"{source}: {e}") from None
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
        _check_preset(preset)
        base = {"method.name": name, **{f"method.{k}": v for k, v in preset.parts.items()},
                **preset.set}
        _merge(flat, base, f"method preset {name}")
    for data, source in layers:
        _merge(flat, data, source)
    _absolute_paths(flat)
    chosen = {k: flat[f"method.{k}"] for k in PART_KEYS}
    if preset is not None and not explicit_name and chosen != preset.parts:
        flat["method.name"] = "×".join(v for k, v in chosen.items() if k != "hypergrad" or v != "none")
    return _validated(flat)


def _absolute_paths(flat: dict[str, Any]) -> None:
    """Data paths as absolute paths, so the saved config reopens the run from any directory."""
    ds = flat["dataset"]
    for prefix in ("npz:", "imagefolder:"):
        path = Path(ds[len(prefix):]).expanduser()
        if ds.startswith(prefix) and not path.is_absolute():
            flat["dataset"] = f"{prefix}{path.resolve()}"
    if flat["init"] is not None:
        flat["init"] = str(Path(flat["init"]).expanduser().resolve())
    if flat["data.dir"] is not None:
        flat["data.dir"] = str(Path(flat["data.dir"]).expanduser().resolve())


def dump(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False, default_flow_style=None)


def describe_keys() -> list[str]:
    """`dorat train --list-keys`: every key with its type, default and one-line help."""
    lines = []
    for k in ordered_keys():
        default = k.coerce(k.default) if k.default is not None else None
        lines.append(f"{k.dotted}: {k.type_name} = {default!r}" + (f"  # {k.help}" if k.help else ""))
    return lines
