"""Heuristic instance weightings of the baselines (METHODS.md §2).

Every weighting returns ŵ_i in objective units (uniform = 1/|B|): ``raw`` gives them in units
of the uniform weight. Each is uniform during its ``warmup`` (dorat.objectives.base).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from dorat.attacks import AttackResult
from dorat.config.parts import nonneg, opt, positive, register
from dorat.objectives.base import LossOutput, StepContext, Weighting


def probabilistic_margin(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """PM_i = p_y(x') − max_{k≠y} p_k(x') (detached), in [−1, 1]."""
    p = F.softmax(logits.detach().float(), 1)
    p_y = p.gather(1, y[:, None]).squeeze(1)
    return p_y - p.scatter(1, y[:, None], -1.0).amax(1)


@register("weighting", "gairat")
@dataclass
class GAIRATWeighting(Weighting):
    """GAIRAT (Zhang et al. 2021): κ_i = PGD steps at which x_i's iterate is still classified
    correctly; w_i = (tanh(Λ + 5·(1 − 2κ_i/K)) + 1)/2, normalised to mean 1 in the batch."""

    lam: float = opt(-1.0, "Lambda in tanh(Lambda + 5(1 - 2 kappa/K))")
    warmup: int | str = opt("50%", "plain AT first: epochs, or a share of the run ('50%')",
                            kind="warmup")
    steps: int = field(default=10, init=False)  # K, the training attack's steps (from bind)

    def bind(self, info: dict[str, Any]) -> None:
        self.steps = info["cfg"].attack.steps

    def raw(self, out: LossOutput, y: torch.Tensor, info: AttackResult | None,
            ctx: StepContext) -> torch.Tensor:
        if info is None:
            raise ValueError("gairat needs the attack's κ")
        kappa = info.kappa.to(out.loss.dtype)
        w = (torch.tanh(self.lam + 5 * (1 - 2 * kappa / self.steps)) + 1) / 2
        return w * (len(w) / w.sum().clamp_min(1e-12))


@register("weighting", "mail")
@dataclass
class MAILWeighting(Weighting):
    """MAIL (Wang et al. 2021): w_i = 3·sigmoid(γ·(b − PM_i)), PM on the adversarial logits."""

    bias: float = opt(-1.5, "b in 3·sigmoid(slope·(b − PM))")
    slope: float = opt(1.0, "the sigmoid's slope γ", positive)
    warmup: int | str = opt("62.5%", "plain training first (official: 75 of 120 epochs)",
                            kind="warmup")

    def raw(self, out: LossOutput, y: torch.Tensor, info: AttackResult | None,
            ctx: StepContext) -> torch.Tensor:
        pm = probabilistic_margin(out.logits_adv, y)  # type: ignore[arg-type]
        return (3 * torch.sigmoid(self.slope * (self.bias - pm))).to(out.loss.dtype)


@register("weighting", "wmmr")
@dataclass
class WMMRWeighting(Weighting):
    """WMMR (Zeng et al. 2021): w_i = exp(−α·m_i), m_i the probabilistic margin on x'."""

    alpha: float = opt(0.5, "α in exp(−α·margin)", nonneg)
    warmup: int | str = opt(0, "plain AT first: epochs, or a share of the run", kind="warmup")

    def raw(self, out: LossOutput, y: torch.Tensor, info: AttackResult | None,
            ctx: StepContext) -> torch.Tensor:
        m = probabilistic_margin(out.logits_adv, y)  # type: ignore[arg-type]
        return torch.exp(-self.alpha * m).to(out.loss.dtype)


__all__ = ["GAIRATWeighting", "MAILWeighting", "WMMRWeighting", "probabilistic_margin"]
