"""Window family: per-layer windows, multi-window heads, LongLoRA S²-Attn, random + global."""
from __future__ import annotations

KINDS: dict = {}
"""attention.kind -> module class, merged into kinds.ATTENTION_KINDS."""
