"""What a training stage with cp > 1 checks and installs before its first step."""
from __future__ import annotations

from typing import Optional

from torch import nn

from dcwdist.parallel.zigzag import check_shardable, cp_kinds


def check_cp_stage(attn_cfg, seq_len: int, cp: int, segmenter: Optional[nn.Module]) -> None:
    """One-line errors for what CP cannot run; the scorer learns to read the whole sequence."""
    if attn_cfg.kind not in cp_kinds():
        raise ValueError(f"context parallelism (cp={cp}) supports attention.kind in {cp_kinds()}; "
                         f"got {attn_cfg.kind!r}")
    if attn_cfg.kind == "dcw" and attn_cfg.dcw_background_windows:
        raise ValueError(f"attention.dcw_background_windows (multi-window background) runs at "
                         f"cp=1 only; got cp={cp}")
    check_shardable(seq_len, cp, attn_cfg.block_size if attn_cfg.block_based else 1)
    if segmenter is not None:
        from dcwdist.parallel.dcw_cp import install_cp_segmenter
        install_cp_segmenter(segmenter)
