"""The parts a training method is composed of: attack × per-example loss × weighting.

A training step is

    info   = attack(model, x, y, ctx)              # x_adv and per-example attack info
    out    = loss(model, x, info.x_adv, y, ctx)    # per-example losses ℓ_i (reduction='none')
    w      = weighting.weights(out, y, info, ctx)  # detached weights ŵ_i (uniform: 1/|B|)
    L      = Σ_i ŵ_i ℓ_i                           # one backward pass

Every part is a dataclass registered by name (dorat.config.parts.register); its fields are its config
section. A part may define ``check(cfg)`` (a classmethod: cross-key validation, before anything
runs) and ``bind(info)`` (data facts after the data is read: num_classes, class_counts, the
training config, the process group).

Weights are in "objective units": uniform is 1/|B| each, so they sum to 1 in a batch for
normalised schemes. DONE's weights need not sum to 1 in a batch (its running normaliser spans
the whole data set); that is why the weighting owns the reduction.

Warm-up, one convention for every weighting: a weighting with a ``warmup`` field is uniform
(plain AT, or plain TRADES) for its first ``warmup`` epochs, given as a number of epochs (int)
or a share of the run ("50%": round(0.5 · epochs)); see dorat.config.parts.warmup_epochs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import torch
import torch.nn as nn

from dorat.attacks import AttackResult
from dorat.config.parts import register, warmup_epochs
from dorat.files.checkpoint import storable, tensors_to

if TYPE_CHECKING:
    from dorat.evaluation.probe import ClassStats

Measure = Callable[[], "ClassStats"]


@dataclass
class StepContext:
    epoch: int  # 0-based epoch being trained
    epochs: int  # total epochs of the run
    step: int  # global step index
    generator: torch.Generator | None = None  # attack noise
    # per-example multipliers of the attack's ε and step (class-wise margins: FRL, CFA, DAFA)
    eps_scale: torch.Tensor | None = None


@dataclass
class LossOutput:
    loss: torch.Tensor  # per-example term ℓ_i that the weighting reweights (requires grad)
    logits_adv: torch.Tensor | None  # logits on x_adv (train mode), for accuracy and weights
    # per-example term that is never reweighted, averaged uniformly (TRADES' clean CE): the
    # objective is Σ ŵ_i ℓ_i + mean_i base_i
    base: torch.Tensor | None = None


def ess_from_moments(sum_w: torch.Tensor, sum_w2: torch.Tensor, n: torch.Tensor | int
                     ) -> torch.Tensor:
    """(Σw)² / (|B|·Σw²) from a batch's moments (elementwise, so batches can be stacked)."""
    return sum_w ** 2 / (sum_w2 * n).clamp_min(1e-300)


def ess_fraction(w: torch.Tensor) -> torch.Tensor:
    """Effective sample size of a batch's weights relative to the batch: (Σw)² / (|B|·Σw²),
    1 for uniform weights, 1/|B| when one example takes all (float64 scalar)."""
    wd = w.double()
    return ess_from_moments(wd.sum(), wd.pow(2).sum(), len(w))


class Attack(Protocol):
    name: str

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                 ctx: StepContext) -> AttackResult: ...


class Loss(Protocol):
    name: str

    def __call__(self, model: nn.Module, x: torch.Tensor, x_adv: torch.Tensor, y: torch.Tensor,
                 ctx: StepContext) -> LossOutput: ...


@register("weighting", "uniform")
@dataclass
class Weighting:
    """Uniform ŵ_i = 1/|B|, and the base of every weighting: subclasses override ``raw``
    (per-example weights in units of the uniform weight) or ``weights``, and may keep state."""

    name = "uniform"
    final_message: ClassVar[str | None] = None  # one line the trainer logs after final_state(), if set
    # what bind() sets from the running process (its process group), not state: bind() sets it
    # again on resume, so step_state neither stores it nor names it as lost
    bound_attrs: ClassVar[tuple[str, ...]] = ("dist",)

    def bind(self, info: dict[str, Any]) -> None:
        """Data facts, once the data is read (num_classes, class_counts, cfg, dist)."""

    def in_warmup(self, ctx: StepContext) -> bool:
        """True during the weighting's ``warmup`` (none without that field)."""
        return ctx.epoch < warmup_epochs(getattr(self, "warmup", 0), ctx.epochs)

    def start_epoch(self, epoch: int, epochs: int, measure: Measure | None = None) -> None:
        """Called before each epoch (adaptive temperatures, class parameters). ``measure()``
        probes the current model on the validation split (dorat.evaluation.probe), for weightings whose
        ``needs_validation()`` is true."""

    def end_epoch(self, epoch: int, epochs: int, measure: Measure | None, model: nn.Module) -> None:
        """Called after each epoch's training, before its checkpoint (weight averages)."""

    def final_state(self) -> dict[str, torch.Tensor] | None:
        """Model weights to finish with instead of the last ones (CFA's FAWA), or None."""
        return None

    def needs_validation(self) -> bool:
        """True if ``start_epoch`` reads the validation split (then the run must hold one)."""
        return False

    def class_eps(self) -> torch.Tensor | None:
        """Per-class multipliers of the attack's ε and step (None: the same for every class)."""
        return None

    def base_weights(self, out: LossOutput, y: torch.Tensor, ctx: StepContext) -> torch.Tensor | None:
        """Weights of the loss's unweighted ``base`` term (TRADES' clean CE) in objective units;
        None: the plain mean."""
        return None

    def weights(self, out: LossOutput, y: torch.Tensor, info: AttackResult | None,
                ctx: StepContext) -> torch.Tensor:
        if type(self).raw is Weighting.raw or self.in_warmup(ctx):
            return self.uniform(out, y)
        return self.raw(out, y, info, ctx) / len(y)

    def raw(self, out: LossOutput, y: torch.Tensor, info: AttackResult | None,
            ctx: StepContext) -> torch.Tensor:
        return torch.ones(len(y), device=y.device, dtype=out.loss.dtype)

    @staticmethod
    def uniform(out: LossOutput, y: torch.Tensor) -> torch.Tensor:
        n = len(y)
        return torch.full((n,), 1.0 / n, device=y.device, dtype=out.loss.dtype)

    def epoch_log(self) -> dict[str, Any]:
        """Method-specific numbers for this epoch's log line."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what ``state_dict`` returned (checkpoint resume)."""

    def step_state(self) -> dict[str, Any]:
        """The state in the middle of an epoch (a checkpoint there, on SIGTERM or on the clock):
        ``state_dict()`` and every other attribute that is not a config field (what start_epoch
        and the steps set: this epoch's flags, accumulators) and that a checkpoint can store.
        A weighting keeping such state in another form overrides this and load_step_state."""
        attrs = {k: v for k, v in self._step_attrs().items() if storable(v)}
        moved = [k for k, v in attrs.items() if _on_accelerator(v)]
        return {"state": self.state_dict(), "attrs": attrs, "on_device": moved}

    def unstored_attrs(self) -> list[str]:
        """The attributes the default ``step_state`` leaves out because a checkpoint cannot
        store them (a resume within the epoch starts without them); none when it is overridden."""
        if type(self).step_state is not Weighting.step_state:
            return []
        return sorted(k for k, v in self._step_attrs().items() if not storable(v))

    def _step_attrs(self) -> dict[str, Any]:
        own = {f.name for f in fields(self)} if hasattr(self, "__dataclass_fields__") else set()
        return {k: v for k, v in vars(self).items() if k not in own and k not in self.bound_attrs}

    def load_step_state(self, state: dict[str, Any], device: torch.device) -> None:
        """Restore what ``step_state`` returned; tensors that were on an accelerator go to
        ``device`` (checkpoints hold CPU tensors)."""
        self.load_state_dict(state["state"])
        for k, v in state["attrs"].items():
            setattr(self, k, tensors_to(v, device) if k in state["on_device"] else v)


def _on_accelerator(v: Any) -> bool:
    if isinstance(v, torch.Tensor):
        return v.device.type != "cpu"
    if isinstance(v, dict):
        return any(_on_accelerator(x) for x in v.values())
    return isinstance(v, (list, tuple)) and any(_on_accelerator(x) for x in v)
