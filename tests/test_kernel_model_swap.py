"""attention.impl=triton swaps the Triton kernel in for the torch reference inside the whole
model — same loss and same gradients — for dense and for DCW with the learned scorer."""
import os

import pytest
import torch

if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("Triton on CPU needs TRITON_INTERPRET=1 (tests/run.sh sets it)",
                allow_module_level=True)

from dcwdist.config import load_config  # noqa: E402
from dcwdist.eval.positions import context_for  # noqa: E402
from dcwdist.train.trainer import build_model  # noqa: E402
from dcwdist.attention import AttentionConfig  # noqa: E402
from dcwdist.data_pipelines import SyntheticRows  # noqa: E402
from tests.conftest import REPO  # noqa: E402
from tests.kernel_helpers import KERNEL_DEV, assert_grads_close  # noqa: E402


@pytest.mark.parametrize("kind", ["dense", "dcw"])
def test_triton_impl_equals_torch_impl_in_the_model(kind):
    cfg = load_config(os.path.join(REPO, "recipes/tiny_cpu.yaml"), [
        f"attention.kind={kind}", "attention.block_size=16", "model.dim=64", "model.n_layers=2",
        "segmentation.scorer_layers=1", "segmentation.scorer_dim=32", "data.num_facts=1",
        "data.min_doc_len=60"])
    attn_cfg = AttentionConfig(**vars(cfg.attention))
    torch.manual_seed(0)
    model = build_model(cfg, attn_cfg).to(KERNEL_DEV)
    batch = SyntheticRows(cfg.data, 256, align=16).batch(0, 1).to(KERNEL_DEV)
    results = {}
    for impl in ("torch", "triton"):
        attn_cfg.impl = impl  # the one switch: every layer reads the shared config
        model.zero_grad(set_to_none=True)
        loss = model(batch.tokens, context_for(batch), batch.labels) / batch.num_loss_tokens
        loss.backward()
        results[impl] = (loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                                         if p.grad is not None})
    (l_t, g_t), (l_k, g_k) = results["torch"], results["triton"]
    tol = 1e-5 if KERNEL_DEV == "cpu" else 1e-3  # tf32 dots in the kernel on a GPU
    torch.testing.assert_close(l_k, l_t, rtol=tol, atol=tol)
    assert_grads_close(g_k, g_t, rtol=2e-3, atol=2e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["dense", "dcw"])
def test_bf16_autocast_training_step_with_the_kernel_on_cuda(kind):
    # Under CUDA autocast RoPE and summary pooling ran in fp32 while v stayed bf16; the kernel
    # needs one dtype. CPU autocast does not show this, so it is checked on the GPU.
    cfg = load_config(os.path.join(REPO, "recipes/tiny_cpu.yaml"), [
        f"attention.kind={kind}", "attention.impl=triton", "attention.block_size=64",
        "model.dim=128", "model.n_layers=2", "data.num_facts=1"])
    attn_cfg = AttentionConfig(**vars(cfg.attention))
    model = build_model(cfg, attn_cfg).cuda()
    batch = SyntheticRows(cfg.data, 1024, align=64).batch(0, 1).to("cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = model(batch.tokens, context_for(batch), batch.labels) / batch.num_loss_tokens
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
