"""Per-example losses (reduction='none'), registered by name (METHODS.md §2)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from dorat.attacks import kl_per_example
from dorat.config.parts import nonneg, opt, register
from dorat.models import has_batchnorm
from dorat.objectives.base import LossOutput, StepContext


@register("loss", "ce")
@dataclass
class CELoss:
    """ℓ_i = CE(f(x_i'), y_i) on the adversarial input."""

    def __call__(self, model: nn.Module, x: torch.Tensor, x_adv: torch.Tensor, y: torch.Tensor,
                 ctx: StepContext) -> LossOutput:
        logits = model(x_adv)
        return LossOutput(F.cross_entropy(logits, y, reduction="none"), logits)


def clean_and_adv_logits(model: nn.Module, x: torch.Tensor, x_adv: torch.Tensor
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """f(x) and f(x'): one forward of [x; x'] when the model has no BatchNorm (cheaper), two
    otherwise (a joint batch would mix clean and adversarial BatchNorm statistics)."""
    if has_batchnorm(model):
        return model(x), model(x_adv)
    return model(torch.cat([x, x_adv])).split(len(x))  # type: ignore[return-value]


@register("loss", "trades")
@dataclass
class TRADESLoss:
    """TRADES (Zhang et al. 2019): CE(f(x), y) + β·KL(p(x) ‖ p(x')).

    The clean CE is the uniform ``base``; the robust term β·KL_i is what a weighting reweights
    (MAIL-TRADES, DONE-TRADES)."""

    beta: float = opt(6.0, "TRADES' KL weight beta_T (official code: 6)", nonneg)

    def __call__(self, model: nn.Module, x: torch.Tensor, x_adv: torch.Tensor, y: torch.Tensor,
                 ctx: StepContext) -> LossOutput:
        logits_clean, logits_adv = clean_and_adv_logits(model, x, x_adv)
        robust = self.beta * kl_per_example(F.log_softmax(logits_adv, 1), F.softmax(logits_clean, 1))
        return LossOutput(robust, logits_adv, base=F.cross_entropy(logits_clean, y, reduction="none"))


@register("loss", "mart")
@dataclass
class MARTLoss:
    """MART (Wang et al. 2020): BCE(f(x'), y) + β·KL(p(x) ‖ p(x'))·(1 − p_y(x)), where
    BCE = −log p_y(x') − log(1 − max_{k≠y} p_k(x'))."""

    beta: float = opt(6.0, "MART's KL weight beta_M", nonneg)

    def __call__(self, model: nn.Module, x: torch.Tensor, x_adv: torch.Tensor, y: torch.Tensor,
                 ctx: StepContext) -> LossOutput:
        logits_clean, logits_adv = clean_and_adv_logits(model, x, x_adv)
        p_adv = F.softmax(logits_adv, 1)
        p_other = p_adv.scatter(1, y[:, None], 0.0).amax(1)
        bce = F.cross_entropy(logits_adv, y, reduction="none") - torch.log(1.0001 - p_other + 1e-12)
        # two softmax nodes, not one shared: the same values, and the backward sums the two
        # paths in the order of the official code (bitwise-identical training)
        p_y_clean = F.softmax(logits_clean, 1).gather(1, y[:, None]).squeeze(1)
        kl = kl_per_example(torch.log(p_adv + 1e-12), F.softmax(logits_clean, 1))
        return LossOutput(bce + self.beta * kl * (1.0000001 - p_y_clean), logits_adv)
