"""The fused SwiGLU gate equals silu(g) * u: output and both gradients, fp32 to rounding and
bf16 within bf16 rounding, odd sizes, and inside the model with the tiled MLP
(swiglu_impl=triton vs torch)."""
import os

import pytest
import torch

from dcwdist.kernels.swiglu import swiglu, swiglu_reference

pytestmark = pytest.mark.skipif(
    not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"),
    reason="the Triton kernel needs CUDA or TRITON_INTERPRET=1")
DEV = "cuda" if torch.cuda.is_available() else "cpu"


def both(g, u):
    dh = torch.randn(g.shape, generator=torch.Generator().manual_seed(4)).to(DEV)
    res = []
    for fn in (swiglu, swiglu_reference):
        gi, ui = g.clone().requires_grad_(True), u.clone().requires_grad_(True)
        h = fn(gi, ui)
        h.backward(dh.to(h.dtype))
        res.append((h.detach(), gi.grad, ui.grad))
    return res


@pytest.mark.parametrize("shape", [(2, 7, 96), (1, 3001), (4, 5, 6, 32)])
def test_fp32_equals_the_reference(shape):
    g0 = torch.Generator().manual_seed(0)
    g = (torch.randn(shape, generator=g0) * 4).to(DEV)  # large |g|: sigmoid saturates too
    u = torch.randn(shape, generator=g0).to(DEV)
    (h, dg, du), (rh, rdg, rdu) = both(g, u)
    torch.testing.assert_close(h, rh, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dg, rdg, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(du, rdu, rtol=1e-5, atol=1e-6)


def test_bf16_within_bf16_rounding():
    g0 = torch.Generator().manual_seed(1)
    g = torch.randn(3, 64, 128, generator=g0).to(DEV)
    u = torch.randn(3, 64, 128, generator=g0).to(DEV)
    (h, dg, du), _ = both(g.bfloat16(), u.bfloat16())
    assert h.dtype == dg.dtype == du.dtype == torch.bfloat16
    gd, ud = g.bfloat16().double().requires_grad_(), u.bfloat16().double().requires_grad_()
    dh = torch.randn(g.shape, generator=torch.Generator().manual_seed(4)).to(DEV)
    truth = swiglu_reference(gd, ud)
    truth.backward(dh.bfloat16().double())
    for got, want in ((h, truth.detach()), (dg, gd.grad), (du, ud.grad)):
        err = float((got.double() - want).norm() / want.norm())
        assert err < 2 ** -7, err  # one bf16 ulp (the interpreter's casts truncate)


def test_model_loss_and_grads_with_the_fused_gate_equal_torch_with_a_tiled_mlp():
    from tests.kernel_helpers import assert_same_step, loss_and_grads
    assert_same_step(loss_and_grads(DEV, 40, swiglu_impl="triton", tiled_mlp=16),
                     loss_and_grads(DEV, 40, swiglu_impl="torch", tiled_mlp=16))


def test_mismatched_inputs_and_bad_impl_are_clear_errors():
    from dcwdist.model import ModelConfig
    with pytest.raises(ValueError, match="share shape and dtype"):
        swiglu(torch.ones(2, 3, device=DEV), torch.ones(2, 4, device=DEV))
    with pytest.raises(ValueError, match="model.swiglu_impl must be one of"):
        ModelConfig(swiglu_impl="liger")
    with pytest.raises(ValueError, match="model.norm_impl must be one of"):
        ModelConfig(norm_impl="apex")
