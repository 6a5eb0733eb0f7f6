"""Reference executor of a BlockLayout: attention over the layout's key blocks, in query chunks.

Shapes: q_BTHD [B, Tq, H, D]; k_BSKD / v_BSKD [B, Tk, Hkv, D] (Tk: the key set the layout indexes,
the full sequence or a compact set: strided keys, summaries); out [B, Tq, H, D]; lse [B, H, Tq] fp32.
Each chunk gathers only its rows' key blocks, so memory is O(chunk * keys-per-row), never the
dense [Tq, Tk] mask. Rows that see no key give out 0 and lse -inf, with finite (zero) gradients.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from dcwdist.attention.layout import (MODE_CAUSAL, MODE_FAR, MODE_FULL, MODE_WINDOW,
                                      BlockLayout)

_TINY = 1e-30


def attend_layout(q_BTHD: torch.Tensor, k_BSKD: torch.Tensor, v_BSKD: torch.Tensor,
                  layout: BlockLayout, scale: Optional[float] = None, impl: str = "torch",
                  chunk_size: int = 1024, kept=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention of q over the keys `layout` allows; returns (out [B,Tq,H,D], lse [B,H,Tq]).

    kept (AttnContext.kept): the kernel's outputs are kept from a checkpointed first forward and
    reused by its recompute (the torch path has no kernel to skip and ignores it)."""
    scale = q_BTHD.shape[-1] ** -0.5 if scale is None else scale
    if impl == "triton":
        # Imported lazily: the kernel module needs triton and is written by the kernels owner.
        from dcwdist.kernels.block_sparse import block_sparse_attention
        return block_sparse_attention(q_BTHD, k_BSKD, v_BSKD, layout, scale, kept=kept)
    if impl != "torch":
        raise ValueError(f"attention impl must be 'torch' or 'triton', got {impl!r}")
    return _attend_torch(q_BTHD, k_BSKD, v_BSKD, layout, scale, chunk_size)


def _padded_entries(layout: BlockLayout, rows: torch.Tensor
                    ) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
    """CSR rows [R] -> (entry index [R, M] clamped into range, valid [R, M]); None if M == 0."""
    start = layout.indptr[rows]
    count = layout.indptr[rows + 1] - start
    width = int(count.max()) if rows.numel() else 0
    if width == 0 or layout.nnz == 0:
        return None
    off = torch.arange(width, device=rows.device)
    valid = off[None, :] < count[:, None]
    return (start[:, None] + off[None, :]).clamp_max(layout.nnz - 1), valid


def padded_rows(layout: BlockLayout, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """CSR rows [R] -> (kv_block [R, M] int64, mode [R, M] int64 with -1 past each row's end)."""
    found = _padded_entries(layout, rows)
    if found is None:
        empty = torch.zeros(rows.numel(), 0, dtype=torch.int64, device=rows.device)
        return empty, empty
    entry, valid = found
    kv = torch.where(valid, layout.kv_block[entry].long(), 0)
    mode = torch.where(valid, layout.mode[entry].long(), -1)
    return kv, mode


def padded_bound(layout: BlockLayout, rows: torch.Tensor) -> Optional[torch.Tensor]:
    """CSR rows [R] -> entry_bound [R, M] int64 (0 past each row's end), aligned with
    padded_rows; None when the layout has no entry_bound (window / far for every entry)."""
    if layout.entry_bound is None:
        return None
    found = _padded_entries(layout, rows)
    if found is None:
        return torch.zeros(rows.numel(), 0, dtype=torch.int64, device=rows.device)
    entry, valid = found
    return torch.where(valid, layout.entry_bound[entry].long(), 0)


def tile_allowed(layout: BlockLayout, q_pos, k_pos, mode, q_doc=None, k_doc=None,
                 bound=None) -> torch.Tensor:
    """Token mask of gathered tiles: q_pos [..., Q], k_pos/mode/k_doc [..., K] -> bool [..., Q, K].

    bound (shape of mode, or None): per key the entry's window (MODE_WINDOW) / far (MODE_FAR),
    overriding layout.window / layout.far elementwise (padded_bound / layout.entry_bound)."""
    delta = q_pos[..., :, None] - k_pos[..., None, :]
    md = mode[..., None, :]
    window, far = layout.window, layout.far
    if bound is not None:
        window = far = bound[..., None, :]
    allowed = ((md == MODE_FULL)
               | ((md == MODE_CAUSAL) & (delta >= 0))
               | ((md == MODE_WINDOW) & (delta >= 0) & (delta < window))
               | ((md == MODE_FAR) & (delta >= far)))
    if q_doc is not None and k_doc is not None:
        allowed &= (q_doc[..., :, None] == k_doc[..., None, :]) & (k_doc[..., None, :] >= 0)
    return allowed


def _attend_torch(q_BTHD, k_BSKD, v_BSKD, layout: BlockLayout, scale: float, chunk_size: int):
    B, Tq, H, D = q_BTHD.shape
    Hkv = k_BSKD.shape[2]
    G, NQ, NK, qb, kb = (layout.groups, layout.num_q_blocks, layout.num_k_blocks,
                         layout.q_block, layout.k_block)
    hq, hk = H // G, Hkv // G  # query / kv heads per layout group (G is 1 or Hkv)
    q = F.pad(q_BTHD, (0, 0, 0, 0, 0, NQ * qb - Tq)).view(B, NQ, qb, H, D)
    pad_k = NK * kb - k_BSKD.shape[1]
    k = F.pad(k_BSKD, (0, 0, 0, 0, 0, pad_k)).view(B, NK, kb, Hkv, D)
    v = F.pad(v_BSKD, (0, 0, 0, 0, 0, pad_k)).view(B, NK, kb, Hkv, D)
    q_pos = layout.q_pos.view(B, NQ, qb)
    k_pos = layout.k_pos.view(B, NK, kb)
    q_doc = None if layout.q_doc is None else layout.q_doc.view(B, NQ, qb)
    k_doc = None if layout.k_doc is None else layout.k_doc.view(B, NK, kb)
    b_idx = torch.arange(B, device=q.device)
    # fp32 accumulation (fp64 inputs stay fp64, so references can be checked to 1e-10)
    acc = torch.float64 if q_BTHD.dtype == torch.float64 else torch.float32
    rows_per_chunk = max(1, chunk_size // qb)
    outs, lses = [], []
    for g in range(G):
        outs_g, lses_g = [], []
        for s in range(0, NQ, rows_per_chunk):
            e = min(NQ, s + rows_per_chunk)
            C = e - s
            rows = ((b_idx[:, None] * G + g) * NQ + torch.arange(s, e, device=q.device)).view(-1)
            kv, mode = padded_rows(layout, rows)
            bound = padded_bound(layout, rows)
            M = kv.shape[1]
            q_c = q[:, s:e, :, g * hq:(g + 1) * hq]  # [B, C, qb, hq, D]
            if M == 0:
                outs_g.append(q_c.new_zeros(B, C * qb, hq, D))
                lses_g.append(q_c.new_full((B, hq, C * qb), float("-inf"), dtype=acc))
                continue
            kv, mode = kv.view(B, C, M), mode.view(B, C, M)
            if bound is not None:
                bound = bound.view(B, C, M).repeat_interleave(kb, -1)
            bi = b_idx[:, None, None]
            k_c = k[bi, kv][..., g * hk:(g + 1) * hk, :].reshape(B, C, M * kb, hk, D)
            v_c = v[bi, kv][..., g * hk:(g + 1) * hk, :].reshape(B, C, M * kb, hk, D)
            allowed = tile_allowed(
                layout, q_pos[:, s:e], k_pos[bi, kv].reshape(B, C, M * kb),
                mode.repeat_interleave(kb, -1),
                None if q_doc is None else q_doc[:, s:e],
                None if k_doc is None else k_doc[bi, kv].reshape(B, C, M * kb),
                bound)  # [B,C,qb,M*kb]
            q_g = q_c.reshape(B, C, qb, hk, hq // hk, D).to(acc)
            scores = torch.einsum("bcqkrd,bcnkd->bckrqn", q_g, k_c.to(acc)) * scale
            scores = scores.masked_fill(~allowed[:, :, None, None], float("-inf"))
            # Max-shifted softmax by hand: empty rows keep m = 0, l = 0 -> out 0, lse -inf, and
            # every gradient stays finite (torch.logsumexp's backward is NaN on all -inf rows).
            m = scores.amax(-1, keepdim=True).detach()
            m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
            p = torch.exp(scores - m)
            l = p.sum(-1, keepdim=True)
            o = torch.einsum("bckrqn,bcnkd->bcqkrd", p / l.clamp_min(_TINY), v_c.to(acc))
            lse = torch.where(l > 0, m + torch.log(l.clamp_min(_TINY)),
                              torch.full_like(l, float("-inf")))[..., 0]  # [B,C,hk,r,qb]
            outs_g.append(o.reshape(B, C * qb, hq, D))
            lses_g.append(lse.permute(0, 2, 3, 1, 4).reshape(B, hq, C * qb))
        outs.append(torch.cat(outs_g, 1))
        lses.append(torch.cat(lses_g, 2))
    out = torch.cat(outs, 2)[:, :Tq].to(q_BTHD.dtype)
    return out, torch.cat(lses, 1)[:, :, :Tq]


def merge_partials(parts: Sequence[tuple[torch.Tensor, torch.Tensor]]
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """One softmax from partial results over disjoint key sets: [(out [B,T,H,D], lse [B,H,T])].

    Like reference.merge_by_lse for any number of parts, but with finite gradients when every
    part of a row is empty (padding queries): logaddexp's backward is NaN at (-inf, -inf).
    """
    acc = torch.float64 if parts[0][0].dtype == torch.float64 else torch.float32
    lse_PBHT = torch.stack([lse.to(acc) for _, lse in parts])
    m = lse_PBHT.amax(0).detach()
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    w_PBHT = torch.exp(lse_PBHT - m)
    total = w_PBHT.sum(0)
    frac = (w_PBHT / total.clamp_min(_TINY)).transpose(2, 3)[..., None]  # [P, B, T, H, 1]
    out = sum(o.to(acc) * frac[i] for i, (o, _) in enumerate(parts))
    lse = torch.where(total > 0, m + torch.log(total.clamp_min(_TINY)),
                      torch.full_like(total, float("-inf")))
    return out.to(parts[0][0].dtype), lse
