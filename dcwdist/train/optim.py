"""AdamW with linear warmup and cosine decay over all stages' steps."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class OptimConfig:
    """Optimizer and learning-rate schedule."""

    lr: float = 3e-4
    """Peak learning rate."""
    min_lr_ratio: float = 0.1
    """Final learning rate as a fraction of the peak (cosine schedule)."""
    warmup_steps: int = 100
    """Linear warmup steps from 0 to the peak."""
    schedule: str = "cosine"
    """cosine | constant (after warmup)."""
    weight_decay: float = 0.1
    """Decoupled weight decay on matrices (not on norms, biases or scalars)."""
    beta1: float = 0.9
    """Adam beta1."""
    beta2: float = 0.95
    """Adam beta2."""
    eps: float = 1e-8
    """Adam epsilon."""
    grad_clip: float = 1.0
    """Global gradient-norm clip; 0 disables."""
    nonfinite: str = "stop"
    """A non-finite loss or gradient norm: stop (exit 3, naming step and stage) or skip (drop
    the batch's update on every rank, log train/skipped, go on; torch backend only)."""

    def __post_init__(self):
        if self.nonfinite not in ("stop", "skip"):
            raise ValueError(f"optim.nonfinite must be stop or skip, got {self.nonfinite!r}")
        if self.schedule not in ("cosine", "constant"):
            raise ValueError(f"optim.schedule must be cosine or constant, got {self.schedule!r}")
        if self.lr <= 0:
            raise ValueError(f"optim.lr must be > 0, got {self.lr}")


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    return torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr,
                             betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)


def lr_at(step: int, total_steps: int, cfg: OptimConfig) -> float:
    """Learning rate for optimizer step `step` (0-based)."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    span = max(1, total_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + (cfg.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))
