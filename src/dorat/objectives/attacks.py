"""Training attacks (the lower level), registered by name; their fields are config sections.

``attack.*`` is the threat model and PGD's settings, shared by every attack; an attack that
needs more declares it in its own section (``fat.*``, ``barrier.*``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from dorat.attacks import AttackResult, PGDSpec, mode, pgd
from dorat.attacks.barrier import Barrier, barrier_attack
from dorat.config.parts import nonneg, opt, positive, register, section
from dorat.errors import ConfigError
from dorat.objectives.base import StepContext

TRADES_INIT_STD = 0.001  # TRADES / FAT start the attack at x + 0.001·N(0, 1)
BARRIER_GD_LR = 100.0


@dataclass
class ThreatModel:
    """The training attack's threat model and PGD settings (``attack.*``)."""

    section: ClassVar[str] = "attack"
    norm: str = opt("linf", "threat norm", choices=("linf", "l2"))
    eps: float = opt(0.1, "threat radius in [0, 1] pixel units",
                     lambda v: None if 0 <= v <= 1 else "must be in [0, 1]")
    alpha: float = opt(0.01, "step size", positive)
    steps: int = opt(10, "attack iterations (single-step attacks: 1)", positive)
    random_start: bool = opt(True, "uniform random start in the ε-ball")
    loss: str = opt("ce", "the loss PGD ascends", choices=("ce", "margin"))
    bn_mode: str = opt("eval", "model mode during the attack", choices=("eval", "train"))

    def spec(self, ctx: StepContext | None = None, **kw: Any) -> PGDSpec:
        """The PGD of this threat model; with ``ctx.eps_scale`` (class-wise margins) ε and the
        step are per-example tensors."""
        s = ctx.eps_scale if ctx is not None else None
        eps, alpha = (self.eps, self.alpha) if s is None else (self.eps * s, self.alpha * s)
        return PGDSpec(eps, alpha, self.steps, self.norm, kw.pop("loss", self.loss),
                       self.random_start, self.bn_mode == "train", **kw)


@register("attack", "none")
@dataclass
class NoAttack:
    """Standard (non-adversarial) training: x_adv = x."""

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                 ctx: StepContext) -> AttackResult:
        z = torch.zeros(len(y), dtype=torch.long, device=y.device)
        return AttackResult(x, z - 1, z)


@register("attack", "pgd")
@dataclass
class PGDAttack(ThreatModel):
    """PGD (Madry et al. 2018) on CE or margin from a uniform random start in the ε-ball."""

    normal_start: ClassVar[bool] = False  # TRADES / FAT: start at x + 0.001·N(0, 1)

    def pgd_spec(self, ctx: StepContext) -> PGDSpec:
        return self.spec(ctx)

    def target(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
        return None

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                 ctx: StepContext) -> AttackResult:
        target = self.target(model, x)
        init = None
        if self.normal_start and self.random_start:
            init = TRADES_INIT_STD * torch.randn(x.shape, generator=ctx.generator, device=x.device,
                                                 dtype=x.dtype)
        return pgd(model, x, y, self.pgd_spec(ctx), generator=ctx.generator, init=init,
                   target_probs=target, final_eval=False)


@register("attack", "pgd-kl")
@dataclass
class PGDKLAttack(PGDAttack):
    """TRADES' attack: PGD on KL(p(x) ‖ p(x')) from x + 0.001·N(0, 1)."""

    normal_start: ClassVar[bool] = True

    def pgd_spec(self, ctx: StepContext) -> PGDSpec:
        return self.spec(ctx, loss="kl")

    def target(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
        with torch.no_grad(), mode(model, self.bn_mode == "train"):
            return F.softmax(model(x), 1)


@register("attack", "pgd-early-stop")
@dataclass
class FATAttack(PGDAttack):
    """FAT (Zhang et al. 2020): PGD from x + 0.001·N that stops τ steps after the first miss."""

    section: ClassVar[str] = "fat"
    normal_start: ClassVar[bool] = True
    tau: int = opt(0, "extra PGD steps after the first misclassification", nonneg)
    dynamic_tau: bool = opt(True, "official schedule: tau+1 from 50/120, tau+2 from 90/120")
    compact: bool = opt(True, "leave stopped examples out of the later attack passes (the same "
                              "result, fewer passes; benchmarks/compaction.py)")

    def tau_at(self, ctx: StepContext) -> int:
        tau = self.tau
        if self.dynamic_tau:  # FAT's official dynamic τ over 120 epochs
            for frac, value in ((50 / 120, self.tau + 1), (90 / 120, self.tau + 2)):
                if ctx.epoch >= int(round(frac * ctx.epochs)):
                    tau = value
        return tau

    def pgd_spec(self, ctx: StepContext) -> PGDSpec:
        return self.spec(ctx, early_stop_tau=self.tau_at(ctx), compact=self.compact)


DEFAULT_STEPS = 10  # ThreatModel.steps' default: "not set" for a single-step attack


class SingleStep(ThreatModel):
    """A single-step attack: one signed step from a uniform random start. ``attack.steps`` and
    ``attack.alpha`` (PGD's) are not read: the step and the noise are multiples of ε in the
    attack's own section. A config that sets attack.steps to anything but 1 (or its default) is
    refused rather than silently run with one step."""

    def single_spec(self, ctx: StepContext, step: float, noise: float, clip: float | None) -> PGDSpec:
        s = ctx.eps_scale
        eps = self.eps if s is None else self.eps * s
        if clip is None:  # no ε-ball at all (N-FGSM): the step is only kept in the pixel box
            return PGDSpec(eps, step * eps, 1, self.norm, self.loss, self.random_start,
                           self.bn_mode == "train", start_radius=noise, ball=False)
        return PGDSpec(clip * eps, step * eps, 1, self.norm, self.loss, self.random_start,
                       self.bn_mode == "train", start_radius=noise / clip)

    def geometry(self) -> tuple[float, float, float | None]:
        """(step, noise radius, clip radius or None for no ε-ball), in units of ε."""
        raise NotImplementedError

    @classmethod
    def check(cls, cfg: Any) -> None:
        if cfg.attack.steps not in (1, DEFAULT_STEPS):
            raise ConfigError(f"{getattr(cls, '_dorat_name', cls.__name__)} is a single-step attack: "
                              f"attack.steps={cfg.attack.steps} would not be read; set attack.steps=1 "
                              "(or use method.attack=pgd for several steps)")

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                 ctx: StepContext) -> AttackResult:
        return pgd(model, x, y, self.single_spec(ctx, *self.geometry()), generator=ctx.generator,
                   final_eval=False)


@register("attack", "fgsm-rs")
@dataclass
class FGSMRSAttack(SingleStep):
    """FGSM with a random start (Wong et al. 2020, fast AT): δ uniform in the ε-ball, one signed
    step of fgsm.step·ε, clipped back to the ε-ball and the pixel box."""

    section: ClassVar[str] = "fgsm"
    step: float = opt(1.25, "the step in units of ε (official code: 10/255 at ε = 8/255)", positive)

    def geometry(self) -> tuple[float, float, float | None]:
        return self.step, 1.0, 1.0


@register("attack", "n-fgsm")
@dataclass
class NFGSMAttack(SingleStep):
    """N-FGSM (de Jorge et al. 2022): noise uniform in n_fgsm.noise·ε, one signed step of
    n_fgsm.step·ε, not clipped to the ε-ball (n_fgsm.clip = 0) — only to the pixel box."""

    section: ClassVar[str] = "n_fgsm"
    noise: float = opt(2.0, "the noise radius in units of ε (official: --unif 2)", positive)
    step: float = opt(1.0, "the step in units of ε (official: --alpha 8 at ε = 8/255)", positive)
    clip: float = opt(0.0, "clip the perturbation to clip·ε (0: never; official default)", nonneg)

    def geometry(self) -> tuple[float, float, float | None]:
        return self.step, self.noise, self.clip or None


@section("barrier")
@dataclass(frozen=True)
class BarrierConfig:
    """The log-barrier lower level (METHODS.md §1.2), read by its attacks and hypergradients."""

    c: float = opt(1e-4, "log-barrier weight c", positive)
    lam: float = opt(0.0, "quadratic regulariser lambda", nonneg)
    steps: int | None = opt(None, "lower-level steps (null: attack.steps)", positive)
    lr: float | None = opt(None, "step (null: 100 for barrier-gd, attack.alpha for barrier-adam)",
                           positive)

    @staticmethod
    def barrier(cfg: Any) -> Barrier:
        return Barrier(cfg.attack.eps, cfg.barrier.c, cfg.barrier.lam)

    @staticmethod
    def check(cfg: Any) -> None:
        if cfg.attack.norm != "linf":
            raise ConfigError("the barrier lower level and hypergradients are for attack.norm=linf")
        if cfg.attack.eps <= 0:
            raise ConfigError("the barrier lower level needs attack.eps > 0")


@register("attack", "barrier-gd")
@dataclass
class BarrierAttack(ThreatModel):
    """Training-time log-barrier lower level (``barrier.*``) solved by semi-implicit GD."""

    optimizer: ClassVar[str] = "gd"
    reads: ClassVar[tuple[str, ...]] = ("barrier",)
    check = staticmethod(BarrierConfig.check)

    def bind(self, info: dict[str, Any]) -> None:
        cfg = info["cfg"]
        self.barrier = BarrierConfig.barrier(cfg)
        self.lower_steps = cfg.barrier.steps or self.steps
        # GD's barrier part is semi-implicit, so its step is bounded by 1/curvature and a large
        # lr is safe (measured on Fashion-MNIST: 10 to 1000 give the same attack strength).
        self.lr = cfg.barrier.lr or (BARRIER_GD_LR if self.optimizer == "gd" else self.alpha)

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                 ctx: StepContext) -> AttackResult:
        return barrier_attack(model, x, y, self.barrier, self.lower_steps, self.lr, self.optimizer,
                              generator=ctx.generator, train_mode=self.bn_mode == "train")


@register("attack", "barrier-adam")
@dataclass
class BarrierAdamAttack(BarrierAttack):
    """The barrier lower level solved by Adam (step barrier.lr, default attack.alpha)."""

    optimizer: ClassVar[str] = "adam"
