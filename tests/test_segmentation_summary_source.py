"""segmentation.summary_source=content: blocks judged by their own content serve later blocks'
summaries (causal mode), next to the core tier; summary_source=tier changes nothing."""
import math
import os

import pytest
import torch

from dcwdist.attention import AttentionConfig, AttnContext, attention_flops
from dcwdist.attention.context import TIER_CORE
from dcwdist.config import ConfigError, load_config
from dcwdist.segmentation import METRIC_KEYS, SegmentationConfig, build_segmenter
from dcwdist.segmentation.losses import lookahead_targets, lookbehind_targets, seg_loss
from dcwdist.segmentation.scorer import InstructionScorer
from tests.conftest import REPO
from tests.test_segmentation_scorer import packed  # the same packed rows

BLK, M = 8, 32
ATTN = AttentionConfig(kind="dcw", block_size=BLK, window=4, buffer_window=8, stride=2,
                       summary_pool=2)


def small_cfg(**kw):
    kw.setdefault("mode", "causal")
    return SegmentationConfig(scorer_layers=2, scorer_dim=32, scorer_heads=2, scorer_window=8, **kw)


def sparse_relevance(doc, p=0.04, seed=0, force_at=0):
    """[B, T] random sparse 0/1 labels on real tokens; every document gets one at token
    `force_at` of the document (so every document is labelled)."""
    g = torch.Generator().manual_seed(seed)
    rel = (torch.rand(doc.shape, generator=g) < p) & (doc >= 0)
    for b in range(doc.shape[0]):
        for d in doc[b].unique().tolist():
            if d >= 0:
                rel[b, (doc[b] == d).nonzero()[force_at, 0]] = True
    return rel.float()


def run(seg, emb, doc, pos, roles, relevance=None):
    ctx = AttnContext(doc_ids=doc, positions=pos, roles=roles,
                      cache={} if relevance is None else {"relevance": relevance})
    seg(emb, None, ctx)
    return ctx


def test_lookbehind_targets_equal_a_brute_force_loop_on_packed_documents():
    doc = torch.tensor([[0] * 13 + [1] * 5 + [-1] * 3 + [2] * 9 + [3] * 2,
                        [0] * 4 + [-1] * 2 + [1] * 20 + [2] * 6])
    for seed in range(4):
        rel = sparse_relevance(doc, p=0.15, seed=seed)
        rel[0, 19] = 1.0  # a label on padding never counts
        for span in (1, 3, 8, 40):
            got = lookbehind_targets(doc, rel, span)
            want = torch.zeros_like(got)
            for b in range(doc.shape[0]):
                for i in range(doc.shape[1]):
                    if doc[b, i] < 0:
                        continue
                    want[b, i] = float(any(
                        doc[b, j] == doc[b, i] and rel[b, j] > 0
                        for j in range(max(0, i - span + 1), i + 1)))
            assert torch.equal(got, want), (seed, span)


def sequential_content_sources(has_rel, info, core_ratio, slack):
    """The content rule one block at a time: relevant blocks under the core tier's cap."""
    out = torch.zeros_like(has_rel)
    for b in range(has_rel.shape[0]):
        n = 0
        for j in range(has_rel.shape[1]):
            if not info.real[b, j]:
                continue
            if info.first[b, j]:
                n = 0
            k = int(info.index[b, j])
            if has_rel[b, j] and n + 1 <= max(1, math.floor(core_ratio * (k + 1) + slack + 1e-9)):
                n, out[b, j] = n + 1, True
    return out


@pytest.mark.parametrize("slack", [0.0, 1.0, 50.0])
def test_oracle_content_sources_are_the_relevant_blocks_within_the_cap_plus_core(slack):
    from dcwdist.segmentation.tiers import block_info
    doc, pos, roles = packed(lengths=(20, 14, 9))
    # The oracle's lookahead makes the core tier the relevant blocks too, but the core count
    # includes each document's (forced) first block; here first blocks hold no label, so under
    # a binding cap content admits a relevant block the core tier has no room for.
    rel = sparse_relevance(doc, p=0.03, force_at=2 * BLK + 1)
    rel[:, :BLK] = 0
    cfg = small_cfg(scorer="oracle", summary_source="content", cap_slack=slack)
    seg = build_segmenter(cfg, M, ATTN)
    ctx = run(seg, torch.randn(*doc.shape, M), doc, pos, roles, rel)
    info = block_info(doc, roles, BLK)
    has_rel = ((rel > 0) & (doc >= 0)).view(2, -1, BLK).any(-1)
    chosen = sequential_content_sources(has_rel, info, cfg.core_ratio, slack)
    core = ctx.tiers == TIER_CORE
    src = ctx.cache["summary_blocks"]
    assert src.dtype == torch.bool and src.shape == ctx.tiers.shape
    assert torch.equal(src, chosen | core)
    if slack == 50.0:  # the cap never binds: every relevant block is a source
        assert torch.equal(src, has_rel | core)
        assert ctx.cache["metrics"]["summary_recall"] == 1.0
    else:
        assert (has_rel & ~src).any()  # the cap binds in this case
        assert (src & ~core).any()  # content adds sources the core tier missed
    # content-chosen blocks weigh their summaries by the own score (1 for the oracle)
    scores = ctx.cache["summary_scores"]
    assert torch.equal(scores[chosen], torch.ones(int(chosen.sum())))
    assert torch.equal(scores[~chosen], ctx.block_scores[~chosen])


def test_learned_content_sources_have_their_shapes_and_carry_gradient_to_the_scorer():
    torch.manual_seed(0)
    seg = build_segmenter(small_cfg(summary_source="content", tau_core=0.5, tau_buffer=0.45),
                          M, ATTN)
    doc, pos, roles = packed()
    ctx = run(seg, torch.randn(*doc.shape, M), doc, pos, roles)
    src, s = ctx.cache["summary_blocks"], ctx.cache["summary_scores"]
    assert src.shape == s.shape == ctx.tiers.shape
    assert src.dtype == torch.bool and s.dtype == torch.float32
    core = ctx.tiers == TIER_CORE
    assert (src | ~core).all() and (src & ~core).any()  # core blocks stay sources; content adds
    assert not src[doc.view(2, -1, BLK).max(-1).values < 0].any()  # padding never
    assert s.requires_grad
    w = 1 + s[src] - s[src].detach()  # DCW's straight-through weight on each source's summaries
    assert torch.allclose(w.detach(), torch.ones_like(w))
    (torch.randn(w.shape) * w).sum().backward()
    params = dict(seg.scorer.named_parameters())
    assert params["w_g.weight"].shape == (2, 32)
    assert params["w_g.weight"].grad[1].abs().sum() > 0  # the own output
    assert params["encoder.layers.0.attn.qkv.weight"].grad.abs().sum() > 0


@pytest.mark.parametrize("p", [5, 40, 100, 161])
def test_causal_own_scores_and_sources_of_blocks_ending_by_p_ignore_later_tokens(p):
    torch.manual_seed(0)
    seg = build_segmenter(small_cfg(summary_source="content", tau_core=0.5, tau_buffer=0.45),
                          M, ATTN)
    doc, pos, roles = packed()
    emb = torch.randn(*doc.shape, M)
    tokens = torch.randint(0, 64, doc.shape)
    emb2, tokens2 = emb.clone(), tokens.clone()
    emb2[:, p + 1:] = torch.randn_like(emb2[:, p + 1:]) * 3
    tokens2[:, p + 1:] = torch.randint(0, 64, tokens2[:, p + 1:].shape)
    with torch.no_grad():
        own_a = seg.scorer(emb, doc, pos, roles)[..., 1]
        own_b = seg.scorer(emb2, doc, pos, roles)[..., 1]
    assert torch.equal(own_a[:, :p + 1], own_b[:, :p + 1])
    assert not torch.allclose(own_a[:, p + 1:], own_b[:, p + 1:])
    ctx = []
    for e, t in ((emb, tokens), (emb2, tokens2)):
        c = AttnContext(doc_ids=doc, positions=pos, roles=roles, cache={})
        seg(e, t, c)
        ctx.append(c)
    a, b = ctx
    done = (p + 1) // BLK  # blocks whose last token is <= p
    for key in ("summary_blocks", "summary_scores"):
        assert torch.equal(a.cache[key][:, :done], b.cache[key][:, :done]), key
    assert not torch.equal(a.cache["summary_scores"], b.cache["summary_scores"])


def test_tier_source_stores_nothing_and_matches_the_default_config_bit_for_bit():
    doc, pos, roles = packed(lengths=(20, 14, 9))
    emb = torch.randn(*doc.shape, M)
    rel = sparse_relevance(doc)
    out = []
    for cfg in (small_cfg(lambda_eff=0.5), small_cfg(lambda_eff=0.5, summary_source="tier")):
        torch.manual_seed(0)
        seg = build_segmenter(cfg, M, ATTN)
        out.append((seg, run(seg, emb, doc, pos, roles, rel)))
    (sa, a), (sb, b) = out
    assert {k: v.shape for k, v in sa.state_dict().items()} == \
        {k: v.shape for k, v in sb.state_dict().items()}
    assert all(torch.equal(v, sb.state_dict()[k]) for k, v in sa.state_dict().items())
    assert sa.scorer.w_g.weight.shape == (1, 32) and sa.scorer.w_g.bias.shape == (1,)
    for c in (a, b):
        assert "summary_blocks" not in c.cache and "summary_scores" not in c.cache
        assert set(c.cache["metrics"]) == set(METRIC_KEYS)
        assert c.cache["metrics"]["summary_recall"] == 0.0
    assert torch.equal(a.tiers, b.tiers) and torch.equal(a.block_scores, b.block_scores)
    assert torch.equal(a.cache["token_scores"], b.cache["token_scores"])
    assert a.cache["aux_losses"].keys() == b.cache["aux_losses"].keys() == {"seg", "eff"}
    for k in a.cache["aux_losses"]:
        assert torch.equal(a.cache["aux_losses"][k], b.cache["aux_losses"][k])
    assert a.cache["metrics"] == b.cache["metrics"]


def test_default_scorer_state_dict_is_unchanged_by_the_own_output():
    """Old checkpoints load: one output keeps W_g [1, D]; n_out only widens W_g."""
    one = InstructionScorer(small_cfg(), M)
    two = InstructionScorer(small_cfg(summary_source="content"), M, n_out=2)
    s1, s2 = one.state_dict(), two.state_dict()
    assert s1.keys() == s2.keys()
    assert {k for k in s1 if s1[k].shape != s2[k].shape} == {"w_g.weight", "w_g.bias"}
    one.load_state_dict(s1)


def test_content_needs_causal_mode_in_one_line():
    with pytest.raises(ValueError) as err:
        small_cfg(mode="prefix", summary_source="content")
    msg = str(err.value)
    assert "segmentation.summary_source" in msg and "segmentation.mode" in msg and "\n" not in msg


def test_recipe_override_selects_content_sources():
    recipe = os.path.join(REPO, "recipes/tiny_cpu.yaml")
    cfg = load_config(recipe, ["segmentation.summary_source=content"])
    assert cfg.segmentation.summary_source == "content" and cfg.segmentation.mode == "causal"
    assert load_config(recipe).segmentation.summary_source == "tier"
    for bad, needle in ((["segmentation.summary_source=content", "segmentation.mode=prefix"],
                         "segmentation.summary_source=content needs segmentation.mode=causal"),
                        (["segmentation.summary_source=both"], "segmentation.summary_source")):
        with pytest.raises(ConfigError) as err:
            load_config(recipe, bad)
        assert needle in str(err.value) and "\n" not in str(err.value)


def test_seg_loss_with_content_adds_the_own_target_term():
    torch.manual_seed(0)
    seg = build_segmenter(small_cfg(summary_source="content", phase="scorer"), M, ATTN)
    doc, pos, roles = packed()
    emb = torch.randn(*doc.shape, M)
    rel = sparse_relevance(doc)
    ctx = run(seg, emb, doc, pos, roles, rel)
    with torch.no_grad():
        logits = seg.scorer(emb, doc, pos, roles).float()
    mask = doc >= 0  # every document is labelled
    ahead = seg_loss(logits[..., 0], lookahead_targets(doc, rel, BLK), mask)
    own = seg_loss(logits[..., 1], lookbehind_targets(doc, rel, BLK), mask)
    got = ctx.cache["aux_losses"]["seg"]
    assert got.requires_grad
    assert got.item() == pytest.approx((ahead + own).item(), rel=1e-5)
    assert got.item() > ahead.item() + 0.1  # differs from what tier mode would take
    assert ctx.cache["metrics"]["seg_bce"] == pytest.approx(got.item(), rel=1e-5)
    # the same input in tier mode trains on the lookahead term alone
    torch.manual_seed(0)
    tier = build_segmenter(small_cfg(phase="scorer"), M, ATTN)
    with torch.no_grad():
        t_logits = tier.scorer(emb, doc, pos, roles).float()
    t = run(tier, emb, doc, pos, roles, rel).cache["aux_losses"]["seg"]
    assert t.item() == pytest.approx(
        seg_loss(t_logits, lookahead_targets(doc, rel, BLK), mask).item(), rel=1e-5)


def brute_force_density(doc, tiers, sources, cfg):
    """Keys per real query token, one token at a time, over dense causal keys: core reads its
    prefix, background a window, buffer a window plus strided keys; every non-core query also
    reads blk / pool summaries of each source block of its document before its own block."""
    from dcwdist.attention.context import TIER_BACKGROUND, TIER_BUFFER
    blk, per = cfg.block_size, cfg.block_size // cfg.summary_pool
    keys = dense = 0
    for b in range(doc.shape[0]):
        start = 0
        for i in range(doc.shape[1]):
            d = int(doc[b, i])
            if d < 0:
                continue
            if i == 0 or int(doc[b, i - 1]) != d:
                start = i
            p, q = i - start, i // blk
            t = int(tiers[b, q])
            dense += p + 1
            if t == TIER_CORE:
                keys += p + 1
                continue
            if t == TIER_BACKGROUND:
                keys += min(p + 1, cfg.window)
            elif t == TIER_BUFFER:
                keys += min(p + 1, cfg.buffer_window) + sum(
                    1 for j in range(p - cfg.buffer_window + 1) if j % cfg.stride == 0)
            keys += per * sum(1 for c in range(start // blk, q) if sources[b, c])
    return keys / dense


def content_case(scorer):
    """(doc, ctx) of a segmenter forward with content sources on labelled packed rows."""
    torch.manual_seed(0)
    doc, pos, roles = packed(lengths=(20, 14, 9))
    rel = sparse_relevance(doc, p=0.05, force_at=2 * BLK + 1)
    rel[:, :BLK] = 0
    seg = build_segmenter(small_cfg(summary_source="content", scorer=scorer, tau_core=0.5,
                                    tau_buffer=0.4, cap_slack=0.0), M, ATTN)
    return doc, run(seg, torch.randn(*doc.shape, M), doc, pos, roles, rel)


@pytest.mark.parametrize("scorer", ["oracle", "learned"])
def test_realised_flops_count_every_non_core_query_reading_the_content_sources(scorer):
    doc, ctx = content_case(scorer)
    src, core = ctx.cache["summary_blocks"], ctx.tiers == TIER_CORE
    assert (src & ~core).any()
    got = ctx.cache["metrics"]["flops_realised"]
    assert got == pytest.approx(brute_force_density(doc, ctx.tiers, src, ATTN), rel=1e-6)
    assert got > brute_force_density(doc, ctx.tiers, core, ATTN)  # the sources cost summaries


@pytest.mark.parametrize("scorer", ["oracle", "learned"])
def test_realised_flops_equal_the_attention_layouts_count_with_content_sources(scorer):
    _, ctx = content_case(scorer)
    want = attention_flops(ATTN, ctx, 1, 1)["density"]
    assert ctx.cache["metrics"]["flops_realised"] == pytest.approx(want, rel=1e-5)
