"""Hugging Face safetensors <-> dcwdist Transformer weights (Llama/Qwen2 parameter names).

dcwdist's names are HF's without the `model.` prefix (`lm_head.weight` unchanged), so the mapping
is a prefix; what it must get right is strictness: every HF tensor is consumed, every dcwdist
parameter except the dcwdist-only ones (the DCW scorer `segmenter.*` and everything an attention
kind owns under `layers.N.self_attn.attn.`: DCW's alpha, CAA's gate) is filled, and shapes match.
Only safetensors are read (never pickles), one shard at a time, straight into the parameters.
"""
from __future__ import annotations

import json
import os
from typing import Iterator

import torch

HF_INDEX = "model.safetensors.index.json"
HF_SINGLE = "model.safetensors"
SKIP_SUFFIXES = ("rotary_emb.inv_freq",)  # derived buffers some old checkpoints carry


def _safetensors():
    try:
        import safetensors.torch  # noqa: F401
        from safetensors import safe_open
    except ImportError:
        raise ImportError("Hugging Face interop needs safetensors: "
                          "pip install -e '.[hf]'") from None
    return safe_open


def is_dcwdist_only(name: str) -> bool:
    """Parameters with no Hugging Face counterpart; they keep their init on import."""
    return name.startswith("segmenter.") or ".self_attn.attn." in name


def hf_to_dcwdist_name(key: str) -> str:
    return key[len("model."):] if key.startswith("model.") else key


def dcwdist_to_hf_name(name: str) -> str:
    return name if name.startswith("lm_head.") else "model." + name


def safetensors_files(hf_dir: str) -> list[str]:
    """The checkpoint's safetensors files (sharded via the index, or the single file)."""
    index = os.path.join(hf_dir, HF_INDEX)
    if os.path.exists(index):
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not os.path.exists(os.path.join(hf_dir, f))]
        if missing:
            raise FileNotFoundError(f"{index} lists {len(missing)} missing shard(s), e.g. "
                                    f"{missing[0]}")
        return [os.path.join(hf_dir, f) for f in files]
    single = os.path.join(hf_dir, HF_SINGLE)
    if os.path.exists(single):
        return [single]
    found = sorted(f for f in os.listdir(hf_dir) if f.endswith(".safetensors"))
    if found:
        return [os.path.join(hf_dir, f) for f in found]
    pickles = [f for f in os.listdir(hf_dir) if f.endswith((".bin", ".pt", ".pth"))]
    hint = (f" (found {pickles[0]}: pickle checkpoints are not loaded; re-save with "
            "save_pretrained(safe_serialization=True))" if pickles else "")
    raise FileNotFoundError(f"{hf_dir} has no {HF_SINGLE} or {HF_INDEX}{hint}")


def iter_hf_tensors(hf_dir: str) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF key, tensor) over every tensor of every shard, one shard open at a time."""
    safe_open = _safetensors()
    for path in safetensors_files(hf_dir):
        with safe_open(path, framework="pt", device="cpu") as f:
            for key in f.keys():
                yield key, f.get_tensor(key)


@torch.no_grad()
def load_hf_weights(model: torch.nn.Module, hf_dir: str) -> list[str]:
    """Copy the checkpoint into `model` strictly; returns the dcwdist-only names left at init."""
    params = model.state_dict()
    tied = getattr(getattr(model, "cfg", None), "tie_embeddings", False)
    filled, tied_head = set(), None
    for key, tensor in iter_hf_tensors(hf_dir):
        if key.endswith(SKIP_SUFFIXES):
            continue
        name = hf_to_dcwdist_name(key)
        if tied and name == "lm_head.weight":
            tied_head = tensor  # a tied checkpoint may still store the head: it must agree
            continue
        if name not in params or is_dcwdist_only(name):
            raise ValueError(f"{hf_dir}: tensor {key} has no place in the dcwdist model "
                             "(unsupported layout for a Llama/Qwen2 import)")
        if tuple(tensor.shape) != tuple(params[name].shape):
            raise ValueError(f"{hf_dir}: {key} has shape {tuple(tensor.shape)}, the model "
                             f"expects {tuple(params[name].shape)}")
        params[name].copy_(tensor)
        filled.add(name)
    missing = sorted(n for n in params if n not in filled and not is_dcwdist_only(n))
    if missing:
        raise ValueError(f"{hf_dir}: {len(missing)} tensor(s) missing from the checkpoint, e.g. "
                         f"{dcwdist_to_hf_name(missing[0])}")
    if tied_head is not None and not torch.equal(
            tied_head.to(params["embed_tokens.weight"].dtype), params["embed_tokens.weight"]):
        raise ValueError(f"{hf_dir}: tie_word_embeddings=true but lm_head.weight differs from "
                         "embed_tokens.weight")
    return sorted(n for n in params if is_dcwdist_only(n))


def to_hf_state_dict(state: dict, tie_embeddings: bool, dtype: torch.dtype) -> tuple[dict, list]:
    """HF-named contiguous tensors in `dtype`, and the dcwdist-only names that were dropped."""
    out, dropped = {}, []
    for name, tensor in state.items():
        if is_dcwdist_only(name):
            dropped.append(name)
            continue
        if tie_embeddings and name == "lm_head.weight":
            continue
        out[dcwdist_to_hf_name(name)] = tensor.detach().to("cpu", dtype).contiguous()
    return out, dropped


def save_hf_safetensors(tensors: dict, out_dir: str, max_shard_bytes: int = 5 << 30) -> list[str]:
    """model.safetensors, or numbered shards plus model.safetensors.index.json when larger."""
    _safetensors()
    from safetensors.torch import save_file

    shards, current, size = [], {}, 0
    for key, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[key] = t
        size += nbytes
    shards.append(current)
    os.makedirs(out_dir, exist_ok=True)
    if len(shards) == 1:
        save_file(shards[0], os.path.join(out_dir, HF_SINGLE), metadata={"format": "pt"})
        return [HF_SINGLE]
    names, weight_map = [], {}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, os.path.join(out_dir, name), metadata={"format": "pt"})
        names.append(name)
        weight_map.update({k: name for k in shard})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    with open(os.path.join(out_dir, HF_INDEX), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=1)
    return names + [HF_INDEX]
