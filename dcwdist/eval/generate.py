"""Greedy generation: prefill with the model's attention kind, decode step by step on a KV cache.

Prefill runs the model's normal forward (any attention kind, the segmenter filling ctx.tiers)
while forward hooks on every layer's q/k/v projections capture their outputs; RoPE is re-applied
to them here, so the cache holds exactly the post-RoPE keys/values the layer attended with and
transformer.py needs no change. Each decode step runs the new token through the layers by hand
(the same modules: norms, projections, RoPE, o_proj, MLP) and attends densely over what the
`KVCache` keeps. Generated tokens are answer tokens: in prefix mode DCW makes them core, i.e. full
attention, so with the full cache a DCW-prefix model decodes exactly as its forward would.
For other kinds (window, static_sparse, block_topk, caa, DCW in causal mode) the decode step's
dense attention over the kept cache is the eviction policy's pattern, not the kind's.

Legend: T prompt tokens (padded to Tp), H query heads, K kv heads, E head dim, V vocab.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from dcwdist.attention.context import (ROLE_ANSWER, ROLE_DOCUMENT, ROLE_INSTRUCTION, ROLE_PAD,
                                       TIER_BUFFER, TIER_CORE, AttnContext)
from dcwdist.eval.kvcache import CacheConfig, HeadBudget, KVCache, prefill_attention_mass
from dcwdist.eval.tasks import Prompt
from dcwdist.model.rope import apply_rope, rope_cos_sin


def encode_prompt(tok, prompt: Prompt) -> tuple[list[int], list[int]]:
    """<instr> instruction <doc> document <answer>: the training format up to the answer."""
    sp = tok.special_ids
    instr = [sp["<instr>"]] + tok.encode(prompt.instruction)
    doc = [sp["<doc>"]] + tok.encode(prompt.document)
    ids = instr + doc + [sp["<answer>"]]
    return ids, [ROLE_INSTRUCTION] * len(instr) + [ROLE_DOCUMENT] * len(doc) + [ROLE_ANSWER]


def prompt_relevance(tok, prompt: Prompt) -> list[float]:
    """Relevance label of every prompt token (encode_prompt's order), as in training rows:
    instruction 1, the document's relevant spans 1, the rest 0, the <answer> token 1."""
    from dcwdist.data_pipelines.packing import _relevance
    n_instr = 1 + len(tok.encode(prompt.instruction))
    _, offsets = tok.encode_with_offsets(prompt.document)
    return [1.0] * n_instr + [0.0] + _relevance(offsets, prompt.relevant_spans) + [1.0]


def prompt_inputs(ids: list[int], roles: list[int], align: int, pad_id: int,
                  device, relevance: Optional[list[float]] = None
                  ) -> tuple[torch.Tensor, AttnContext]:
    """tokens [1, Tp] and the context of one document, right-padded to a multiple of `align`
    (block kinds work on whole blocks; pads carry doc id -1 and change nothing before them).
    `relevance` (optional, one label per id) goes to ctx.cache for an oracle scorer."""
    T = len(ids)
    Tp = T + (-T) % align
    tokens = torch.full((1, Tp), pad_id, dtype=torch.long)
    tokens[0, :T] = torch.tensor(ids)
    doc = torch.full((1, Tp), -1, dtype=torch.long)
    doc[0, :T] = 0
    role = torch.full((1, Tp), ROLE_PAD, dtype=torch.long)
    role[0, :T] = torch.tensor(roles)
    ctx = AttnContext(doc_ids=doc.to(device), positions=torch.arange(Tp)[None].to(device),
                      roles=role.to(device))
    if relevance is not None:
        rel = torch.zeros(1, Tp)
        rel[0, :T] = torch.tensor(relevance[:T])
        ctx.cache["relevance"] = rel.to(device)
    return tokens.to(device), ctx


class _Capture:
    """Forward hooks on each layer's q/k/v projections; outputs kept per layer while active."""

    def __init__(self, model):
        self.model = model
        self.out: list[dict] = [{} for _ in model.layers]
        self.handles = []

    def __enter__(self):
        for i, layer in enumerate(self.model.layers):
            for name in ("q_proj", "k_proj", "v_proj"):
                mod = getattr(layer.self_attn, name)
                self.handles.append(mod.register_forward_hook(
                    lambda m, a, o, i=i, name=name: self.out[i].__setitem__(name, o.detach())))
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        self.handles = []


def token_tiers(ctx: AttnContext, n_real: int, block_size: int) -> torch.Tensor:
    """[T] tier of each prompt token: the prefill's ctx.tiers (DCW), else from roles
    (instruction / answer core, document buffer)."""
    if ctx.tiers is not None:
        return ctx.tiers[0].repeat_interleave(block_size)[:n_real].clone()
    roles = ctx.roles[0, :n_real]
    return torch.where(roles == ROLE_DOCUMENT, TIER_BUFFER, TIER_CORE).long()


@torch.no_grad()
def prefill(model, tokens_BT: torch.Tensor, ctx: AttnContext, n_real: int, cache: KVCache):
    """Run the model's forward on the prompt, fill `cache`; logits [V] after the last token."""
    cfg = model.cfg
    H, K, E = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    with _Capture(model) as cap:
        hidden = model(tokens_BT, ctx)
    logits = model.logits(hidden[:, n_real - 1])[0]
    tiers = token_tiers(ctx, n_real, model.attn_cfg.block_size)
    pos = ctx.positions[0, :n_real]
    need_mass = cache.cfg.policy in ("h2o", "learned") and cache.budgets is not None
    for i, out in enumerate(cap.out):
        k, v = out["k_proj"][0, :n_real], out["v_proj"][0, :n_real]
        cos, sin = rope_cos_sin(model.rope_cfg, E, pos[None], k.dtype)
        k = apply_rope(k.view(1, n_real, K, E), cos, sin)[0]
        mass = None
        if need_mass:
            q = apply_rope(out["q_proj"][0, :n_real].view(1, n_real, H, E), cos, sin)[0]
            mass = prefill_attention_mass(q, k, E ** -0.5)
        cache.prefill(i, k, v.view(n_real, K, E), pos, tiers, mass)
    return logits


@torch.no_grad()
def decode_step(model, cache: KVCache, token: int, pos: int) -> torch.Tensor:
    """Logits [V] after feeding `token` at position `pos`, attending to (and growing) the cache."""
    cfg = model.cfg
    H, K, E = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    dev = model.norm.weight.device
    h = model.embed_tokens(torch.tensor([[token]], device=dev))
    cos, sin = rope_cos_sin(model.rope_cfg, E, torch.tensor([[pos]], device=dev), h.dtype)
    for i, layer in enumerate(model.layers):
        attn = layer.self_attn
        x = layer.input_layernorm(h)
        q = apply_rope(attn.q_proj(x).view(1, 1, H, E), cos, sin)[0, 0]
        k = apply_rope(attn.k_proj(x).view(1, 1, K, E), cos, sin)[0, 0]
        v = attn.v_proj(x).view(K, E)
        cache.append(i, k, v, pos, TIER_CORE)
        out = cache.attend(i, q, E ** -0.5)
        h = h + attn.o_proj(out.reshape(1, 1, H * E))
        h = h + layer.mlp(layer.post_attention_layernorm(h))
    return model.logits(model.norm(h))[0, 0]


@dataclass
class Generation:
    tokens: list[int]
    """Generated token ids (eos included if it was produced)."""
    prompt_len: int
    peak_sizes: torch.Tensor
    """[L, K] largest number of tokens each (layer, kv head) kept at any time."""
    budgets: Optional[torch.Tensor]
    """[L, K] per-head budgets (None: unbounded)."""
    logits: list[torch.Tensor] = field(default_factory=list)
    """Per step logits [V] (when asked for)."""


@torch.no_grad()
def generate(model, ids: list[int], roles: list[int], max_new_tokens: int,
             cache_cfg: CacheConfig = CacheConfig(), *, align: int = 1, pad_id: int = 0,
             eos_id: Optional[int] = None, head_budget: Optional[HeadBudget] = None,
             keep_logits: bool = False, relevance: Optional[list[float]] = None) -> Generation:
    """Greedy decoding of up to `max_new_tokens` after the prompt, on an evicting KV cache."""
    was_training = model.training
    model.eval()
    dev = model.norm.weight.device
    tokens, ctx = prompt_inputs(ids, roles, align, pad_id, dev, relevance)
    cache = KVCache(cache_cfg, model.cfg.n_layers, model.cfg.n_kv_heads, head_budget)
    logits = prefill(model, tokens, ctx, len(ids), cache)
    out, kept = [], []
    for step in range(max_new_tokens):
        if keep_logits:
            kept.append(logits)
        nxt = int(logits.argmax())
        out.append(nxt)
        if nxt == eos_id or step == max_new_tokens - 1:
            break
        logits = decode_step(model, cache, nxt, len(ids) + step)
    model.train(was_training)
    return Generation(out, len(ids), cache.peak.clone(), cache.budgets, kept)


@torch.no_grad()
def generate_recompute(model, ids: list[int], roles: list[int], max_new_tokens: int, *,
                       align: int = 1, pad_id: int = 0, eos_id: Optional[int] = None,
                       keep_logits: bool = False) -> Generation:
    """Reference greedy decoding: the full forward over prompt + answer so far at every step."""
    was_training = model.training
    model.eval()
    dev = model.norm.weight.device
    n_prompt, ids, roles = len(ids), list(ids), list(roles)
    out, kept = [], []
    for _ in range(max_new_tokens):
        tokens, ctx = prompt_inputs(ids, roles, align, pad_id, dev)
        logits = model.logits(model(tokens, ctx)[:, len(ids) - 1])[0]
        if keep_logits:
            kept.append(logits)
        nxt = int(logits.argmax())
        out.append(nxt)
        if nxt == eos_id:
            break
        ids.append(nxt)
        roles.append(ROLE_ANSWER)
    model.train(was_training)
    return Generation(out, n_prompt, torch.zeros(0, dtype=torch.int64), None, kept)


class ModelPredictor:
    """A `Predictor` for the eval tasks: encode the prompt, greedy-decode, detokenize."""

    def __init__(self, model, tok, cache_cfg: CacheConfig, max_new_tokens: int, align: int = 1,
                 head_budget: Optional[HeadBudget] = None):
        self.model, self.tok, self.cache_cfg = model, tok, cache_cfg
        self.max_new_tokens, self.align, self.head_budget = max_new_tokens, align, head_budget
        self.eos_id = tok.special_ids["<eos>"]
        self.peak_tokens = 0  # largest total cache size seen (all layers and heads)

    def __call__(self, prompt: Prompt) -> str:
        ids, roles = encode_prompt(self.tok, prompt)
        seg = getattr(self.model, "segmenter", None)
        oracle = seg is not None and seg.cfg.scorer == "oracle"
        gen = generate(self.model, ids, roles, self.max_new_tokens, self.cache_cfg,
                       align=self.align, pad_id=self.tok.pad_id, eos_id=self.eos_id,
                       head_budget=self.head_budget,
                       relevance=prompt_relevance(self.tok, prompt) if oracle else None)
        self.peak_tokens = max(self.peak_tokens, int(gen.peak_sizes.sum()))
        return self.tok.decode([t for t in gen.tokens if t != self.eos_id])
