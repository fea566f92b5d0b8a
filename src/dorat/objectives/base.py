"""The parts a training method is composed of: attack × per-example loss × weighting.

A training step is

    info   = attack(model, x, y, ctx)              # x_adv and per-example attack info
    out    = loss(model, x, info.x_adv, y, ctx)    # per-example losses ℓ_i (reduction='none')
    w      = weighting(out, y, info, ctx)          # detached weights ŵ_i (uniform: 1/|B|)
    L      = Σ_i ŵ_i ℓ_i                           # one backward pass

Weights are in "objective units": uniform is 1/|B| each, so they sum to 1 in a batch for
normalised schemes. DONE's weights need not sum to 1 in a batch (its running normaliser spans
the whole data set); that is why the weighting owns the reduction.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import torch.nn as nn

from dorat.attacks import AttackResult


@dataclass
class StepContext:
    epoch: int  # 0-based epoch being trained
    epochs: int  # total epochs of the run
    step: int  # global step index
    generator: torch.Generator | None = None  # attack noise
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class LossOutput:
    loss: torch.Tensor  # per-example term ℓ_i that the weighting reweights (requires grad)
    logits_adv: torch.Tensor | None  # logits on x_adv (train mode), for accuracy and weights
    logits_clean: torch.Tensor | None = None
    # per-example term that is never reweighted, averaged uniformly (TRADES' clean CE): the
    # objective is Σ ŵ_i ℓ_i + mean_i base_i
    base: torch.Tensor | None = None


def ess_from_moments(sum_w: torch.Tensor, sum_w2: torch.Tensor, n: torch.Tensor | int
                     ) -> torch.Tensor:
    """(Σw)² / (|B|·Σw²) from a batch's moments (elementwise, so batches can be stacked)."""
    return sum_w ** 2 / (sum_w2 * n).clamp_min(1e-300)


def ess_fraction(w: torch.Tensor) -> torch.Tensor:
    """Effective sample size of a batch's weights relative to the batch: (Σw)² / (|B|·Σw²),
    1 for uniform weights, 1/|B| when one example takes all (float64 scalar)."""
    wd = w.double()
    return ess_from_moments(wd.sum(), wd.pow(2).sum(), len(w))


class Attack(Protocol):
    name: str

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                 ctx: StepContext) -> AttackResult: ...


class Loss(Protocol):
    name: str

    def __call__(self, model: nn.Module, x: torch.Tensor, x_adv: torch.Tensor, y: torch.Tensor,
                 ctx: StepContext) -> LossOutput: ...


class Weighting:
    """Base weighting: uniform ŵ_i = 1/|B|. Subclasses override ``weights`` and may keep state."""

    name = "uniform"

    def weights(self, out: LossOutput, y: torch.Tensor, info: AttackResult | None,
                ctx: StepContext) -> torch.Tensor:
        n = len(y)
        return torch.full((n,), 1.0 / n, device=y.device, dtype=out.loss.dtype)

    def start_epoch(self, epoch: int) -> None:
        """Called before each epoch (burn-in switches, adaptive temperatures)."""

    def epoch_log(self) -> dict[str, Any]:
        """Method-specific numbers for this epoch's log line."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what ``state_dict`` returned (checkpoint resume)."""
