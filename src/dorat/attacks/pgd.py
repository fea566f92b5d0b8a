"""Batched PGD (ℓ∞ and ℓ2) and FGSM with random start.

The attack maximises a per-example loss inside C_i = {δ : ‖δ‖ ≤ ε, 0 ≤ x_i + δ ≤ 1}.
Parameters do not require grad while it runs (no weight-gradient graph is built), and the
model's mode during the attack is a setting (default eval, so BatchNorm statistics are not
disturbed and examples are treated independently). Both are restored on exit, even on error.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class AttackResult:
    x_adv: torch.Tensor
    # index t of the first iterate x_t classified wrong (t = 0 is the random start), -1 if none
    first_wrong: torch.Tensor
    # number of the K attacked iterates x_0..x_{K-1} still classified correctly (GAIRAT's κ)
    kappa: torch.Tensor
    # per-example loss and correctness at x_adv (only when the attack ran a final forward)
    loss: torch.Tensor | None = None
    correct: torch.Tensor | None = None


@contextlib.contextmanager
def frozen(model: nn.Module) -> Iterator[None]:
    """Parameters do not require grad inside the block (restored afterwards)."""
    flags = [p.requires_grad for p in model.parameters()]
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        yield
    finally:
        for p, f in zip(model.parameters(), flags):
            p.requires_grad_(f)


@contextlib.contextmanager
def mode(model: nn.Module, train: bool | None) -> Iterator[None]:
    """Model in train (True) or eval (False) mode inside the block; None leaves it alone."""
    was = model.training
    try:
        if train is not None:
            model.train(train)
        yield
    finally:
        model.train(was)


def attack_loss(
    logits: torch.Tensor, y: torch.Tensor, kind: str, target_probs: torch.Tensor | None = None
) -> torch.Tensor:
    """Per-example loss the attack ascends: ce, margin (CW: max_{k≠y} z_k − z_y) or kl."""
    if kind == "ce":
        return F.cross_entropy(logits, y, reduction="none")
    if kind == "margin":
        z_y = logits.gather(1, y[:, None]).squeeze(1)
        other = logits.scatter(1, y[:, None], float("-inf")).amax(1)
        return other - z_y
    if kind == "kl":
        if target_probs is None:
            raise ValueError("the kl attack loss needs target_probs (the clean predictions)")
        logp = F.log_softmax(logits, 1)
        return F.kl_div(logp, target_probs, reduction="none").sum(1)
    raise ValueError(f"unknown attack loss '{kind}' (ce, margin, kl)")


def _per_example_norm(t: torch.Tensor) -> torch.Tensor:
    return t.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *([1] * (t.dim() - 1)))


def project(delta: torch.Tensor, x: torch.Tensor, eps: float, norm: str) -> torch.Tensor:
    """Project δ onto the ε-ball and the pixel box [0, 1] around x."""
    if norm == "linf":
        delta = delta.clamp(-eps, eps)
    else:
        delta = delta * (eps / _per_example_norm(delta)).clamp(max=1.0)
    return (x + delta).clamp(0, 1) - x


def random_start(
    x: torch.Tensor, eps: float, norm: str, generator: torch.Generator | None
) -> torch.Tensor:
    if norm == "linf":
        u = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        delta = (2 * u - 1) * eps
    else:
        d = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        r = torch.rand((len(x),) + (1,) * (x.dim() - 1), generator=generator, device=x.device,
                       dtype=x.dtype)
        delta = d / _per_example_norm(d) * r * eps
    return project(delta, x, eps, norm)


def track_iterate(logits: torch.Tensor, y: torch.Tensor, t: int, first_wrong: torch.Tensor,
                  kappa: torch.Tensor) -> torch.Tensor:
    """Count iterate t in κ if still correct (in place); return first_wrong updated with t."""
    wrong = logits.argmax(1) != y
    kappa += (~wrong).long()
    return torch.where(wrong & (first_wrong < 0), torch.full_like(first_wrong, t), first_wrong)


def pgd(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    alpha: float,
    steps: int,
    norm: str = "linf",
    loss: str = "ce",
    rand_init: bool = True,
    generator: torch.Generator | None = None,
    train_mode: bool | None = False,
    final_eval: bool = True,
    early_stop_tau: int | None = None,
    target_probs: torch.Tensor | None = None,
    init: torch.Tensor | None = None,
) -> AttackResult:
    """Projected gradient ascent on a per-example loss; returns x_adv and per-example info.

    ``early_stop_tau``: FAT's early stopping, an example stops moving τ steps after its first
    misclassification. ``init``: a starting δ (else uniform random or zero). ``final_eval``: one
    extra no-grad forward at x_adv to return its loss and correctness.
    """
    if norm not in ("linf", "l2"):
        raise ValueError(f"unknown norm '{norm}' (linf, l2)")
    x = x.detach()
    n = len(x)
    first_wrong = torch.full((n,), -1, dtype=torch.long, device=x.device)
    kappa = torch.zeros(n, dtype=torch.long, device=x.device)
    if eps == 0 or steps == 0:
        delta = torch.zeros_like(x)
    elif init is not None:
        delta = project(init.detach(), x, eps, norm)
    elif rand_init:
        delta = random_start(x, eps, norm, generator)
    else:
        delta = torch.zeros_like(x)
    with frozen(model), mode(model, train_mode):
        if eps > 0:
            for t in range(steps):
                delta.requires_grad_(True)
                logits = model(x + delta)
                obj = attack_loss(logits, y, loss, target_probs)
                (grad,) = torch.autograd.grad(obj.sum(), delta)
                with torch.no_grad():
                    first_wrong = track_iterate(logits, y, t, first_wrong, kappa)
                    if norm == "linf":
                        step = alpha * grad.sign()
                    else:
                        step = alpha * grad / _per_example_norm(grad)
                    if early_stop_tau is not None:
                        moving = (first_wrong < 0) | (t - first_wrong < early_stop_tau)
                        step = step * moving.view(-1, *([1] * (x.dim() - 1)))
                    delta = project(delta.detach() + step, x, eps, norm)
        x_adv = (x + delta).detach()
        result = AttackResult(x_adv, first_wrong, kappa)
        if final_eval:
            with torch.no_grad():
                logits = model(x_adv)
                result.loss = attack_loss(logits, y, loss, target_probs)
                result.correct = logits.argmax(1) == y
                never = result.first_wrong < 0
                result.first_wrong = torch.where(
                    never & ~result.correct, torch.full_like(first_wrong, steps), first_wrong
                )
    return result


def fgsm(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    alpha: float | None = None,
    norm: str = "linf",
    generator: torch.Generator | None = None,
    train_mode: bool | None = False,
    final_eval: bool = True,
) -> AttackResult:
    """FGSM with random start (Wong et al. 2020): one step of size α (default 1.25·ε)."""
    return pgd(model, x, y, eps, 1.25 * eps if alpha is None else alpha, 1, norm=norm,
               generator=generator, train_mode=train_mode, final_eval=final_eval)
