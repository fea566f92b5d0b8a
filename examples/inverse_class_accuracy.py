"""A dorat plug-in in one file: weight each example by 1 / its class's running robust accuracy.

    PYTHONPATH=examples dorat train --plugin inverse_class_accuracy --method at-inv-acc --out RUN
    dorat train --plugin inverse_class_accuracy --set method.weighting=inv-class-acc ...

Classes the model gets wrong under attack get more weight (a heuristic in the spirit of FRL's
reweighting, not a published method). The class accuracies are of the local batch: under
torchrun each rank keeps its own.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

import dorat
from dorat.config.parts import positive, unit


@dorat.register("weighting", "inv-class-acc")
@dataclass
class InverseClassAccuracy(dorat.Weighting):
    """ŵ_i ∝ 1 / max(floor, acc_{y_i}), acc_c the running adversarial accuracy of class c."""

    momentum: float = dorat.opt(0.9, "running-average rate of the class accuracies", unit)
    floor: float = dorat.opt(0.05, "smallest accuracy used (a weight is at most 1/floor)", positive)
    warmup: int | str = dorat.opt(0, "uniform first: epochs, or a share of the run", kind="warmup")

    def bind(self, info: dict[str, Any]) -> None:
        self.acc = torch.ones(info["num_classes"], dtype=torch.float64)

    def raw(self, out, y, info, ctx):  # noqa: ANN001, ANN201  (Weighting.raw's signature)
        c = len(self.acc)
        self.acc = self.acc.to(y.device)
        n = torch.bincount(y, minlength=c).double()
        right = (out.logits_adv.detach().argmax(1) == y).double()
        batch = torch.bincount(y, weights=right, minlength=c) / n.clamp_min(1)
        self.acc = torch.where(n > 0, self.momentum * self.acc + (1 - self.momentum) * batch, self.acc)
        w = 1 / self.acc[y].clamp_min(self.floor)
        return (w * (len(w) / w.sum())).to(out.loss.dtype)  # mean 1: in units of the uniform weight

    def epoch_log(self) -> dict[str, Any]:
        return {"class_acc": [round(float(a), 4) for a in self.acc]}

    def state_dict(self) -> dict[str, Any]:  # resumed runs continue bitwise
        return {"acc": self.acc}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.acc = state["acc"]


dorat.register_preset("at-inv-acc", attack="pgd", loss="ce", weighting="inv-class-acc",
                      help="PGD × CE × inverse class-accuracy weights (example plug-in)")
