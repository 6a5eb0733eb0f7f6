"""Phase 1 (scorer alone on relevance labels) lifts core-tier recall of key blocks above chance."""
import torch

from dcwdist.attention import AttentionConfig, AttnContext
from dcwdist.data_pipelines import DataConfig, SyntheticRows
from dcwdist.segmentation import SegmentationConfig, build_segmenter

BLK = 16


def core_recall(seg, emb, batch):
    ctx = AttnContext(doc_ids=batch.doc_ids, positions=batch.positions, roles=batch.roles,
                      cache={"relevance": batch.relevance})
    seg(emb(batch.tokens), batch.tokens, ctx)
    return ctx


def test_phase1_recall_of_key_blocks_rises_above_chance():
    torch.manual_seed(0)
    rows = SyntheticRows(DataConfig(), seq_len=512, align=BLK)
    # A narrow scorer keeps the test fast on 1 CPU thread; the recipe default is 4 x 128.
    cfg = SegmentationConfig(mode="prefix", phase="scorer", scorer_layers=2, scorer_dim=64,
                             scorer_window=32)
    seg = build_segmenter(cfg, 64, AttentionConfig(kind="dcw", block_size=BLK))
    emb = torch.nn.Embedding(rows.tok.vocab_size, 64)  # the LM's (frozen, random) embeddings
    torch.nn.init.normal_(emb.weight, std=0.02)
    held = rows.batch(100_000, 32)
    opt = torch.optim.AdamW(seg.parameters(), lr=1e-2)
    with torch.no_grad():
        before = core_recall(seg, emb, held).cache["metrics"]
    for step in range(100):
        ctx = core_recall(seg, emb, rows.batch(4 * step, 4))
        opt.zero_grad()
        sum(ctx.cache["aux_losses"].values()).backward()
        opt.step()
    with torch.no_grad():
        after = core_recall(seg, emb, held).cache["metrics"]
    chance = cfg.core_ratio  # a random 20% of each document's blocks finds 20% of key blocks
    assert after["seg_bce"] < before["seg_bce"] - 0.2, (before, after)
    assert after["core_recall"] > chance + 0.1, (before, after)
    assert after["core_recall"] > before["core_recall"], (before, after)
    assert after["core_precision"] > 0.2, (before, after)
