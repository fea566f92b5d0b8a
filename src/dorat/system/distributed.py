"""Data-parallel training with torch.distributed (launched by ``torchrun``).

``torchrun --nproc-per-node N -m dorat train ...`` starts N processes with RANK, WORLD_SIZE,
LOCAL_RANK and MASTER_ADDR/PORT in the environment. dorat then:

* initialises the process group (NCCL on CUDA, gloo on CPU) and uses ``cuda:LOCAL_RANK``;
* gives every rank the same seeded permutation and augmentation draws of each global batch and
  lets each rank take its slice (``Batches(shard=(rank, world))``), so the global batch is the
  one a single process would see; ``batch_size`` is the global batch;
* wraps the model in DistributedDataParallel for the training forward (gradients averaged over
  ranks); attacks run on the unwrapped module with frozen parameters;
* reduces DONE's normaliser (objectives/done.py) and every logged number over ranks;
* lets rank 0 alone write config, log, checkpoints, weights and metrics; rank 0 checks the
  run directory first and a failure there stops every rank with the same message.

Resume reads the checkpoint on every rank, so the run directory must be on a file system all
ranks see (one machine, or a shared disk across machines).
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist
import torch.nn as nn

from dorat.errors import ConfigError, DoratError

T = TypeVar("T")


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    owns_group: bool = False  # we initialised the process group (and tear it down)

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1


def from_env(device_name: str) -> Dist:
    """Join the process group torchrun describes in the environment (no-op for one process)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if dist.is_initialized():
        return Dist(dist.get_rank(), dist.get_world_size(), local, False)
    use_cuda = torch.cuda.is_available() and device_name in ("auto", "cuda")
    if use_cuda:
        torch.cuda.set_device(local)
    try:
        # rank 0 alone runs the final evaluation (AutoAttack can take hours) while the others wait
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=datetime.timedelta(hours=6))
    except (RuntimeError, ValueError) as e:
        raise ConfigError(f"cannot join the torch.distributed process group ({e}); launch with "
                          "torchrun, which sets RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT") from None
    return Dist(rank, world, local, True)


def device_for(d: Dist, device: torch.device) -> torch.device:
    return torch.device("cuda", d.local_rank) if d.active and device.type == "cuda" else device


def on_main(d: Dist, fn: Callable[[], T]) -> T | None:
    """Run ``fn`` on rank 0; if it fails, every rank fails too (nobody waits for a dead rank 0):
    a DoratError with its message, anything else as a DoratError naming rank 0's failure."""
    if not d.active:
        return fn()
    msg: list[Any] = [None]
    result, failure = None, None
    if d.main:
        try:
            result = fn()
        except Exception as e:  # noqa: BLE001 (re-raised below, after telling the other ranks)
            failure = e
            msg[0] = (type(e).__name__ if isinstance(e, DoratError) else None, str(e))
    dist.broadcast_object_list(msg, src=0)
    if failure is not None:
        raise failure
    if msg[0] is not None:
        from dorat import errors

        kind, text = msg[0]
        raise getattr(errors, kind, DoratError)(text) if kind else DoratError(
            f"rank 0 failed ({text}); see its output")
    return result


def broadcast(d: Dist, obj: T) -> T:
    """Rank 0's ``obj`` on every rank."""
    if not d.active:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_sum(d: Dist, t: torch.Tensor) -> torch.Tensor:
    if d.active:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_max(d: Dist, t: torch.Tensor) -> torch.Tensor:
    if d.active:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


def gather_objects(d: Dist, obj: T) -> list[T]:
    """Every rank's ``obj`` on rank 0, in rank order (others get an empty list); between the
    run's own processes, never from a file."""
    if not d.active:
        return [obj]
    out: list[Any] = [None] * d.world if d.main else []
    dist.gather_object(obj, out if d.main else None, dst=0)
    return out


def all_gather_cat(d: Dist, t: torch.Tensor) -> torch.Tensor:
    """Concatenate equally sized tensors from every rank (rank order)."""
    if not d.active:
        return t
    parts = [torch.empty_like(t) for _ in range(d.world)]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts)


def wrap(d: Dist, model: nn.Module, sync_bn: bool) -> nn.Module:
    """The module the training forward runs through: DDP over ``model`` when distributed."""
    if not d.active:
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    if sync_bn:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    dev = next(model.parameters()).device
    return DDP(model, device_ids=[dev.index] if dev.type == "cuda" else None)


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module under DDP and torch.compile wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod  # type: ignore[assignment]
        elif isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model


def teardown(d: Dist) -> None:
    if d.owns_group and dist.is_initialized():
        dist.destroy_process_group()
