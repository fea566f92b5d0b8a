"""Weight averaging: one exponential moving average of a model's weights, for every method.

``fold`` is the mechanism: ``avg ← d·avg + (1 − d)·θ`` over a model's floating-point state,
with integer buffers (BatchNorm's ``num_batches_tracked``) taken as they are. Two users:

- ``optim.ema`` (``EMA`` below): the average of Rebuffi et al. (2021) and Gowal et al. (2020),
  updated after every optimizer step. As the reference PyTorch code of those papers
  (imrahulr/adversarial_robustness_pytorch, ``ema_update`` and ``update_bn``): the decay ramps
  up as min(d, (1 + t)/(10 + t)) over the t steps since ``optim.ema_start``, before which the
  average is the current weights, and the average's BatchNorm statistics are *copied* from the
  trained model (the running statistics are already an average; averaging them again would mix
  statistics of weights the average does not hold). The probe, ``val.keep_best``, the
  catastrophic-overfitting guard, model.safetensors and the final evaluation use the average.
- CFA's FAWA (dorat.objectives.fairness): a *filtered* average, updated once per epoch when
  the epoch's validation worst-class robust accuracy clears a threshold; it averages the
  BatchNorm statistics too, as the official CFA code averages the whole state dict.

Both are stored in the checkpoint (at an epoch's end and within one), so a resume is bitwise.
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn

from dorat.config.parts import warmup_epochs


@torch.no_grad()
def fold(avg: dict[str, torch.Tensor] | None, model: nn.Module, decay: float,
         buffers: str = "copy") -> dict[str, torch.Tensor]:
    """One step of the average, in place: ``avg ← decay·avg + (1 − decay)·θ`` for the model's
    parameters; its buffers (BatchNorm statistics) are copied (``buffers="copy"``) or averaged
    too (``"average"``); integer buffers are always copied. ``avg`` None: a copy of the model's
    state starts the average."""
    if buffers not in ("copy", "average"):
        raise ValueError(f"buffers must be 'copy' or 'average', got {buffers!r}")
    sd = model.state_dict()
    if avg is None:
        return {k: v.detach().clone() for k, v in sd.items()}
    params = {n for n, _ in model.named_parameters()}
    for k, v in sd.items():
        a = avg[k]
        if v.is_floating_point() and (k in params or buffers == "average"):
            a.mul_(decay).add_(v.detach().to(a.device, a.dtype), alpha=1 - decay)
        else:
            a.copy_(v)
    return avg


class EMA:
    """``optim.ema``: the per-step average and a model that holds it (for the probe and the end)."""

    def __init__(self, model: nn.Module, decay: float, start: int | str, epochs: int,
                 steps_per_epoch: int) -> None:
        self.decay = decay
        self.start_step = warmup_epochs(start, epochs) * steps_per_epoch
        self.avg = fold(None, model, 0.0)
        self.model = copy.deepcopy(model)
        for p in self.model.parameters():
            p.requires_grad_(False)

    def decay_at(self, step: int) -> float:
        """The decay after global step ``step`` (0-based): 0 before the start, then the ramp."""
        t = step - self.start_step
        if t < 0:
            return 0.0
        return min(self.decay, (1.0 + t) / (10.0 + t))

    def update(self, model: nn.Module, step: int) -> None:
        fold(self.avg, model, self.decay_at(step))

    def sync(self) -> nn.Module:
        """The averaged model, with the average loaded (call before using it)."""
        self.model.load_state_dict(self.avg)
        self.model.eval()
        return self.model

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.avg

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if set(state) != set(self.avg):
            raise ValueError("its weight average (optim.ema) does not fit this model")
        self.avg = {k: v.to(self.avg[k].device).clone() for k, v in state.items()}
