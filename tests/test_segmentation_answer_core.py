"""segmentation.answer_core (causal mode): blocks holding instruction or answer tokens are core,
so the answer's queries read the whole prefix in training as they do when decoding -- and the
model stays causal: perturbing tokens after p changes no logit before p."""
import os

import pytest
import torch

from dcwdist.attention import AttentionConfig
from dcwdist.attention.context import ROLE_ANSWER, TIER_CORE
from tests.conftest import REPO


def model_and_batch(answer_core: bool):
    from dcwdist.config import load_config
    from dcwdist.data_pipelines import SyntheticRows
    from dcwdist.train.trainer import build_model
    cfg = load_config(os.path.join(REPO, "recipes/tiny_cpu.yaml"), [
        "attention.kind=dcw", "attention.block_size=16", "model.dim=32", "model.n_layers=2",
        "segmentation.scorer_layers=1", "segmentation.scorer_dim=16",
        "segmentation.tau_core=0.99", "segmentation.tau_buffer=0.99",  # no block by score
        f"segmentation.answer_core={str(answer_core).lower()}",
        "data.num_facts=1", "data.min_doc_len=60"])
    torch.manual_seed(0)
    model = build_model(cfg, AttentionConfig(**vars(cfg.attention))).eval()
    return model, SyntheticRows(cfg.data, 256, align=16).batch(0, 1), cfg


@pytest.mark.parametrize("answer_core", [True, False])
def test_answer_blocks_are_core_only_with_the_rule(answer_core):
    from dcwdist.eval.positions import context_for
    model, batch, _ = model_and_batch(answer_core)
    with torch.no_grad():
        ctx = context_for(batch)
        model(batch.tokens, ctx)
    answer = (batch.roles == ROLE_ANSWER).view(1, -1, 16).any(-1)
    assert answer.any()
    # a document's first block is core either way; the rest only by their role here
    first = torch.zeros_like(answer)
    first[:, 1:] = ctx.doc_ids.view(1, -1, 16)[:, 1:, 0] != ctx.doc_ids.view(1, -1, 16)[:, :-1, 0]
    first[:, 0] = True
    later_answer = answer & ~first
    assert later_answer.any()
    assert bool((ctx.tiers[later_answer] == TIER_CORE).all()) == answer_core


def test_answer_core_keeps_the_model_causal():
    from dcwdist.eval.positions import context_for
    model, batch, cfg = model_and_batch(True)
    answer_pos = (batch.roles[0] == ROLE_ANSWER).nonzero().squeeze(1)
    p = int(answer_pos[0]) - 5  # inside the document, before the first answer
    with torch.no_grad():
        base = model(batch.tokens, context_for(batch))
        tokens = batch.tokens.clone()
        tokens[:, p:] = (tokens[:, p:] + 7) % cfg.model.vocab_size
        other = model(tokens, context_for(batch))
    torch.testing.assert_close(other[:, :p], base[:, :p], rtol=0, atol=1e-6)
    assert not torch.allclose(other[:, p:], base[:, p:])
