"""Method presets: names mapped to compositions of attack × per-example loss × weighting.

A method is built from the run config; adding a method is adding a preset here (and any new
part it needs), not a new training loop.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from dorat.errors import ConfigError
from dorat.objectives.base import Attack, Loss, StepContext, Weighting
from dorat.objectives.parts import CELoss, NoAttack, PGDAttack


@dataclass
class StepOutput:
    objective: torch.Tensor  # scalar to backpropagate
    loss: torch.Tensor  # per-example losses (detached)
    weights: torch.Tensor  # per-example weights (detached, objective units)
    logits_adv: torch.Tensor | None
    y: torch.Tensor


class Method:
    """attack × loss × weighting; ``step`` computes the objective of one mini-batch."""

    def __init__(self, name: str, attack: Attack, loss: Loss, weighting: Weighting) -> None:
        self.name = name
        self.attack = attack
        self.loss = loss
        self.weighting = weighting

    def step(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
             ctx: StepContext) -> StepOutput:
        info = self.attack(model, x, y, ctx)
        out = self.loss(model, x, info.x_adv, y, ctx)
        w = self.weighting.weights(out, y, info, ctx).detach()
        objective = (w * out.loss).sum()
        return StepOutput(objective, out.loss.detach(), w, out.logits_adv, y)

    def describe(self) -> dict[str, str]:
        return {"attack": self.attack.name, "loss": self.loss.name,
                "weighting": self.weighting.name}


def _pgd_from(cfg: dict[str, Any]) -> PGDAttack:
    a = cfg["attack"]
    return PGDAttack(a["eps"], a["alpha"], a["steps"], a["norm"], a["loss"], a["random_start"],
                     a["bn_mode"] == "train")


PRESETS: dict[str, tuple[str, Callable[[dict[str, Any]], Method]]] = {
    "standard": ("clean training (no attack): CE, uniform weights",
                 lambda cfg: Method("standard", NoAttack(), CELoss(), Weighting())),
    "at": ("PGD-AT (Madry et al. 2018): PGD × CE × uniform",
           lambda cfg: Method("at", _pgd_from(cfg), CELoss(), Weighting())),
}


def method_names() -> list[str]:
    return list(PRESETS)


def build_method(cfg: dict[str, Any]) -> Method:
    name = cfg["method"]
    if name not in PRESETS:
        raise ConfigError(f"unknown method '{name}'; choose one of {', '.join(PRESETS)}")
    return PRESETS[name][1](cfg)
