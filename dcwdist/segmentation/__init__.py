"""Instruction-aware block scorer and tiering (DESIGN.md "Scores -> tiers", "Learning the scorer")."""
from torch import nn

from dcwdist.segmentation.config import SegmentationConfig
from dcwdist.segmentation.phases import apply_phase, segmenter_parameter_names, trainable_parameter_names
from dcwdist.segmentation.segmenter import METRIC_KEYS, Segmenter


def build_segmenter(seg_cfg: SegmentationConfig, model_dim: int, attn_cfg) -> nn.Module:
    """The module the Transformer calls as `segmenter(h_emb_BTD, tokens_BT, ctx)`.

    attn_cfg is the AttentionConfig shared by the layers (block size, windows, summary pool);
    it is read at every forward, so stage changes to it apply.
    """
    return Segmenter(seg_cfg, model_dim, attn_cfg)


__all__ = ["SegmentationConfig", "Segmenter", "build_segmenter", "apply_phase",
           "segmenter_parameter_names", "trainable_parameter_names", "METRIC_KEYS"]
