"""Concrete attacks and per-example losses used by the method presets (METHODS.md §2)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from dorat.attacks import AttackResult, pgd
from dorat.attacks.barrier import Barrier, barrier_attack
from dorat.attacks.pgd import mode
from dorat.models import has_batchnorm
from dorat.objectives.base import LossOutput, StepContext

TRADES_INIT_STD = 0.001  # TRADES / FAT start the attack at x + 0.001·N(0, 1)


@dataclass
class PGDAttack:
    """Training-time PGD on CE, margin or KL, from a uniform random start in the ε-ball (or
    x + 0.001·N(0, 1) with ``init='normal'``), optionally early-stopped (FAT)."""

    eps: float
    alpha: float
    steps: int
    norm: str = "linf"
    loss: str = "ce"  # ce | margin | kl (KL(p(x) ‖ p(x')) against the clean prediction)
    random_start: bool = True
    bn_train: bool = False  # model mode during the attack (default eval)
    init: str = "uniform"  # uniform | normal
    tau: int | None = None  # FAT: stop τ steps after the first misclassification
    tau_schedule: tuple[tuple[float, int], ...] = ()  # FAT's dynamic τ: (fraction, τ) steps
    name: str = "pgd"

    def tau_at(self, ctx: StepContext) -> int | None:
        tau = self.tau
        for frac, value in self.tau_schedule:
            if ctx.epoch >= int(round(frac * ctx.epochs)):
                tau = value
        return tau

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                 ctx: StepContext) -> AttackResult:
        target = None
        if self.loss == "kl":
            with torch.no_grad(), mode(model, self.bn_train):
                target = F.softmax(model(x), 1)
        init = None
        if self.init == "normal" and self.random_start:
            init = TRADES_INIT_STD * torch.randn(x.shape, generator=ctx.generator, device=x.device,
                                                 dtype=x.dtype)
        return pgd(model, x, y, self.eps, self.alpha, self.steps, norm=self.norm, loss=self.loss,
                   rand_init=self.random_start, generator=ctx.generator,
                   train_mode=self.bn_train, final_eval=False, early_stop_tau=self.tau_at(ctx),
                   target_probs=target, init=init)


@dataclass
class BarrierAttack:
    """Training-time log-barrier lower level solved by GD or Adam (METHODS.md §1.2)."""

    barrier: Barrier
    steps: int
    lr: float
    optimizer: str = "gd"
    bn_train: bool = False

    @property
    def name(self) -> str:
        return f"barrier-{self.optimizer}"

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                 ctx: StepContext) -> AttackResult:
        return barrier_attack(model, x, y, self.barrier, self.steps, self.lr, self.optimizer,
                              generator=ctx.generator, train_mode=self.bn_train)


class NoAttack:
    """Standard (non-adversarial) training: x_adv = x."""

    name = "none"

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                 ctx: StepContext) -> AttackResult:
        z = torch.zeros(len(y), dtype=torch.long, device=y.device)
        return AttackResult(x, z - 1, z)


class CELoss:
    """ℓ_i = CE(f(x_i'), y_i) on the adversarial input."""

    name = "ce"

    def __call__(self, model: nn.Module, x: torch.Tensor, x_adv: torch.Tensor, y: torch.Tensor,
                 ctx: StepContext) -> LossOutput:
        logits = model(x_adv)
        return LossOutput(F.cross_entropy(logits, y, reduction="none"), logits)


def kl_per_example(logits_clean: torch.Tensor, logits_adv: torch.Tensor) -> torch.Tensor:
    """KL(p(x) ‖ p(x')) per example."""
    return F.kl_div(F.log_softmax(logits_adv, 1), F.softmax(logits_clean, 1),
                    reduction="none").sum(1)


@dataclass
class TRADESLoss:
    """TRADES (Zhang et al. 2019): CE(f(x), y) + β·KL(p(x) ‖ p(x')).

    The clean CE is the uniform ``base``; the robust term β·KL_i is what a weighting reweights
    (MAIL-TRADES, DONE-TRADES).
    """

    beta: float = 6.0
    name: str = "trades"

    def __call__(self, model: nn.Module, x: torch.Tensor, x_adv: torch.Tensor, y: torch.Tensor,
                 ctx: StepContext) -> LossOutput:
        logits_clean, logits_adv = clean_and_adv_logits(model, x, x_adv)
        robust = self.beta * kl_per_example(logits_clean, logits_adv)
        return LossOutput(robust, logits_adv, logits_clean,
                          base=F.cross_entropy(logits_clean, y, reduction="none"))


@dataclass
class MARTLoss:
    """MART (Wang et al. 2020): BCE(f(x'), y) + β·KL(p(x) ‖ p(x'))·(1 − p_y(x)), where
    BCE = −log p_y(x') − log(1 − max_{k≠y} p_k(x'))."""

    beta: float = 6.0
    name: str = "mart"

    def __call__(self, model: nn.Module, x: torch.Tensor, x_adv: torch.Tensor, y: torch.Tensor,
                 ctx: StepContext) -> LossOutput:
        logits_clean, logits_adv = clean_and_adv_logits(model, x, x_adv)
        p_adv = F.softmax(logits_adv, 1)
        p_other = p_adv.scatter(1, y[:, None], 0.0).amax(1)
        bce = F.cross_entropy(logits_adv, y, reduction="none") - torch.log(1.0001 - p_other + 1e-12)
        p_y_clean = F.softmax(logits_clean, 1).gather(1, y[:, None]).squeeze(1)
        kl = F.kl_div(torch.log(p_adv + 1e-12), F.softmax(logits_clean, 1), reduction="none").sum(1)
        return LossOutput(bce + self.beta * kl * (1.0000001 - p_y_clean), logits_adv, logits_clean)


def clean_and_adv_logits(model: nn.Module, x: torch.Tensor, x_adv: torch.Tensor
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """f(x) and f(x'): one forward of [x; x'] when the model has no BatchNorm (cheaper), two
    otherwise (a joint batch would mix clean and adversarial BatchNorm statistics)."""
    if has_batchnorm(model):
        return model(x), model(x_adv)
    return model(torch.cat([x, x_adv])).split(len(x))  # type: ignore[return-value]
