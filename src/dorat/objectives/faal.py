"""FAAL (Zhang et al., "Towards Fairness-Aware Adversarial Learning", CVPR 2024; official code
TrustAI/FAAL, FAAL.py and ft_prn.py): class weights from a distributionally robust problem over
the classes, solved every batch.

The official problem, per batch: with m_c the class-c mean of the adversarial probability margin
max_{j≠y} softmax_j − softmax_y (a class absent from the batch gets −1) and u the uniform
distribution over the C classes,

    p* = argmax_{p ∈ simplex} Σ_c p_c m_c   subject to   Σ_c u_c log(u_c / p_c) ≤ r,

i.e. a ball of radius r in KL(u ‖ p) around uniform (cvxpy's ``kl_div(Pemp, p)``, the official
code's constraint; it is not the KL(p ‖ u) ball whose solution would be a softmax). The loss is
Σ_i p*_{y_i} ℓ_i · C / |B|. The official code solves it with cvxpy (ECOS, then MOSEK or SCS).

Here it is solved exactly and without a solver: the Lagrangian's stationarity gives
p_c ∝ 1 / (ν − m_c) for a scalar ν > max_c m_c, and KL(u ‖ p(ν)) falls from ∞ to 0 as ν grows,
so the active constraint KL = r fixes ν by a one-dimensional bisection (on log(ν − max m), a
fixed number of steps, on the device: no host sync). ``tests/test_faal.py`` checks it against a
two-class case solved by hand and against cvxpy's solution.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from dorat.attacks import AttackResult
from dorat.config.parts import nonneg, opt, register
from dorat.errors import ConfigError
from dorat.objectives.base import LossOutput, StepContext, Weighting
from dorat.system import distributed

BISECTION_STEPS = 80  # on log(ν − max m) in [−30, 12]: an interval of 42 halved 80 times


def probability_margin(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """max_{j≠y} softmax_j − softmax_y per example (FAAL's ``cw`` on probabilities), in [−1, 1]."""
    p = F.softmax(logits.float(), 1)
    true = p.gather(1, y[:, None]).squeeze(1)
    other = p.scatter(1, y[:, None], float("-inf")).amax(1)
    return other - true


def kl_ball_weights(m: torch.Tensor, r: float, steps: int = BISECTION_STEPS) -> torch.Tensor:
    """argmax_p Σ p_c m_c over the simplex with KL(u ‖ p) ≤ r (u uniform): p_c ∝ 1/(ν − m_c),
    ν from KL(u ‖ p(ν)) = r by bisection. r = 0 or equal margins give the uniform p."""
    dtype = torch.float32 if m.device.type == "mps" else torch.float64
    m = m.to(dtype)
    C = m.numel()
    if r <= 0:
        return torch.full_like(m, 1.0 / C)
    top = m.max()

    def kl(log_s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        inv = 1.0 / (top + log_s.exp() - m)  # 1/(ν − m_c) > 0
        p = inv / inv.sum()
        return -math.log(C) - p.log().mean(), p

    lo, hi = m.new_tensor(-30.0), m.new_tensor(12.0)  # KL(lo) ≥ KL(hi): larger ν is more uniform
    for _ in range(steps):
        mid = (lo + hi) / 2
        too_far = kl(mid)[0] > r  # p(mid) is outside the ball: move toward uniform
        lo = torch.where(too_far, mid, lo)
        hi = torch.where(too_far, hi, mid)
    return kl(hi)[1]  # the feasible end


def class_margins(margin: torch.Tensor, y: torch.Tensor, C: int, dist: Any = None) -> torch.Tensor:
    """The batch's per-class mean margin (the global batch's under DDP); −1 for an absent class."""
    sums = torch.zeros(2, C, dtype=torch.float64, device=y.device)
    sums[0].index_add_(0, y, margin.double())
    sums[1].index_add_(0, y, torch.ones_like(margin, dtype=torch.float64))
    if dist is not None:
        sums = distributed.all_sum(dist, sums)
    return torch.where(sums[1] > 0, sums[0] / sums[1].clamp_min(1), torch.full_like(sums[0], -1.0))


@register("weighting", "faal")
@dataclass
class FAALWeighting(Weighting):
    """FAAL: every batch, class weights p* from the KL(u ‖ p) ≤ r problem over the classes' mean
    adversarial probability margins; example i gets C·p*_{y_i} in units of the uniform weight."""

    r: float = opt(0.5, "radius of the KL(uniform ‖ p) ball over class weights (official "
                        "run_prn.py: --scale 0.5; 0: uniform)", nonneg)
    from_init: bool = opt(False, "FAAL fine-tunes a trained model (its paper's use): the run must "
                                 "start from `init` (the faal preset; faal-scratch: false)")
    warmup: int | str = opt(0, "plain training first (none in the official fine-tuning)",
                            kind="warmup")

    @staticmethod
    def check(cfg: Any) -> None:
        if cfg.faal.from_init and cfg.init is None:
            raise ConfigError("faal fine-tunes a trained model, as in its paper: pass --init RUN (e.g. "
                              "a PGD-AT run; the paper: 2 epochs, --set optim.lr=0.01 "
                              "optim.milestones=[0.5]), or use --method faal-scratch")

    def bind(self, info: dict[str, Any]) -> None:
        self.C = info.get("num_classes", 10)
        self.dist = info.get("dist")
        self.sums: torch.Tensor | None = None  # this epoch's Σ p* per class and the batch count

    def start_epoch(self, epoch: int, epochs: int, measure: Any = None) -> None:
        self.sums = None

    def raw(self, out: LossOutput, y: torch.Tensor, info: AttackResult | None,
            ctx: StepContext) -> torch.Tensor:
        margin = probability_margin(out.logits_adv.detach(), y)  # type: ignore[union-attr]
        p = kl_ball_weights(class_margins(margin, y, self.C, self.dist), self.r)
        row = torch.cat([p, p.new_ones(1)])
        self.sums = row if self.sums is None else self.sums + row
        return (self.C * p[y]).to(out.loss.dtype)

    def epoch_log(self) -> dict[str, Any]:
        if self.sums is None:
            return {"reweighting": False}
        mean = (self.sums[:-1] / self.sums[-1]).tolist()
        return {"reweighting": True, "class_w": [round(v, 5) for v in mean]}

    def state_dict(self) -> dict[str, Any]:
        return {"sums": self.sums}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sums = state["sums"]
