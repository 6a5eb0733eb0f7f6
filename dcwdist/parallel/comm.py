"""The collectives context parallelism calls, each counting the bytes this rank sends.

Every CP exchange goes through these verbs, so a CommCounter handed in with the shard
sees exactly what the implementation sends (benchmarks/cp_comm.py predicts the same numbers from
shapes; tests/test_cp_comm.py checks one against the other).

Bytes sent per rank, by verb (P ranks in the group):
  ring_shift        the tensors themselves (one hop to the next rank)
  all_gather        (P - 1) x the local tensor (ring all-gather)
  all_reduce        2 (P - 1) / P x the tensor (ring all-reduce; the backward of all_gather:
                    gloo has no reduce-scatter, so all-reduce then keep this rank's slice)
  all_to_all        the rows (dim 0) sent to the other ranks (per-rank row counts; query
                    shipping, qship.py)
"""
from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.distributed as dist


@dataclass
class CommCounter:
    """Bytes sent by this rank, per label (e.g. 'ring_kv_fwd', 'strided_fwd')."""

    bytes: dict = field(default_factory=lambda: defaultdict(int))
    calls: dict = field(default_factory=lambda: defaultdict(int))

    def add(self, label: str, nbytes: int) -> None:
        self.bytes[label] += int(nbytes)
        self.calls[label] += 1

    def total(self) -> int:
        return sum(self.bytes.values())


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class _Pending:
    """Receive buffers of a ring shift, valid after wait()."""

    def __init__(self, reqs, bufs):
        self.reqs, self.bufs = reqs, bufs

    def wait(self) -> list[torch.Tensor]:
        for r in self.reqs:
            r.wait()
        return self.bufs


def ring_shift(tensors: list[torch.Tensor], group, counter: Optional[CommCounter] = None,
               label: str = "ring") -> _Pending:
    """Send `tensors` to the next rank of `group` and receive the previous rank's, async."""
    size, rank = dist.get_world_size(group), dist.get_rank(group)
    nxt = dist.get_global_rank(group, (rank + 1) % size)
    prv = dist.get_global_rank(group, (rank - 1) % size)
    tensors = [t.contiguous() for t in tensors]
    bufs = [torch.empty_like(t) for t in tensors]
    ops = [dist.P2POp(dist.isend, t, nxt, group) for t in tensors]
    ops += [dist.P2POp(dist.irecv, b, prv, group) for b in bufs]
    reqs = dist.batch_isend_irecv(ops)
    if counter is not None:
        counter.add(label, sum(_nbytes(t) for t in tensors))
    return _Pending(reqs, bufs)


def all_reduce_sum(t: torch.Tensor, group, counter: Optional[CommCounter] = None,
                   label: str = "all_reduce") -> torch.Tensor:
    size = dist.get_world_size(group)
    dist.all_reduce(t, group=group)
    if counter is not None:
        counter.add(label, 2 * (size - 1) * _nbytes(t) // size)
    return t


def _all_gather_raw(x: torch.Tensor, group, counter, label) -> torch.Tensor:
    size = dist.get_world_size(group)
    out = [torch.empty_like(x) for _ in range(size)]
    dist.all_gather(out, x.contiguous(), group=group)
    if counter is not None:
        counter.add(label, (size - 1) * _nbytes(x))
    return torch.stack(out)


class _AllGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, counter, label):
        ctx.group, ctx.counter, ctx.label = group, counter, label
        return _all_gather_raw(x, group, counter, label + "_fwd")

    @staticmethod
    def backward(ctx, grad_P):
        grad_P = all_reduce_sum(grad_P.contiguous().clone(), ctx.group, ctx.counter,
                                ctx.label + "_bwd")
        return grad_P[dist.get_rank(ctx.group)], None, None, None


def all_gather(x: torch.Tensor, group, counter: Optional[CommCounter] = None,
               label: str = "all_gather") -> torch.Tensor:
    """[*] on every rank -> [P, *] in group-rank order; differentiable (grads summed back)."""
    if x.requires_grad and torch.is_grad_enabled():
        return _AllGather.apply(x, group, counter, label)
    return _all_gather_raw(x, group, counter, label + "_fwd")


def all_to_all(x: torch.Tensor, send_rows: list[int], recv_rows: list[int], group,
               counter: Optional[CommCounter] = None, label: str = "all_to_all") -> torch.Tensor:
    """Rows x[sum(send_rows[:p]) : ...] go to rank p; returns the rows every rank sent here,
    [sum(recv_rows), *x.shape[1:]] in group-rank order (not differentiable: callers wrap it)."""
    out = x.new_empty((sum(recv_rows),) + tuple(x.shape[1:]))
    dist.all_to_all_single(out, x.contiguous(), recv_rows, send_rows, group=group)
    if counter is not None:
        me = dist.get_rank(group)
        row = math.prod(x.shape[1:]) * x.element_size()
        counter.add(label, (sum(send_rows) - send_rows[me]) * row)
    return out


class _KeepInGraph(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, *others):
        ctx.specs = [(o.shape, o.dtype, o.device) for o in others]
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return (grad, *(torch.zeros(s, dtype=d, device=dev) for s, d, dev in ctx.specs))


def keep_in_graph(x: torch.Tensor, *others: torch.Tensor) -> torch.Tensor:
    """x, with `others` (outputs of differentiable collectives) hung on its graph with zero
    gradient. A collective's backward is itself a collective, so it must run on every rank; a
    rank whose rows happen not to read a gathered set (no strided keys, no summaries) would
    otherwise skip it and deadlock the others."""
    if not torch.is_grad_enabled() or not any(o.requires_grad for o in others):
        return x
    return _KeepInGraph.apply(x, *others)
