"""A method: attack × per-example loss × weighting (+ hypergradient), built from the config.

``method.attack``, ``method.loss``, ``method.weighting`` and ``method.hypergrad`` name
registered parts (dorat.config.parts); each part's fields come from its config section. The presets
(configs/methods.yaml) are names for such compositions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from dorat.config import parts
from dorat.objectives.base import Attack, Loss, StepContext, Weighting
from dorat.objectives.hypergrad import NoHypergrad


@dataclass
class StepOutput:
    objective: torch.Tensor  # scalar to backpropagate
    loss: torch.Tensor  # per-example losses (detached)
    weights: torch.Tensor  # per-example weights (detached, objective units)
    logits_adv: torch.Tensor | None


class Method:
    """attack × loss × weighting (+ hypergradient); ``step`` computes one batch's objective."""

    def __init__(self, name: str, attack: Attack, loss: Loss, weighting: Weighting,
                 hypergrad: NoHypergrad | None = None) -> None:
        self.name = name
        self.attack = attack
        self.loss = loss
        self.weighting = weighting
        self.hypergrad = hypergrad or NoHypergrad()

    def step(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
             ctx: StepContext, attack_model: nn.Module | None = None) -> StepOutput:
        """One batch's objective. ``model`` runs the training forward (it may be a DDP or
        compiled wrapper); the attack runs on ``attack_model`` (default: ``model``)."""
        scale = self.weighting.class_eps()
        if scale is not None:
            ctx.eps_scale = scale.to(device=y.device, dtype=x.dtype)[y]
        info = self.attack(attack_model if attack_model is not None else model, x, y, ctx)
        hg = self.hypergrad
        delta = None
        if getattr(hg, "shares_forward", lambda m: False)(model):
            # train and eval mode agree: reuse the training forward for the correction
            delta = (info.x_adv - x).detach().requires_grad_(True)
            out = self.loss(model, x, x + delta, y, ctx)
        else:
            out = self.loss(model, x, info.x_adv, y, ctx)
        w = self.weighting.weights(out, y, info, ctx).detach()
        objective = (w * out.loss).sum()
        if out.base is not None:
            wb = self.weighting.base_weights(out, y, ctx)
            objective = objective + (out.base.mean() if wb is None else (wb.detach() * out.base).sum())
        term = hg.term(model, x, info.x_adv, y, out.loss, delta, w)
        if term is not None:
            objective = objective + term
        total = out.loss.detach() if out.base is None else out.loss.detach() + out.base.detach()
        return StepOutput(objective, total, w, out.logits_adv)

    def describe(self) -> dict[str, str]:
        d = {"attack": self.attack.name, "loss": self.loss.name, "weighting": self.weighting.name}
        if self.hypergrad.name != "none":
            d["hypergrad"] = self.hypergrad.name
        return d


def build_method(cfg: Any, info: dict[str, Any] | None = None) -> Method:
    """The method of ``cfg``; ``info`` carries data facts (num_classes, class_counts, dist)."""
    info = {**(info or {}), "cfg": cfg}
    built = {}
    for kind in ("attack", "loss", "weighting", "hypergrad"):
        part = parts.build(kind, cfg.method[kind], cfg)
        if hasattr(part, "bind"):
            part.bind(info)
        built[kind] = part
    return Method(cfg.method.name, **built)
