"""Checkpoint settings and the single-process save of the final model."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch


@dataclass
class CheckpointConfig:
    """When and where checkpoints are written."""

    dir: str = ""
    """Checkpoint folder; empty means RUN_DIR/checkpoints."""
    every: int = 0
    """Save every N optimizer steps; 0 saves only at the end of each stage."""
    keep_last: int = 3
    """Checkpoints kept; older ones are pruned."""
    resume: str = "none"
    """none | auto (newest complete checkpoint) | a checkpoint path."""

    def __post_init__(self):
        if self.every < 0 or self.keep_last < 1:
            raise ValueError("checkpoint.every must be >= 0 and checkpoint.keep_last >= 1")


def save_model(model: torch.nn.Module, path: str) -> None:
    """Atomic write of the model's state dict (temp file, then rename)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    torch.save(model.state_dict(), tmp)
    os.replace(tmp, path)
