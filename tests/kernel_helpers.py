"""One training step of a tiny model, for checking a fused kernel inside the model against its
torch path (the *_impl model keys)."""
from typing import Optional

import torch

# Where the Triton kernels run in a test: the GPU when there is one, else CPU tensors under
# TRITON_INTERPRET=1 (tests/run.sh).
KERNEL_DEV = "cuda" if torch.cuda.is_available() else "cpu"


def fp32_kernel_tol(atol: float, rtol: float, grad: bool = False) -> tuple[float, float]:
    """(atol, rtol) for an fp32 Triton attention result against torch: the given ones under
    the interpreter (exact fp32 dots); on a GPU the kernel's fp32 dots run as tf32 (10-bit
    mantissa), so the tolerances of tests/test_kernel_block_sparse.py's GPU table."""
    if KERNEL_DEV == "cpu":
        return atol, rtol
    return (2e-2, 2e-2) if grad else (5e-3, 5e-3)


def assert_grads_close(got: dict, want: dict, rtol: float, atol: float):
    """Per-parameter gradients: elementwise to (rtol, atol) on CPU; on a GPU (tf32 dots in the
    kernel, exact fp32 in torch) each gradient to 1% in relative norm."""
    assert got.keys() == want.keys()
    for name, g in want.items():
        if KERNEL_DEV == "cpu":
            torch.testing.assert_close(got[name], g, rtol=rtol, atol=atol, msg=name)
        else:
            rel = float((got[name] - g).norm() / g.norm().clamp_min(1e-30))
            assert rel < 1e-2, f"{name}: relative error {rel:.2e}"


def loss_and_grads(dev: str, T: int, positions: Optional[torch.Tensor] = None, **model_kw):
    """(loss, {name: grad}) of one step: 2 rows of T tokens, one document each, a window-8
    attention over 8-token blocks, activation checkpointing on; model_kw override ModelConfig."""
    from dcwdist.attention import AttentionConfig, AttnContext
    from dcwdist.model import ModelConfig, Transformer
    torch.manual_seed(0)
    kw = dict(vocab_size=64, dim=32, n_layers=2, n_heads=2, n_kv_heads=1,
              activation_checkpointing=True)
    m = Transformer(ModelConfig(**{**kw, **model_kw}),
                    AttentionConfig(kind="window", window=8, block_size=8)).to(dev)
    tokens = torch.randint(0, 64, (2, T), generator=torch.Generator().manual_seed(2)).to(dev)
    pos = torch.arange(T).repeat(2, 1) if positions is None else positions
    ctx = AttnContext(doc_ids=torch.zeros(2, T, dtype=torch.long).to(dev), positions=pos.to(dev))
    loss = m(tokens, ctx, tokens)
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in m.named_parameters()}


def assert_same_step(got, want, rtol=1e-4, atol=1e-5):
    """Two loss_and_grads results agree: loss to 1e-5, every gradient to rtol / atol."""
    (l1, g1), (l0, g0) = got, want
    torch.testing.assert_close(l1, l0, rtol=1e-5, atol=1e-5)
    for name, g in g0.items():
        torch.testing.assert_close(g1[name], g, rtol=rtol, atol=atol, msg=name)
