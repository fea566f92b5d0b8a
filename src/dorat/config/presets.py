"""Method presets as data: a name for a composition attack × loss × weighting (+ hypergradient)
and the keys it sets, from configs/methods.yaml or a plug-in's ``register_preset``. A preset
changes the method and nothing else: it may set keys of its own parts only (config.py checks).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import yaml

from dorat.config import parts
from dorat.errors import ConfigError


@dataclass(frozen=True)
class Preset:
    name: str
    attack: str
    loss: str
    weighting: str
    hypergrad: str = "none"
    help: str = ""
    set: Mapping[str, Any] = field(default_factory=dict)  # dotted keys of its own parts

    @property
    def parts(self) -> dict[str, str]:
        return {"attack": self.attack, "loss": self.loss, "weighting": self.weighting,
                "hypergrad": self.hypergrad}


PRESETS: dict[str, Preset] = {}
_BUILTIN: list[bool] = []
PART_KEYS = ("attack", "loss", "weighting", "hypergrad")


def register_preset(name: str, attack: str, loss: str, weighting: str, hypergrad: str = "none",
                    help: str = "", set: Mapping[str, Any] | None = None, *,
                    replace: bool = False) -> Preset:
    """Add a method preset: a name for parts + config overrides (dotted keys). A name taken by
    another preset (a built-in one too) is refused unless ``replace=True``, as for parts; the
    same preset registered again (a plug-in imported twice) is fine."""
    _load_presets()
    p = Preset(name, attack, loss, weighting, hypergrad, help, dict(set or {}))
    old = PRESETS.get(name)
    if old is not None and old != p and not replace:
        raise ConfigError(f"a method preset named '{name}' exists already ({old.attack} × {old.loss} × "
                          f"{old.weighting}); choose another name or pass replace=True")
    PRESETS[name] = p
    return p


def _load_presets() -> None:
    """The built-in presets (configs/methods.yaml), once; plug-ins may add their own."""
    if _BUILTIN:
        return
    _BUILTIN.append(True)
    text = resources.files("dorat").joinpath("configs", "methods.yaml").read_text()
    for name, row in yaml.safe_load(text).items():
        PRESETS.setdefault(name, Preset(name, **row))


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


SHARED_SECTIONS = ("attack",)  # the threat model: read by every attack, the same for all methods


def part_sections(parts_of: Mapping[str, str]) -> set[str]:
    """The config sections a method's own parts read (their fields' sections and what they
    declare in ``reads``), the shared threat model excluded."""
    out: set[str] = set()
    for kind in PART_KEYS:
        cls = parts.get(kind, parts_of[kind])
        out |= set(parts.field_sections(cls).values()) | set(getattr(cls, "reads", ()))
    return out - set(SHARED_SECTIONS)
