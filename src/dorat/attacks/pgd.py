"""Batched PGD (ℓ∞ and ℓ2) and FGSM with random start, on the shared iteration core.

The attack maximises a per-example loss inside C_i = {δ : ‖δ‖ ≤ ε, 0 ≤ x_i + δ ≤ 1}. What it
does is one typed :class:`PGDSpec` (radius, step, steps, norm, loss, start, model mode, FAT's
early stop); the loop itself is dorat.attacks.core.iterate.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from dorat.attacks.core import AttackResult, attack_loss, frozen, iterate, mode

NORMS = ("linf", "l2")


@dataclass(frozen=True)
class PGDSpec:
    """What a PGD attack does. ``early_stop_tau``: FAT's early stopping, an example stops
    moving τ steps after its first misclassification. ``train_mode``: the model's mode during
    the attack (False = eval, None = leave it). ``eps`` and ``alpha`` may be per-example tensors
    (class-wise margins)."""

    eps: float | torch.Tensor
    alpha: float | torch.Tensor
    steps: int
    norm: str = "linf"
    loss: str = "ce"  # ce | margin | kl
    random_start: bool = True
    train_mode: bool | None = False
    early_stop_tau: int | None = None
    start_radius: float = 1.0  # the random start's radius, in units of eps (N-FGSM: 2)
    ball: bool = True  # False: only the pixel box, never the eps-ball (N-FGSM's unclipped step)
    compact: bool = True  # early stop: leave stopped examples out of later passes (core.iterate)

    def __post_init__(self) -> None:
        if self.norm not in NORMS:
            raise ValueError(f"unknown norm '{self.norm}' (linf, l2)")


def _per_example_norm(t: torch.Tensor) -> torch.Tensor:
    return t.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *([1] * (t.dim() - 1)))


def per_example(v: float | torch.Tensor, like: torch.Tensor) -> float | torch.Tensor:
    """A number as it is; a per-example tensor shaped to broadcast over ``like``'s examples."""
    return v.view(-1, *([1] * (like.dim() - 1))) if isinstance(v, torch.Tensor) else v


def project(delta: torch.Tensor, x: torch.Tensor, eps: float | torch.Tensor, norm: str) -> torch.Tensor:
    """Project δ onto the ε-ball and the pixel box [0, 1] around x (ε a number or per example)."""
    eps = per_example(eps, x)
    if norm == "linf":
        delta = torch.clamp(delta, -eps, eps) if isinstance(eps, torch.Tensor) else delta.clamp(-eps, eps)
    else:
        delta = delta * (eps / _per_example_norm(delta)).clamp(max=1.0)
    return (x + delta).clamp(0, 1) - x


def random_start(x: torch.Tensor, eps: float | torch.Tensor, norm: str,
                 generator: torch.Generator | None, radius: float = 1.0) -> torch.Tensor:
    """Uniform in the ε-ball (ℓ∞: each pixel in [-ε, ε]; ℓ2: a random direction and length), in
    the pixel box; ``radius`` scales the ball (N-FGSM's noise of 2ε)."""
    eps = eps * radius if radius != 1.0 else eps
    eps_b = per_example(eps, x)
    if norm == "linf":
        u = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        delta = (2 * u - 1) * eps_b
    else:
        d = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        r = torch.rand((len(x),) + (1,) * (x.dim() - 1), generator=generator, device=x.device,
                       dtype=x.dtype)
        delta = d / _per_example_norm(d) * r * eps_b
    return project(delta, x, eps, norm)


def pgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, spec: PGDSpec, *,
        generator: torch.Generator | None = None, init: torch.Tensor | None = None,
        target_probs: torch.Tensor | None = None, final_eval: bool = True) -> AttackResult:
    """Projected gradient ascent on a per-example loss; returns x_adv and per-example info.

    ``init``: a starting δ (else uniform random or zero). ``target_probs``: the clean
    predictions for the kl loss. ``final_eval``: one extra no-grad forward at x_adv to return
    its loss and correctness."""
    s = spec
    x = x.detach()
    no_ball = bool((s.eps == 0).all()) if isinstance(s.eps, torch.Tensor) else s.eps == 0
    alpha = per_example(s.alpha, x)
    if no_ball or s.steps == 0:
        delta = torch.zeros_like(x)
    elif init is not None:
        delta = project(init.detach(), x, s.eps, s.norm)
    elif s.random_start:
        delta = random_start(x, s.eps, s.norm, generator, s.start_radius)
    else:
        delta = torch.zeros_like(x)
    bcast = (-1, *([1] * (x.dim() - 1)))

    def rule(t: int, d: torch.Tensor, grad: torch.Tensor, first_wrong: torch.Tensor) -> torch.Tensor:
        step = alpha * (grad.sign() if s.norm == "linf" else grad / _per_example_norm(grad))
        if s.early_stop_tau is not None:
            moving = (first_wrong < 0) | (t - first_wrong < s.early_stop_tau)
            step = step * moving.view(bcast)
        if not s.ball:
            return (x + d + step).clamp(0, 1) - x
        return project(d + step, x, s.eps, s.norm)

    def loss(logits: torch.Tensor, idx: torch.Tensor | None) -> torch.Tensor:
        if idx is None:
            return attack_loss(logits, y, s.loss, target_probs)
        return attack_loss(logits, y[idx], s.loss, None if target_probs is None else target_probs[idx])

    moving = None
    if s.early_stop_tau is not None and s.compact:
        tau = s.early_stop_tau
        moving = lambda t, fw: (fw < 0) | (t - fw < tau)  # noqa: E731 (the rule's own test)
    result = iterate(model, x, y, delta, 0 if no_ball else s.steps, loss, rule, s.train_mode, moving)
    if final_eval:
        with torch.no_grad(), frozen(model), mode(model, s.train_mode):
            logits = model(result.x_adv)
            result.loss = attack_loss(logits, y, s.loss, target_probs)
            result.correct = logits.argmax(1) == y
            never = result.first_wrong < 0
            result.first_wrong = torch.where(never & ~result.correct,
                                             torch.full_like(result.first_wrong, s.steps),
                                             result.first_wrong)
    return result


def fgsm(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, alpha: float | None = None,
         norm: str = "linf", generator: torch.Generator | None = None,
         train_mode: bool | None = False, final_eval: bool = True) -> AttackResult:
    """FGSM with random start (Wong et al. 2020): one step of size α (default 1.25·ε)."""
    spec = PGDSpec(eps, 1.25 * eps if alpha is None else alpha, 1, norm, train_mode=train_mode)
    return pgd(model, x, y, spec, generator=generator, final_eval=final_eval)
