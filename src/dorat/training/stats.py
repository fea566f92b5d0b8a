"""The statistics of one training epoch, summed on the device as the steps go (no host sync
per step), reduced over DDP ranks at the epoch's end, and storable in a checkpoint taken in the
middle of an epoch (``state`` / ``from_state``), so a resumed epoch logs what an uninterrupted
one would.
"""

from __future__ import annotations

from typing import Any

import torch

from dorat.objectives.base import ess_from_moments
from dorat.system import distributed


class EpochStats:
    """Per-epoch sums kept on the device (no host sync per step)."""

    def __init__(self, num_classes: int, device: torch.device) -> None:
        z = lambda: torch.zeros((), device=device, dtype=torch.float64)  # noqa: E731
        self.loss, self.correct_adv, self.correct_clean, self.n = z(), z(), z(), 0
        self.w_max, self.batches = z(), 0
        self.w_moments: list[torch.Tensor] = []  # per batch: Σw, Σw², |B| (global under DDP)
        self.grad_norm_max, self.clipped, self.clip_used = z(), z(), False
        self.w_class = torch.zeros(num_classes, device=device, dtype=torch.float64)
        self.n_class = torch.zeros(num_classes, device=device, dtype=torch.float64)
        self.w_all: list[torch.Tensor] = []  # per example of the epoch: weight, label, loss,
        self.y_all: list[torch.Tensor] = []  # and position in the training split
        self.loss_all: list[torch.Tensor] = []
        self.idx_all: list[torch.Tensor] = []

    def add(self, loss: torch.Tensor, w: torch.Tensor, y: torch.Tensor,
            logits_adv: torch.Tensor | None, clean_correct: torch.Tensor,
            idx: torch.Tensor | None = None) -> None:
        b = len(y)
        self.loss += loss.double().sum()
        if logits_adv is not None:
            self.correct_adv += (logits_adv.argmax(1) == y).double().sum()
        self.correct_clean += clean_correct.double().sum()
        self.n += b
        wd = w.double() * b  # in units of the uniform weight 1/|B|
        wf = w.double()
        self.w_moments.append(torch.stack([wf.sum(), (wf * wf).sum(), wf.new_tensor(float(b))]))
        self.w_max = torch.maximum(self.w_max, wd.max())
        self.w_class.index_add_(0, y, wd)
        self.n_class.index_add_(0, y, torch.ones_like(wd))
        self.w_all.append(wd.float())
        self.y_all.append(y)
        self.loss_all.append(loss.detach().float())
        self.idx_all.append(idx if idx is not None else torch.full_like(y, -1))
        self.batches += 1

    def add_grad_norm(self, norm: torch.Tensor, clip: float) -> None:
        self.clip_used = True
        self.grad_norm_max = torch.maximum(self.grad_norm_max, norm.double())
        self.clipped += (norm > clip).double()

    def reduce(self, d: distributed.Dist) -> None:
        """Sum (max) the epoch's numbers over ranks; every rank then logs the same."""
        if not d.active:
            return
        sums = torch.stack([self.loss, self.correct_adv, self.correct_clean,
                            torch.tensor(float(self.n), device=self.loss.device, dtype=torch.float64)])
        distributed.all_sum(d, sums)
        self.loss, self.correct_adv, self.correct_clean = sums[:3]
        self.n = int(sums[3])
        if self.w_moments:  # the ESS of each global batch: its moments summed over ranks
            moments = distributed.all_sum(d, torch.stack(self.w_moments))
            self.w_moments = list(moments)
        distributed.all_sum(d, self.w_class)
        distributed.all_sum(d, self.n_class)
        maxes = distributed.all_max(d, torch.stack([self.w_max, self.grad_norm_max]))
        self.w_max, self.grad_norm_max = maxes[0], maxes[1]

    def gathered(self, d: distributed.Dist) -> dict[str, torch.Tensor]:
        """The epoch's per-example weights, labels, losses and split positions of all ranks."""
        parts = {"w": self.w_all, "y": self.y_all, "loss": self.loss_all, "idx": self.idx_all}
        return {k: distributed.all_gather_cat(d, torch.cat(v)).cpu() for k, v in parts.items()}

    def _ess(self) -> float:
        """Mean over batches of ESS/|B| (each batch the global one under DDP)."""
        if not self.w_moments:
            return 1.0
        m = torch.stack(self.w_moments)
        return float(ess_from_moments(m[:, 0], m[:, 1], m[:, 2]).mean())

    def _weight_sums(self) -> dict[str, float]:
        """Mean, min and max over batches of Σŵ in the (global) batch: 1 for normalised
        weightings; DONE's running normaliser lets it drift, and the step size with it."""
        if not self.w_moments:
            return {}
        s = torch.stack(self.w_moments)[:, 0]
        return {"w_sum_mean": float(s.mean()), "w_sum_min": float(s.min()), "w_sum_max": float(s.max())}

    def summary(self) -> dict[str, Any]:
        n = max(self.n, 1)
        wc = (self.w_class / self.n_class.clamp_min(1)).tolist()
        out = {
            "loss": float(self.loss) / n,
            "train_acc_clean": float(self.correct_clean) / n,
            "train_acc_adv": float(self.correct_adv) / n,
            "ess": self._ess(),
            **self._weight_sums(),
            "w_max": float(self.w_max),
            "w_class_mean": [round(v, 5) for v in wc],
        }
        if self.clip_used:  # with optim.grad_clip: how hard clipping worked this epoch
            out["grad_norm_max"] = float(self.grad_norm_max)
            out["clipped_frac"] = float(self.clipped) / max(self.batches, 1)
        return out

    def state(self) -> dict[str, Any]:
        """Everything summed so far, for a checkpoint in the middle of the epoch."""
        cat = lambda xs: torch.cat(xs) if xs else None  # noqa: E731
        return {"sums": torch.stack([self.loss, self.correct_adv, self.correct_clean, self.w_max,
                                     self.grad_norm_max, self.clipped]),
                "n": self.n, "batches": self.batches, "clip_used": self.clip_used,
                "w_moments": torch.stack(self.w_moments) if self.w_moments else None,
                "w_class": self.w_class, "n_class": self.n_class, "w_all": cat(self.w_all),
                "y_all": cat(self.y_all), "loss_all": cat(self.loss_all), "idx_all": cat(self.idx_all)}

    @classmethod
    def from_state(cls, state: dict[str, Any], num_classes: int, device: torch.device) -> EpochStats:
        s = cls(num_classes, device)
        sums = state["sums"].to(device)
        s.loss, s.correct_adv, s.correct_clean, s.w_max, s.grad_norm_max, s.clipped = sums.unbind()
        s.n, s.batches, s.clip_used = int(state["n"]), int(state["batches"]), bool(state["clip_used"])
        if state["w_moments"] is not None:
            s.w_moments = list(state["w_moments"].to(device).unbind())
        s.w_class, s.n_class = state["w_class"].to(device), state["n_class"].to(device)
        for k in ("w_all", "y_all", "loss_all", "idx_all"):  # one block for the batches so far
            if state[k] is not None:
                setattr(s, k, [state[k].to(device)])
        return s
