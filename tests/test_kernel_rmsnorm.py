"""The fused RMSNorm kernel equals its torch reference: output and both gradients, in fp32 (to
rounding) and with bf16 activations (within bf16 rounding), for fp32 and bf16 weights, odd
widths and row counts, and inside the model (norm_impl=triton vs torch)."""
import os

import pytest
import torch

from dcwdist.kernels.rmsnorm import rms_norm, rms_norm_reference

pytestmark = pytest.mark.skipif(
    not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"),
    reason="the Triton kernel needs CUDA or TRITON_INTERPRET=1")
DEV = "cuda" if torch.cuda.is_available() else "cpu"


def both(x, w, eps=1e-6):
    """(y, dx, dw) of the kernel and of the reference for one random upstream gradient."""
    out = []
    dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(7)).to(DEV)
    for fn in (rms_norm, rms_norm_reference):
        xi, wi = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
        y = fn(xi, wi, eps)
        y.backward(dy.to(y.dtype))
        out.append((y.detach(), xi.grad, wi.grad))
    return out


@pytest.mark.parametrize("shape", [(2, 5, 48), (1, 4100, 96), (3, 33)])
def test_fp32_equals_the_reference(shape):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(shape, generator=g) * 3).to(DEV)
    w = (1 + 0.1 * torch.randn(shape[-1], generator=g)).to(DEV)
    (y, dx, dw), (ry, rdx, rdw) = both(x, w)
    assert y.dtype == ry.dtype == torch.float32
    torch.testing.assert_close(y, ry, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dx, rdx, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(dw, rdw, rtol=1e-4, atol=1e-4)


def rel_err(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.mark.parametrize("w_dtype", [torch.float32, torch.bfloat16])
def test_bf16_activations_within_bf16_rounding(w_dtype):
    """bf16 x with fp32 weights (autocast) gives fp32 y, with bf16 weights (DeepSpeed) bf16 y,
    as torch's promotion does. The kernel is as close to the fp64 truth as the torch reference
    is (relative error norms under bf16's 2^-7), and both agree elementwise within two bf16
    ulps (xhat's rounding to bf16 may go the other way when rstd differs in its last bit)."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 64, 80, generator=g).to(DEV, torch.bfloat16)
    w = (1 + 0.1 * torch.randn(80, generator=g)).to(DEV, w_dtype)
    (y, dx, dw), (ry, rdx, rdw) = both(x, w)
    assert y.dtype == ry.dtype and dx.dtype == torch.bfloat16 and dw.dtype == w_dtype
    (ty, tdx, tdw), _ = both(x.double(), w.double())  # the kernel in fp64 is the truth
    for got, ref, truth in ((y, ry, ty), (dx, rdx, tdx), (dw, rdw, tdw)):
        assert rel_err(got, truth) < 2**-7 and rel_err(ref, truth) < 2**-7
    torch.testing.assert_close(y.float(), ry.float(), rtol=2 * 2**-7, atol=2e-2)


def test_model_loss_and_grads_with_the_kernel_equal_the_torch_norm():
    from tests.kernel_helpers import assert_same_step, loss_and_grads
    assert_same_step(loss_and_grads(DEV, 24, norm_impl="triton"),
                     loss_and_grads(DEV, 24, norm_impl="torch"))


def test_bad_width_is_a_clear_error():
    with pytest.raises(ValueError, match="last dim"):
        rms_norm(torch.ones(2, 4, device=DEV), torch.ones(5, device=DEV), 1e-6)
