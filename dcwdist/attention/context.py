"""What every attention layer of one forward pass shares: document structure, tiers, caches."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch

ROLE_INSTRUCTION, ROLE_DOCUMENT, ROLE_ANSWER, ROLE_PAD = 0, 1, 2, 3
TIER_CORE, TIER_BUFFER, TIER_BACKGROUND = 0, 1, 2


@dataclass
class AttnContext:
    """Per-forward inputs of the attention layers. Shapes: B batch, T tokens, NB = T / block."""

    doc_ids: torch.Tensor
    """[B, T] int64 document index within the row; -1 marks padding."""
    positions: torch.Tensor
    """[B, T] int64 position within the document (global under context parallelism)."""
    roles: Optional[torch.Tensor] = None
    """[B, T] int64 ROLE_* of each token (instruction / document / answer / pad)."""
    tiers: Optional[torch.Tensor] = None
    """[B, NB] int64 TIER_* of each block (DCW), from the scorer."""
    block_scores: Optional[torch.Tensor] = None
    """[B, NB] soft block scores in [0, 1] carrying the scorer's gradient (DCW)."""
    group: Any = None
    """Context-parallel process group (None: the whole sequence is local)."""
    cache: dict = field(default_factory=dict)
    """Layouts and other per-forward artefacts built once and reused by every layer."""
    kept: Any = None
    """Attention kernel outputs kept across activation-checkpoint recompute
    (model.activations.KeptOutputs, set by the model when it checkpoints); None: the recompute
    runs the kernels again."""
