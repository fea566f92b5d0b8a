"""A per-epoch look at the validation split: per-class clean and robust error and losses.

Validation-driven methods (FRL, WAT, DONE's class-level DRO on validation losses) set their
class parameters from how each class does on held-out data, never on the test set. The probe
takes a fixed, stratified subset of the validation split (``val.n`` points), attacks it with
PGD on CE at the training threat model (``val.steps`` steps of ε/4) with the model in eval
mode, and reports per class: clean and robust error, the mean clean CE, adversarial CE and
KL(p(x) ‖ p(x')). Its noise is seeded by (seed, epoch), so a resumed run measures the same.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from dorat.attacks import PGDSpec, kl_per_example, mode, pgd
from dorat.config.parts import nonneg, opt, positive, section, unit
from dorat.data.loader import Split, as_unit_images, balanced_counts, stratified_indices
from dorat.errors import ConfigError


@section("val")
@dataclass(frozen=True)
class ValConfig:
    n: int = opt(1000, "stratified validation points the per-epoch probe attacks", positive)
    steps: int = opt(10, "PGD steps of the probe (step ε/4, on CE)", positive)
    batch_size: int = opt(500, "the probe's batch", positive)
    every: int = opt(0, "probe every N epochs for any method (and after the last), logged as "
                        "val_sa, val_ra_pgd, val_worst_class_pgd, val_tail30_pgd in log.jsonl "
                        "(what `dorat tune`'s pruner reads); 0: only for methods that need it",
                     nonneg)
    keep_best: str = opt("none", "keep RUN/best.safetensors: the epoch with the best probe value "
                                 "(val_<metric>), probed every epoch; `dorat eval --which best`",
                         choices=("none", "ra_pgd", "worst_class_pgd", "tail30_pgd", "sa"))
    co_guard: str = opt("auto", "catastrophic-overfitting guard (probe every epoch); auto: on for "
                                "single-step training attacks", choices=("auto", "on", "off"))
    co_margin: float = opt(0.2, "the guard fires when the probe's PGD accuracy falls this far below "
                                "its best while the training attack's accuracy rises", unit)
    co_restore: bool = opt(False, "when the guard fires: stop, and keep the best epoch's weights")


@dataclass
class ClassStats:
    """Per-class numbers of one probe (tensors of length C, float64) and their totals."""

    clean_err: torch.Tensor
    robust_err: torch.Tensor
    clean_loss: torch.Tensor
    robust_loss: torch.Tensor
    kl: torch.Tensor
    total_clean_err: float
    total_robust_err: float
    seconds: float

    def summary(self) -> dict[str, float]:
        """The probe as accuracies (fractions): clean, PGD, worst class and RA-Tail-30 under PGD,
        the log's val_* keys."""
        from dorat.evaluation.evaluate import tail_mean

        robust = (1 - self.robust_err).tolist()
        return {"val_sa": round(1 - self.total_clean_err, 6),
                "val_ra_pgd": round(1 - self.total_robust_err, 6),
                "val_worst_class_pgd": round(min(robust), 6),
                "val_tail30_pgd": round(tail_mean(robust), 6)}

    @property
    def boundary_err(self) -> torch.Tensor:
        """Robust minus clean error per class (FRL's boundary error)."""
        return self.robust_err - self.clean_err


class ValidationProbe:
    """Measures a model on a fixed stratified validation subset; see the module docstring."""

    def __init__(self, val: Split, num_classes: int, eps: float, norm: str, n: int, steps: int,
                 batch_size: int, seed: int, device: torch.device, channels_last: bool = False) -> None:
        counts = balanced_counts(val.y.cpu(), min(n, len(val)), num_classes, "val.n")
        idx = stratified_indices(val.y.cpu(), counts, seed, salt=17)
        self.x, self.y = val.x[idx.to(val.x.device)], val.y[idx.to(val.y.device)]
        self.num_classes, self.seed, self.device = num_classes, seed, device
        self.spec = PGDSpec(eps, eps / 4, steps, norm, "ce", train_mode=False)
        self.batch_size, self.channels_last = batch_size, channels_last
        self.last: ClassStats | None = None

    @staticmethod
    def check(val: Split | None, num_classes: int, who: str) -> None:
        """A method that needs the probe needs every class in the validation split."""
        if val is None or len(val) == 0:
            raise ConfigError(f"{who} reads the validation split every epoch: set data.val_size "
                              "(e.g. --set data.val_size=5000)")
        counts = torch.bincount(val.y.cpu(), minlength=num_classes)
        missing = (counts == 0).nonzero().flatten().tolist()
        if missing:
            raise ConfigError(f"{who}: class(es) {missing} have no validation example; raise "
                              "data.val_size (it is stratified) or check the data")

    def measure(self, model: nn.Module, epoch: int) -> ClassStats:
        t0 = time.perf_counter()
        C, dev = self.num_classes, self.device
        sums = torch.zeros(5, C, dtype=torch.float64, device=dev)  # clean err, robust err, 3 losses
        g = torch.Generator(device=dev)
        g.manual_seed(self.seed * 1_000_003 + 31 * 7919 + epoch)
        with mode(model, False):
            for b in range(0, len(self.y), self.batch_size):
                x = as_unit_images(self.x[b:b + self.batch_size].to(dev))
                if self.channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                y = self.y[b:b + self.batch_size].to(dev)
                with torch.no_grad():
                    clean = model(x)
                r = pgd(model, x, y, self.spec, generator=g, final_eval=False)
                with torch.no_grad():
                    adv = model(r.x_adv)
                    rows = torch.stack([
                        (clean.argmax(1) != y).double(), (adv.argmax(1) != y).double(),
                        F.cross_entropy(clean, y, reduction="none").double(),
                        F.cross_entropy(adv, y, reduction="none").double(),
                        kl_per_example(F.log_softmax(adv, 1), F.softmax(clean, 1)).double()])
                sums.index_add_(1, y, rows)
        counts = torch.bincount(self.y.to(dev), minlength=C).double().clamp_min(1)
        per = (sums / counts).cpu()
        n = len(self.y)
        self.last = ClassStats(per[0], per[1], per[2], per[3], per[4], float(sums[0].sum()) / n,
                               float(sums[1].sum()) / n, time.perf_counter() - t0)
        return self.last
