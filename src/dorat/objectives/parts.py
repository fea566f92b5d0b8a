"""Concrete attacks and per-example losses used by the method presets."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from dorat.attacks import AttackResult, pgd
from dorat.attacks.barrier import Barrier, barrier_attack
from dorat.objectives.base import LossOutput, StepContext


@dataclass
class PGDAttack:
    """Training-time PGD on CE (or margin), from a uniform random start in the ε-ball."""

    eps: float
    alpha: float
    steps: int
    norm: str = "linf"
    loss: str = "ce"
    random_start: bool = True
    bn_train: bool = False  # model mode during the attack (default eval)
    name: str = "pgd"

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                 ctx: StepContext) -> AttackResult:
        return pgd(model, x, y, self.eps, self.alpha, self.steps, norm=self.norm, loss=self.loss,
                   rand_init=self.random_start, generator=ctx.generator,
                   train_mode=self.bn_train, final_eval=False)


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
