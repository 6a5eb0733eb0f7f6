"""Hugging Face config.json <-> dcwdist ModelConfig for Llama and Qwen2 decoders.

config.json is read as plain JSON (transformers is not needed to import), in both the 4.x layout
(`rope_theta` + `rope_scaling`) and the 5.x one (`rope_parameters`). Anything dcwdist cannot
represent exactly is refused with one line naming what is supported.
"""
from __future__ import annotations

import json
import math
import os
import warnings
from dataclasses import replace
from typing import Optional, Sequence

from dcwdist.model.config import ModelConfig
from dcwdist.model.rope import RopeConfig

ARCHITECTURES = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2"}
SUPPORTED = "LlamaForCausalLM (model_type llama), Qwen2ForCausalLM (model_type qwen2)"
ROPE_TYPES = "default, linear, yarn, llama3"
SHAPE_FIELDS = ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "norm_eps",
                "tie_embeddings", "qkv_bias", "rope")


def read_config_json(hf_dir: str) -> dict:
    """config.json of a local checkpoint directory, with one-line errors for bad paths."""
    if not os.path.isdir(hf_dir):
        raise FileNotFoundError(f"{hf_dir}: not a directory (expected a local Hugging Face "
                                "checkpoint: config.json + *.safetensors)")
    path = os.path.join(hf_dir, "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{hf_dir} has no config.json: not a Hugging Face checkpoint "
                                "directory")
    with open(path) as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: invalid JSON ({e})") from None


def architecture(hf: dict, where: str) -> str:
    """'llama' or 'qwen2'; anything else is a one-line error naming what is supported."""
    archs = hf.get("architectures") or []
    model_type = hf.get("model_type", "")
    for arch in archs:
        if arch in ARCHITECTURES:
            return ARCHITECTURES[arch]
    if not archs and model_type in ARCHITECTURES.values():
        return model_type
    raise ValueError(f"{where}: architecture {'/'.join(archs) or '?'} (model_type "
                     f"{model_type or '?'}) is not supported; supported: {SUPPORTED}")


def rope_from_hf(hf: dict, where: str) -> RopeConfig:
    """RopeConfig equal to the checkpoint's rotary embedding (default, linear or YaRN)."""
    params = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if any(isinstance(v, dict) for v in params.values()):
        raise ValueError(f"{where}: per-layer-type rope_parameters are not supported")
    theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
    kind = params.get("rope_type", params.get("type", "default"))
    max_pos = int(hf.get("max_position_embeddings", 4096))
    partial = params.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    if partial not in (None, 1, 1.0):
        raise ValueError(f"{where}: partial_rotary_factor={partial} is not supported (only 1.0)")
    if kind == "default":
        return RopeConfig(base=theta, original_max_len=max_pos)
    if kind == "linear":
        return RopeConfig(base=theta, scaling="linear", factor=float(params["factor"]),
                          original_max_len=max_pos)
    if kind == "yarn":
        original = int(params.get("original_max_position_embeddings") or max_pos)
        factor = float(params.get("factor") or max_pos / original)
        default_mscale = 0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0
        attn_factor = params.get("attention_factor")
        if params.get("mscale") and params.get("mscale_all_dim"):
            raise ValueError(f"{where}: YaRN with mscale/mscale_all_dim is not supported "
                             "(only the default attention factor 0.1*ln(factor)+1)")
        if attn_factor is not None and abs(float(attn_factor) - default_mscale) > 1e-6:
            raise ValueError(f"{where}: YaRN attention_factor={attn_factor} is not supported "
                             f"(only the default 0.1*ln(factor)+1 = {default_mscale:.6f})")
        if params.get("truncate", True) is False:
            raise ValueError(f"{where}: YaRN truncate=false is not supported")
        return RopeConfig(base=theta, scaling="yarn", factor=factor, original_max_len=original,
                          beta_fast=float(params.get("beta_fast") or 32.0),
                          beta_slow=float(params.get("beta_slow") or 1.0))
    if kind == "llama3":
        return RopeConfig(base=theta, scaling="llama3", factor=float(params["factor"]),
                          original_max_len=int(params["original_max_position_embeddings"]),
                          low_freq_factor=float(params.get("low_freq_factor", 1.0)),
                          high_freq_factor=float(params.get("high_freq_factor", 4.0)))
    raise ValueError(f"{where}: rope_scaling type '{kind}' is not supported; supported: "
                     f"{ROPE_TYPES}")


def model_config_from_hf(hf_dir: str, base: Optional[ModelConfig] = None) -> ModelConfig:
    """ModelConfig of the checkpoint's decoder; non-shape fields (activation checkpointing and
    the other memory options, init_std, loss_chunk, init_from) are kept from `base`."""
    hf = read_config_json(hf_dir)
    where = os.path.join(hf_dir, "config.json")
    arch = architecture(hf, where)
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"{where}: hidden_act={act!r} is not supported (only silu / SwiGLU)")
    if arch == "llama" and hf.get("attention_bias"):
        raise ValueError(f"{where}: Llama attention_bias=true (bias on o_proj too) is not "
                         "supported; q/k/v-only bias is the Qwen2 layout")
    if hf.get("mlp_bias"):
        raise ValueError(f"{where}: mlp_bias=true is not supported")
    if arch == "qwen2" and (hf.get("use_sliding_window") or "sliding_attention" in
                            (hf.get("layer_types") or [])):
        raise ValueError(f"{where}: Qwen2 sliding-window layers are not supported (set "
                         "use_sliding_window=false)")
    dim, n_heads = int(hf["hidden_size"]), int(hf["num_attention_heads"])
    head_dim = hf.get("head_dim")
    if head_dim is not None and int(head_dim) != dim // n_heads:
        raise ValueError(f"{where}: head_dim={head_dim} differs from hidden_size/"
                         f"num_attention_heads={dim // n_heads}; dcwdist supports only "
                         "head_dim = hidden_size / num_attention_heads")
    shape = dict(
        vocab_size=int(hf["vocab_size"]), dim=dim, n_layers=int(hf["num_hidden_layers"]),
        n_heads=n_heads, n_kv_heads=int(hf.get("num_key_value_heads") or n_heads),
        ffn_dim=int(hf["intermediate_size"]), norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        qkv_bias=arch == "qwen2", rope=rope_from_hf(hf, where))
    return replace(base or ModelConfig(), **shape)


def adopt_hf_config(model_cfg: ModelConfig, stages: Sequence = ()) -> None:
    """Overwrite `model_cfg`'s shape fields in place from `model_cfg.init_from`'s config.json.

    Warns when a stage's RoPE base differs from the checkpoint's rope_theta (usually a recipe
    written for another model)."""
    imported = model_config_from_hf(model_cfg.init_from, model_cfg)
    for name in SHAPE_FIELDS:
        setattr(model_cfg, name, getattr(imported, name))
    for i, stage in enumerate(stages):
        rope = getattr(stage, "rope", None)
        if rope is not None and rope.base != model_cfg.rope.base:
            warnings.warn(f"stages.{i}.rope.base={rope.base:g} differs from {model_cfg.init_from}"
                          f"'s rope_theta={model_cfg.rope.base:g}", stacklevel=2)


def hf_config_dict(cfg: ModelConfig, rope: RopeConfig, dtype: str, max_len: int = 0,
                   source: Optional[dict] = None) -> dict:
    """config.json for `cfg` with `rope`, readable by transformers 4.4x and 5.x.

    Qwen2 when the model has q/k/v bias, Llama otherwise. `max_len` (the longest length trained)
    sets max_position_embeddings for unscaled RoPE; token ids come from `source` (the imported
    checkpoint's config.json) when given."""
    arch = "qwen2" if cfg.qkv_bias else "llama"
    theta, scaling = rope.base, None
    max_pos = max(max_len, rope.original_max_len)
    if rope.scaling == "ntk":  # static NTK-aware = plain RoPE with a stretched base (exact)
        theta = rope.base * rope.factor ** (cfg.head_dim / (cfg.head_dim - 2))
    elif rope.scaling == "linear":
        scaling = {"rope_type": "linear", "factor": float(rope.factor)}
    elif rope.scaling == "yarn":
        scaling = {"rope_type": "yarn", "factor": float(rope.factor),
                   "original_max_position_embeddings": int(rope.original_max_len),
                   "beta_fast": float(rope.beta_fast), "beta_slow": float(rope.beta_slow)}
        max_pos = int(round(rope.original_max_len * rope.factor))
    elif rope.scaling == "llama3":
        scaling = {"rope_type": "llama3", "factor": float(rope.factor),
                   "low_freq_factor": float(rope.low_freq_factor),
                   "high_freq_factor": float(rope.high_freq_factor),
                   "original_max_position_embeddings": int(rope.original_max_len)}
        max_pos = int(round(rope.original_max_len * rope.factor))
    out = {
        "architectures": ["Qwen2ForCausalLM" if arch == "qwen2" else "LlamaForCausalLM"],
        "model_type": arch, "vocab_size": cfg.vocab_size, "hidden_size": cfg.dim,
        "intermediate_size": cfg.ffn_hidden, "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim, "hidden_act": "silu", "max_position_embeddings": max_pos,
        "rms_norm_eps": cfg.norm_eps, "tie_word_embeddings": cfg.tie_embeddings,
        "initializer_range": cfg.init_std, "use_cache": True,
        # 4.x reads rope_theta + rope_scaling; 5.x reads rope_parameters (same content).
        "rope_theta": theta, "rope_scaling": scaling,
        "rope_parameters": {"rope_theta": theta, **(scaling or {"rope_type": "default"})},
        "torch_dtype": dtype, "dtype": dtype,
    }
    if arch == "llama":
        out.update(attention_bias=False, mlp_bias=False)
    else:
        out.update(use_sliding_window=False, sliding_window=None,
                   max_window_layers=cfg.n_layers)
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if source and source.get(key) is not None:
            out[key] = source[key]
    return out
