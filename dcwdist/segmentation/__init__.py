"""Instruction-aware block scorer and tiering."""
from dcwdist.segmentation.config import SegmentationConfig

__all__ = ["SegmentationConfig"]
