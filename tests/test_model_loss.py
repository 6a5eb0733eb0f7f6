"""The chunked output projection + cross-entropy equals the full one in value and gradient."""
import pytest
import torch

from dcwdist.model.loss import chunked_cross_entropy_sum, full_cross_entropy_sum


@pytest.mark.parametrize("chunk", [1, 7, 64, 1000])
def test_chunked_loss_equals_full_loss_value_and_gradient(chunk):
    torch.manual_seed(0)
    h = torch.randn(2, 37, 16, dtype=torch.float64, requires_grad=True)
    w = torch.randn(50, 16, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 50, (2, 37))
    labels[0, :5] = -100
    labels[1, -3:] = -100
    full = full_cross_entropy_sum(h, w, labels)
    gh_full, gw_full = torch.autograd.grad(full * 0.7, (h, w))
    chunked = chunked_cross_entropy_sum(h, w, labels, chunk)
    gh, gw = torch.autograd.grad(chunked * 0.7, (h, w))
    torch.testing.assert_close(chunked, full.to(chunked.dtype), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(gh, gh_full, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(gw, gw_full, rtol=1e-10, atol=1e-10)


def test_all_ignored_gives_zero_loss_and_gradient():
    h = torch.randn(1, 8, 4, requires_grad=True)
    w = torch.randn(10, 4, requires_grad=True)
    loss = chunked_cross_entropy_sum(h, w, torch.full((1, 8), -100), 3)
    loss.backward()
    assert float(loss) == 0.0 and h.grad.abs().max() == 0 and w.grad.abs().max() == 0
