"""Attention kinds of the DCW contract and their torch reference executor."""
from dcwdist.attention.config import AttentionConfig
from dcwdist.attention.context import AttnContext
from dcwdist.attention.kinds import ATTENTION_KINDS, build_attention

__all__ = ["AttentionConfig", "AttnContext", "ATTENTION_KINDS", "build_attention"]
