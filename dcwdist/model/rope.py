"""Rotary position embeddings with base and length scaling (linear, NTK-aware, YaRN).

Shapes: x_BTHD is [batch, tokens, heads, head_dim]; positions_BT are absolute token positions
(they restart at each packed document, and are global under context parallelism).
The YaRN and NTK formulas follow the published papers and transformers' implementation, so
imported Hugging Face checkpoints rotate identically.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch


@dataclass
class RopeConfig:
    """Rotary embedding settings; a stage may replace them when the length grows."""

    base: float = 10000.0
    """theta: base of the inverse frequencies."""
    scaling: Literal["none", "linear", "ntk", "yarn", "llama3"] = "none"
    """How positions beyond `original_max_len` are reached."""
    factor: float = 1.0
    """Length extension factor s (new length / original length)."""
    original_max_len: int = 4096
    """Context length the base frequencies were trained for (YaRN's ramp needs it)."""
    beta_fast: float = 32.0
    """YaRN: dims rotating more than this many times over the original length extrapolate."""
    beta_slow: float = 1.0
    """YaRN: dims rotating fewer times than this interpolate fully."""
    low_freq_factor: float = 1.0
    """llama3: wavelengths above original_max_len / low_freq_factor are divided by factor."""
    high_freq_factor: float = 4.0
    """llama3: wavelengths below original_max_len / high_freq_factor are kept."""

    def __post_init__(self):
        if self.base <= 1:
            raise ValueError(f"rope.base must be > 1, got {self.base}")
        if self.factor < 1:
            raise ValueError(f"rope.factor must be >= 1, got {self.factor}")
        if self.scaling == "none" and self.factor != 1.0:
            raise ValueError("rope.factor != 1 needs rope.scaling linear|ntk|yarn")


def inv_freq_and_mscale(cfg: RopeConfig, head_dim: int) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [head_dim/2] (float64) and the attention scale applied to cos/sin."""
    dims = torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim
    base = cfg.base
    if cfg.scaling == "ntk":
        # NTK-aware: stretch the base so the lowest frequency covers factor x the length.
        base = base * cfg.factor ** (head_dim / (head_dim - 2))
    inv_freq = 1.0 / (base ** dims)
    mscale = 1.0
    if cfg.scaling == "linear":
        inv_freq = inv_freq / cfg.factor
    elif cfg.scaling == "yarn":
        def correction_dim(num_rotations: float) -> float:
            return head_dim * math.log(cfg.original_max_len / (num_rotations * 2 * math.pi)) / (
                2 * math.log(cfg.base))

        low = max(math.floor(correction_dim(cfg.beta_fast)), 0)
        high = min(math.ceil(correction_dim(cfg.beta_slow)), head_dim - 1)
        if low == high:
            high += 0.001  # avoid a zero-width ramp
        ramp = ((torch.arange(head_dim // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
        extrapolate = 1.0 - ramp  # 1: keep the original frequency; 0: interpolate by factor
        inv_freq = (inv_freq / cfg.factor) * (1 - extrapolate) + inv_freq * extrapolate
        mscale = 0.1 * math.log(cfg.factor) + 1.0 if cfg.factor > 1 else 1.0
    elif cfg.scaling == "llama3":
        # Llama 3.1: long wavelengths interpolate, short ones stay, a smooth ramp in between.
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > cfg.original_max_len / cfg.low_freq_factor,
                             inv_freq / cfg.factor, inv_freq)
        smooth = (cfg.original_max_len / wavelen - cfg.low_freq_factor) / (
            cfg.high_freq_factor - cfg.low_freq_factor)
        smoothed = (1 - smooth) * scaled / cfg.factor + smooth * scaled
        medium = ((wavelen >= cfg.original_max_len / cfg.high_freq_factor)
                  & (wavelen <= cfg.original_max_len / cfg.low_freq_factor))
        inv_freq = torch.where(medium, smoothed, scaled)
    return inv_freq, mscale


def rope_cos_sin(cfg: RopeConfig, head_dim: int, positions_BT: torch.Tensor,
                 dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape [B, T, 1, head_dim] for the given positions.

    Angles are computed in fp64: in fp32, position * frequency loses ~0.06 rad at 1M tokens.
    """
    inv_freq, mscale = inv_freq_and_mscale(cfg, head_dim)
    inv_freq = inv_freq.to(device=positions_BT.device)
    angles = positions_BT.to(torch.float64)[..., None] * inv_freq  # [B, T, D/2]
    angles = torch.cat([angles, angles], dim=-1)[:, :, None, :]
    return (angles.cos() * mscale).to(dtype), (angles.sin() * mscale).to(dtype)


def apply_rope(x_BTHD: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half convention (Llama/Qwen2 in transformers)."""
    half = x_BTHD.shape[-1] // 2
    x1, x2 = x_BTHD[..., :half], x_BTHD[..., half:]
    rotated = torch.cat([-x2, x1], dim=-1)
    return x_BTHD * cos + rotated * sin
