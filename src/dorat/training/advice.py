"""One-line warnings at the start of a run: settings that run, but probably not as meant (the
result is still right, so they are warnings, not errors)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from dorat.training.prepared import Run

MIN_PER_CLASS = 10  # fewer training examples in a class: its accuracies are noise


def warn_at_start(run: Run, log: Callable[[str], None]) -> None:
    for check in (idle_weighting, emulated_bf16, small_classes):
        check(run, log)


def idle_weighting(run: Run, log: Callable[[str], None]) -> None:
    """One line when a weighting's warm-up covers the whole run (it would never act)."""
    from dorat.config import parts

    w, cfg = run.method.weighting, run.cfg
    if hasattr(w, "warmup") and parts.warmup_epochs(w.warmup, cfg.epochs) >= cfg.epochs:
        key = f"{parts.field_sections(type(w))['warmup']}.warmup"
        log(f"warning: {key}={w.warmup} covers all {cfg.epochs} epochs: the weighting "
            f"'{w.name}' never acts and this is plain {cfg.method.loss} training; lower {key} or "
            "train for more epochs")


def emulated_bf16(run: Run, log: Callable[[str], None]) -> None:
    from dorat.system.runtime import bf16_native

    if run.cfg.perf.amp == "bf16" and bf16_native(run.device.type) is False:
        log(f"warning: perf.amp=bf16 on a {run.device.type} without native bf16 (no AVX512-BF16/AMX "
            "or compute capability < 8): it runs emulated, usually slower than fp32 (perf.amp=off)")


def small_classes(run: Run, log: Callable[[str], None]) -> None:
    counts = run.train.class_counts(run.data.num_classes)
    k = min(range(len(counts)), key=counts.__getitem__)
    if counts[k] < MIN_PER_CLASS:
        log(f"warning: class '{run.data.classes[k]}' has {counts[k]} training example"
            f"{'s' if counts[k] != 1 else ''} ({len(run.train)} in all): fewer than {MIN_PER_CLASS} a "
            "class makes per-class accuracies noise and training unreliable")


ESS_WARN = 0.1  # an epoch's mean effective sample size below this fraction of the batch
W_MAX_WARN = 200.0  # or one example weighing more than this many uniform weights (1/|B| each)


def concentration(record: dict[str, Any], weighting: str) -> str | None:
    """The warning when an epoch's weights concentrate on a few examples (its log record's
    ``ess`` and ``w_max``), naming the knobs that spread them; None when they do not."""
    ess, w_max = record.get("ess", 1.0), record.get("w_max", 0.0)
    if ess >= ESS_WARN and w_max <= W_MAX_WARN:
        return None
    knobs = ("raise done.r (the temperature: weights flatten as it grows) or set done.target_ess "
             "(r then follows a target ESS)" if weighting == "kl-dro"
             else "soften the weighting's temperature or strength (dorat train --list-keys)")
    return (f"warning: epoch {record['epoch']}'s weights concentrate (ESS {100 * ess:.1f}% of the "
            f"batch, one example up to {w_max:.0f}x the uniform weight; warned below "
            f"{100 * ESS_WARN:.0f}% or above {W_MAX_WARN:.0f}x): the gradient rests on a few examples; "
            f"{knobs}")
