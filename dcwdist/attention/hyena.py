"""Hyena long-convolution operator (attention.kind=hyena)."""
from __future__ import annotations

KINDS: dict = {}
"""attention.kind -> module class, merged into kinds.ATTENTION_KINDS."""
