"""Run check functions in real multi-process gloo groups (torch.multiprocessing spawn).

A check is a module-level function check(rank, world, group, *args); every rank runs it and an
assertion on any rank fails the test (mp.spawn re-raises it). Several checks share one spawned
group to keep process start-up (the costly part on 2 cores) off the per-check time.
"""
from __future__ import annotations

import datetime
import os
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tests.distributed import free_port


def _worker(rank, world, port, checks, timeout=60.0):
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=timeout))
    try:
        for fn, args in checks:
            torch.manual_seed(0)
            fn(rank, world, dist.group.WORLD, *args)
            dist.barrier()
    finally:
        dist.destroy_process_group()
    # A rank whose checks all passed leaves without interpreter teardown: gloo's threads may
    # still hold work objects whose tensors take the GIL while the interpreter finalizes, which
    # now and then aborted a finished rank (SIGABRT, "terminate called without an active
    # exception") and failed a passing test. A failing rank raises above, as before.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def spawn(world: int, checks: list, timeout: float = 60.0) -> None:
    """Run [(fn, args), ...] on `world` gloo ranks; raises if any rank fails. `timeout`
    (seconds) bounds every collective: a rank left waiting in one (a collective skipped by
    another rank) raises after it instead of hanging the test."""
    mp.spawn(_worker, args=(world, free_port(), checks, timeout), nprocs=world, join=True)


def gather_full(x_local: torch.Tensor, group, sharding=None) -> torch.Tensor:
    """Sharded [B, T/P, ...] -> [B, T, ...] (test side, no autograd; zigzag unless `sharding`)."""
    from dcwdist.parallel.zigzag import zigzag_index
    P = dist.get_world_size(group)
    parts = [torch.empty_like(x_local) for _ in range(P)]
    dist.all_gather(parts, x_local.contiguous(), group=group)
    T = x_local.shape[1] * P
    out = x_local.new_zeros((x_local.shape[0], T) + tuple(x_local.shape[2:]))
    for r, part in enumerate(parts):
        idx = zigzag_index(T, P, r) if sharding is None else sharding.index(r)
        out[:, idx] = part
    return out


def tiny_cp_model(kind: str, seg_mode: str = "", blk: int = 8, vocab: int = 64, **attn_kw):
    """The CP tests' tiny fp64 model (2 layers, GQA 4/2), with a segmenter for DCW when
    seg_mode is prefix|causal; DCW's alpha starts at 0.5 so the cross-tier path counts."""
    from dcwdist.attention import AttentionConfig
    from dcwdist.model import ModelConfig, Transformer
    from dcwdist.segmentation import SegmentationConfig, build_segmenter
    torch.manual_seed(0)
    attn = AttentionConfig(**{**dict(kind=kind, block_size=blk, window=6, buffer_window=12,
                                     stride=4, summary_pool=2, chunk_size=32,
                                     caa_windows=[8, 16], caa_c=4.0), **attn_kw})
    cfg = ModelConfig(vocab_size=vocab, dim=32, n_layers=2, n_heads=4, n_kv_heads=2)
    seg = None
    if seg_mode:
        seg = build_segmenter(SegmentationConfig(
            mode=seg_mode, scorer_layers=1, scorer_dim=16, scorer_heads=2, scorer_window=16,
            tau_core=0.5, tau_buffer=0.45, lambda_eff=0.5, eff_target=0.05), cfg.dim, attn)
    return open_cross_tier(Transformer(cfg, attn, seg).double())


def open_cross_tier(model):
    """DCW's alpha (init 0) set to 0.5 in every layer, so the cross-tier path counts."""
    with torch.no_grad():
        for layer in model.layers:
            if hasattr(layer.self_attn.attn, "alpha"):
                layer.self_attn.attn.alpha.fill_(0.5)
    return model


def assert_cp_equals_single(loss, ref_loss, model, ref_model, group, loss_tol: dict,
                            grad_tol: dict, label: str) -> None:
    """Summed per-rank losses and all-reduced parameter gradients equal one process's."""
    total = loss.detach().clone()
    dist.all_reduce(total, group=group)
    torch.testing.assert_close(total, ref_loss.detach(), **loss_tol)
    for (name, p_ref), (_, p) in zip(ref_model.named_parameters(), model.named_parameters()):
        if p_ref.grad is None:
            assert p.grad is None or not p.grad.any(), name
            continue
        g = p.grad.clone() if p.grad is not None else torch.zeros_like(p_ref.grad)
        dist.all_reduce(g, group=group)
        torch.testing.assert_close(g, p_ref.grad, **grad_tol,
                                   msg=lambda m: f"{label} grad {name}: {m}")


def doc_batch(doc, roles, vocab: int, g, answer_only: bool):
    """A Batch over rows of doc ids [B, T] (-1 padding) and roles: random tokens, positions from
    each document's start, next-token labels inside documents (only onto answer tokens when
    answer_only) and random relevance labels."""
    from dcwdist.attention.layouts import doc_position
    from dcwdist.attention.context import ROLE_ANSWER
    from dcwdist.data_pipelines.packing import IGNORE, Batch
    B, T = doc.shape
    tokens = torch.randint(0, vocab, (B, T), generator=g)
    labels = torch.full_like(tokens, IGNORE)
    same = (doc[:, 1:] == doc[:, :-1]) & (doc[:, 1:] >= 0)
    if answer_only:
        same &= roles[:, 1:] == ROLE_ANSWER
    labels[:, :-1] = torch.where(same, tokens[:, 1:], IGNORE)
    relevance = (torch.rand(B, T, generator=g) > 0.7).double() * (doc >= 0)
    return Batch(tokens, labels, doc_position(doc), doc, roles, relevance)
