"""Experiment tracking beside log.jsonl: TensorBoard event files in RUN/tb (``log.tensorboard``).

Per epoch: every number of the log line as a scalar (loss, clean/adversarial accuracy, lr,
seconds, ex/s, ESS, largest weight, weight sums, r, the validation cost, ...), each class's
mean weight (``weights/class_mean/<class>``) and parameters a weighting logs per class (ε_c,
β_c, class weights, class losses: ``class/<key>/<class>``), and a histogram of the epoch's
instance weights (in units of the uniform weight). After the final evaluation: SA, RA per
attack and the per-class robust accuracies (``final/...``) at the last epoch's step.

Only the main process writes. A resumed run purges the events after its checkpoint's epoch
(``purge_step``), so curves never hold an epoch twice.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from dorat.errors import ConfigError

EXTRA = "dorat[tensorboard]"
TB_DIR = "tb"  # in the run directory: TensorBoard's event files


def _writer_class() -> Any:
    try:
        import tensorboard  # noqa: F401  (SummaryWriter needs it and fails late without it)
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ConfigError(f"log.tensorboard needs the tensorboard package: pip install '{EXTRA}' "
                          "(or pip install tensorboard), or turn it off") from None
    return SummaryWriter


def check_available(enabled: bool) -> None:
    """Before training: a requested tracker whose package is missing is one clear error."""
    if enabled:
        _writer_class()


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in str(name))


class TensorBoard:
    """Writes a run's curves to RUN/tb; ``start_epoch`` > 0 when resuming."""

    def __init__(self, run_dir: Path, classes: Sequence[str], start_epoch: int = 0) -> None:
        writer = _writer_class()
        self.classes = [_safe(c) for c in classes]
        self.w = writer(log_dir=str(Path(run_dir) / TB_DIR), purge_step=start_epoch + 1)

    def epoch(self, record: dict[str, Any], weights: dict[str, torch.Tensor] | None) -> None:
        step = int(record["epoch"])
        for k, v in record.items():
            if k == "epoch":
                continue
            tag = f"val/{k[4:]}" if k.startswith("val_") and k != "val_seconds" else f"train/{k}"
            if isinstance(v, bool):
                self.w.add_scalar(tag, float(v), step)
            elif isinstance(v, (int, float)) and math.isfinite(v):
                self.w.add_scalar(tag, v, step)
            elif isinstance(v, list) and len(v) == len(self.classes) and \
                    all(isinstance(t, (int, float)) for t in v):
                group = "weights/class_mean" if k == "w_class_mean" else f"class/{k}"
                for name, t in zip(self.classes, v):
                    if math.isfinite(t):
                        self.w.add_scalar(f"{group}/{name}", t, step)
        if weights is not None and len(weights.get("w", ())):
            self.w.add_histogram("weights/instance", weights["w"].float(), step)
        self.w.flush()

    def final(self, metrics: dict[str, Any], step: int) -> None:
        self.w.add_scalar("final/sa", metrics["sa"], step)
        for attack, v in metrics["ra"].items():
            self.w.add_scalar(f"final/ra/{attack}", v, step)
        for attack, per_class in metrics["per_class"].items():
            for name, v in zip(self.classes, per_class):
                if v is not None and math.isfinite(v):
                    self.w.add_scalar(f"final/per_class/{attack}/{name}", v, step)
        self.w.flush()

    def close(self) -> None:
        self.w.close()
