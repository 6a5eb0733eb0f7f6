"""Decoder model, RoPE variants and the chunked loss."""
from dcwdist.model.config import ModelConfig
from dcwdist.model.rope import RopeConfig
from dcwdist.model.transformer import Transformer

__all__ = ["ModelConfig", "RopeConfig", "Transformer"]
