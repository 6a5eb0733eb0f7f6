"""The fused RoPE kernel equals the model's torch RoPE: output and gradient, fp32 to rounding
and bf16 within bf16 rounding, for q- and k-shaped inputs (GQA), YaRN-scaled tables, positions
restarting per document, and inside the model (rope_impl=triton vs torch)."""
import os

import pytest
import torch

from dcwdist.kernels.rope import apply_rope_fused, apply_rope_reference
from dcwdist.model.rope import RopeConfig, rope_cos_sin

pytestmark = pytest.mark.skipif(
    not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"),
    reason="the Triton kernel needs CUDA or TRITON_INTERPRET=1")
DEV = "cuda" if torch.cuda.is_available() else "cpu"


def tables(B, T, D, dtype, yarn=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    pos = torch.cumsum(torch.randint(0, 2, (B, T), generator=g), 1)  # repeats, restarts
    pos[:, T // 2:] -= pos[:, T // 2:T // 2 + 1].clone()
    cfg = (RopeConfig(base=10000.0, scaling="yarn", factor=8.0, original_max_len=64) if yarn
           else RopeConfig(base=10000.0))
    cos, sin = rope_cos_sin(cfg, D, pos.to(DEV), dtype)
    return cos, sin


def both(x, cos, sin, out_dtype):
    dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(3)).to(DEV)
    res = []
    for fn in (apply_rope_fused, apply_rope_reference):
        xi = x.clone().requires_grad_(True)
        y = fn(xi, cos, sin, out_dtype)
        y.backward(dy.to(y.dtype))
        res.append((y.detach(), xi.grad))
    return res


@pytest.mark.parametrize("B,T,H,D,yarn", [(2, 37, 4, 64, False), (1, 130, 2, 32, True),
                                          (1, 5, 3, 128, False)])
def test_fp32_equals_the_reference(B, T, H, D, yarn):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(B, T, H, D, generator=g).to(DEV)
    cos, sin = tables(B, T, D, torch.float32, yarn)
    (y, dx), (ry, rdx) = both(x, cos, sin, torch.float32)
    assert y.dtype == torch.float32 and dx.dtype == torch.float32
    torch.testing.assert_close(y, ry, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dx, rdx, rtol=1e-5, atol=1e-6)


def test_fp32_math_with_bf16_output_and_bf16_input():
    """Autocast: fp32 tables and x, bf16 out (one cast); DeepSpeed bf16: everything bf16, where
    the fused kernel computes in fp32 and so is at least as close to the fp64 truth (on a GPU;
    the interpreter truncates its casts)."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 48, 4, 64, generator=g).to(DEV)
    cos, sin = tables(2, 48, 64, torch.float32)
    (y, dx), (ry, rdx) = both(x, cos, sin, torch.bfloat16)
    assert y.dtype == torch.bfloat16 and dx.dtype == torch.float32
    # fp32 math then one rounding in both, so within one bf16 ulp: the interpreter's fp32 -> bf16
    # cast truncates, and on a GPU the compiled kernel fuses x*cos + rot*sin into an FMA (one
    # rounding fewer than torch's mul then add), which moves a value across a bf16 rounding
    # boundary now and then (1 of 24,576 on an H200)
    torch.testing.assert_close(y.float(), ry.float(), rtol=2 ** -7, atol=1e-6)
    if DEV == "cuda":
        assert (y != ry).float().mean() < 1e-3
    torch.testing.assert_close(dx, rdx, rtol=1e-2, atol=1e-2)
    xb = x.bfloat16()
    cb, sb = cos.bfloat16(), sin.bfloat16()
    (y, dx), (ry, rdx) = both(xb, cb, sb, torch.bfloat16)
    assert y.dtype == dx.dtype == torch.bfloat16
    truth = apply_rope_reference(xb.double(), cb.double(), sb.double(), torch.float64)
    err = lambda a: float((a.double() - truth).norm() / truth.norm())  # noqa: E731
    assert err(y) < 2 ** -7  # one bf16 ulp, truncating (interpreter) or rounding (GPU)
    if DEV == "cuda":
        assert err(y) <= err(ry) + 1e-6


def test_model_loss_and_grads_with_fused_rope_equal_the_torch_rope():
    from tests.kernel_helpers import assert_same_step, loss_and_grads
    pos = torch.cat([torch.arange(10), torch.arange(14)]).repeat(2, 1)  # a position restart
    kw = dict(dim=64, n_heads=4, n_kv_heads=2, positions=pos)
    assert_same_step(loss_and_grads(DEV, 24, rope_impl="triton", **kw),
                     loss_and_grads(DEV, 24, rope_impl="torch", **kw))


def test_bad_rope_impl_is_one_clear_error():
    from dcwdist.model import ModelConfig
    with pytest.raises(ValueError, match="rope_impl must be one of"):
        ModelConfig(rope_impl="fused")
    with pytest.raises(ValueError, match="twice a power of two"):
        ModelConfig(dim=96 * 2, n_heads=2, n_kv_heads=2, rope_impl="triton")
