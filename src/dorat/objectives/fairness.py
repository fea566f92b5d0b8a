"""Robust-fairness weightings driven by the validation split (dorat.probe): FRL and WAT.

Both set class-level parameters once per epoch from how each class does on held-out data, and
turn them into per-example weights (and, for FRL's remargin, per-class attack radii):

* FRL (Xu et al., ICML 2021, "To be Robust or to be Fair"; official code hannxu123/fair_robust,
  frlrw.py / frlrmrw.py / utils_frl*.py): fairness constraints "class error ≤ average + τ" on the
  clean and the boundary (robust − clean) error; Lagrange multipliers λ updated by projected
  ascent each epoch; reweight: the clean and boundary terms of TRADES weighted per class by
  1/C + λ_c − mean(λ); remargin: class c attacked at ε·clamp(exp(2λ_c), 0.98, max_margin).
* WAT (Li & Liu, AAAI 2023, "WAT: Improve the Worst-class Robustness in Adversarial Training";
  official code by the authors, train_wat.py): Hedge (exponentiated gradient, step η) on the
  cumulative per-class validation loss, over the C classes plus one expert for the average
  loss; example i gets (w_{y_i} + w_avg)/|B| on both terms.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from dorat.attacks import AttackResult
from dorat.objectives.base import LossOutput, Measure, StepContext, Weighting
from dorat.parts import nonneg, opt, positive, register


def _class_mean(w_class: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-example weights w_class[y], normalised to sum 1 in the batch (FRL's Σw ℓ / Σw)."""
    w = w_class.to(device=y.device, dtype=torch.float32)[y]
    return w / w.sum().clamp_min(1e-12)


@register("weighting", "frl")
@dataclass
class FRLWeighting(Weighting):
    """FRL: Lagrangian class reweighting (reweight) and/or class-wise margins (remargin)."""

    reweight: bool = opt(True, "weight each class's clean and boundary terms by its multipliers")
    remargin: bool = opt(False, "attack each class at its own ε (multiplier exp(2λ))")
    tau_clean: float = opt(0.07, "allowed excess of a class's clean error over the average "
                           "(official bound0: 0.07 with remargin, 0.1 reweight only)", nonneg)
    tau_boundary: float = opt(0.07, "allowed excess of a class's boundary error (bound1)", nonneg)
    rate: float = opt(0.05, "multiplier step of the reweight constraints (rate1; halved every "
                      "40 epochs, as the official loop does)", positive)
    rate_margin: float = opt(0.2, "multiplier step of the remargin constraints (rate2)", positive)
    lim: float = opt(0.5, "the reweight multipliers' total mass at most (official lim: 0.5)", positive)
    max_margin: float = opt(3.0, "largest ε multiplier (official: 3 in frlrmrw, 2.5 in frlrw)",
                            lambda v: None if v >= 1 else "must be >= 1")
    warmup: int | str = opt("50%", "plain training first (the official code fine-tunes a robust "
                            "pre-trained model: a hot start)", kind="warmup")

    def bind(self, info: dict[str, Any]) -> None:
        C = info.get("num_classes", 10)
        self.lam = torch.zeros(3, C, dtype=torch.float64)  # clean, boundary, margin multipliers
        self.active = False

    def needs_validation(self) -> bool:
        return True

    def start_epoch(self, epoch: int, epochs: int, measure: Measure | None = None) -> None:
        self.active = not self.in_warmup(StepContext(epoch, epochs, 0))
        if not self.active or measure is None:
            return
        s = measure()
        gamma0 = s.clean_err - s.total_clean_err - self.tau_clean
        gamma1 = s.boundary_err - (s.total_robust_err - s.total_clean_err) - self.tau_boundary
        rate = self.rate * 0.5 ** ((epoch + 1) // 40)
        if self.reweight:
            self.lam[0] = self._simplex(self.lam[0] + rate * gamma0.clamp(min=-1000))
            self.lam[1] = self._simplex(self.lam[1] + 2 * rate * gamma1.clamp(min=-1000))
        if self.remargin:
            self.lam[2] = self.lam[2] + self.rate_margin * gamma1

    def _simplex(self, lam: torch.Tensor) -> torch.Tensor:
        lam = lam.clamp(min=0)
        return self.lim * lam / lam.sum() if lam.sum() > self.lim else lam

    def class_weights(self, k: int) -> torch.Tensor:
        """1/C + λ_c − mean(λ) for the clean (k=0) or boundary (k=1) term."""
        lam = self.lam[k]
        return 1 / len(lam) + lam - lam.mean()

    def weights(self, out: LossOutput, y: torch.Tensor, info: AttackResult | None,
                ctx: StepContext) -> torch.Tensor:
        if not self.active:
            return self.uniform(out, y)
        return _class_mean(self.class_weights(1), y).to(out.loss.dtype)

    def base_weights(self, out: LossOutput, y: torch.Tensor, ctx: StepContext) -> torch.Tensor | None:
        return _class_mean(self.class_weights(0), y) if self.active else None

    def class_eps(self) -> torch.Tensor | None:
        if not (self.active and self.remargin):
            return None
        return torch.exp(2 * self.lam[2]).clamp(0.98, self.max_margin)

    def epoch_log(self) -> dict[str, Any]:
        out: dict[str, Any] = {"reweighting": self.active}
        if self.active:
            out["class_w_clean"] = [round(float(v), 5) for v in self.class_weights(0)]
            out["class_w_boundary"] = [round(float(v), 5) for v in self.class_weights(1)]
            if self.remargin:
                out["class_eps_scale"] = [round(float(v), 5) for v in self.class_eps()]  # type: ignore[union-attr]
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"lam": self.lam}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.lam = state["lam"]


@register("weighting", "wat")
@dataclass
class WATWeighting(Weighting):
    """WAT: Hedge on the cumulative per-class validation loss (+ one average-loss expert)."""

    eta: float = opt(0.1, "Hedge step size η (official: 0.1)", positive)
    warmup: int | str = opt(0, "uniform first: epochs, or a share of the run", kind="warmup")

    def bind(self, info: dict[str, Any]) -> None:
        cfg = info["cfg"]
        C = info.get("num_classes", 10)
        # the validation cost WAT minimises: TRADES' clean CE + β·KL, or the adversarial CE
        self.beta = cfg.trades.beta if cfg.method.loss == "trades" else None
        self.cum = torch.zeros(C + 1, dtype=torch.float64)
        self.w = torch.ones(C + 1, dtype=torch.float64)  # the official start: all ones

    def needs_validation(self) -> bool:
        return True

    def start_epoch(self, epoch: int, epochs: int, measure: Measure | None = None) -> None:
        if epoch == 0 or measure is None or self.in_warmup(StepContext(epoch, epochs, 0)):
            return  # WAT updates after each epoch's training, from the model it ends with
        s = measure()
        cost = s.robust_loss if self.beta is None else s.clean_loss + self.beta * s.kl
        self.cum = self.cum + torch.cat([cost, cost.mean().view(1)])
        self.w = len(cost) * torch.softmax(self.eta * self.cum, 0)  # C·exp(ηΣcost)/Σ, stable

    def _per_example(self, y: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        w = self.w.to(y.device)
        return ((w[:-1][y] + w[-1]) / len(y)).to(dtype)

    def weights(self, out: LossOutput, y: torch.Tensor, info: AttackResult | None,
                ctx: StepContext) -> torch.Tensor:
        return self.uniform(out, y) if self.in_warmup(ctx) else self._per_example(y, out.loss.dtype)

    def base_weights(self, out: LossOutput, y: torch.Tensor, ctx: StepContext) -> torch.Tensor | None:
        return None if self.in_warmup(ctx) else self._per_example(y, out.loss.dtype)

    def epoch_log(self) -> dict[str, Any]:
        return {"class_w": [round(float(v), 5) for v in self.w[:-1]], "w_avg_expert": float(self.w[-1])}

    def state_dict(self) -> dict[str, Any]:
        return {"cum": self.cum, "w": self.w}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.cum, self.w = state["cum"], state["w"]
