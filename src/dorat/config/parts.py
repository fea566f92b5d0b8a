"""Typed config sections and the registry of parts (attacks, losses, weightings, models, ...).

A *section* is a dataclass whose fields are config keys: ``DataConfig`` is ``data.*``, and a
part's own fields are its section (``GAIRATWeighting.lam`` is ``gairat.lam``). Each field is
declared with :func:`opt` (default, one-line help, optional check or choices); its type comes
from the annotation. The section of a class is its ``section`` class attribute, else the name
it is registered under; a subclass that adds fields puts them in its own section and inherits
its parents' (FAT's attack reads ``attack.*`` and ``fat.*``).

Parts are registered by kind and name: ``@register("weighting", "my-weights")`` on a
dataclass, from dorat itself or from a plug-in. Plug-ins are imported from the entry-point
group ``dorat.parts`` (found once, at first use), from ``--plugin MODULE`` / the config key
``plugins``, or registered in code with :func:`register`. An unknown name is a ConfigError
that lists every registered name, plug-ins included.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from dorat.errors import ConfigError

KINDS = ("attack", "loss", "weighting", "hypergrad", "model")
ENTRY_POINTS = "dorat.parts"

Check = Callable[[Any], "str | None"]


def opt(default: Any, help: str = "", check: Check | None = None,
        choices: tuple[str, ...] | None = None, kind: str | None = None) -> Any:
    """A config field: ``x: float = opt(0.1, "what it is", positive)``."""
    meta = {"help": help, "check": check, "choices": choices, "kind": kind}
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


# -- checks used by many sections ------------------------------------------------------------

def positive(v: Any) -> str | None:
    return None if v > 0 else "must be > 0"


def nonneg(v: Any) -> str | None:
    return None if v >= 0 else "must be >= 0"


def seed_value(v: Any) -> str | None:
    """Seeds are mixed into 64-bit generator seeds (seed * 1_000_003 + salt): keep them 32-bit."""
    return None if 0 <= v < 2**32 else "must be in [0, 2^32 - 1]"


def unit(v: Any) -> str | None:
    return None if 0 <= v <= 1 else "must be in [0, 1]"


def warmup_epochs(value: int | str, epochs: int) -> int:
    """The one warm-up convention of every weighting: ``value`` is a number of epochs (int) or
    a share of the run (``"50%"``, or a float in (0, 1)), rounded to whole epochs:
    round(share · epochs)."""
    value = _warmup(value)
    if isinstance(value, str):
        return int(round(float(value[:-1]) / 100 * epochs))
    return int(value)


def _warmup(value: Any) -> Any:
    """Coerce a warm-up: an int of epochs, or 'N%' of the run (a float in [0, 1) = a share)."""
    if isinstance(value, bool):
        raise ValueError
    if isinstance(value, float):
        if value.is_integer():
            return int(value)
        if 0 < value < 1:
            return f"{100 * value:g}%"
        raise ValueError
    if isinstance(value, int):
        if value < 0:
            raise ValueError
        return value
    if isinstance(value, str) and value.strip().endswith("%"):
        share = float(value.strip()[:-1])
        if not 0 <= share <= 100:
            raise ValueError
        return f"{share:g}%" if share else 0  # no share is no epoch: one spelling
    raise ValueError


@dataclass(frozen=True)
class Key:
    """One config key: its section, name, type, default, help and check."""

    section: str
    name: str
    kind: str  # int | float | bool | str | list[float] | list[str] | warmup | any
    default: Any
    optional: bool = False
    help: str = ""
    check: Check | None = None
    choices: tuple[str, ...] | None = None
    owner: str = ""  # the class that declares it (module:qualname)

    @property
    def dotted(self) -> str:
        return f"{self.section}.{self.name}" if self.section else self.name

    @property
    def type_name(self) -> str:
        t = "|".join(self.choices) if self.choices else {"warmup": "epochs|N%"}.get(self.kind, self.kind)
        return f"{t} | null" if self.optional else t

    def coerce(self, value: Any) -> Any:
        """The value as this key's type, checked; a ConfigError names the key."""
        key = self.dotted
        if value is None:
            if self.optional:
                return None
            raise ConfigError(f"config key '{key}' cannot be empty (null); give a {self.kind} value")
        try:
            out = _COERCE[self.kind](value)
        except (TypeError, ValueError):
            what = "a finite number" if self.kind == "float" and _nonfinite(value) else self.type_name
            raise ConfigError(f"config key '{key}' must be {what}, got {value!r}") from None
        if self.choices and out not in self.choices:
            raise ConfigError(f"config key '{key}' must be one of {', '.join(self.choices)}, "
                              f"got {value!r}")
        problem = self.check(out) if self.check else None
        if problem:
            raise ConfigError(f"config key '{key}' {problem}, got {value!r}")
        return out


def _nonfinite(v: Any) -> bool:
    try:
        return not math.isfinite(float(v))
    except (TypeError, ValueError):
        return False


def _int(v: Any) -> int:
    if isinstance(v, bool) or (isinstance(v, float) and not v.is_integer()):
        raise ValueError
    return int(v)


def _float(v: Any) -> float:
    if isinstance(v, bool):
        raise ValueError
    out = float(v)
    if not math.isfinite(out):
        raise ValueError
    return out


def _bool(v: Any) -> bool:
    if not isinstance(v, bool):
        raise ValueError
    return v


def _str(v: Any) -> str:
    if isinstance(v, bool):  # YAML 1.1 reads on/off/yes/no as booleans
        return "on" if v else "off"
    if not isinstance(v, str):
        raise ValueError
    return v


def _list(item: Callable[[Any], Any], split: bool) -> Callable[[Any], list[Any]]:
    def coerce(v: Any) -> list[Any]:
        if split and isinstance(v, str):
            v = [s for s in v.split(",") if s]
        if isinstance(v, (int, float, str)):
            v = [v]
        return [item(x) for x in v]

    return coerce


_COERCE: dict[str, Callable[[Any], Any]] = {
    "int": _int, "float": _float, "bool": _bool, "str": _str, "warmup": _warmup,
    "list[float]": _list(_float, False), "list[str]": _list(str, True), "any": lambda v: v,
}
_TYPES = {int: "int", float: "float", bool: "bool", str: "str"}


def _kind_of(tp: Any) -> tuple[str, bool]:
    """(kind, optional) from a field's type annotation."""
    optional = False
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        optional = len(args) < len(typing.get_args(tp))
        tp = args[0] if len(args) == 1 else Any
    if typing.get_origin(tp) is list:
        (item,) = typing.get_args(tp)
        return f"list[{_TYPES.get(item, 'str')}]", optional
    return _TYPES.get(tp, "any"), optional


# -- sections --------------------------------------------------------------------------------

SECTIONS: dict[str, dict[str, Key]] = {}  # section name ("" = top level) -> keys
_OWNERS: dict[str, str] = {}  # section name -> the class that declares it
REGISTRY: dict[str, dict[str, Any]] = {k: {} for k in KINDS}


def _qualname(cls: Any) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


def own_fields(cls: type) -> list[dataclasses.Field]:
    """The dataclass fields ``cls`` itself declares (not inherited), config fields only."""
    own = cls.__dict__.get("__annotations__", {})
    return [f for f in dataclasses.fields(cls) if f.name in own and f.init]


def _declare(cls: type, section: str) -> None:
    """Record the keys ``cls`` declares in ``section`` (one class owns a section)."""
    owner = _qualname(cls)
    if _OWNERS.get(section, owner) != owner:
        raise ConfigError(f"config section '{section or '(top level)'}' is declared by "
                          f"{_OWNERS[section]} already; give {owner} another `section`")
    hints = typing.get_type_hints(cls)
    keys: dict[str, Key] = {}
    for f in own_fields(cls):
        kind, optional = _kind_of(hints[f.name])
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        keys[f.name] = Key(section, f.name, f.metadata.get("kind") or kind, default, optional,
                           f.metadata.get("help", ""), f.metadata.get("check"),
                           f.metadata.get("choices"), owner)
    _OWNERS[section] = owner
    SECTIONS[section] = keys


def section(name: str) -> Callable[[type], type]:
    """Class decorator: a dataclass whose fields are the config section ``name``."""
    def deco(cls: type) -> type:
        cls.section = name  # type: ignore[attr-defined]
        _declare(cls, name)
        return cls

    return deco


def field_sections(cls: type) -> dict[str, str]:
    """Each config field of a part class -> the section it is read from."""
    out: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        fields = own_fields(klass)
        if fields:
            sec = klass.__dict__.get("section") or getattr(klass, "_dorat_name", None)
            if sec is None:
                raise ConfigError(f"{_qualname(klass)} declares config fields but no `section`")
            for f in fields:
                out[f.name] = sec
    return out


def register(kind: str, name: str | None = None, obj: Any = None, *, replace: bool = False) -> Any:
    """Register a part: ``@register("weighting", "my-weights")`` on a dataclass, or
    ``register("model", "my-net", factory)`` for a model factory (in_channels, size, classes)."""
    if kind not in KINDS:
        raise ConfigError(f"unknown part kind '{kind}'; one of {', '.join(KINDS)}")

    def add(o: Any) -> Any:
        nm = name or getattr(o, "name", None)
        if not isinstance(nm, str) or not nm:
            raise ConfigError(f"register({kind!r}, ...) needs a name for {o!r}")
        old = REGISTRY[kind].get(nm)
        if old is not None and old is not o and not replace and _qualname(old) != _qualname(o):
            raise ConfigError(f"a {kind} named '{nm}' is registered already ({_qualname(old)}); "
                              "choose another name or pass replace=True")
        if kind != "model":
            if not dataclasses.is_dataclass(o):
                raise ConfigError(f"the {kind} '{nm}' must be a dataclass (its fields are its "
                                  "config section)")
            if "_dorat_name" not in o.__dict__:
                o._dorat_name = nm
            for klass in o.__mro__:  # every class that declares fields owns its section
                if dataclasses.is_dataclass(klass) and own_fields(klass):
                    sec = klass.__dict__.get("section") or klass.__dict__.get("_dorat_name")
                    if sec is not None and _OWNERS.get(sec) != _qualname(klass):
                        _declare(klass, sec)
            field_sections(o)
            o.name = nm
        REGISTRY[kind][nm] = o
        return o

    return add(obj) if obj is not None else add


_plugins_loaded: set[str] = set()
_entry_points_loaded = False


def load_plugins(modules: list[str] | tuple[str, ...] = ()) -> None:
    """Import the entry points of group ``dorat.parts`` (once) and the named modules."""
    global _entry_points_loaded
    if not _entry_points_loaded:
        _entry_points_loaded = True
        from importlib.metadata import entry_points

        for ep in entry_points(group=ENTRY_POINTS):
            try:
                ep.load()
            except Exception as e:  # noqa: BLE001  a broken plug-in is the user's to fix
                raise ConfigError(f"plug-in entry point '{ep.name}' ({ep.value}) of group "
                                  f"{ENTRY_POINTS} failed to load: {type(e).__name__}: {e}") from None
    for m in modules:
        if m in _plugins_loaded:
            continue
        try:
            importlib.import_module(m)
        except ModuleNotFoundError as e:
            raise ConfigError(f"plug-in module '{m}' cannot be imported ({e}); put it on "
                              "PYTHONPATH or install it") from None
        except ConfigError as e:  # e.g. a name it registers is taken
            raise ConfigError(f"plug-in module '{m}': {e}") from None
        except (Exception, SystemExit) as e:  # noqa: BLE001  its code ran: anything may come out
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            raise ConfigError(f"plug-in module '{m}' failed while being imported ({type(e).__name__}"
                              f"{': ' + first if first else ''}); fix the module") from None
        _plugins_loaded.add(m)


def get(kind: str, name: str) -> Any:
    """The part registered as ``name`` of ``kind``; a ConfigError lists the registered ones."""
    load_plugins()
    table = REGISTRY[kind]
    if name not in table:
        key = "model" if kind == "model" else f"method.{kind}"
        raise ConfigError(f"unknown {kind} '{name}' ({key}); registered: {', '.join(table)}")
    return table[name]


def names(kind: str) -> list[str]:
    load_plugins()
    return list(REGISTRY[kind])


def build(kind: str, name: str, cfg: Any) -> Any:
    """An instance of the part ``name``, its fields read from ``cfg``'s sections."""
    cls = get(kind, name)
    return cls(**{f: cfg.get(f"{sec}.{f}") for f, sec in field_sections(cls).items()})


__all__ = ["KINDS", "Key", "opt", "section", "register", "get", "names", "build", "load_plugins",
           "warmup_epochs", "positive", "nonneg", "unit", "SECTIONS", "REGISTRY"]
