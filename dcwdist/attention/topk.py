"""block_topk attention (seed 004) and the pooled block scores it shares with CAA's global branch.

Shapes: q_BTHD [B, T, H, D]; k_BTKD [B, T, Hkv, D]; scores [B, G, NQ, NK] with G = Hkv groups.
Per kv-head group and query block: the top-k earlier key blocks of the same document by
<mean-pooled queries, mean-pooled keys> / sqrt(D), plus the causal diagonal block.

Deviation from seed 004 (which pools the query block itself): query block b is scored with the
pooled queries of block b - 1, the last complete block. Pooling block b's own queries lets token
i's key choice depend on tokens i+1.. of its block, which breaks the causal-mode invariant
(perturbing tokens after p changes nothing before p). Block b's candidates are blocks < b, so
block b - 1 always exists when there is anything to choose.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dcwdist.attention.config import AttentionConfig
from dcwdist.attention.context import AttnContext
from dcwdist.attention.executor import attend_layout
from dcwdist.attention.layout import BlockLayout
from dcwdist.attention.layouts import pad_doc, topk_layout


@torch.no_grad()
def pooled_block_means(q_BTHD: torch.Tensor, k_BTKD: torch.Tensor, doc_BT: torch.Tensor,
                       blk: int, groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(pooled queries, pooled keys), each [B, NB, G, D] fp32: every block's mean over its real
    tokens (padding values never move a choice) and over the group's heads.

    Each block's means depend on that block's tokens only, so a context-parallel rank computes
    its own blocks' and all-gathers them (dcwdist.parallel.caa_cp).
    """
    B, T, H, D = q_BTHD.shape
    Hkv = k_BTKD.shape[2]
    NB = -(-T // blk)
    real = (pad_doc(doc_BT, blk) >= 0).view(B, NB, blk, 1, 1).float()
    count = real.sum(2).clamp_min(1)

    def pool(x):
        x = F.pad(x.float(), (0, 0, 0, 0, 0, NB * blk - T)).view(B, NB, blk, x.shape[2], D)
        return (x * real).sum(2) / count  # [B, NB, heads, D]

    return (pool(q_BTHD).view(B, NB, groups, H // groups, D).mean(3),
            pool(k_BTKD).view(B, NB, groups, Hkv // groups, D).mean(3))


@torch.no_grad()
def scores_from_means(q_m: torch.Tensor, k_m: torch.Tensor) -> torch.Tensor:
    """[B, G, NQ, NK] from the whole sequence's pooled means [B, NB, G, D]: query block b is
    scored by block b - 1's pooled queries (module docstring)."""
    NB, D = q_m.shape[1], q_m.shape[-1]
    q_m = F.pad(q_m, (0, 0, 0, 0, 1, 0))[:, :NB]
    return torch.einsum("bqgd,bkgd->bgqk", q_m, k_m) * D ** -0.5


@torch.no_grad()
def pooled_block_scores(q_BTHD: torch.Tensor, k_BTKD: torch.Tensor, doc_BT: torch.Tensor,
                        blk: int, groups: int) -> torch.Tensor:
    """[B, G, NQ, NK] score of each query block against each key block, per kv-head group.

    Means run over a block's real tokens only and over the group's heads. Selection is
    discrete, so no gradient flows through it.
    """
    return scores_from_means(*pooled_block_means(q_BTHD, k_BTKD, doc_BT, blk, groups))


def block_topk_layout(q_BTHD, k_BTKD, doc_BT, blk: int, k: int) -> BlockLayout:
    """Layout with one group per kv head: top-k earlier blocks + diagonal, per group."""
    scores = pooled_block_scores(q_BTHD, k_BTKD, doc_BT, blk, k_BTKD.shape[2])
    return topk_layout(doc_BT, blk, scores, k)


class BlockTopkAttention(nn.Module):
    """Per query block, the `topk_blocks` best earlier key blocks plus the causal diagonal."""

    def __init__(self, cfg: AttentionConfig, layer_idx: int, n_heads: int, n_kv_heads: int,
                 head_dim: int):
        super().__init__()
        self.cfg, self.layer_idx = cfg, layer_idx
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, head_dim

    def forward(self, q_BTHD, k_BTKD, v_BTKD, ctx: AttnContext):
        cfg = self.cfg
        layout = block_topk_layout(q_BTHD, k_BTKD, ctx.doc_ids, cfg.block_size, cfg.topk_blocks)
        # Data-dependent per layer: kept per layer so the FLOPs counter can read what ran.
        ctx.cache[("block_topk", self.layer_idx)] = layout
        out, _ = attend_layout(q_BTHD, k_BTKD, v_BTKD, layout, None, cfg.impl, cfg.chunk_size)
        return out
