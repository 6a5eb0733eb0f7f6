"""Whole conversions: a Hugging Face checkpoint -> a dcwdist run directory, and a dcwdist run
(final model.pt, or any checkpoint, ZeRO-3 sharded ones merged by DeepSpeed's zero_to_fp32) ->
a directory `transformers.AutoModelForCausalLM.from_pretrained` loads.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from typing import Optional

import torch

from dcwdist.hf.hfconfig import hf_config_dict, read_config_json
from dcwdist.hf.weights import save_hf_safetensors, to_hf_state_dict

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
              "tokenizer.model", "vocab.json", "merges.txt", "generation_config.json")


def import_to_run(hf_dir: str, run_dir: str, recipe: Optional[str] = None,
                  overrides: tuple = ()) -> dict:
    """Build the recipe's model from `hf_dir` (the trainer's own `build_model`, so training sees
    the same thing) and write RUN_DIR/config.yaml + RUN_DIR/model.pt."""
    from dcwdist.attention.config import AttentionConfig
    from dcwdist.config import dump_config, load_config
    from dcwdist.train.checkpoint import save_model
    from dcwdist.train.trainer import build_model

    read_config_json(hf_dir)  # bad paths fail here, in one line, before the recipe is parsed
    cfg = load_config(recipe, [*overrides, f"model.init_from={os.path.abspath(hf_dir)}"])
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, AttentionConfig(**vars(cfg.attention)))
    os.makedirs(run_dir, exist_ok=True)
    dump_config(cfg, os.path.join(run_dir, "config.yaml"))
    save_model(model.state_dict(), os.path.join(run_dir, "model.pt"))
    fresh = [n for n, _ in model.named_parameters() if n.startswith("segmenter.")
             or ".self_attn.attn." in n]
    return {"params": sum(p.numel() for p in model.parameters()), "fresh": fresh,
            "attention": cfg.attention.kind, "rope": cfg.model.rope, "n_layers": cfg.model.n_layers}


@dataclass
class RunWeights:
    """A run's weights with the config and RoPE in force when they were saved."""

    state: dict
    cfg: object  # JobConfig
    rope: object  # RopeConfig
    max_len: int
    source: str


def _stage_at_step(cfg, step: int) -> int:
    """Index of the stage whose steps include optimizer step `step` (1-based count done)."""
    end = 0
    for i, stage in enumerate(cfg.stages):
        end += stage.steps
        if step <= end and stage.steps:
            return i
    return len(cfg.stages) - 1


def _resolve_tag(ckpt_dir: str, which: str) -> str:
    from dcwdist.train.checkpoint import check_complete

    if which == "latest":
        path = os.path.join(ckpt_dir, "latest")
        if not os.path.exists(path):
            raise FileNotFoundError(f"{ckpt_dir}: no complete checkpoint (no 'latest' file)")
        which = open(path).read().strip()
    tag_dir = os.path.join(ckpt_dir, which)
    reason = check_complete(tag_dir)
    if reason:
        raise FileNotFoundError(f"checkpoint {tag_dir}: {reason}")
    return which


def _checkpoint_state(tag_dir: str) -> dict:
    """Full fp32 weights of one checkpoint tag (DeepSpeed ZeRO 1/2/3 merged, or torch)."""
    names = os.listdir(tag_dir)
    if "state.pt" in names:  # plain-torch backend; our own file (holds RNG state: not weights-only)
        return torch.load(os.path.join(tag_dir, "state.pt"), map_location="cpu",
                          weights_only=False)["model"]
    if any(n.endswith("optim_states.pt") for n in names):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        ckpt_dir, tag = os.path.split(tag_dir.rstrip("/"))
        return dict(get_fp32_state_dict_from_zero_checkpoint(ckpt_dir, tag))
    if "mp_rank_00_model_states.pt" in names:  # DeepSpeed without ZeRO partitioning
        return torch.load(os.path.join(tag_dir, "mp_rank_00_model_states.pt"),
                          map_location="cpu", weights_only=False)["module"]
    raise FileNotFoundError(f"{tag_dir}: neither a DeepSpeed nor a torch checkpoint")


def load_run_weights(run_dir: str, checkpoint: str = "auto") -> RunWeights:
    """Weights of a run: `auto` = RUN_DIR/model.pt if present, else the newest complete
    checkpoint; `latest` or a tag (step00000040) picks a checkpoint. The RoPE is the one of the
    stage the weights come from (the last one for a finished run; the model's own for a
    model.pt written by hf-import)."""
    from dcwdist.config import load_config
    from dcwdist.hf.hfconfig import adopt_hf_config

    cfg_path = os.path.join(run_dir, "config.yaml")
    if not os.path.exists(cfg_path):
        raise FileNotFoundError(f"{run_dir} has no config.yaml: not a dcwdist run directory")
    cfg = load_config(cfg_path)
    ckpt_dir = cfg.checkpoint.dir or os.path.join(run_dir, "checkpoints")
    model_pt = os.path.join(run_dir, "model.pt")
    if checkpoint == "auto":
        checkpoint = "model.pt" if os.path.exists(model_pt) else "latest"
    if checkpoint == "model.pt":
        state = torch.load(model_pt, map_location="cpu", weights_only=True)
        stage, source = len(cfg.stages) - 1, model_pt
        if not os.path.exists(os.path.join(run_dir, "summary.json")):
            stage = None  # written by hf-import, not by training: no stage's RoPE applies yet
    else:
        tag = _resolve_tag(ckpt_dir, checkpoint)
        tag_dir = os.path.join(ckpt_dir, tag)
        saved_cfg = os.path.join(tag_dir, "config.yaml")
        if os.path.exists(saved_cfg):  # resolved at save time: shape already adopted
            from dcwdist.config import JobConfig
            from dcwdist.configtree import from_dict
            cfg = from_dict(JobConfig, json.load(open(saved_cfg)))
        state = _checkpoint_state(tag_dir)
        step = json.load(open(os.path.join(tag_dir, "MANIFEST.json")))["step"]
        stage, source = _stage_at_step(cfg, step), tag_dir
    if cfg.model.init_from and os.path.isdir(cfg.model.init_from):
        adopt_hf_config(cfg.model)  # config.yaml was written before the shape was adopted
    elif cfg.model.init_from and os.path.exists(os.path.join(ckpt_dir, "latest")):
        saved = os.path.join(ckpt_dir, open(os.path.join(ckpt_dir, "latest")).read().strip(),
                             "config.yaml")  # init_from is gone: a checkpoint kept the shape
        if os.path.exists(saved):
            from dcwdist.config import JobConfig
            from dcwdist.configtree import from_dict
            cfg.model = from_dict(JobConfig, json.load(open(saved))).model
    if stage is None:
        return RunWeights(state=state, cfg=cfg, rope=cfg.model.rope, max_len=0, source=source)
    return RunWeights(state=state, cfg=cfg, rope=cfg.stages[stage].rope or cfg.model.rope,
                      max_len=max(s.seq_len for s in cfg.stages[:stage + 1]), source=source)


def _check_shape(state: dict, mcfg, source: str) -> None:
    """The weights must match the config that will describe them (config.json)."""
    from dcwdist.model.transformer import Transformer
    from dcwdist.attention.config import AttentionConfig

    with torch.device("meta"):
        expected = Transformer(mcfg, AttentionConfig(kind="dense")).state_dict()
    for name, t in expected.items():
        got = state.get(name)
        if got is None or tuple(got.shape) != tuple(t.shape):
            hint = (f"; model.init_from {mcfg.init_from} is gone and with it the model shape"
                    if mcfg.init_from and not os.path.isdir(mcfg.init_from) else "")
            raise ValueError(f"{source}: {name} is {None if got is None else tuple(got.shape)}, "
                             f"the run's model config expects {tuple(t.shape)}{hint}")


def export_run(run_dir: str, out_dir: str, checkpoint: str = "auto", dtype: str = "float32",
               max_shard_gb: float = 5.0) -> dict:
    """Write config.json + safetensors (+ the imported model's tokenizer files) to `out_dir`."""
    if dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype}: choose one of {', '.join(DTYPES)}")
    run = load_run_weights(run_dir, checkpoint)
    mcfg = run.cfg.model
    _check_shape(run.state, mcfg, run.source)
    tensors, dropped = to_hf_state_dict(run.state, mcfg.tie_embeddings, DTYPES[dtype])
    source = None
    if mcfg.init_from and os.path.isdir(mcfg.init_from):
        source = read_config_json(mcfg.init_from)
    config = hf_config_dict(mcfg, run.rope, dtype, run.max_len, source)
    os.makedirs(out_dir, exist_ok=True)
    files = save_hf_safetensors(tensors, out_dir, int(max_shard_gb * (1 << 30)))
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    copied = []
    if mcfg.init_from and os.path.isdir(mcfg.init_from):
        for name in SIDE_FILES:
            src = os.path.join(mcfg.init_from, name)
            if os.path.exists(src):
                shutil.copy(src, os.path.join(out_dir, name))
                copied.append(name)
    return {"source": run.source, "files": files + ["config.json"] + copied,
            "dropped": dropped, "architecture": config["architectures"][0],
            "rope": run.rope, "tensors": len(tensors)}
