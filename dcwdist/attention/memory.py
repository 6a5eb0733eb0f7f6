"""Memory family: hierarchical segment pooling and compressed memory slots."""
from __future__ import annotations

KINDS: dict = {}
"""attention.kind -> module class, merged into kinds.ATTENTION_KINDS."""
