"""Instruction-aware token scorer (seed 000 section 2.1): s_i = sigmoid(W_g ReLU(W_h h_i + W_I e_I)).

Legend: B batch, T tokens, M model dim, D scorer dim.

h_i is the windowed encoder's output over the model's token embeddings (projected M -> D, plus a
role embedding); e_I pools the encoder outputs of the document's instruction tokens:
- prefix mode: the mean over all of the document's instruction tokens (the scorer reads
  instruction and document at once, never the answer);
- causal mode: the mean over the instruction tokens j <= i of i's document, so a token inside
  the instruction never sees a later instruction token, and a document token (after the
  instruction) sees the whole instruction, which precedes it anyway.
A document without instruction tokens (or a token before its first one) uses a learned default.
The same pooling over the projected inputs is also added (W_cond) to the encoder's input, so the
layers can compare document tokens with the instruction instead of meeting it only in the head's
additive W_I e_I (on synthetic rows, held-out core recall after a short phase-1 run went from
about 0.3 to 0.4-0.45 with it); it is causal-safe the same way.

Outputs: n_out = 1 (default) gives the relevance logit [B, T]; n_out > 1 gives [B, T, n_out]
logits from one shared trunk (only W_g widens; with segmentation.summary_source=content the
segmenter reads output 0 as the lookahead logit and output 1 as the "own" logit: a relevant
token lies in this token's trailing block_size-token window). Every output at token i reads only
what the relevance logit reads (causal mode: tokens <= i).

The input embeddings are detached: the scorer is a separate network, so L_seg / L_eff (and the
straight-through L_task estimate through block scores) train only the scorer and never pull the
LM's shared (possibly tied) embedding table toward what is convenient for scoring.
"""
from __future__ import annotations

import torch
from torch import nn

from dcwdist.attention.context import ROLE_ANSWER, ROLE_DOCUMENT, ROLE_INSTRUCTION, ROLE_PAD
from dcwdist.segmentation.config import SegmentationConfig
from dcwdist.segmentation.encoder import WindowedEncoder


class _SortedGather(torch.autograd.Function):
    """src[idx] for a nondecreasing idx. Backward sums each run of equal indices as a difference
    of prefix sums of the gradient instead of autograd's index backward, which accumulates every
    token's row into the few instruction rows with atomics (9% of a 128k training step of the
    100M model on an H100, benchmarks/results/train_step_h100.md). The prefix sums run in fp32
    within chunks of _CHUNK rows plus fp64 carries between chunks (_prefix_sums_at): one fp32
    prefix over 1M rows would bury a short run under the rounding of everything before it, and
    an fp64 cumsum over the whole [T, D] gradient was still 6% of that step."""

    @staticmethod
    def forward(ctx, src, idx):
        ctx.save_for_backward(idx)
        ctx.rows = src.shape[0]
        return src[idx]

    @staticmethod
    def backward(ctx, grad):
        (idx,) = ctx.saved_tensors
        last = torch.ones_like(idx, dtype=torch.bool)
        last[:-1] = idx[1:] != idx[:-1]
        ends = last.nonzero().squeeze(1)  # the last position of each run
        total = _prefix_sums_at(grad, ends)
        total = torch.cat([total[:1], total[1:] - total[:-1]])
        out = grad.new_zeros(ctx.rows, *grad.shape[1:])
        out[idx[ends]] = total.to(grad.dtype)  # one writer per row
        return out, None


_CHUNK = 1024


def _prefix_sums_at(x: torch.Tensor, pos: torch.Tensor, chunk: int = _CHUNK) -> torch.Tensor:
    """Inclusive prefix sums of x [N, ...] along dim 0 at rows pos [R], in fp64: an fp32 (or
    x's, if wider) cumsum inside chunks of `chunk` rows plus the fp64 sum of whole chunks before."""
    N = x.shape[0]
    flat = x.reshape(N, -1).to(torch.promote_types(x.dtype, torch.float32))
    if N % chunk:  # pad to whole chunks (a copy of the gradient: only when needed)
        flat = torch.nn.functional.pad(flat, (0, 0, 0, (-N) % chunk))
    local = flat.view(-1, chunk, flat.shape[1]).cumsum(1)
    carry = torch.nn.functional.pad(local[:, -1].double().cumsum(0), (0, 0, 1, 0))
    at = local.view(-1, flat.shape[1])[pos].double() + carry[pos // chunk]
    return at.view(pos.shape[0], *x.shape[1:])


def pool_instruction(h_BTD: torch.Tensor, doc_BT: torch.Tensor, instr_BT: torch.Tensor,
                     causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token instruction embedding [B, T, D] (fp32) and whether one exists [B, T].

    prefix: mean of every instruction token of the token's document. causal: mean of the
    instruction tokens j <= i of the document (a running mean over a compact list of the
    instruction tokens, reset at each document; exact, O(T)).
    """
    B, T, D = h_BTD.shape
    dev = h_BTD.device
    real = doc_BT >= 0
    gid = torch.where(real, doc_BT + torch.arange(B, device=dev)[:, None] * (T + 1), -1)
    gid, sel = gid.reshape(-1), (instr_BT & real).reshape(-1)
    h = h_BTD.reshape(B * T, D).float()
    idx = sel.nonzero().squeeze(1)  # [N] flat indices of instruction tokens
    if not causal:
        sums = h.new_zeros(B * (T + 1), D).index_add_(0, gid[idx], h[idx])
        counts = h.new_zeros(B * (T + 1)).index_add_(0, gid[idx], torch.ones_like(idx, dtype=h.dtype))
        g = gid.clamp_min(0)
        has = (counts[g] > 0) & (gid >= 0)
        e = sums[g] / counts[g].clamp_min(1)[:, None]
        return e.view(B, T, D), has.view(B, T)
    # Running sums over the compact instruction list, reset where its document changes.
    n = idx.numel()
    if n == 0:
        return h.new_zeros(B, T, D), torch.zeros(B, T, dtype=torch.bool, device=dev)
    vals = torch.cat([h[idx], torch.ones(n, 1, device=dev)], 1).double()
    csum = vals.cumsum(0)
    g_i = gid[idx]
    new = torch.ones(n, dtype=torch.bool, device=dev)
    new[1:] = g_i[1:] != g_i[:-1]
    start = torch.where(new, torch.arange(n, device=dev), 0).cummax(0).values
    run = csum - (csum - vals)[start]  # inclusive sums within the document
    # For token t: the last instruction token at or before t, if it is in t's document.
    flat = torch.arange(B * T, device=dev)
    last = torch.where(sel, flat, -1).cummax(0).values
    has = (last >= 0) & (gid[last.clamp_min(0)] == gid) & (gid >= 0)
    k = (sel.long().cumsum(0) - 1)[last.clamp_min(0)].clamp_min(0)
    mean = (run[:, :D] / run[:, D:].clamp_min(1)).float()  # per instruction token, [n, D]
    e = _SortedGather.apply(mean, k)  # k is nondecreasing: last and the count are cumulative
    return e.view(B, T, D), has.view(B, T)


class InstructionScorer(nn.Module):
    """Token relevance logits [B, T] (n_out = 1) or [B, T, n_out] from embeddings [B, T, M]."""

    def __init__(self, cfg: SegmentationConfig, model_dim: int, n_out: int = 1):
        super().__init__()
        D = cfg.scorer_dim
        self.causal = cfg.mode == "causal"
        self.in_norm = nn.LayerNorm(model_dim)
        self.in_proj = nn.Linear(model_dim, D)
        self.role_embed = nn.Embedding(ROLE_PAD + 1, D)
        self.encoder = WindowedEncoder(D, cfg.scorer_heads, cfg.scorer_layers, cfg.scorer_window,
                                       cfg.scorer_checkpointing)
        self.w_cond = nn.Linear(D, D, bias=False)
        """Conditions the encoder input on the pooled instruction (so layers can match it)."""
        self.w_h = nn.Linear(D, D)
        self.w_i = nn.Linear(D, D, bias=False)
        self.n_out = n_out
        self.w_g = nn.Linear(D, n_out)
        self.default_instruction = nn.Parameter(torch.randn(D) * 0.02)
        """e_I of a document (or causal prefix) without instruction tokens."""

    def forward(self, emb_BTM: torch.Tensor, doc_BT: torch.Tensor, positions_BT: torch.Tensor,
                roles_BT: torch.Tensor | None) -> torch.Tensor:
        real = doc_BT >= 0
        if roles_BT is None:
            roles_BT = torch.where(real, ROLE_DOCUMENT, ROLE_PAD)
        x = self.in_proj(self.in_norm(emb_BTM.detach())) + self.role_embed(roles_BT)
        # prefix mode never reads the answer; causal mode reads everything before i.
        key_ok = real if self.causal else real & (roles_BT != ROLE_ANSWER)
        instr = roles_BT == ROLE_INSTRUCTION
        e0, has0 = pool_instruction(x, doc_BT, instr, self.causal)
        x = x + self.w_cond(torch.where(has0[..., None], e0, 0.0).to(x.dtype))
        h = self.encoder(x, doc_BT, positions_BT, key_ok, self.causal)
        e, has = pool_instruction(h, doc_BT, instr, self.causal)
        e = torch.where(has[..., None], e, self.default_instruction.float()).to(h.dtype)
        out = self.w_g(torch.relu(self.w_h(h) + self.w_i(e)))
        return out.squeeze(-1) if self.n_out == 1 else out
