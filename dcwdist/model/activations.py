"""Activation memory for very long sequences: the sequence-tiled MLP and the CPU offload of the
tensors kept between forward and backward (the two single-GPU tools of DeepSpeed's Arctic Long
Sequence Training, written for this model).

- `tiled(fn, x, tile)` runs a token-wise function over tiles of `tile` tokens, each tile under
  its own non-reentrant checkpoint. The forward keeps only each tile's input (a view of x);
  backward recomputes and differentiates one tile at a time (the autograd engine finishes the
  last tile before it starts the one before), so fn's intermediates peak at [tile, F] instead
  of [B*T, F]. The same ops on row slices, so the result equals the untiled one.
- `OffloadSaved` is a saved-tensor hook pair: every tensor autograd saves inside it with at least
  `min_numel` elements (parameters excepted) is copied to host memory (pinned when it lives on a
  GPU, so the copies are asynchronous on the current stream) and copied back when backward needs
  it. Around checkpointed layers the only tensors autograd saves are the layers' inputs (the
  RoPE tables passed beside them are smaller), so the device keeps no hidden state per layer.
- `LiveBytes` counts the bytes of tensor storage created inside it that are still alive (current
  and peak): the CPU stand-in for torch.cuda.max_memory_allocated in tests and
  benchmarks/activation_memory.py.

Legend: B batch, T tokens, D model dim, F MLP inner dim.
"""
from __future__ import annotations

import weakref
from typing import Callable

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.checkpoint import checkpoint


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
    """A saved tensor moved to host memory, and the device it goes back to."""

    __slots__ = ("device", "tensor")

    def __init__(self, device: torch.device, tensor: torch.Tensor):
        self.device, self.tensor = device, tensor


class OffloadSaved(torch.autograd.graph.saved_tensors_hooks):
    """Saved tensors of at least `min_numel` elements live in host memory until backward.

    Use it around checkpointed layers: inside a checkpoint the checkpoint's own hooks take the
    layer's activations (the innermost hooks win), so these hooks see only what is kept across
    the checkpoint boundary, the layer's inputs. A tensor already on the host (a CPU run) stays
    where it is, but still goes through the hooks and is counted. `offloaded_bytes` sums what was
    packed; one instance may be entered many times (once per layer).
    """

    def __init__(self, min_numel: int):
        self.offloaded_bytes = 0

        def pack(t: torch.Tensor):
            if (t.numel() < min_numel or isinstance(t, nn.Parameter)
                    or t.layout != torch.strided):
                return t
            self.offloaded_bytes += t.numel() * t.element_size()
            if t.device.type == "cpu":
                return _OnHost(t.device, t)
            pin = t.device.type == "cuda"
            host = torch.empty_like(t, device="cpu", pin_memory=pin)
            host.copy_(t, non_blocking=pin)
            return _OnHost(t.device, host)

        def unpack(packed):
            if not isinstance(packed, _OnHost):
                return packed
            if packed.device.type == "cpu":
                return packed.tensor
            return packed.tensor.to(packed.device, non_blocking=packed.tensor.is_pinned())

        super().__init__(pack, unpack)


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
