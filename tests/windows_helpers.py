"""Brute-force masks of the window family, token by token, independent of the layout code, plus
the shared problem (packed rows, configs) and the CP checks of tests/test_attention_windows.py.

The only library call the oracle makes is the random draw itself (random_block_offsets): which
blocks are random *is* the definition; the oracle recomputes the candidate range and checks that
the draw stays inside it.
"""
import torch
import torch.distributed as dist

from dcwdist.attention import AttentionConfig, AttnContext, build_attention
from dcwdist.attention.reference import masked_attention
from dcwdist.attention.windows import layer_window, random_block_offsets
from tests.test_attention_oracle import doc_pos, mask_from

KINDS = ["window", "multi_window", "s2attn", "random_global"]
H, HKV, D, BLK, T, N_LAYERS = 4, 2, 8, 4, 48, 2
CFG = dict(block_size=BLK, window=5, chunk_size=8, head_windows=[2, 9], s2_group=8,
           num_global=6, random_blocks=2, random_seed=3)
PER_LAYER = {"window": dict(window_schedule=[3, 7]), "random_global": dict(window_schedule=[5, 9])}


def packed_docs(T=T, blk=BLK) -> torch.Tensor:
    """Row 0: one document. Row 1: three documents, the first two padded by half a block so
    that each starts at a block boundary (T=48, blk=4: 10 + 2 pad, 22 + 2 pad, 12 tokens)."""
    row, t = [], 0
    for d, frac in enumerate((0.21, 0.7, 1.0)):
        end = (int(T * frac) // blk + 1) * blk if d < 2 else T
        n = end - t - (blk // 2 if d < 2 else 0)
        row += [d] * n + [-1] * (end - t - n)
        t = end
    return torch.tensor([[0] * T, row])


def cfg_for(kind, **kw):
    return AttentionConfig(kind=kind, **{**CFG, **PER_LAYER.get(kind, {}), **kw})


def module_for(kind, layer=1, **kw):
    return build_attention(cfg_for(kind, **kw), layer, H, HKV, D, n_layers=N_LAYERS)


def ctx_for(doc):
    return AttnContext(doc_ids=doc, positions=torch.zeros_like(doc))


# -- oracle masks ---------------------------------------------------------------------------------
def window_rule(w):
    return lambda i, j: i - j < w


def group_rule(doc, g, shift):
    p = doc_pos(doc)
    return lambda i, j: (p[i] + shift) // g == (p[j] + shift) // g


def random_sets(doc, blk, w, num_global, r, seed, layer):
    """Query block -> set of random key blocks, with the candidate range checked."""
    p = doc_pos(doc)
    out = {}
    for qb in range(len(doc) // blk):
        i0 = qb * blk
        first_tok = i0 - p[i0]
        first, skip = first_tok // blk, -(-num_global // blk)
        lo_w = max(first_tok, i0 - w + 1) // blk
        n = max(0, lo_w - first - skip)
        off = random_block_offsets(seed, layer, torch.tensor([[qb - first]]),
                                   torch.tensor([[n]]), r)[0, 0].tolist()
        chosen = [first + skip + o for o in off if o >= 0]
        assert len(set(chosen)) == len(chosen) == min(n, r), (qb, n, chosen)
        assert all(first + skip <= c < lo_w for c in chosen), (qb, chosen)
        out[qb] = set(chosen)
    return out


def random_global_rule(doc, cfg, w, layer):
    p = doc_pos(doc)
    sets = random_sets(doc, cfg.block_size, w, cfg.num_global, cfg.random_blocks,
                       cfg.random_seed, layer)
    blk = cfg.block_size
    return lambda i, j: i - j < w or p[j] < cfg.num_global or j // blk in sets[i // blk]


def head_group_masks(kind, cfg, doc_row, layer):
    """One [T, T] mask per head group (kv heads split evenly), from the contract's rules."""
    w = layer_window(cfg, layer, N_LAYERS) if kind in PER_LAYER else cfg.window
    if kind == "window":
        return [mask_from(doc_row, window_rule(w))]
    if kind == "multi_window":
        return [mask_from(doc_row, window_rule(hw)) for hw in cfg.head_windows]
    if kind == "s2attn":
        g = cfg.s2_group
        return [mask_from(doc_row, group_rule(doc_row, g, 0)),
                mask_from(doc_row, group_rule(doc_row, g, g // 2))]
    return [mask_from(doc_row, random_global_rule(doc_row, cfg, w, layer))]


def oracle(kind, cfg, q, k, v, doc, layer):
    """masked_attention per head group with the brute-force masks."""
    masks = [head_group_masks(kind, cfg, doc[b].tolist(), layer) for b in range(doc.shape[0])]
    n = len(masks[0])
    hq, hk = q.shape[2] // n, k.shape[2] // n
    outs = []
    for g in range(n):
        m = torch.stack([masks[b][g] for b in range(doc.shape[0])])
        o, _ = masked_attention(q[:, :, g * hq:(g + 1) * hq], k[:, :, g * hk:(g + 1) * hk],
                                v[:, :, g * hk:(g + 1) * hk], m)
        outs.append(o)
    return torch.cat(outs, 2)


def plan_masks(mod, doc):
    """[B, T, T] bool per head group: the union of the token masks of the module's layouts
    (compact key sets mapped back to their tokens)."""
    cfg = mod.cfg
    plan = mod.plan(cfg, doc, cfg.block_size, mod.layer_idx, mod.window)
    B, T_ = doc.shape
    out = []
    for hg in plan:
        m = sum(lay.token_mask()[:, 0, :T_, :T_].int() for lay in hg.seq)
        for lay, idx in hg.compact:
            cm = lay.token_mask()[:, 0, :T_].int()  # [B, T, S]
            m = m.scatter_add(2, idx[:, None, :].expand(-1, T_, -1), cm)
        assert m.max() <= 1, "a key is counted twice: the layouts of one softmax must be disjoint"
        out.append(m.bool())
    return out


def qkv(seed, T=T, B=2, dtype=torch.float64, d=D):
    g = torch.Generator().manual_seed(seed)
    mk = lambda h: torch.randn(B, T, h, d, generator=g, dtype=dtype).requires_grad_()  # noqa: E731
    return mk(H), mk(HKV), mk(HKV)


# -- context parallel checks (run by tests.cp_helpers.spawn) --------------------------------------
CP_T, CP_BLK = 96, 4  # 2 * cp = 4 zigzag chunks of 24 tokens = 6 blocks


def check_attention_cp(rank, world, group, kind):
    """Attention output and q/k/v gradients of the shard equal the single-process module."""
    from dcwdist.parallel.zigzag import CPShard, shard_tensor
    from tests.cp_helpers import gather_full

    doc = packed_docs(CP_T, CP_BLK)
    q, k, v = qkv(11, CP_T)
    g_out = torch.randn(q.shape, generator=torch.Generator().manual_seed(12), dtype=q.dtype)
    g_out = g_out * (doc >= 0)[..., None, None]
    mod = module_for(kind)
    ref = mod(q, k, v, ctx_for(doc))
    ref_grads = torch.autograd.grad((ref * g_out).sum(), (q, k, v))
    shard = CPShard(group, world, rank, CP_T, doc, torch.zeros_like(doc))
    ql, kl, vl = (shard_tensor(x.detach(), world, rank).requires_grad_() for x in (q, k, v))
    doc_l = shard_tensor(doc, world, rank)
    ctx = AttnContext(doc_ids=doc_l, positions=torch.zeros_like(doc_l), group=group,
                      cache={"cp_shard": shard})
    out = mod(ql, kl, vl, ctx)
    grads = torch.autograd.grad((out * shard_tensor(g_out, world, rank)).sum(), (ql, kl, vl))
    real = (doc >= 0)[..., None, None]
    tol = dict(rtol=1e-5, atol=1e-6)  # fp64 inputs, fp32 accumulation in the executor and ring
    torch.testing.assert_close(gather_full(out.detach(), group) * real, ref.detach() * real, **tol,
                               msg=lambda m: f"{kind} out: {m}")
    for name, got, want in zip("qkv", grads, ref_grads):
        torch.testing.assert_close(gather_full(got, group), want, **tol,
                                   msg=lambda m: f"{kind} d{name}: {m}")


def check_model_loss_cp(rank, world, group, kind, balance):
    """The Transformer's loss and every parameter gradient under cp equal one process, with the
    zigzag sharding and with the document-balanced block deal (parallel.cp_balance)."""
    from dcwdist.data_pipelines.packing import IGNORE, Batch
    from dcwdist.model import ModelConfig, Transformer
    from dcwdist.parallel.zigzag import cp_context

    doc = packed_docs(CP_T, CP_BLK)
    tokens = torch.randint(0, 32, doc.shape, generator=torch.Generator().manual_seed(4))
    labels = torch.full_like(tokens, IGNORE)
    same = (doc[:, 1:] == doc[:, :-1]) & (doc[:, 1:] >= 0)
    labels[:, :-1] = torch.where(same, tokens[:, 1:], IGNORE)
    pos = torch.stack([torch.tensor(doc_pos(r.tolist())) for r in doc]) * (doc >= 0)
    batch = Batch(tokens, labels, pos, doc, torch.ones_like(doc), torch.zeros(doc.shape))

    def loss_of(model, grp):
        if grp is None:
            local, ctx = batch, AttnContext(doc_ids=doc, positions=pos)
        else:
            local, ctx = cp_context(batch, kind, grp, CP_BLK, balance=balance,
                                    attn_cfg=cfg_for(kind))
        return model(local.tokens, ctx, local.labels) / batch.num_loss_tokens

    models = []
    for _ in range(2):
        torch.manual_seed(0)
        cfg = ModelConfig(vocab_size=32, dim=32, n_layers=N_LAYERS, n_heads=H, n_kv_heads=HKV)
        models.append(Transformer(cfg, cfg_for(kind)).double())
    ref = loss_of(models[0], None)
    ref.backward()
    loss = loss_of(models[1], group)
    loss.backward()
    total = loss.detach().clone()
    dist.all_reduce(total, group=group)
    torch.testing.assert_close(total, ref.detach(), rtol=1e-6, atol=1e-8)  # fp32 inside
    for (name, p_ref), (_, p) in zip(models[0].named_parameters(), models[1].named_parameters()):
        g = p.grad.clone()
        dist.all_reduce(g, group=group)
        torch.testing.assert_close(g, p_ref.grad, rtol=1e-5, atol=1e-7,
                                   msg=lambda m: f"{kind} grad {name}: {m}")
