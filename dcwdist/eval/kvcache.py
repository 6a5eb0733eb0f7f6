"""A per-layer, per-KV-head cache of post-RoPE keys and values with eviction policies (seed 004).

Legend: L layers, K kv heads, H query heads (G = H / K per kv head), E head dim, T prompt
tokens, N tokens one head keeps.

Policies (each (layer, kv head) keeps at most its budget after every prefill / append):
- full:    keep everything.
- window:  FIFO / sliding window: the `budget` most recent tokens.
- h2o:     heavy hitters + recent (H2O): the `recent_ratio` share of the budget goes to the most
           recent tokens, the rest to the older tokens with the largest accumulated attention
           (prefill column sums of the causal softmax, plus every decode step's weights),
           summed over the head's query group.
- tier:    DCW tiers of the prefill (ctx.tiers; generated tokens are core): eviction order is
           old background tokens first, then buffer tokens off the stride grid, then strided
           buffer tokens, then core; the `window` most recent tokens go last. With no budget it
           keeps exactly the pattern: all core, buffer within `buffer_window` or on the
           `stride` grid, background within `window`.
- learned: H2O selection under per-head budgets from `HeadBudget`, a [L, K] weight vector whose
           softmax splits the total budget over layers and heads.
Budget scope: "head" = each (layer, kv head) keeps `budget` tokens (learned: the same total,
L * K * budget, reallocated); "total" = `budget` tokens over all layers and heads together.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

import torch
from torch import nn

from dcwdist.attention.context import TIER_BUFFER, TIER_CORE

POLICIES = ("full", "window", "h2o", "tier", "learned")


@dataclass
class CacheConfig:
    """Which tokens the decode-time KV cache keeps."""

    policy: Literal["full", "window", "h2o", "tier", "learned"] = "full"
    """Eviction policy (see the module docstring)."""
    budget: int = 0
    """Tokens kept (per head or in total, see `scope`); 0 = unbounded (full, or tier's pattern)."""
    scope: Literal["head", "total"] = "head"
    """head: the budget holds for every (layer, kv head); total: summed over all of them."""
    recent_ratio: float = 0.5
    """h2o / learned: share of a head's budget reserved for the most recent tokens."""
    window: int = 32
    """tier: recent window kept for background tokens (attention.window)."""
    buffer_window: int = 64
    """tier: recent window kept for buffer tokens (attention.buffer_window)."""
    stride: int = 8
    """tier: buffer tokens at positions = 0 mod stride are kept (attention.stride)."""

    def __post_init__(self):
        if self.policy not in POLICIES:
            raise ValueError(f"cache policy must be one of {POLICIES}, got {self.policy!r}")
        if self.scope not in ("head", "total"):
            raise ValueError(f"cache scope must be head or total, got {self.scope!r}")
        if self.budget < 0:
            raise ValueError(f"cache budget must be >= 0, got {self.budget}")
        if self.policy in ("window", "h2o", "learned") and self.budget == 0:
            raise ValueError(f"cache policy {self.policy} needs a budget > 0")
        if not 0.0 <= self.recent_ratio <= 1.0:
            raise ValueError(f"recent_ratio must be in [0, 1], got {self.recent_ratio}")
        if min(self.window, self.buffer_window, self.stride) < 1:
            raise ValueError("cache window, buffer_window and stride must be >= 1")


class HeadBudget(nn.Module):
    """Learned split of a KV budget over layers and KV heads: softmax of a [L, K] weight."""

    def __init__(self, n_layers: int, n_kv_heads: int):
        super().__init__()
        self.logits = nn.Parameter(torch.zeros(n_layers, n_kv_heads))

    def shares(self) -> torch.Tensor:
        """[L, K] fractions of the budget, summing to 1 (differentiable)."""
        return torch.softmax(self.logits.flatten(), 0).view_as(self.logits)

    @torch.no_grad()
    def allocate(self, total: int) -> torch.Tensor:
        """[L, K] int64 budgets summing to `total` (largest remainder), each at least 1."""
        n = self.logits.numel()
        if total < n:
            raise ValueError(f"a total budget of {total} tokens cannot give each of {n} heads one")
        want = self.shares().flatten().double().cpu() * (total - n)
        out = want.floor().long() + 1
        rest = total - int(out.sum())
        out[torch.argsort(want - want.floor(), descending=True)[:rest]] += 1
        return out.view_as(self.logits)


def head_budgets(cfg: CacheConfig, n_layers: int, n_kv_heads: int,
                 learned: Optional[HeadBudget] = None) -> Optional[torch.Tensor]:
    """[L, K] int64 per-head budgets, or None when unbounded."""
    if cfg.budget == 0 or cfg.policy == "full":
        return None
    n = n_layers * n_kv_heads
    total = cfg.budget * n if cfg.scope == "head" else cfg.budget
    if cfg.policy == "learned":
        learned = learned or HeadBudget(n_layers, n_kv_heads)
        return learned.allocate(total)
    if cfg.scope == "head":
        return torch.full((n_layers, n_kv_heads), cfg.budget, dtype=torch.int64)
    if total < n:
        raise ValueError(f"a total budget of {total} tokens cannot give each of {n} heads one")
    flat = torch.full((n,), total // n, dtype=torch.int64)
    flat[: total % n] += 1
    return flat.view(n_layers, n_kv_heads)


def prefill_attention_mass(q_THE: torch.Tensor, k_TKE: torch.Tensor, scale: float,
                           chunk: int = 256) -> torch.Tensor:
    """[K, T] causal-softmax attention each key receives over the prompt's queries, summed over
    the kv head's query group (H2O's accumulated scores; dense attention, chunked over queries)."""
    T, H, _ = q_THE.shape
    K = k_TKE.shape[1]
    G = H // K
    acc = torch.float64 if k_TKE.dtype == torch.float64 else torch.float32
    k_KET = k_TKE.permute(1, 2, 0).to(acc)
    q_HTE = q_THE.transpose(0, 1).to(k_KET.dtype)
    mass = torch.zeros(K, T, dtype=torch.float64, device=q_THE.device)
    key_idx = torch.arange(T, device=q_THE.device)
    for s in range(0, T, chunk):
        q = q_HTE[:, s:s + chunk].reshape(K, G * min(chunk, T - s), -1)  # [K, G*c, E]
        scores = torch.bmm(q, k_KET) * scale  # [K, G*c, T]
        qi = torch.arange(s, min(s + chunk, T), device=q_THE.device).repeat(G)
        scores.masked_fill_(key_idx[None, None, :] > qi[None, :, None], float("-inf"))
        mass += torch.softmax(scores, -1).sum(1).double()
    return mass


class _Head:
    """What one (layer, kv head) keeps: keys/values [N, E], positions, tiers, scores [N]."""

    __slots__ = ("k", "v", "pos", "tier", "score")

    def __init__(self, k, v, pos, tier, score):
        self.k, self.v, self.pos, self.tier, self.score = k, v, pos, tier, score

    def take(self, idx: torch.Tensor) -> None:
        self.k, self.v, self.pos = self.k[idx], self.v[idx], self.pos[idx]
        self.tier, self.score = self.tier[idx], self.score[idx]


class KVCache:
    """Post-RoPE K/V of every (layer, kv head) under one eviction policy; decode attends to it."""

    def __init__(self, cfg: CacheConfig, n_layers: int, n_kv_heads: int,
                 learned: Optional[HeadBudget] = None):
        self.cfg = cfg
        self.n_layers, self.n_kv_heads = n_layers, n_kv_heads
        self.budgets = head_budgets(cfg, n_layers, n_kv_heads, learned)
        self.heads: list[list[Optional[_Head]]] = [[None] * n_kv_heads for _ in range(n_layers)]
        self.peak = torch.zeros(n_layers, n_kv_heads, dtype=torch.int64)
        """Largest size each head reached after any prefill / append (eviction included)."""

    # -- filling ------------------------------------------------------------------------------
    def prefill(self, layer: int, k_TKE: torch.Tensor, v_TKE: torch.Tensor, pos_T: torch.Tensor,
                tier_T: torch.Tensor, mass_KT: Optional[torch.Tensor] = None) -> None:
        """Load a prompt's keys/values (with tiers and accumulated attention), then evict."""
        T = k_TKE.shape[0]
        for g in range(self.n_kv_heads):
            score = (mass_KT[g].double() if mass_KT is not None
                     else torch.zeros(T, dtype=torch.float64, device=k_TKE.device))
            self.heads[layer][g] = _Head(k_TKE[:, g].clone(), v_TKE[:, g].clone(), pos_T.clone(),
                                         tier_T.clone(), score.clone())
            self._evict(layer, g)

    def append(self, layer: int, k_KE: torch.Tensor, v_KE: torch.Tensor, pos: int,
               tier: int = TIER_CORE) -> None:
        """Add one token's keys/values to every kv head of `layer`, then evict."""
        for g in range(self.n_kv_heads):
            h = self.heads[layer][g]
            dev = k_KE.device
            new = _Head(k_KE[g:g + 1], v_KE[g:g + 1], torch.tensor([pos], device=dev),
                        torch.tensor([tier], device=dev),
                        torch.zeros(1, dtype=torch.float64, device=dev))
            if h is None:
                self.heads[layer][g] = new
            else:
                h.k, h.v = torch.cat([h.k, new.k]), torch.cat([h.v, new.v])
                h.pos, h.tier = torch.cat([h.pos, new.pos]), torch.cat([h.tier, new.tier])
                h.score = torch.cat([h.score, new.score])
            self._evict(layer, g)

    # -- attending ----------------------------------------------------------------------------
    def attend(self, layer: int, q_HE: torch.Tensor, scale: float) -> torch.Tensor:
        """One query token's attention output [H, E] over the kept cache (dense softmax per kv
        head); adds the weights to the heads' accumulated scores."""
        H = q_HE.shape[0]
        G = H // self.n_kv_heads
        out = torch.empty_like(q_HE)
        for g in range(self.n_kv_heads):
            h = self.heads[layer][g]
            q = q_HE[g * G:(g + 1) * G]
            acc = torch.promote_types(q.dtype, torch.float32)
            p = torch.softmax((q.to(acc) @ h.k.to(acc).t()) * scale, -1)  # [G, N]
            out[g * G:(g + 1) * G] = (p @ h.v.to(acc)).to(q_HE.dtype)
            h.score += p.sum(0).double()
        return out

    # -- eviction -----------------------------------------------------------------------------
    def budget(self, layer: int, g: int) -> Optional[int]:
        return None if self.budgets is None else int(self.budgets[layer, g])

    def _evict(self, layer: int, g: int) -> None:
        h = self.heads[layer][g]
        idx = self.keep_indices(h, self.budget(layer, g))
        if idx is not None:
            h.take(idx)
        self.peak[layer, g] = max(int(self.peak[layer, g]), h.pos.numel())

    def keep_indices(self, h: _Head, budget: Optional[int]) -> Optional[torch.Tensor]:
        """Sorted indices of the tokens `h` keeps, or None to keep all."""
        cfg, n = self.cfg, h.pos.numel()
        if cfg.policy == "tier":
            return self._tier_keep(h, budget)
        if budget is None or n <= budget:
            return None
        dev = h.pos.device
        if cfg.policy == "window":
            return torch.arange(n - budget, n, device=dev)
        # h2o / learned: recent window + heavy hitters among the older tokens.
        n_recent = min(budget, max(1, round(budget * cfg.recent_ratio)))
        old = n - n_recent
        heavy = torch.topk(h.score[:old], budget - n_recent).indices
        return torch.cat([heavy.sort().values, torch.arange(old, n, device=dev)])

    def _tier_keep(self, h: _Head, budget: Optional[int]) -> Optional[torch.Tensor]:
        cfg, n = self.cfg, h.pos.numel()
        age = h.pos.max() - h.pos
        cls = torch.full_like(h.pos, 4)  # 4: outside the tier pattern
        strided = (h.tier == TIER_BUFFER) & (h.pos % cfg.stride == 0)
        cls = torch.where(strided, 3, cls)
        cls = torch.where((h.tier == TIER_BUFFER) & (age < cfg.buffer_window), 2, cls)
        cls = torch.where(h.tier == TIER_CORE, 1, cls)
        cls = torch.where(age < cfg.window, 0, cls)
        if budget is None:  # the tier pattern itself
            keep = cls < 4
            return None if bool(keep.all()) else keep.nonzero().squeeze(1)
        if n <= budget:
            return None
        key = cls * (int(age.max()) + 1) + age  # by class, then most recent first
        return torch.topk(key, budget, largest=False).indices.sort().values

    # -- inspection ---------------------------------------------------------------------------
    def sizes(self) -> torch.Tensor:
        """[L, K] tokens each head keeps now."""
        return torch.tensor([[0 if h is None else h.pos.numel() for h in row]
                             for row in self.heads], dtype=torch.int64)

    def positions(self, layer: int, g: int) -> torch.Tensor:
        return self.heads[layer][g].pos

    def nbytes(self) -> int:
        return sum(h.k.numel() * h.k.element_size() + h.v.numel() * h.v.element_size()
                   for row in self.heads for h in row if h is not None)
