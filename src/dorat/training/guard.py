"""Per-epoch validation robustness: the best checkpoint (``val.keep_best``) and the
catastrophic-overfitting guard (``val.co_guard``).

Both read the validation probe (dorat.evaluation.probe: PGD-``val.steps`` on a fixed stratified subset of
``val.n`` points) after every epoch. Without a validation split the probe takes a fixed
stratified subset of the training split instead (``probe_split: train`` in log.jsonl).

- ``val.keep_best=METRIC`` (ra_pgd, worst_class_pgd, tail30_pgd, sa) keeps RUN/best.safetensors,
  the weights of the epoch with the highest probe value so far, beside the last epoch's
  model.safetensors; `dorat eval RUN --which best` evaluates it.
- The guard (``auto``: on for single-step training attacks, whose catastrophic overfitting is
  the known failure: Wong et al. 2020, de Jorge et al. 2022) declares catastrophic overfitting
  when the probe's PGD accuracy falls more than ``val.co_margin`` (0.2, the 20-point drop of the
  fast_adversarial code's early stop) below its best epoch while the training attack's accuracy
  rises: a warning and ``co_event`` in log.jsonl. With ``val.co_restore`` (``--co-restore``) the
  run stops there and its final model is the best epoch's (best.safetensors by ``keep_best``, by
  ``ra_pgd`` when that is not set), as the fast_adversarial code's ``--early-stop`` does.

Everything it decides is a function of the log's records, so a resumed run decides the same.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch.nn as nn

from dorat.files.checkpoint import load_weights, save_weights

BEST = "best.safetensors"
KEEP_CHOICES = ("none", "ra_pgd", "worst_class_pgd", "tail30_pgd", "sa")


@dataclass
class Watch:
    out: Path
    keep: str | None  # the probe key best.safetensors is kept by (val_ra_pgd, ...), or None
    guard: bool
    margin: float
    restore: bool
    steps: int
    log: Callable[[str], None]
    meta: dict[str, str]
    history: list[dict[str, Any]] = field(default_factory=list)
    restored_to: int | None = None

    @classmethod
    def build(cls, cfg: Any, out: Path, single_step: bool, log: Callable[[str], None],
              meta: dict[str, str], start_epoch: int) -> Watch | None:
        v = cfg.val
        guard = v.co_guard == "on" or (v.co_guard == "auto" and single_step)
        keep = None if v.keep_best == "none" else f"val_{v.keep_best}"
        if guard and v.co_restore and keep is None:
            keep = "val_ra_pgd"
        if not guard and keep is None:
            return None
        w = cls(out, keep, guard, v.co_margin, v.co_restore, v.steps, log, meta)
        w.history = _read_log(out / "log.jsonl", start_epoch)
        return w

    def _best(self, key: str) -> tuple[float, int] | None:
        seen = [(r[key], r["epoch"]) for r in self.history if key in r]
        return max(seen, key=lambda t: (t[0], -t[1])) if seen else None

    def after_epoch(self, record: dict[str, Any], model: nn.Module, main: bool) -> bool:
        """Update best.safetensors and check for catastrophic overfitting after the epoch whose
        log ``record`` (with the probe's val_* keys) is given; True: stop training now."""
        stop = False
        if self.keep is not None and self.keep in record:
            best = self._best(self.keep)
            if best is None or record[self.keep] > best[0]:
                if main:
                    save_weights(self.out / BEST, model, meta={**self.meta, "epoch": str(record["epoch"]),
                                                               self.keep: str(record[self.keep])})
                record["best"] = True
        if self.guard and "val_ra_pgd" in record and self.history:
            best = self._best("val_ra_pgd")
            prev = self.history[-1].get("train_acc_adv")
            ra, fg = record["val_ra_pgd"], record.get("train_acc_adv")
            if best is not None and prev is not None and fg is not None and best[0] - ra > self.margin \
                    and fg > prev:
                record["co_event"] = True
                back = self._best(self.keep) if self.keep is not None else None
                msg = (f"warning: catastrophic overfitting at epoch {record['epoch']}: PGD-{self.steps} "
                       f"accuracy on the probe fell from {100 * best[0]:.1f}% (epoch {best[1]}) to "
                       f"{100 * ra:.1f}% while the training attack's accuracy rose from {100 * prev:.1f}% "
                       f"to {100 * fg:.1f}%")
                if self.restore and back is not None:
                    self.restored_to = back[1]
                    record["co_restored_to"] = back[1]
                    stop = True
                    msg += f"; stopping and keeping epoch {back[1]}'s weights (--co-restore)"
                else:
                    msg += "; --co-restore (val.co_restore) stops and keeps the best epoch's weights"
                self.log(msg)
        self.history.append(record)
        return stop

    def final(self, model: nn.Module) -> bool:
        """After a stop by the guard: the model becomes the best epoch's (True when it did)."""
        if self.restored_to is None:
            return False
        load_weights(self.out / BEST, model)
        return True


def _read_log(path: Path, epochs_done: int) -> list[dict[str, Any]]:
    if epochs_done == 0 or not path.is_file():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if r.get("epoch", 0) <= epochs_done]
