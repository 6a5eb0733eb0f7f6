"""Run check functions in real multi-process gloo groups (torch.multiprocessing spawn).

A check is a module-level function check(rank, world, group, *args); every rank runs it and an
assertion on any rank fails the test (mp.spawn re-raises it). Several checks share one spawned
group to keep process start-up (the costly part on 2 cores) off the per-check time.
"""
from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tests.distributed import free_port


def _worker(rank, world, port, checks):
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=60))
    try:
        for fn, args in checks:
            torch.manual_seed(0)
            fn(rank, world, dist.group.WORLD, *args)
            dist.barrier()
    finally:
        dist.destroy_process_group()


def spawn(world: int, checks: list) -> None:
    """Run [(fn, args), ...] on `world` gloo ranks; raises if any rank fails."""
    mp.spawn(_worker, args=(world, free_port(), checks), nprocs=world, join=True)


def gather_full(x_local: torch.Tensor, group, sharding=None) -> torch.Tensor:
    """Sharded [B, T/P, ...] -> [B, T, ...] (test side, no autograd; zigzag unless `sharding`)."""
    from dcwdist.parallel.zigzag import zigzag_index
    P = dist.get_world_size(group)
    parts = [torch.empty_like(x_local) for _ in range(P)]
    dist.all_gather(parts, x_local.contiguous(), group=group)
    T = x_local.shape[1] * P
    out = x_local.new_zeros((x_local.shape[0], T) + tuple(x_local.shape[2:]))
    for r, part in enumerate(parts):
        idx = zigzag_index(T, P, r) if sharding is None else sharding.index(r)
        out[:, idx] = part
    return out
