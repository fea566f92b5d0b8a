"""Log-barrier lower level (METHODS.md §1.2): a differentiable stand-in for the PGD attack.

    ℓ^bar(θ, δ) = −ℓ(θ, δ) + (λ/2)‖δ‖² − c · Σ_k [log(ε − δ_k) + log(ε + δ_k)]

is minimised over δ by K steps of gradient descent (``barrier-gd``; the barrier part taken
semi-implicitly, i.e. preconditioned by 1 + lr·barrier curvature) or Adam (``barrier-adam``),
each iterate kept strictly inside the ℓ∞ ball (|δ_k| ≤ (1 − 1e-3)·ε) and the pixel box. The
barrier makes the minimiser δ*(θ) a smooth function of θ, so its derivative exists
(implicit differentiation, see ``dorat.objectives.hypergrad``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from dorat.attacks.core import AttackResult, attack_loss, iterate
from dorat.attacks.pgd import random_start

INTERIOR = 1 - 1e-3


@dataclass(frozen=True)
class Barrier:
    eps: float
    c: float = 1e-4
    lam: float = 0.0

    def penalty(self, delta: torch.Tensor) -> torch.Tensor:
        """Per-example (λ/2)‖δ‖² − c Σ log(ε − δ) + log(ε + δ)."""
        d = delta.flatten(1)
        bar = torch.log(self.eps - d) + torch.log(self.eps + d)
        return 0.5 * self.lam * d.pow(2).sum(1) - self.c * bar.sum(1)

    def penalty_grad(self, delta: torch.Tensor) -> torch.Tensor:
        return self.lam * delta + self.c * (1 / (self.eps - delta) - 1 / (self.eps + delta))

    def penalty_curvature(self, delta: torch.Tensor) -> torch.Tensor:
        """Diagonal of the penalty's Hessian: λ + c/(ε − δ)² + c/(ε + δ)²."""
        return self.lam + self.c / (self.eps - delta) ** 2 + self.c / (self.eps + delta) ** 2

    def project(self, delta: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        r = INTERIOR * self.eps
        return (x + delta.clamp(-r, r)).clamp(0, 1) - x


def barrier_attack(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    barrier: Barrier,
    steps: int,
    lr: float,
    optimizer: str = "gd",
    loss: str = "ce",
    generator: torch.Generator | None = None,
    train_mode: bool | None = False,
    init: torch.Tensor | None = None,
) -> AttackResult:
    """Minimise ℓ^bar over δ by GD or Adam from a random start in half the ball."""
    if optimizer not in ("gd", "adam"):
        raise ValueError(f"unknown barrier optimizer '{optimizer}' (gd, adam)")
    x = x.detach()
    delta = random_start(x, 0.5 * barrier.eps, "linf", generator) if init is None else init.detach()
    delta = barrier.project(delta, x)
    m = torch.zeros_like(x)
    v = torch.zeros_like(x)
    b1, b2 = 0.9, 0.999

    def rule(t: int, d: torch.Tensor, g_loss: torch.Tensor, first_wrong: torch.Tensor) -> torch.Tensor:
        grad = -g_loss + barrier.penalty_grad(d)
        if optimizer == "gd":
            # semi-implicit in the barrier: divide by 1 + lr·(barrier curvature). Plain GD
            # needs lr < 2ε²/c near the boundary and otherwise jumps from side to side
            # of the ball; this keeps the same fixed points and stays stable.
            step = lr * grad / (1 + lr * barrier.penalty_curvature(d))
        else:
            m.mul_(b1).add_(grad, alpha=1 - b1)
            v.mul_(b2).addcmul_(grad, grad, value=1 - b2)
            step = lr * (m / (1 - b1 ** (t + 1))) / ((v / (1 - b2 ** (t + 1))).sqrt() + 1e-12)
        return barrier.project(d - step, x)

    return iterate(model, x, y, delta, steps, lambda logits, idx: attack_loss(
        logits, y if idx is None else y[idx], loss), rule,
                   train_mode)
