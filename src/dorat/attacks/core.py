"""The one attack iteration loop that PGD, FGSM-RS and the barrier lower level share.

An attack here is a start δ_0 and a *step rule*: K times, the model's logits at x + δ give the
attack loss, its input gradient g, and the rule maps (t, δ, g, first_wrong) to the next δ. The
loop runs with the parameters frozen (no weight-gradient graph) and the model in the requested
mode, both restored on exit, and tracks for every example the first iterate classified wrong
and GAIRAT's κ (the number of iterates still classified correctly).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
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


def kl_per_example(log_p: torch.Tensor, p_target: torch.Tensor) -> torch.Tensor:
    """KL(p_target ‖ p) per example, from log p (the attacked or adversarial side) and the
    target probabilities (the clean prediction): TRADES' and MART's robust term, and the
    loss of TRADES' attack."""
    return F.kl_div(log_p, p_target, reduction="none").sum(1)


def attack_loss(logits: torch.Tensor, y: torch.Tensor, kind: str,
                target_probs: torch.Tensor | None = None) -> torch.Tensor:
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
        return kl_per_example(F.log_softmax(logits, 1), target_probs)
    raise ValueError(f"unknown attack loss '{kind}' (ce, margin, kl)")


def track_iterate(logits: torch.Tensor, y: torch.Tensor, t: int, first_wrong: torch.Tensor,
                  kappa: torch.Tensor) -> torch.Tensor:
    """Count iterate t in κ if still correct (in place); return first_wrong updated with t."""
    wrong = logits.argmax(1) != y
    kappa += (~wrong).long()
    return torch.where(wrong & (first_wrong < 0), torch.full_like(first_wrong, t), first_wrong)


StepRule = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
# the per-example attack loss of the logits of the examples ``idx`` (None: the whole batch)
LossFn = Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]


def batch_independent(model: nn.Module, train_mode: bool | None) -> bool:
    """Whether one example's logits do not depend on the rest of the batch: in eval mode, or a
    model without batch-statistics layers. Only then may an attack leave examples out."""
    if train_mode is False or (train_mode is None and not model.training):
        return True
    return not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def iterate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, delta: torch.Tensor, steps: int,
            loss: LossFn, rule: StepRule, train_mode: bool | None = False,
            moving: Callable[[int, torch.Tensor], torch.Tensor] | None = None) -> AttackResult:
    """K steps of ``rule`` on the input gradient of ``loss(logits, idx)`` (per example, summed).

    ``moving(t, first_wrong)``: which examples step t of the rule may still move (an attack
    that stops per example, FAT). Once an example has stopped, the later steps leave it out of
    their forward and backward passes (batch compaction) when its logits do not depend on the
    batch (``batch_independent``): its iterate, and so its correctness, no longer changes, so κ
    counts it from the last pass that saw it, and the result equals the uncompacted loop's.

    Returns x + δ_K with first_wrong and κ; the caller's final forward, if any, is its own."""
    n = len(x)
    first_wrong = torch.full((n,), -1, dtype=torch.long, device=x.device)
    kappa = torch.zeros(n, dtype=torch.long, device=x.device)
    compact = moving is not None and batch_independent(model, train_mode)
    stopped = torch.zeros(n, dtype=torch.bool, device=x.device)
    correct = torch.zeros(n, dtype=torch.bool, device=x.device)  # at each example's last pass
    with frozen(model), mode(model, train_mode):
        for t in range(steps):
            if compact and bool(stopped.any()):
                idx = (~stopped).nonzero().squeeze(1)
                grad = torch.zeros_like(delta)
                if len(idx):
                    d = delta[idx].requires_grad_(True)
                    logits = model(x[idx] + d)
                    (grad_a,) = torch.autograd.grad(loss(logits, idx).sum(), d)
                    grad[idx] = grad_a
                with torch.no_grad():
                    kappa += (correct & stopped).long()
                    if len(idx):
                        fw, ka = first_wrong[idx], kappa[idx]
                        first_wrong[idx] = track_iterate(logits, y[idx], t, fw, ka)
                        kappa[idx] = ka
                        correct[idx] = logits.argmax(1) == y[idx]
            else:
                delta.requires_grad_(True)
                logits = model(x + delta)
                (grad,) = torch.autograd.grad(loss(logits, None).sum(), delta)
                with torch.no_grad():
                    first_wrong = track_iterate(logits, y, t, first_wrong, kappa)
                    correct = logits.argmax(1) == y
            with torch.no_grad():
                delta = rule(t, delta.detach(), grad, first_wrong)
                if compact:
                    stopped = ~moving(t, first_wrong)
    return AttackResult((x + delta).detach(), first_wrong, kappa)
