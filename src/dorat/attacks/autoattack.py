"""AutoAttack (Croce & Hein, 2020) behind one small adapter.

The evaluator needs one thing from AutoAttack: for each example, is the model still correct on
the adversarial example AutoAttack found. Two packages provide it with different APIs:

* ``pyautoattack`` (PyPI, a dorat dependency): ``AutoAttack(model, *, eps, norm, seed, version,
  device)`` and ``run_standard_evaluation(x, y, /, *, batch_size)`` returning ``(x_adv, y_adv)``;
* ``autoattack`` (the authors' git package): ``AutoAttack(model, norm, eps, seed, verbose,
  version, device)`` and ``run_standard_evaluation(x, y, bs)`` returning ``x_adv``.

The official settings are used unchanged (version ``standard``: APGD-CE, APGD-T with 9 target
classes, FAB-T with 9 target classes, Square with 5,000 queries; 100 iterations). ``budget``
shrinks iterations and queries for tests only; results produced with it are not AutoAttack
numbers and the evaluator records the budget next to them.

AutoAttack reseeds torch's global generator; the adapter restores it afterwards, so running an
evaluation does not change what a later seeded computation in the same process draws.

The model's parameters do not require grad while AutoAttack runs (restored afterwards): its
gradient attacks (APGD, FAB) only need input gradients, and every backward they call would
otherwise also compute, and accumulate in ``.grad``, the weight gradients. Same adversarial
examples, less work, and no stale ``.grad`` left on the model. The time saved is small at the
official settings, where the forward-only Square attack takes much of the time (1.05x on the
small CNN, within the noise: docs/PERFORMANCE.md, benchmarks/autoattack.py).
"""

from __future__ import annotations

import contextlib
import inspect
import logging
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn as nn

from dorat.attacks.core import frozen
from dorat.errors import ConfigError

VERSIONS = ("standard", "plus", "rand")
NORMS = {"linf": "Linf", "l2": "L2"}


def _import() -> tuple[Any, str]:
    try:
        from pyautoattack import AutoAttack  # type: ignore[import-not-found]
        return AutoAttack, "pyautoattack"
    except ImportError:
        pass
    try:
        from autoattack import AutoAttack  # type: ignore[import-not-found]
        return AutoAttack, "autoattack"
    except ImportError:
        raise ConfigError(
            "AutoAttack ('aa') needs the package pyautoattack: pip install pyautoattack "
            "(or the authors' git package `autoattack`)") from None


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        msg = " ".join(record.getMessage().split())
        if msg not in self.messages:
            self.messages.append(msg)


@contextlib.contextmanager
def _quiet(warnings_out: list[str]) -> Iterator[None]:
    """Silence AutoAttack's own logging and collect its warnings (randomised model, ...)."""
    import warnings

    log = logging.getLogger("auto-attack")
    handler, old_level, old_prop = _Collect(), log.level, log.propagate
    log.addHandler(handler)
    log.setLevel(logging.WARNING)
    log.propagate = False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        log.removeHandler(handler)
        log.setLevel(old_level)
        log.propagate = old_prop
        for m in handler.messages:
            if m not in warnings_out:
                warnings_out.append(m)


def _apply_budget(adversary: Any, budget: dict[str, int]) -> None:
    """Test-only: fewer iterations / queries for every sub-attack."""
    iters, queries = budget.get("iters"), budget.get("queries")
    for name in ("apgd", "apgd_targeted", "fab"):
        sub = getattr(adversary, name, None)
        if sub is None or iters is None:
            continue
        sub.n_iter = iters
        if hasattr(sub, "n_iter_2"):  # APGD's checkpoint schedule is derived from n_iter
            sub.n_iter_2 = max(int(0.22 * iters), 1)
            sub.n_iter_min = max(int(0.06 * iters), 1)
            sub.size_decr = max(int(0.03 * iters), 1)
            sub.n_iter_orig = iters
    if queries is not None and getattr(adversary, "square", None) is not None:
        adversary.square.n_queries = queries
    if "targets" in budget:
        for name in ("apgd_targeted", "fab"):
            if getattr(adversary, name, None) is not None:
                getattr(adversary, name).n_target_classes = budget["targets"]


def autoattack_correct(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    norm: str = "linf",
    seed: int = 0,
    version: str = "standard",
    batch_size: int = 500,
    budget: dict[str, int] | None = None,
    warnings_out: list[str] | None = None,
) -> torch.Tensor:
    """Per-example correctness (bool[n]) of ``model`` under AutoAttack. ``x`` in [0, 1].

    The model must already be in eval mode (the evaluator's ``mode`` context does that and
    restores the previous mode even if the attack fails)."""
    if norm not in NORMS:
        raise ConfigError(f"AutoAttack supports norms {', '.join(NORMS)}, got '{norm}'")
    if version not in VERSIONS:
        raise ConfigError(f"unknown AutoAttack version '{version}'; choose one of {', '.join(VERSIONS)}")
    AutoAttack, package = _import()
    device = x.device
    msgs: list[str] = warnings_out if warnings_out is not None else []
    if eps == 0:  # nothing to search: AutoAttack's step sizes would divide by zero
        with torch.no_grad():
            return model(x).argmax(1) == y
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), _quiet(msgs), frozen(model):
        if package == "pyautoattack":
            adversary = AutoAttack(model, eps=eps, norm=NORMS[norm], seed=seed, version=version,
                                   device=device)
        else:
            adversary = AutoAttack(model, norm=NORMS[norm], eps=eps, seed=seed, version=version,
                                   device=device, verbose=False)
        if budget:
            _apply_budget(adversary, budget)
        run = adversary.run_standard_evaluation
        if "batch_size" in inspect.signature(run).parameters:
            out = run(x, y, batch_size=batch_size)
        else:
            out = run(x, y, bs=batch_size)
        x_adv = out[0] if isinstance(out, tuple) else out
        x_adv = x_adv.to(device)
        # Trust, but verify: the adversarial examples must be in the threat model.
        dist = (x_adv - x).flatten(1)
        dist = dist.abs().amax(1) if norm == "linf" else dist.norm(dim=1)
        if bool((dist > eps * (1 + 1e-4) + 1e-6).any()) or bool((x_adv < 0).any() | (x_adv > 1).any()):
            raise RuntimeError(f"{package} returned points outside the eps={eps} {norm} ball or "
                               "the [0, 1] box; this is a bug in the installed AutoAttack")
        with torch.no_grad():
            return model(x_adv).argmax(1) == y
