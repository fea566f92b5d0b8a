"""Under torch.distributed, DONE's normaliser sees the global batch: every rank holds the same
u_t as one process with the whole batch, and the weights match (2 CPU processes, gloo)."""

from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dorat.objectives.base import LossOutput, StepContext
from dorat.objectives.done import KLDROWeighting


def _batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [(torch.rand(8, generator=g, dtype=torch.float64) * 4, torch.randint(0, 3, (8,), generator=g))
            for _ in range(5)]


def _run(weighting: KLDROWeighting, rank: int, world: int) -> tuple[list[torch.Tensor], list[float]]:
    ws, us = [], []
    for loss, y in _batches():
        part = slice(rank * 8 // world, (rank + 1) * 8 // world)
        w = weighting.weights(LossOutput(loss[part], None), y[part], None, StepContext(0, 1, 0))
        ws.append(w)
        us.append(float(weighting.log_u) if weighting.log_u is not None
                  else [float(v) for v in weighting.class_log_u])
    return ws, us


def _worker(rank: int, world: int, port: int, q) -> None:  # noqa: ANN001
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        out = {}
        for level in ("instance", "mixed"):
            ws, us = _run(KLDROWeighting(0.7, 0.3, level=level, num_classes=3), rank, world)
            out[level] = ([w.tolist() for w in ws], us)  # plain lists cross the queue safely
        q.put((rank, out))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_ranks_match_one_process_with_global_batch() -> None:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, 2, port, q)) for r in range(2)]
    for p in procs:
        p.start()
    results = dict(q.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    for level in ("instance", "mixed"):
        single_w, single_u = _run(KLDROWeighting(0.7, 0.3, level=level, num_classes=3), 0, 1)
        (w0, u0), (w1, u1) = results[0][level], results[1][level]
        t0, t1, ts = (torch.tensor(u, dtype=torch.float64) for u in (u0, u1, single_u))
        torch.testing.assert_close(t0, t1, rtol=0, atol=0, equal_nan=True)  # same u on every rank
        torch.testing.assert_close(t0, ts, rtol=1e-12, atol=0, equal_nan=True)
        for a, b, full in zip(w0, w1, single_w):
            # DDP averages the ranks' gradients: per-example weights are the global ones × world
            both = torch.tensor(a + b, dtype=torch.float64)
            assert torch.allclose(both / 2, full, rtol=1e-12), level
