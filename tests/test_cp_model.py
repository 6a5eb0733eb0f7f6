"""The Transformer under context parallelism (real gloo groups) equals one process: loss and
every parameter gradient (fp64), causality under CP, packed rows equal documents alone."""
import pytest
import torch
import torch.distributed as dist

from dcwdist.attention import AttentionConfig, AttnContext
from dcwdist.attention.context import ROLE_ANSWER, ROLE_DOCUMENT, ROLE_INSTRUCTION, ROLE_PAD
from dcwdist.data_pipelines.packing import Batch
from dcwdist.parallel.dims import ParallelDims, ParallelLayoutError
from dcwdist.parallel.stage import check_cp_stage
from dcwdist.parallel.zigzag import cp_context
from tests.cp_helpers import (assert_cp_equals_single, doc_batch, gather_full, spawn,
                              tiny_cp_model)

T, BLK, VOCAB = 128, 8, 64


def make_model(kind: str, seg_mode: str = ""):
    return tiny_cp_model(kind, seg_mode, BLK, VOCAB)


def make_batch(prefix: bool = False) -> Batch:
    """Row 0: one document; row 1: two block-aligned documents and padding."""
    doc = torch.zeros(2, T, dtype=torch.long)
    doc[1, 48:100] = 1
    doc[1, 44:48] = -1
    doc[1, 100:] = -1
    roles = torch.where(doc >= 0, ROLE_DOCUMENT, ROLE_PAD)
    if prefix:
        for b, d in ((0, 0), (1, 0), (1, 1)):
            idx = (doc[b] == d).nonzero().squeeze(1)
            roles[b, idx[:5]] = ROLE_INSTRUCTION
            roles[b, idx[-6:]] = ROLE_ANSWER
    return doc_batch(doc, roles, VOCAB, torch.Generator().manual_seed(5), prefix)


def given_tiers(batch: Batch) -> torch.Tensor:
    g = torch.Generator().manual_seed(7)
    tiers = torch.randint(0, 3, (2, T // BLK), generator=g)
    tiers[:, 0] = 0
    return tiers


def step_loss(model, batch: Batch, group, tiers=None):
    """The trainer's loss rule on one micro-batch: summed CE / global count + aux / cp."""
    cp = 1 if group is None else dist.get_world_size(group)
    if group is None:
        local, ctx = batch, AttnContext(doc_ids=batch.doc_ids, positions=batch.positions,
                                        roles=batch.roles, cache={"relevance": batch.relevance})
    else:
        local, ctx = cp_context(batch, model.attn_cfg.kind, group, BLK)
    ctx.tiers = tiers
    loss = model(local.tokens, ctx, local.labels) / batch.num_loss_tokens
    for value in ctx.cache.get("aux_losses", {}).values():
        loss = loss + value / cp
    return loss


def check_loss_and_grads(rank, world, group, kind, seg_mode):
    batch = make_batch(prefix=seg_mode == "prefix")
    tiers = given_tiers(batch) if kind == "dcw" and not seg_mode else None
    ref_model, model = make_model(kind, seg_mode), make_model(kind, seg_mode)
    if seg_mode:
        check_cp_stage(model.attn_cfg, T, world, model.segmenter)
    ref = step_loss(ref_model, batch, None, tiers)
    ref.backward()
    loss = step_loss(model, batch, group, tiers)
    loss.backward()
    assert_cp_equals_single(loss, ref, model, ref_model, group, dict(rtol=1e-6, atol=1e-8),
                            dict(rtol=1e-5, atol=1e-7), f"{kind}/{seg_mode}")
    # (prefix mode: the last layer's alpha only reaches non-core tokens, which carry no loss)
    for name, p_ref in ref_model.named_parameters():
        assert (p_ref.grad is None or p_ref.grad.abs().max() > 0 or "segmenter" in name
                or seg_mode == "prefix"), name


def check_causal_and_packed(rank, world, group, kind, seg_mode):
    model = make_model(kind, seg_mode)
    if seg_mode:
        check_cp_stage(model.attn_cfg, T, world, model.segmenter)
    batch = make_batch()
    tiers = given_tiers(batch) if kind == "dcw" and not seg_mode else None

    def hidden(b: Batch, grp, t=tiers):
        if grp is None:
            ctx = AttnContext(doc_ids=b.doc_ids, positions=b.positions, roles=b.roles, tiers=t)
            with torch.no_grad():
                return model(b.tokens, ctx)
        local, ctx = cp_context(b, kind, grp, BLK)
        ctx.tiers = t
        with torch.no_grad():
            return gather_full(model(local.tokens, ctx), grp)

    base = hidden(batch, group)
    p = 64  # block boundary: later tokens may change later tiers, never earlier outputs
    pert = Batch(**{**batch.__dict__, "tokens": batch.tokens.clone()})
    pert.tokens[:, p:] = torch.randint(0, VOCAB, (2, T - p))
    torch.testing.assert_close(hidden(pert, group)[:, :p], base[:, :p], rtol=0, atol=1e-12)
    assert not torch.allclose(hidden(pert, group)[0, p:], base[0, p:])
    # packed row 1 = each document alone (one process, its own row and tiers)
    for lo, hi in ((0, 44), (48, 100)):
        n = -(-(hi - lo) // BLK) * BLK
        alone = Batch(**{k: v[1:, lo:lo + n].clone() for k, v in batch.__dict__.items()})
        alone.doc_ids[alone.doc_ids >= 0] = 0
        t_alone = None if tiers is None else tiers[1:, lo // BLK:(lo + n) // BLK]
        if seg_mode:
            continue  # the scorer sees padding-free rows alone: tiers may differ by the cap
        torch.testing.assert_close(hidden(alone, None, t_alone)[0, :hi - lo],
                                   base[1, lo:hi], rtol=1e-5, atol=1e-6)  # fp32 executor inside


@pytest.mark.parametrize("world", [2, 4])
def test_model_loss_and_grads_equal_single_process(world):
    cases = [("dense", ""), ("dcw", "")] + ([("dcw", "causal"), ("dcw", "prefix")]
                                            if world == 2 else [])
    spawn(world, [(check_loss_and_grads, c) for c in cases])


def test_causality_and_packing_under_cp():
    spawn(2, [(check_causal_and_packed, c) for c in
              (("dense", ""), ("dcw", ""), ("dcw", "causal"))])


def test_layout_errors_are_one_line():
    with pytest.raises(ParallelLayoutError, match="not divisible") as e:
        ParallelDims(world_size=3, cp=2)
    assert "\n" not in str(e.value)
    attn = AttentionConfig(kind="block_topk", block_size=8)  # no CP path yet
    with pytest.raises(ValueError, match="supports attention.kind") as e:
        check_cp_stage(attn, 128, 2, None)
    assert "\n" not in str(e.value)
    with pytest.raises(ParallelLayoutError, match="multiple of 32") as e:
        check_cp_stage(AttentionConfig(kind="dcw", block_size=8), 120, 2, None)
    assert "\n" not in str(e.value)
