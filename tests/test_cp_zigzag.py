"""Zigzag sharding and the splitting of global layouts into per-rank ring steps (one process)."""
import torch

from dcwdist.attention.layouts import ROW_CAUSAL, local_layout
from dcwdist.data_pipelines.packing import Batch
from dcwdist.parallel.dcw_cp import select_rows, split_by_source
from dcwdist.parallel.ring import dense_step_layouts
from dcwdist.parallel.zigzag import CPShard, shard_batch, zigzag_index
from tests.test_cp_attention import packed_docs


def test_zigzag_chunks_balance_and_cover():
    T, P = 48, 3
    idx = [zigzag_index(T, P, r) for r in range(P)]
    assert torch.equal(torch.sort(torch.cat(idx)).values, torch.arange(T))
    assert idx[0].tolist() == list(range(0, 8)) + list(range(40, 48))
    assert idx[2].tolist() == list(range(16, 32))  # the last rank's chunks are adjacent
    work = [int((i + 1).sum()) for i in idx]  # causal keys per rank
    assert len(set(work)) == 1


def test_shard_batch_keeps_global_positions():
    T = 16
    x = torch.arange(T)[None]
    batch = Batch(tokens=x, labels=x + 1, positions=x * 10, doc_ids=x * 0, roles=x * 0,
                  relevance=x.double())
    local = shard_batch(batch, 2, 1)
    assert local.tokens.tolist() == [[4, 5, 6, 7, 8, 9, 10, 11]]
    assert local.positions.tolist() == [[40, 50, 60, 70, 80, 90, 100, 110]]
    assert local.labels.tolist() == [[5, 6, 7, 8, 9, 10, 11, 12]]


def _shard(P, r, doc):
    return CPShard(None, P, r, doc.shape[1], doc, doc * 0)


def test_split_by_source_reproduces_the_global_mask():
    T, blk = 64, 4
    doc = packed_docs(T, blk)
    rows = torch.randint(1, 3, (2, T // blk))
    for layout in (local_layout(doc, blk, rows, 6), local_layout(doc, blk, rows * 0 + ROW_CAUSAL)):
        full = layout.token_mask()[:, 0]
        for P in (2, 4):
            for r in range(P):
                shard = _shard(P, r, doc)
                qi = shard.index()
                for s, step in enumerate(split_by_source(layout, shard)):
                    ki = shard.index((r - s) % P)
                    assert torch.equal(step.token_mask()[:, 0], full[:, qi][:, :, ki]), (P, r, s)
                sel = select_rows(layout, shard).token_mask()[:, 0]
                assert torch.equal(sel, full[:, qi])


def test_dense_steps_are_the_causal_document_mask():
    T = 48
    doc = packed_docs(T)
    full = local_layout(doc, 1).token_mask()[:, 0]
    for P in (2, 3):
        for r in range(P):
            shard = _shard(P, r, doc)
            for s, step in enumerate(dense_step_layouts(shard, 64)):
                ki = shard.index((r - s) % P)
                assert torch.equal(step[0].token_mask()[:, 0], full[:, shard.index()][:, :, ki])
