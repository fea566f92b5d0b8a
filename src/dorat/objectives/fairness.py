"""Robust-fairness weightings driven by the validation split (dorat.evaluation.probe): FRL and WAT.

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
from dorat.config.parts import nonneg, opt, positive, register
from dorat.errors import ConfigError, DoratError
from dorat.models.averaging import fold
from dorat.objectives.base import LossOutput, Measure, StepContext, Weighting
from dorat.system import distributed
from dorat.system.distributed import Dist


def _class_mean(w_class: torch.Tensor, y: torch.Tensor, dist: Dist | None = None) -> torch.Tensor:
    """Per-example weights w_class[y], normalised to sum 1 in the batch (FRL's Σw ℓ / Σw). Under
    DDP the sum is the global batch's, expressed per local example (DDP averages the ranks)."""
    w = w_class.to(device=y.device, dtype=torch.float64)[y]
    s = torch.stack([w.sum(), w.new_tensor(float(len(y)))])
    if dist is not None:
        s = distributed.all_sum(dist, s)
    return (w * (s[1] / len(y)) / s[0].clamp_min(1e-12)).float()


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
        self.dist = info.get("dist")

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
        return _class_mean(self.class_weights(1), y, self.dist).to(out.loss.dtype)

    def base_weights(self, out: LossOutput, y: torch.Tensor, ctx: StepContext) -> torch.Tensor | None:
        return _class_mean(self.class_weights(0), y, self.dist) if self.active else None

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
            out["lambda"] = [[round(float(v), 5) for v in row] for row in self.lam]  # clean, bndy, margin
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
    normalise: bool = opt(False, "divide the weights by their class average mean_c(w_c) + w_avg, so "
                          "that equal class weights give plain training's step size (the official "
                          "(w_y + w_avg)/|B| is about twice it: an ablation)")

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
        scale = w[:-1].mean() + w[-1] if self.normalise else 1.0  # a tensor: no host sync per batch
        return ((w[:-1][y] + w[-1]) / (scale * len(y))).to(dtype)

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


def _global(acc: torch.Tensor, dist: Dist | None) -> torch.Tensor:
    """Per-class sums of this rank, summed over the ranks (every rank then sets the same)."""
    return distributed.all_sum(dist, acc.clone()) if dist is not None else acc


def _class_means(acc: torch.Tensor | None, v: torch.Tensor, y: torch.Tensor, C: int) -> torch.Tensor:
    """Accumulate per-class sums of ``v`` (rows: examples) and counts in ``acc`` [C, D+1]."""
    v = v.detach().double().reshape(len(y), -1)
    add = torch.zeros(C, v.shape[1] + 1, dtype=torch.float64, device=y.device)
    add.index_add_(0, y, torch.cat([v, torch.ones(len(y), 1, dtype=v.dtype, device=v.device)], 1))
    return add if acc is None else acc.to(y.device) + add


@register("weighting", "cfa")
@dataclass
class CFAWeighting(Weighting):
    """CFA (Wei et al., CVPR 2023; official code PKU-ML/CFA): class-wise calibrated margins
    ε_c = (λ1 + r_c)·ε (CCM) and TRADES weights β_c = (λ2 + r_c)β / (1 + (λ2 + r_c)β) (CCR), r_c
    the class's robust training accuracy in the previous epoch; FAWA keeps an EMA of the weights
    over the epochs whose validation worst-class robust accuracy clears a threshold, and that
    average is the final model. The official decay, 0.88 per epoch, averages over the last ~8
    of 200 epochs (4% of training); applied per epoch to a short run it would take the first
    epochs' models into the final one (8 epochs: 41% of the average is epoch 1's model), so the
    decay per epoch is scaled to the run's length (``fawa_decay_epochs``).

    CCR's loss is (1 + β)·[(1 − β_c)·CE + β_c·KL]. The official code writes TRADES, with and
    without CCR, as (1 − β')·CE + β'·KL with β' = β/(1 + β): 1/(1 + β) of TRADES' CE + β·KL, a
    learning rate 7× smaller at β = 6 that its baseline shares. dorat's TRADES is CE + β·KL, so the
    factor (1 + β) keeps CFA at its own baseline's scale: at β_c = β/(1 + β) this is TRADES."""

    ccm: bool = opt(True, "class-wise calibrated margins (attack radius per class)")
    ccr: bool = opt(False, "class-wise calibrated TRADES β (TRADES losses only)")
    lambda_margin: float = opt(0.5, "λ1 of CCM (official default 0.5)", nonneg)
    lambda_beta: float = opt(0.5, "λ2 of CCR (official default 0.5)", nonneg)
    fawa: bool = opt(True, "fairness-aware weight averaging (the final model is the average)")
    fawa_decay: float = opt(0.88, "FAWA's EMA decay per epoch of a fawa_decay_epochs-epoch run "
                            "(official 0.88 of 200)", lambda v: None if 0 <= v < 1 else "must be in [0, 1)")
    fawa_decay_epochs: int = opt(200, "the run length fawa_decay is meant for: each epoch decays the "
                                 "average by fawa_decay^(fawa_decay_epochs/epochs), so it spans the same "
                                 "share of training (official: 200 epochs); 0: fawa_decay per epoch as is",
                                 nonneg)
    fawa_threshold: float = opt(0.2, "validation worst-class robust accuracy an epoch must reach "
                                "to enter the average (official: 0.24; README example 0.2)",
                                lambda v: None if 0 <= v <= 1 else "must be in [0, 1]")
    warmup: int | str = opt("5%", "plain training first (official begin: 10 of 200 epochs)", kind="warmup")

    def bind(self, info: dict[str, Any]) -> None:
        cfg = info["cfg"]
        self.C = info.get("num_classes", 10)
        self.beta = cfg.trades.beta if cfg.method.loss == "trades" else None
        self.dist = info.get("dist")
        self.robust: torch.Tensor | None = None  # r_c of the previous epoch
        self.acc: torch.Tensor | None = None  # this epoch's per-class [correct, count]
        self.avg: dict[str, torch.Tensor] | None = None  # FAWA's average (dorat.models.averaging.fold)
        self.active = False

    @staticmethod
    def check(cfg: Any) -> None:
        if cfg.cfa.fawa and cfg.optim.ema:
            raise ConfigError("cfa.fawa and optim.ema both make the final model a weight average; "
                              "turn one off (--set cfa.fawa=false or --set optim.ema=0)")

    def needs_validation(self) -> bool:
        return self.fawa

    def start_epoch(self, epoch: int, epochs: int, measure: Measure | None = None) -> None:
        if self.acc is not None:
            acc = _global(self.acc, self.dist)
            self.robust = (acc[:, 0] / acc[:, 1].clamp_min(1)).cpu()
        self.acc = None
        self.active = self.robust is not None and not self.in_warmup(StepContext(epoch, epochs, 0))

    def weights(self, out: LossOutput, y: torch.Tensor, info: AttackResult | None,
                ctx: StepContext) -> torch.Tensor:
        right = (out.logits_adv.detach().argmax(1) == y)  # type: ignore[union-attr]
        self.acc = _class_means(self.acc, right, y, self.C)
        b = self._class_beta(y)
        if b is None:
            return self.uniform(out, y)
        # the loss is β·KL: weight (1 + β)·β_c/β
        return ((1 + self.beta) * b / (self.beta * len(y))).to(out.loss.dtype)

    def base_weights(self, out: LossOutput, y: torch.Tensor, ctx: StepContext) -> torch.Tensor | None:
        b = self._class_beta(y)
        if b is None:
            return None
        return ((1 + self.beta) * (1 - b) / len(y)).to(out.base.dtype)  # type: ignore[union-attr]

    def _class_beta(self, y: torch.Tensor) -> torch.Tensor | None:
        if not (self.active and self.ccr and self.beta is not None):
            return None
        k = (self.lambda_beta + self.robust.to(y.device))[y]  # type: ignore[union-attr]
        return k * self.beta / (1 + k * self.beta)

    def class_eps(self) -> torch.Tensor | None:
        if not (self.active and self.ccm):
            return None
        return self.lambda_margin + self.robust  # type: ignore[operator]

    def end_epoch(self, epoch: int, epochs: int, measure: Measure | None, model: torch.nn.Module) -> None:
        if not self.fawa or measure is None:
            return
        worst = float(1 - measure().robust_err.max())
        if worst >= self.fawa_threshold:  # this epoch enters the average
            self.avg = fold(self.avg, model, self.epoch_decay(epochs), buffers="average")
        self.last_worst = worst

    def epoch_decay(self, epochs: int) -> float:
        """FAWA's decay per epoch of an ``epochs``-epoch run."""
        if not self.fawa_decay_epochs:
            return self.fawa_decay
        return self.fawa_decay ** (self.fawa_decay_epochs / max(epochs, 1))

    def final_state(self) -> dict[str, torch.Tensor] | None:
        if self.fawa and self.avg is None:
            self.final_message = (f"warning: no epoch reached cfa.fawa_threshold={self.fawa_threshold} "
                                  "(validation worst-class robust accuracy): the final model is the "
                                  "last epoch's, not a FAWA average")
        return self.avg

    def epoch_log(self) -> dict[str, Any]:
        out: dict[str, Any] = {"reweighting": self.active}
        if self.active and self.ccm:
            out["class_eps_scale"] = [round(float(v), 5) for v in self.class_eps()]  # type: ignore[union-attr]
        if self.active and self.ccr and self.beta is not None:
            out["class_beta"] = [round(float(v), 5) for v in self._class_beta(torch.arange(self.C))]  # type: ignore[union-attr]
        if self.fawa:
            out["fawa_epochs_in"] = self.avg is not None
            if hasattr(self, "last_worst"):
                out["val_worst_class_ra"] = self.last_worst
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"robust": self.robust, "acc": self.acc, "avg": self.avg}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.robust, self.acc, self.avg = state["robust"], state["acc"], state["avg"]


@register("weighting", "dafa")
@dataclass
class DAFAWeighting(Weighting):
    """DAFA (ICLR 2024; official code rucy74/DAFA): after the warm-up, class weights from the
    class similarity p̄_ij (mean adversarial softmax of class i's examples in the last warm-up
    epoch): w_i = 1 + λ Σ_{j≠i} (p̄_ij·p̄_jj if p̄_ii < p̄_jj else −p̄_ji·p̄_ii); they scale the
    class's ε and step and its clean-CE term (TRADES) or adversarial CE (AT)."""

    lam: float = opt(1.0, "λ of DAFA (official: 1.0 for CIFAR-10, 1.5 for CIFAR-100 and STL-10)", nonneg)
    warmup: int | str = opt("63.6%", "plain training first (official: 70 of 110 epochs)", kind="warmup")

    def bind(self, info: dict[str, Any]) -> None:
        self.C = info.get("num_classes", 10)
        self.trades = info["cfg"].method.loss == "trades"
        self.dist = info.get("dist")
        self.memory: torch.Tensor | None = None  # per-class sums of softmax(adv logits) + counts
        self.w: torch.Tensor | None = None  # the class weights, once computed
        self.collect = False

    def start_epoch(self, epoch: int, epochs: int, measure: Measure | None = None) -> None:
        first = not self.in_warmup(StepContext(epoch, epochs, 0))
        if first and self.w is None and self.memory is not None:
            mem = _global(self.memory, self.dist)
            self.w = self.class_weights(mem[:, :-1] / mem[:, -1:].clamp_min(1))
            if float(self.w.min()) <= 0:
                raise DoratError(f"DAFA's class weights reached {float(self.w.min()):.3g} (<= 0: a "
                                 "class would get no attack radius); lower dafa.lam")
        self.collect = self.w is None and not self.in_warmup(StepContext(epoch + 1, epochs, 0))

    def class_weights(self, p: torch.Tensor) -> torch.Tensor:
        d = torch.diagonal(p)
        harder = d[:, None] < d[None, :]  # i is the harder class of the pair (i, j)
        gain = torch.where(harder, p * d[None, :], -p.T * d[:, None])
        gain.fill_diagonal_(0)
        return (1 + self.lam * gain.sum(1)).cpu()

    def weights(self, out: LossOutput, y: torch.Tensor, info: AttackResult | None,
                ctx: StepContext) -> torch.Tensor:
        if self.collect:
            probs = torch.softmax(out.logits_adv.detach().double(), 1)  # type: ignore[union-attr]
            self.memory = _class_means(self.memory, probs, y, self.C)
        if self.w is None or self.trades:  # TRADES: the robust KL term stays uniform
            return self.uniform(out, y)
        return (self.w.to(y.device)[y] / len(y)).to(out.loss.dtype)

    def base_weights(self, out: LossOutput, y: torch.Tensor, ctx: StepContext) -> torch.Tensor | None:
        if self.w is None:
            return None
        return (self.w.to(y.device)[y] / len(y)).to(out.base.dtype)  # type: ignore[union-attr]

    def class_eps(self) -> torch.Tensor | None:
        return self.w

    def epoch_log(self) -> dict[str, Any]:
        return {"reweighting": self.w is not None,
                **({"class_w": [round(float(v), 5) for v in self.w]} if self.w is not None else {})}

    def state_dict(self) -> dict[str, Any]:
        return {"memory": self.memory, "w": self.w}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.memory, self.w = state["memory"], state["w"]
