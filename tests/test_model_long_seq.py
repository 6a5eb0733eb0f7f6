"""Long-sequence memory options: model.tiled_mlp and model.offload_activations give the loss and
every gradient of the plain model (fp64, 1e-10), alone, together, under activation checkpointing
and with DCW's scorer; they hold the memory they promise (tensor bytes counted with LiveBytes);
the chunked loss's backward adds no [N, D] tensor; the trainer and the CLI take the options."""
import os

import pytest
import torch

from dcwdist.attention import AttentionConfig, AttnContext
from dcwdist.attention.context import ROLE_DOCUMENT, ROLE_INSTRUCTION
from dcwdist.configtree import ConfigError
from dcwdist.model import ModelConfig, Transformer
from dcwdist.model.activations import LiveBytes, OffloadSaved, tiled
from dcwdist.model.loss import chunked_cross_entropy_sum
from dcwdist.model.transformer import SwiGLU
from tests.conftest import REPO

TOL = dict(rtol=1e-10, atol=1e-10)


def tiny(kind="window", **opts):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, loss_chunk=16,
                      **opts)
    attn = AttentionConfig(kind=kind, block_size=8, window=6, buffer_window=12, stride=4,
                           summary_pool=2, chunk_size=16)
    seg = None
    if kind == "dcw":
        from dcwdist.segmentation import SegmentationConfig, build_segmenter
        seg = build_segmenter(SegmentationConfig(
            mode="causal", scorer_layers=1, scorer_dim=16, scorer_heads=2, scorer_window=16,
            tau_core=0.5, tau_buffer=0.45, lambda_eff=0.5, eff_target=0.05), cfg.dim, attn)
    model = Transformer(cfg, attn, seg).double().train()
    with torch.no_grad():  # DCW's cross-tier path counts from the start
        for layer in model.layers:
            if hasattr(layer.self_attn.attn, "alpha"):
                layer.self_attn.attn.alpha.fill_(0.5)
    return model


def batch(B=2, T=48, vocab=64):
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, vocab, (B, T), generator=g)
    labels = torch.randint(0, vocab, (B, T), generator=g)
    labels[0, :5] = -100
    doc = torch.zeros(B, T, dtype=torch.long)
    doc[1, 24:] = 1  # two packed documents in row 1, the second from a block boundary
    pos = torch.arange(T).repeat(B, 1)
    pos[1, 24:] -= 24
    roles = torch.full((B, T), ROLE_DOCUMENT, dtype=torch.long)
    roles[:, :8] = ROLE_INSTRUCTION
    return tokens, labels, doc, pos, roles


def loss_and_grads(model):
    tokens, labels, doc, pos, roles = batch()
    ctx = AttnContext(doc_ids=doc, positions=pos, roles=roles)
    loss = model(tokens, ctx, labels)
    for value in ctx.cache.get("aux_losses", {}).values():  # the scorer's own losses (DCW)
        loss = loss + value
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads, ctx


def assert_same(got, ref, label):
    (loss, grads, _), (ref_loss, ref_grads, _) = got, ref
    torch.testing.assert_close(loss, ref_loss, **TOL, msg=lambda m: f"{label} loss: {m}")
    assert grads.keys() == ref_grads.keys(), label
    for name, g in grads.items():
        torch.testing.assert_close(g, ref_grads[name], **TOL,
                                   msg=lambda m, n=name: f"{label} grad {n}: {m}")


@pytest.mark.parametrize("ckpt", [False, True])
@pytest.mark.parametrize("tile", [7, 32])  # 7: tiles straddle the two rows; 32: uneven last tile
def test_tiled_mlp_equals_untiled(ckpt, tile):
    ref = loss_and_grads(tiny(activation_checkpointing=ckpt))
    got = loss_and_grads(tiny(activation_checkpointing=ckpt, tiled_mlp=tile))
    assert_same(got, ref, f"tiled_mlp={tile} ckpt={ckpt}")


@pytest.mark.parametrize("tile", [0, 16])
def test_offload_equals_and_moves_every_hidden_sized_saved_tensor(tile):
    ref = loss_and_grads(tiny(activation_checkpointing=True))
    got = loss_and_grads(tiny(activation_checkpointing=True, offload_activations=True,
                              tiled_mlp=tile))
    assert_same(got, ref, f"offload tiled_mlp={tile}")
    # Each layer's input, the final norm's input and the loss's hidden gradient: [2, 48, 32] fp64
    # each (the [64, 32] weight gradient is smaller and stays); on CPU "moving" keeps them put.
    hidden_bytes = 2 * 48 * 32 * 8
    assert got[2].cache["offloaded_bytes"] == (2 + 1 + 1) * hidden_bytes
    assert "offloaded_bytes" not in ref[2].cache


def test_dcw_with_both_options_equals_plain():
    ref = loss_and_grads(tiny("dcw", activation_checkpointing=True))
    got = loss_and_grads(tiny("dcw", activation_checkpointing=True, tiled_mlp=24,
                              offload_activations=True))
    assert any(n.startswith("segmenter.") for n in got[1])  # the scorer's gradient is compared
    assert_same(got, ref, "dcw tiled+offload")


def test_eval_forward_ignores_offload_and_tiles_without_grad():
    model = tiny(activation_checkpointing=True, offload_activations=True, tiled_mlp=8).eval()
    plain = tiny()
    plain.load_state_dict(model.state_dict())
    tokens, _, doc, pos, _ = batch()
    with torch.no_grad():
        ctx = AttnContext(doc_ids=doc, positions=pos)
        torch.testing.assert_close(model(tokens, ctx), plain.eval()(tokens, AttnContext(
            doc_ids=doc, positions=pos)), **TOL)
    assert "offloaded_bytes" not in ctx.cache


def test_tiled_mlp_peak_is_one_tile_of_intermediates():
    torch.manual_seed(0)
    N, D, F, tile = 512, 64, 256, 64
    mlp = SwiGLU(D, F).double()
    x = torch.randn(N, D, dtype=torch.float64, requires_grad=True)
    peaks = {}
    for t in (0, tile):
        mlp.tile = t
        with LiveBytes() as live:
            out = mlp(x)
            kept = live.current  # after forward: the output + what autograd saved
            out.backward(torch.ones_like(out))
        peaks[t] = (kept, live.peak)
        x.grad = None
        mlp.zero_grad(set_to_none=True)
    row = 8 * N  # bytes of one fp64 column over all tokens
    # Untiled, forward keeps gate, up, silu(gate) and their product ([N, F] each) besides [N, D].
    assert peaks[0][0] >= 4 * F * row
    # Tiled, forward keeps the output (and the concatenated tiles while building it) only.
    assert peaks[tile][0] <= 2 * D * row
    # Backward recomputes one tile at a time: the [N, F] intermediates never exist at once.
    assert peaks[tile][1] < peaks[0][1] / 3, peaks


def test_offload_hooks_take_only_large_non_parameter_tensors():
    w = torch.nn.Parameter(torch.randn(8, 8, dtype=torch.float64))
    x = torch.randn(4, 8, dtype=torch.float64, requires_grad=True)
    hooks = OffloadSaved(min_numel=32)
    with hooks:
        y = (x * 2) @ w  # saves x*2 (32 elements) and w (a parameter, 64 elements)
        z = (y[:, :2] * y[:, :2]).sum()  # saves [4, 2] slices: too small
    assert hooks.offloaded_bytes == 32 * 8
    z.backward()
    ref_x, ref_w = x.grad.clone(), w.grad.clone()
    x.grad = w.grad = None
    ((x * 2) @ w)[:, :2].pow(2).sum().backward()
    torch.testing.assert_close(x.grad, ref_x, **TOL)
    torch.testing.assert_close(w.grad, ref_w, **TOL)


def test_tiled_function_handles_uneven_tiles_and_row_boundaries():
    x = torch.randn(3, 10, 4, dtype=torch.float64, requires_grad=True)
    lin = torch.nn.Linear(4, 5).double()
    out = tiled(lambda t: torch.tanh(lin(t)), x, 7)
    assert out.shape == (3, 10, 5)
    torch.testing.assert_close(out, torch.tanh(lin(x)), **TOL)
    g = torch.randn_like(out)
    gx, gw = torch.autograd.grad(out, (x, lin.weight), g)
    rx, rw = torch.autograd.grad(torch.tanh(lin(x)), (x, lin.weight), g)
    torch.testing.assert_close(gx, rx, **TOL)
    torch.testing.assert_close(gw, rw, **TOL)


def test_loss_backward_adds_no_hidden_sized_tensor_and_refuses_a_second_backward():
    torch.manual_seed(0)
    N, D, V = 256, 32, 40
    h = torch.randn(1, N, D, dtype=torch.float64, requires_grad=True)
    w = torch.randn(V, D, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, V, (1, N))
    with LiveBytes() as live:
        loss = chunked_cross_entropy_sum(h, w, labels, 64) * 0.5
        live.reset_peak()
        before = live.current
        loss.backward(retain_graph=True)
    # the saved gradients are scaled in place and handed over: no new [N, D] (64 KiB here)
    assert live.peak - before < N * D * 8 // 2, (live.peak - before)
    with pytest.raises(RuntimeError, match="second backward"):
        loss.backward()


def test_options_are_validated_and_reach_the_trainer_from_the_command_line(tmp_path):
    with pytest.raises(ValueError, match="activation_checkpointing=true"):
        ModelConfig(offload_activations=True)
    with pytest.raises(ValueError, match="tiled_mlp"):
        ModelConfig(tiled_mlp=-1)
    from dcwdist.config import load_config
    from dcwdist.train.trainer import Trainer
    over = ["model.tiled_mlp=4096", "model.offload_activations=true"]
    big = load_config(os.path.join(REPO, "recipes/qwen2_100m_4k_to_128k.yaml"), over)
    assert big.model.tiled_mlp == 4096 and big.model.offload_activations
    with pytest.raises((ValueError, ConfigError), match="activation_checkpointing"):
        load_config(os.path.join(REPO, "recipes/tiny_cpu.yaml"), over)
    small = ["attention.kind=dense", "model.dim=32", "model.n_layers=2", "stages.0.seq_len=384",
             "stages.0.steps=2", "stages.0.batch_tokens=768", "stages.0.micro_batch_size=2",
             "stages.1.steps=0", "data.eval_rows=1", "logging.progress=false",
             "logging.tensorboard=false", "checkpoint.every=0",
             "model.activation_checkpointing=true"]
    losses = {}
    for name, extra in (("plain", []), ("options", ["model.tiled_mlp=100",
                                                    "model.offload_activations=true"])):
        cfg = load_config(os.path.join(REPO, "recipes/tiny_cpu.yaml"), small + extra)
        lines = []
        out = Trainer(cfg, run_dir=str(tmp_path / name), echo=lines.append).fit()
        losses[name] = out["losses"]
    assert any("tiled MLP (100) + offload" in str(x) for x in lines), lines[:2]
    assert losses["options"] == pytest.approx(losses["plain"], rel=1e-6)


@pytest.mark.gpu
def test_offload_on_gpu_frees_the_device_and_equals():
    """The real move: pinned host copies out in forward, back in backward; loss and gradients
    equal, and the device holds L + 2 hidden states less between forward and backward."""
    dev = torch.device("cuda")
    B, T, D, L = 1, 4096, 64, 4
    tokens, labels = (torch.randint(0, 64, (B, T), device=dev) for _ in range(2))
    results = {}
    for offload in (False, True):
        torch.manual_seed(0)
        cfg = ModelConfig(vocab_size=64, dim=D, n_layers=L, n_heads=4, n_kv_heads=2,
                          activation_checkpointing=True, offload_activations=offload,
                          tiled_mlp=1000)
        model = Transformer(cfg, AttentionConfig(kind="dense")).double().to(dev).train()
        ctx = AttnContext(doc_ids=torch.zeros(B, T, dtype=torch.long, device=dev),
                          positions=torch.arange(T, device=dev)[None])
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        loss = model(tokens, ctx, labels)
        torch.cuda.synchronize()
        kept = torch.cuda.memory_allocated() - before
        loss.backward()
        grads = {n: p.grad.cpu() for n, p in model.named_parameters()}
        results[offload] = (loss.detach().cpu(), grads, kept, ctx.cache.get("offloaded_bytes"))
    (ref_loss, ref_grads, ref_kept, _), (loss, grads, kept, moved) = results[False], results[True]
    hidden = B * T * D * 8
    assert moved == (L + 2) * hidden
    assert ref_kept - kept >= (L + 1) * hidden, (ref_kept, kept, hidden)
    torch.testing.assert_close(loss, ref_loss, **TOL)
    for name, g in grads.items():
        torch.testing.assert_close(g, ref_grads[name], **TOL, msg=lambda m, n=name: f"{n}: {m}")
