"""Heuristic instance weightings of the baselines (METHODS.md §2).

Every weighting returns ŵ_i in objective units (uniform = 1/|B|) and is uniform during a
burn-in of plain training, given as a fraction of the run's epochs (switching at epoch
round(fraction · epochs), 0-based).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dorat.attacks import AttackResult
from dorat.objectives.base import LossOutput, StepContext, Weighting


def probabilistic_margin(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """PM_i = p_y(x') − max_{k≠y} p_k(x') (detached), in [−1, 1]."""
    p = F.softmax(logits.detach().float(), 1)
    p_y = p.gather(1, y[:, None]).squeeze(1)
    return p_y - p.scatter(1, y[:, None], -1.0).amax(1)


class _BurnIn(Weighting):
    def __init__(self, burn_in: float) -> None:
        self.burn_in = burn_in

    def burn_in_epochs(self, epochs: int) -> int:
        return int(round(self.burn_in * epochs))

    def active(self, ctx: StepContext) -> bool:
        return ctx.epoch >= self.burn_in_epochs(ctx.epochs)

    def weights(self, out: LossOutput, y: torch.Tensor, info: AttackResult | None,
                ctx: StepContext) -> torch.Tensor:
        if not self.active(ctx):
            return super().weights(out, y, info, ctx)
        return self.raw(out, y, info, ctx) / len(y)

    def raw(self, out: LossOutput, y: torch.Tensor, info: AttackResult | None,
            ctx: StepContext) -> torch.Tensor:
        raise NotImplementedError


class GAIRATWeighting(_BurnIn):
    """GAIRAT (Zhang et al. 2021): κ_i = PGD steps at which x_i's iterate is still classified
    correctly; w_i = (tanh(Λ + 5·(1 − 2κ_i/K)) + 1)/2, normalised to mean 1 in the batch."""

    name = "gairat"

    def __init__(self, steps: int, lam: float = -1.0, burn_in: float = 0.5) -> None:
        super().__init__(burn_in)
        self.steps = steps
        self.lam = lam

    def raw(self, out: LossOutput, y: torch.Tensor, info: AttackResult | None,
            ctx: StepContext) -> torch.Tensor:
        if info is None:
            raise ValueError("gairat needs the attack's κ")
        kappa = info.kappa.to(out.loss.dtype)
        w = (torch.tanh(self.lam + 5 * (1 - 2 * kappa / self.steps)) + 1) / 2
        return w * (len(w) / w.sum().clamp_min(1e-12))


class MAILWeighting(_BurnIn):
    """MAIL (Wang et al. 2021): w_i = 3·sigmoid(γ·(b − PM_i)), PM on the adversarial logits."""

    name = "mail"

    def __init__(self, bias: float = -1.5, slope: float = 1.0, burn_in: float = 0.625) -> None:
        super().__init__(burn_in)
        self.bias = bias
        self.slope = slope

    def raw(self, out: LossOutput, y: torch.Tensor, info: AttackResult | None,
            ctx: StepContext) -> torch.Tensor:
        pm = probabilistic_margin(out.logits_adv, y)  # type: ignore[arg-type]
        return (3 * torch.sigmoid(self.slope * (self.bias - pm))).to(out.loss.dtype)


class WMMRWeighting(_BurnIn):
    """WMMR (Zeng et al. 2021): w_i = exp(−α·m_i), m_i the probabilistic margin on x'."""

    name = "wmmr"

    def __init__(self, alpha: float = 0.5, burn_in: float = 0.0) -> None:
        super().__init__(burn_in)
        self.alpha = alpha

    def raw(self, out: LossOutput, y: torch.Tensor, info: AttackResult | None,
            ctx: StepContext) -> torch.Tensor:
        m = probabilistic_margin(out.logits_adv, y)  # type: ignore[arg-type]
        return torch.exp(-self.alpha * m).to(out.loss.dtype)


__all__ = ["GAIRATWeighting", "MAILWeighting", "WMMRWeighting", "probabilistic_margin"]
