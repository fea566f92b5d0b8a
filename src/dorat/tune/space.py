"""`dorat tune`'s language: the search space (``--space``), validation metrics (``--objective``)
and constraints (``--constraint``), parsed and checked against the base config."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from dorat import config as cfglib
from dorat.errors import ConfigError

GROUPS = ("sa", "ra", "worst_class", "tail30")


@dataclass(frozen=True)
class Param:
    """One ``--space`` entry: a config key and its distribution."""

    key: str
    kind: str  # float | int | categorical
    low: float = 0.0
    high: float = 0.0
    log: bool = False
    choices: tuple[Any, ...] = ()

    def suggest(self, trial: Any) -> Any:
        if self.kind == "categorical":
            return trial.suggest_categorical(self.key, list(self.choices))
        if self.kind == "int":
            return trial.suggest_int(self.key, int(self.low), int(self.high), log=self.log)
        return trial.suggest_float(self.key, self.low, self.high, log=self.log)

    def describe(self) -> str:
        if self.kind == "categorical":
            return ",".join(map(str, self.choices))
        return f"{'int:' if self.kind == 'int' else ''}{'log:' if self.log else ''}{self.low:g}:{self.high:g}"


def _full_key(key: str, base: cfglib.Config | None = None) -> str:
    """A config key; a bare name that is not a top-level key stands for the one section key
    with that name, the base method's own first (``r`` is ``done.r`` for DONE, ``faal.r`` for
    FAAL)."""
    keys = cfglib.all_keys()
    if key in keys or "." in key:
        return key
    matches = [k for k in keys if k.rpartition(".")[2] == key]
    if len(matches) > 1 and base is not None:
        own = cfglib.part_sections(base.method)
        mine = [k for k in matches if k.rpartition(".")[0] in own]
        matches = mine or matches
    if len(matches) == 1:
        return matches[0]
    if len(matches) > 1:
        raise ConfigError(f"--space key '{key}' is ambiguous ({', '.join(matches)}); give the full key")
    return key  # unknown: the config's own error names it


_SPACE = re.compile(r"^(?:(int):)?(?:(log):)?([^:]+):([^:]+)$")


def parse_space(item: str, base: cfglib.Config) -> Param:
    """``KEY=log:LOW:HIGH``, ``KEY=LOW:HIGH``, ``KEY=int:LOW:HIGH`` (``int:log:``) or
    ``KEY=A,B,C``; each bound or choice is validated as a value of the key."""
    key, sep, spec = item.partition("=")
    if not sep or not key.strip() or not spec.strip():
        raise ConfigError(f"--space '{item}' must be KEY=SPEC, e.g. r=log:0.25:16, done.beta=0.05:0.8, "
                          "epochs=int:4:12 or method.attack=pgd,trades")
    key, spec = _full_key(key.strip(), base), spec.strip()
    m = _SPACE.match(spec)
    if m and "," not in spec:
        kind = "int" if m.group(1) else "float"
        try:
            low, high = (int(m.group(3)), int(m.group(4))) if kind == "int" else \
                (float(m.group(3)), float(m.group(4)))
        except ValueError:
            log = m.group(2) or m.group(3) in ("log", "int")
            form = f"{'int:' if kind == 'int' else ''}{'log:' if log else ''}LOW:HIGH"
            what = "integer" if kind == "int" else "number"
            raise ConfigError(f"--space '{item}': a range is {form} with {what} bounds, e.g. "
                              f"{key.rpartition('.')[2]}=log:0.25:16; got '{spec}'") from None
        if not (math.isfinite(low) and math.isfinite(high)) or not low < high:
            raise ConfigError(f"--space '{item}': need LOW < HIGH, got {low:g} and {high:g}")
        if m.group(2) and low <= 0:
            raise ConfigError(f"--space '{item}': a log range needs LOW > 0, got {low:g}")
        p = Param(key, kind, low, high, bool(m.group(2)))
        values: list[Any] = [low, high]
    else:
        if ":" in spec:
            raise ConfigError(f"--space '{item}': write a range as [int:][log:]LOW:HIGH (e.g. "
                              "log:0.25:16) and choices as A,B,C")
        values = [cfglib.parse_set(f"x={v.strip()}")[1] for v in spec.split(",")]
        if len(values) < 2 or len(set(map(repr, values))) != len(values):
            raise ConfigError(f"--space '{item}': give two or more different choices, A,B,C")
        p = Param(key, "categorical", choices=tuple(values))
    for v in values:  # each end of the range (and each choice) must be a valid value of the key
        try:
            base.replace({key: v})
        except ConfigError as e:
            raise ConfigError(f"--space '{item}': {e}") from None
    return p


# --- metrics, objective and constraints ---------------------------------------------------------

@dataclass(frozen=True)
class Metric:
    """A validation metric, ``val.sa`` or ``val.GROUP.KIND`` (GROUP: ra, worst_class, tail30;
    KIND: clean, an attack of eval.attacks, or worst), in %; ``REF.val...`` names the same metric
    of a reference method's run."""

    group: str
    kind: str | None
    ref: str | None = None

    def __str__(self) -> str:
        ref, kind = f"{self.ref}." if self.ref else "", f".{self.kind}" if self.kind else ""
        return f"{ref}val.{self.group}{kind}"

    def value(self, metrics: dict[str, Any]) -> float:
        v = metrics[self.group] if self.kind is None else metrics[self.group][self.kind]
        return 100.0 * float(v)

    @property
    def probe_key(self) -> str | None:
        """The per-epoch probe's (PGD on a validation subset) version of this metric, if any."""
        if self.group == "sa":
            return "val_sa"
        return None if self.kind == "clean" else f"val_{self.group}_pgd"


def parse_metric(text: str, attacks: Sequence[str], what: str, ref_ok: bool = False) -> Metric:
    parts = text.strip().split(".")
    ref = None
    if ref_ok and len(parts) >= 2 and parts[0] != "val":
        ref, parts = parts[0], parts[1:]
    kinds = ["clean", *attacks] + (["worst"] if len(attacks) > 1 else [])
    ok = (len(parts) == 2 and parts[1] == "sa") or (
        len(parts) == 3 and parts[1] in GROUPS[1:] and parts[2] in kinds and not (
            parts[1] == "ra" and parts[2] == "clean"))
    if not ok or parts[0] != "val":
        examples = ", ".join(["val.sa", *(f"val.ra.{k}" for k in kinds[1:]), f"val.worst_class.{kinds[1]}",
                              f"val.tail30.{kinds[-1]}"])
        raise ConfigError(f"{what} '{text}' is not a validation metric of this config; one of "
                          f"{examples} (eval.attacks: {','.join(attacks)})")
    if ref is not None:
        from dorat.config.presets import presets

        if ref not in presets():
            raise ConfigError(f"{what} '{text}': '{ref}' is not a method preset (the reference "
                              "run's method, e.g. at.val.sa)")
    return Metric(parts[1], parts[2] if len(parts) == 3 else None, ref)


_CONSTRAINT = re.compile(r"^\s*(\S+)\s*(>=|<=|>|<)\s*(\S+?)\s*(?:([+-])\s*([0-9.]+))?\s*$")


@dataclass(frozen=True)
class Constraint:
    """``LHS OP RHS [+- NUMBER]``: LHS a metric of the trial, RHS a number or a metric (of the
    trial or of a reference method's run); Optuna's value is <= 0 when it holds."""

    text: str
    lhs: Metric
    op: str
    rhs: Metric | float
    offset: float

    def value(self, metrics: dict[str, Any], refs: dict[str, dict[str, Any]]) -> float:
        left = self.lhs.value(metrics)
        if isinstance(self.rhs, Metric):
            right = self.rhs.value(refs[self.rhs.ref] if self.rhs.ref else metrics)
        else:
            right = self.rhs
        right += self.offset
        return right - left if self.op.startswith(">") else left - right


def parse_constraint(text: str, attacks: Sequence[str]) -> Constraint:
    m = _CONSTRAINT.match(text)
    if not m:
        raise ConfigError(f"--constraint '{text}' must be METRIC OP VALUE, e.g. \"val.sa >= at.val.sa - 1\" "
                          "or \"val.ra.pgd > 60\"")
    lhs = parse_metric(m.group(1), attacks, "--constraint")
    try:
        rhs: Metric | float = float(m.group(3))
    except ValueError:
        rhs = parse_metric(m.group(3), attacks, "--constraint", ref_ok=True)
    offset = float(m.group(5) or 0) * (-1 if m.group(4) == "-" else 1)
    return Constraint(text.strip(), lhs, m.group(2), rhs, offset)


