"""Implicit hypergradient of ℓ_i(θ, δ_i*(θ)) through the barrier lower level (METHODS.md §1.3).

    ∇̂_θ ℓ_i = ∇_θ ℓ_i(θ, δ_i) − ∇²_{θδ} ℓ_i^bar · v_i,   v_i = [∇²_{δδ} ℓ_i^bar]^{-1} ∇_δ ℓ_i.

Since ∇²_{θδ} ℓ^bar = −∇²_{θδ} ℓ (the barrier does not depend on θ), with ŵ and v detached one
backward pass of

    S = Σ_i ŵ_i ⟨∇_δ ℓ_i(θ, δ_i), v_i⟩       (a function of θ through the double backward)

added to Σ_i ŵ_i ℓ_i gives the whole weighted hypergradient. Modes:
- ``diag``: ∇²_{δδ} ℓ^bar ≈ its known diagonal part λ + c/(ε−δ)² + c/(ε+δ)².
- ``cg``: exact Hessian-vector products (double backward in δ), damped conjugate gradient with
  a fixed budget, per example, preconditioned by the known diagonal.
Coordinates where the pixel box is active are held fixed (their δ does not move with θ).
The per-example Hessians are block-diagonal only if the model treats examples independently,
so the solve runs with BatchNorm in eval mode.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from dorat.attacks.barrier import Barrier
from dorat.attacks.pgd import mode
from dorat.config.parts import nonneg, opt, positive, register
from dorat.models import has_batchnorm


def _bdot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a * b).flatten(1).sum(1)


def _bcast(s: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return s.view(-1, *([1] * (like.dim() - 1)))


def free_mask(x_adv: torch.Tensor, tol: float = 1e-6) -> torch.Tensor:
    """Coordinates not pinned to the pixel box (the only ones δ*(θ) can move)."""
    return ((x_adv > tol) & (x_adv < 1 - tol)).to(x_adv.dtype)


def implicit_term(
    loss: torch.Tensor,
    delta: torch.Tensor,
    x_adv: torch.Tensor,
    barrier: Barrier,
    kind: str,
    weights: torch.Tensor,
    cg_iters: int = 5,
    damping: float = 0.0,
) -> torch.Tensor:
    """S = Σ_i ŵ_i ⟨∇_δ ℓ_i(θ, δ_i), v_i⟩, differentiable in θ, with v_i solved here (detached).

    ``loss`` holds the per-example ℓ_i computed from ``x + delta`` (``delta`` a leaf that
    requires grad), with the model treating examples independently (BatchNorm in eval mode).
    Adding S to Σ_i ŵ_i ℓ_i and calling backward gives Σ_i ŵ_i ∇̂_θ ℓ_i.
    """
    if kind not in ("diag", "cg"):
        raise ValueError(f"unknown hypergradient mode '{kind}' (none, diag, cg)")
    (g,) = torch.autograd.grad(loss.sum(), delta, create_graph=True)
    d = delta.detach()
    mask = free_mask(x_adv.detach())
    rhs = g.detach() * mask
    curv = barrier.penalty_curvature(d) + damping
    if kind == "diag":
        v = rhs / curv
    else:
        def hvp(p: torch.Tensor) -> torch.Tensor:
            # (∇²_{δδ} ℓ^bar + damping·I) p = −∇²_{δδ}ℓ p + (λ + barrier curvature + damping) p
            (hp,) = torch.autograd.grad(g, delta, grad_outputs=p, retain_graph=True)
            return mask * (curv * p - hp)

        # Conjugate gradient preconditioned by the known diagonal (Jacobi): the barrier
        # curvature spans orders of magnitude (c/(ε−δ)² near the boundary), which stalls plain
        # CG; preconditioned, the first iterate is already the ``diag`` solution.
        v = torch.zeros_like(rhs)
        r = rhs.clone()
        z = r / curv
        p = z.clone()
        rz = _bdot(r, z)
        for _ in range(cg_iters):
            hp = hvp(p)
            php = _bdot(p, hp)
            ok = php > 0  # stop an example whose curvature along p is not positive
            alpha = torch.where(ok, rz / php.clamp_min(1e-30), torch.zeros_like(rz))
            v = v + _bcast(alpha, v) * p
            r = r - _bcast(alpha, r) * hp
            z = r / curv
            rz_new = _bdot(r, z)
            p = z + _bcast(torch.where(ok, rz_new / rz.clamp_min(1e-30), torch.zeros_like(rz)), p) * p
            rz = rz_new
        v = v.detach()
    return (weights.detach() * _bdot(g, v)).sum()


def bn_free(model: nn.Module) -> bool:
    """True if train and eval mode compute the same function (no BatchNorm, no dropout)."""
    return not has_batchnorm(model) and not any(isinstance(m, nn.Dropout) for m in model.modules())


@register("hypergrad", "none")
@dataclass
class NoHypergrad:
    """First-order: the lower level's solution is treated as a constant."""

    def term(self, model: nn.Module, x: torch.Tensor, x_adv: torch.Tensor, y: torch.Tensor,
             loss: torch.Tensor, delta: torch.Tensor | None, weights: torch.Tensor) -> torch.Tensor | None:
        return None


@register("hypergrad", "diag")
@dataclass
class Hypergrad(NoHypergrad):
    """Implicit-differentiation correction through the barrier lower level (``hypergrad.*``,
    the barrier of ``barrier.*``): ``diag`` approximates the lower level's Hessian by the
    barrier's diagonal, ``cg`` solves with exact Hessian-vector products."""

    section = "hypergrad"
    kind: ClassVar[str] = "diag"
    reads: ClassVar[tuple[str, ...]] = ("barrier",)
    cg_iters: int = opt(5, "conjugate-gradient iterations (cg)", positive)
    damping: float = opt(0.1, "added to the Hessian in diag and cg", nonneg)

    @staticmethod
    def check(cfg: Any) -> None:
        from dorat.objectives.attacks import BarrierConfig

        BarrierConfig.check(cfg)

    def bind(self, info: dict[str, Any]) -> None:
        from dorat.objectives.attacks import BarrierConfig

        self.barrier = BarrierConfig.barrier(info["cfg"])

    def shares_forward(self, model: nn.Module) -> bool:
        """Train and eval mode agree: the training forward can serve the correction."""
        return bn_free(model)

    def term(self, model: nn.Module, x: torch.Tensor, x_adv: torch.Tensor, y: torch.Tensor,
             loss: torch.Tensor, delta: torch.Tensor | None, weights: torch.Tensor) -> torch.Tensor:
        if delta is not None:  # the training forward was computed from x + delta
            return implicit_term(loss, delta, x_adv, self.barrier, self.kind, weights, self.cg_iters,
                                 self.damping)
        # models with BatchNorm: a forward of its own in eval mode (examples independent)
        delta = (x_adv - x).detach().requires_grad_(True)
        with mode(model, False):
            loss = F.cross_entropy(model(x.detach() + delta), y, reduction="none")
            return implicit_term(loss, delta, x_adv, self.barrier, self.kind, weights, self.cg_iters,
                                 self.damping)


@register("hypergrad", "cg")
@dataclass
class CGHypergrad(Hypergrad):
    kind: ClassVar[str] = "cg"

