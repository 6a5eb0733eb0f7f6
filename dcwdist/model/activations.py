"""Activation memory for very long sequences: the sequence-tiled MLP and the CPU offload of the
tensors kept between forward and backward (the two single-GPU tools of DeepSpeed's Arctic Long
Sequence Training, written for this model).

- `tiled(fn, x, tile)` runs a token-wise function over tiles of `tile` tokens, each tile under
  its own non-reentrant checkpoint. The forward keeps only each tile's input (a view of x);
  backward recomputes and differentiates one tile at a time (the autograd engine finishes the
  last tile before it starts the one before), so fn's intermediates peak at [tile, F] instead
  of [B*T, F]. The same ops on row slices, so the result equals the untiled one.
- `OffloadSaved` is a saved-tensor hook pair: every tensor autograd saves inside it with at least
  `min_numel` elements (parameters excepted) is copied to host memory (pinned, on a side stream
  when it lives on a GPU) and copied back, one layer ahead, when backward needs it. Around
  checkpointed layers the only tensors autograd saves are the layers' inputs (the RoPE tables
  passed beside them are smaller), so the device keeps no hidden state per layer.
- `KeptOutputs` keeps the attention kernels' outputs from a checkpointed layer's forward, so the
  recompute in backward does not run the attention forward again.
- `LiveBytes` counts the bytes of tensor storage created inside it that are still alive (current
  and peak): the CPU stand-in for torch.cuda.max_memory_allocated in tests and
  benchmarks/activation_memory.py.

Legend: B batch, T tokens, D model dim, F MLP inner dim.
"""
from __future__ import annotations

import weakref
from typing import Callable, Optional

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.checkpoint import (CheckpointPolicy, checkpoint,
                                    create_selective_checkpoint_contexts, noop_context_fn)


def tiled(fn: Callable[[torch.Tensor], torch.Tensor], x_BTD: torch.Tensor,
          tile: int) -> torch.Tensor:
    """fn(x) for a token-wise fn ([N, D] -> [N, D']), computed over tiles of `tile` tokens of the
    flattened B*T; with gradients on, each tile is recomputed in backward. Returns [B, T, D'].

    With gradients off (evaluation) the tiles just run one after another, which bounds the
    inference peak the same way. tile <= 0, or one tile covering every token, is plain fn(x).
    """
    D = x_BTD.shape[-1]
    x_ND = x_BTD.reshape(-1, D)
    N = x_ND.shape[0]
    if tile <= 0 or N <= tile:
        return fn(x_BTD)
    outs = []
    for s in range(0, N, tile):
        x_tile = x_ND[s:s + tile]
        if torch.is_grad_enabled():
            # fn has no randomness: skip saving RNG states per tile.
            outs.append(checkpoint(fn, x_tile, use_reentrant=False, preserve_rng_state=False))
        else:
            outs.append(fn(x_tile))
    return torch.cat(outs).view(*x_BTD.shape[:-1], -1)


class _OnHost:
    """A saved tensor moved to host memory: the device it goes back to, its group (the layer
    that saved it) and, on a GPU, the events of its copy out and of a prefetched copy back."""

    __slots__ = ("device", "tensor", "group", "copied", "back", "back_ready")

    def __init__(self, device: torch.device, tensor: torch.Tensor, group: int):
        self.device, self.tensor, self.group = device, tensor, group
        self.copied = self.back = self.back_ready = None


class OffloadSaved(torch.autograd.graph.saved_tensors_hooks):
    """Saved tensors of at least `min_numel` elements live in host memory until backward.

    Use it around checkpointed layers: inside a checkpoint the checkpoint's own hooks take the
    layer's activations (the innermost hooks win), so these hooks see only what is kept across
    the checkpoint boundary, the layer's inputs (and, through `pack`, the attention outputs that
    `KeptOutputs` holds). A tensor already on the host (a CPU run) stays where it is, but still
    goes through the hooks and is counted. `offloaded_bytes` sums what was packed; one instance
    may be entered many times (once per layer).

    On a GPU the copies run on a side stream, so they overlap the compute: the copy out starts
    when the tensor is saved (the caching allocator keeps the device memory until it is done),
    and the copy back of a group (`begin_group`: the caller numbers the layers) is issued
    together with the group before it, so layer i - 1's tensors travel while layer i's backward
    runs. Backward visits groups in decreasing order, so at most two groups are on the device.
    """

    def __init__(self, min_numel: int):
        self.offloaded_bytes = 0
        self.min_numel = min_numel
        self._group = 0
        self._by_group: dict[int, list[_OnHost]] = {}
        self._stream: Optional[torch.cuda.Stream] = None
        super().__init__(self.pack, self.unpack)

    def begin_group(self, group: int) -> None:
        """Tensors packed from now on belong to `group` (a layer index; backward visits
        groups in decreasing order)."""
        self._group = group

    def pack(self, t: torch.Tensor):
        if (t.numel() < self.min_numel or isinstance(t, nn.Parameter)
                or t.layout != torch.strided):
            return t
        self.offloaded_bytes += t.numel() * t.element_size()
        if t.device.type != "cuda":
            return _OnHost(t.device, t, self._group)
        stream = self._side_stream(t.device)
        stream.wait_stream(torch.cuda.current_stream(t.device))
        host = torch.empty_like(t, device="cpu", pin_memory=True)
        with torch.cuda.stream(stream):
            host.copy_(t, non_blocking=True)
            packed = _OnHost(t.device, host, self._group)
            packed.copied = torch.cuda.Event()
            packed.copied.record(stream)
        t.record_stream(stream)  # t's memory is not reused before the copy has read it
        self._by_group.setdefault(self._group, []).append(packed)
        return packed

    def unpack(self, packed):
        if not isinstance(packed, _OnHost):
            return packed
        if packed.device.type != "cuda":
            return packed.tensor
        for g in (packed.group, packed.group - 1):  # this group now, the one before ahead
            for other in self._by_group.get(g, ()):
                self._fetch(other)
        self._fetch(packed)  # (a second unpack of one tensor fetches it again)
        current = torch.cuda.current_stream(packed.device)
        current.wait_event(packed.back_ready)
        out, packed.back = packed.back, None
        out.record_stream(current)  # allocated on the side stream, used (and freed) here
        group = self._by_group.get(packed.group)
        if group is not None:
            group.remove(packed)
            if not group:
                del self._by_group[packed.group]
        return out

    def _fetch(self, packed: _OnHost) -> None:
        if packed.back is not None:
            return
        stream = self._side_stream(packed.device)
        with torch.cuda.stream(stream):
            stream.wait_event(packed.copied)
            packed.back = packed.tensor.to(packed.device, non_blocking=True)
            packed.back_ready = torch.cuda.Event()
            packed.back_ready.record(stream)

    def _side_stream(self, device: torch.device) -> torch.cuda.Stream:
        if self._stream is None:
            self._stream = torch.cuda.Stream(device)
        return self._stream


class KeptOutputs:
    """Attention kernel outputs kept from a checkpointed layer's forward for its recompute.

    Activation checkpointing runs each layer's forward twice: once in forward, once inside
    backward to rebuild what the layer's backward needs. The attention kernel's outputs (out
    [B, T, H, E] and lse [B, H, T]) are small next to the work that makes them, so the first
    forward keeps them here and the recompute rebuilds the kernel's autograd node around them
    instead of running the kernel again (torchtitan's selective checkpointing saves SDPA's
    outputs for the same reason). Cost: one [T, H*E] tensor per layer and kernel call (one
    hidden state for the usual H*E = D); with `offload` it lives in host memory.

    A layer calls `begin_layer(i)` before its attention; the kernel wrapper asks `recall()`
    for its slot (the n-th kernel call of layer i). Recompute is told apart from the first
    forward by running inside the autograd engine. Nothing is kept with gradients off.
    """

    def __init__(self, offload: Optional[OffloadSaved] = None):
        self.offload = offload
        self._kept: dict[tuple[int, int], tuple] = {}
        self._layer, self._n = -1, 0

    def begin_layer(self, layer: int) -> None:
        self._layer, self._n = layer, 0

    def recall(self) -> tuple[Optional[tuple[int, int]], Optional[tuple]]:
        """(slot to `keep` under, None) in a first forward; (None, kept outputs) in the
        recompute (outputs None when nothing was kept); (None, None) with gradients off."""
        slot = (self._layer, self._n)
        self._n += 1
        if not torch.is_grad_enabled():
            return None, None
        if torch._C._current_graph_task_id() == -1:  # not inside backward: a first forward
            return slot, None
        packed = self._kept.pop(slot, None)
        if packed is None:
            return None, None
        unpack = self.offload.unpack if self.offload is not None else (lambda t: t)
        return None, tuple(unpack(p) for p in packed)

    def keep(self, slot: tuple[int, int], *tensors: torch.Tensor) -> None:
        pack = self.offload.pack if self.offload is not None else (lambda t: t)
        self._kept[slot] = tuple(pack(t.detach()) for t in tensors)

    def __len__(self) -> int:
        return len(self._kept)


# torch's fused SDPA kernels (flash, memory-efficient, cuDNN, CPU flash), whichever this build has
_SDPA_OPS = frozenset(
    getattr(torch.ops.aten, name).default
    for name in ("_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
                 "_scaled_dot_product_cudnn_attention",
                 "_scaled_dot_product_flash_attention_for_cpu")
    if hasattr(torch.ops.aten, name))


def _keep_sdpa(ctx, op, *args, **kwargs):
    return CheckpointPolicy.MUST_SAVE if op in _SDPA_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def checkpoint_context(keep_sdpa: bool) -> Callable:
    """`context_fn` for a layer's non-reentrant checkpoint. keep_sdpa: torch's SDPA outputs (and
    LSE) are kept from the forward, so the recompute skips them: `KeptOutputs` for the torch
    attention path, through selective checkpointing (torchtitan's policy). The kept tensors live
    in the checkpoint's own cache, on the device: `OffloadSaved` does not see them."""
    if not keep_sdpa:
        return noop_context_fn
    return lambda: create_selective_checkpoint_contexts(_keep_sdpa)


class LiveBytes(TorchDispatchMode):
    """Bytes of the tensor storages that ops create inside this mode and that are still alive:
    `current`, `peak` (and `reset_peak()`). Counts every new storage an op returns once (views
    and in-place results share an input's storage and are not new), in forward and backward;
    scratch an op frees before returning is not seen. Works on any device.
    """

    def __init__(self):
        super().__init__()
        self.current = self.peak = 0
        self._live: dict[int, int] = {}

    def reset_peak(self) -> None:
        self.peak = self.current

    def _freed(self, key: int) -> None:
        self.current -= self._live.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0]
                  if isinstance(t, torch.Tensor) and t.device.type != "meta"}
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor) or t.device.type == "meta":
                continue
            storage = t.untyped_storage()
            key, nbytes = storage.data_ptr(), storage.nbytes()
            if nbytes == 0 or key in self._live or key in inputs:  # views, in-place: not new
                continue
            self._live[key] = nbytes
            self.current += nbytes
            self.peak = max(self.peak, self.current)
            weakref.finalize(storage, self._freed, key)
        return out
