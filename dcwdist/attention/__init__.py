"""Attention kinds of the DCW contract, their layouts and torch reference executor."""
from dcwdist.attention.config import AttentionConfig
from dcwdist.attention.context import AttnContext
from dcwdist.attention.executor import attend_layout, merge_partials
from dcwdist.attention.flops import attention_flops
from dcwdist.attention.kinds import ATTENTION_KINDS, build_attention

__all__ = ["AttentionConfig", "AttnContext", "ATTENTION_KINDS", "build_attention",
           "attend_layout", "merge_partials", "attention_flops"]
