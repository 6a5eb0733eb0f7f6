"""RoPE scaling variants match their published formulas (written out independently here)."""
import math

import pytest
import torch

from dcwdist.model.rope import RopeConfig, apply_rope, inv_freq_and_mscale, rope_cos_sin

D = 64


def plain(base=10000.0):
    return torch.tensor([base ** (-2 * i / D) for i in range(D // 2)], dtype=torch.float64)


def test_none_is_the_plain_frequencies():
    f, m = inv_freq_and_mscale(RopeConfig(base=10000.0), D)
    torch.testing.assert_close(f, plain(), rtol=1e-12, atol=0)
    assert m == 1.0


def test_linear_divides_every_frequency_by_the_factor():
    f, m = inv_freq_and_mscale(RopeConfig(scaling="linear", factor=4.0), D)
    torch.testing.assert_close(f, plain() / 4.0, rtol=1e-12, atol=0)
    assert m == 1.0


def test_ntk_stretches_the_base():
    f, _ = inv_freq_and_mscale(RopeConfig(scaling="ntk", factor=8.0), D)
    torch.testing.assert_close(f, plain(10000.0 * 8.0 ** (D / (D - 2))), rtol=1e-12, atol=0)


def test_yarn_keeps_fast_dims_interpolates_slow_dims_and_scales_attention():
    cfg = RopeConfig(scaling="yarn", factor=4.0, original_max_len=4096, beta_fast=32, beta_slow=1)
    f, m = inv_freq_and_mscale(cfg, D)
    base_f = plain()
    for i in range(D // 2):
        rotations = 4096 * base_f[i] / (2 * math.pi)  # turns over the original context
        if rotations > 32:
            assert f[i] == pytest.approx(float(base_f[i]), rel=1e-12)  # extrapolate
        elif rotations < 1:
            assert f[i] == pytest.approx(float(base_f[i]) / 4.0, rel=1e-12)  # interpolate
        else:
            assert float(base_f[i]) / 4.0 - 1e-15 <= f[i] <= float(base_f[i]) + 1e-15
    assert m == pytest.approx(0.1 * math.log(4.0) + 1.0)


def test_rotation_preserves_norm_and_relative_position():
    cfg = RopeConfig()
    q = torch.randn(1, 1, 1, D, dtype=torch.float64)
    k = torch.randn(1, 1, 1, D, dtype=torch.float64)
    def dot_at(i, j):
        ci, si = rope_cos_sin(cfg, D, torch.tensor([[i]]), torch.float64)
        cj, sj = rope_cos_sin(cfg, D, torch.tensor([[j]]), torch.float64)
        return float((apply_rope(q, ci, si) * apply_rope(k, cj, sj)).sum())
    assert dot_at(10, 3) == pytest.approx(dot_at(107, 100), rel=1e-9)
    c, s = rope_cos_sin(cfg, D, torch.tensor([[5]]), torch.float64)
    assert apply_rope(q, c, s).norm() == pytest.approx(float(q.norm()), rel=1e-12)


def test_factor_without_scaling_is_rejected():
    with pytest.raises(ValueError, match="needs rope.scaling"):
        RopeConfig(factor=2.0)
