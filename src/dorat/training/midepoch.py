"""Checkpoints within an epoch: on a stop (SIGTERM, Ctrl-C, a Slurm requeue; dorat.training.interrupts)
after the batch in progress, and every ``log.checkpoint_minutes``. Such a checkpoint is the
epoch-end one (model, optimizer, schedule; ``epoch`` = the epochs finished) plus ``mid_epoch``:
the batches done and, for each rank, what the epoch so far left behind (the attack generator,
the epoch's statistics, the weighting's ``step_state``, the time). A resume skips that epoch's
``start_epoch`` and its first batches, and goes on bitwise.

Under torchrun the ranks must agree on when to stop and save: every ``AGREE_EVERY`` batches
one all-reduce of two flags (a rank holds a stop; rank 0's clock says a checkpoint is due), so
a stop waits at most that many batches; every rank's state goes to rank 0, which writes the
one file. A resume needs the same number of processes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dorat.files.checkpoint import save_state, tensors_to
from dorat.objectives import Weighting
from dorat.system import distributed
from dorat.training.interrupts import HeldStops
from dorat.training.stats import EpochStats

AGREE_EVERY = 10  # batches between the ranks' agreements under torchrun


def decide(d: distributed.Dist, held: HeldStops, due: bool, batches_done: int,
           device: torch.device) -> tuple[bool, bool]:
    """(stop, checkpoint) after ``batches_done`` batches of the epoch, the same on every rank."""
    if not d.active:
        stop = held.pending is not None
        return stop, stop or due
    if batches_done % AGREE_EVERY:
        return False, False
    flags = torch.tensor([float(held.pending is not None), float(due and d.main)], device=device)
    stop, due = (bool(v) for v in distributed.all_max(d, flags).tolist())
    return stop, stop or due


def stop_at_epoch_end(d: distributed.Dist, held: HeldStops, device: torch.device) -> bool:
    """Whether any rank holds a stop at the epoch's end (every rank then stops)."""
    if not d.active:
        return held.pending is not None
    flag = torch.tensor([float(held.pending is not None)], device=device)
    return bool(distributed.all_max(d, flag).item())


def rank_state(gen: torch.Generator, stats: EpochStats, weighting: Weighting,
               measured: list[tuple[float, float]], seconds: float, cpu_seconds: float
               ) -> dict[str, Any]:
    return {"gen": gen.get_state(), "stats": stats.state(), "weighting": weighting.step_state(),
            "measured": [list(m) for m in measured], "seconds": seconds, "cpu_seconds": cpu_seconds}


def save(out: Path, meta: dict[str, str], epoch_state: Callable[[], dict[str, Any]],
         d: distributed.Dist, step: int, mine: dict[str, Any]) -> None:
    """The checkpoint after ``step`` batches of an epoch, written by rank 0: the trainer's
    ``epoch_state()`` (as at the epoch's start) and every rank's ``mine``."""
    ranks = distributed.gather_objects(d, tensors_to(mine, "cpu"))

    def write() -> None:
        state = {**epoch_state(), "mid_epoch": {"step": step, "ranks": ranks}}
        save_state(out / "checkpoint.safetensors", state, meta=meta)

    distributed.on_main(d, write)


@dataclass
class Resumed:
    """What a checkpoint taken within an epoch gives this rank back."""

    step: int  # batches of the epoch done
    stats: EpochStats
    gen_state: torch.Tensor
    seconds: float
    cpu_seconds: float
    measured: list[tuple[float, float]]


def restore(mid: dict[str, Any], d: distributed.Dist, steps_per_epoch: int, weighting: Weighting,
            num_classes: int, device: torch.device) -> Resumed:
    """This rank's part of ``mid``, with the weighting's state loaded from it; a ValueError (or
    TypeError, KeyError) when the checkpoint does not fit the run."""
    step, ranks = int(mid["step"]), list(mid["ranks"])
    if not 0 < step < steps_per_epoch:
        raise ValueError(f"it was taken after batch {step} of an epoch of {steps_per_epoch}")
    if len(ranks) != d.world:
        raise ValueError(f"it was taken in the middle of an epoch by {len(ranks)} process(es), and "
                         f"this run has {d.world}: resume it with {len(ranks)}")
    mine = ranks[d.rank]
    if not (isinstance(mine["gen"], torch.Tensor) and mine["gen"].dtype == torch.uint8):
        raise ValueError("its attack generator state is not a byte tensor")
    torch.Generator(device=device).set_state(mine["gen"])  # the size fits this device's kind
    weighting.load_step_state(mine["weighting"], device)
    return Resumed(step, EpochStats.from_state(mine["stats"], num_classes, device), mine["gen"],
                   float(mine["seconds"]), float(mine["cpu_seconds"]),
                   [(float(w), float(c)) for w, c in mine["measured"]])
