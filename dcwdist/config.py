"""The job config tree: every component's dataclass composed, loaded from a YAML recipe.

    cfg = load_config("recipes/tiny_cpu.yaml", ["attention.window=64", "stages.0.steps=5"])
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Literal, Optional

import yaml

from dcwdist.attention.config import AttentionConfig
from dcwdist.configtree import (ConfigError, apply_override, deep_merge, from_dict, load_yaml,
                                to_dict)
from dcwdist.data_pipelines.config import DataConfig
from dcwdist.model.config import ModelConfig
from dcwdist.parallel.config import ParallelConfig
from dcwdist.segmentation.config import SegmentationConfig
from dcwdist.train.checkpoint import CheckpointConfig
from dcwdist.train.engine import ZeroConfig
from dcwdist.train.logging import LoggingConfig
from dcwdist.train.optim import OptimConfig
from dcwdist.train.stages import StageConfig


@dataclass
class JobConfig:
    """A whole training job."""

    name: str = "run"
    """Job name (run directory, logs)."""
    seed: int = 0
    """Model initialisation and dropout seed."""
    deterministic: bool = False
    """Bit-reproducible steps for one seed on one device: deterministic torch algorithms and the
    kernels' first fitting tile instead of the fastest timed one (train/determinism.py).
    Slower; for studies that compare runs of one seed."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """auto picks cuda when available."""
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    """Compute dtype: auto = bf16 on GPU, fp32 on CPU."""
    model: ModelConfig = field(default_factory=ModelConfig)
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    segmentation: SegmentationConfig = field(default_factory=SegmentationConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    zero: ZeroConfig = field(default_factory=ZeroConfig)
    data: DataConfig = field(default_factory=DataConfig)
    stages: list[StageConfig] = field(default_factory=lambda: [StageConfig()])
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def __post_init__(self):
        if not self.stages:
            raise ValueError("stages: a recipe needs at least one stage")
        if self.optim.nonfinite == "skip" and self.zero.enabled:
            raise ValueError("optim.nonfinite=skip needs the torch backend (zero.enabled=false): "
                             "a DeepSpeed step updates even on a non-finite gradient")
        attn_fields = {f.name for f in dataclasses.fields(AttentionConfig)}
        for i, stage in enumerate(self.stages):
            for key in stage.attention:
                if key not in attn_fields:
                    raise ValueError(f"unknown key 'stages.{i}.attention.{key}'; allowed keys: "
                                     f"{', '.join(sorted(attn_fields))}")
            if stage.attention.get("kind", self.attention.kind) != self.attention.kind:
                raise ValueError(f"stages.{i}.attention.kind: the attention kind cannot change "
                                 "between stages (its parameters differ)")
            for key in ("source", "path", "format"):
                if key in stage.data and stage.data[key] != getattr(self.data, key):
                    raise ValueError(f"stages.{i}.data.{key}: the data source cannot change "
                                     "between stages (resume counts samples of one stream)")
            self.stage_data(stage, i)  # unknown keys, types and field checks fail here
            attn = self.stage_attention(stage)
            if attn.block_based and stage.seq_len % attn.block_size:
                raise ValueError(f"stages.{i}.seq_len={stage.seq_len} is not divisible by "
                                 f"attention.block_size={attn.block_size}")

    def stage_attention(self, stage: StageConfig) -> AttentionConfig:
        """The attention config in force during `stage`."""
        try:
            return dataclasses.replace(self.attention, **stage.attention)
        except (TypeError, ValueError) as e:
            raise ValueError(f"stage attention override: {e}") from None


    def stage_data(self, stage: StageConfig, index: Optional[int] = None) -> DataConfig:
        """The data config in force during `stage` (the recipe's data with its overrides)."""
        if not stage.data:
            return self.data
        where = f"stages.{'N' if index is None else index}.data."
        return from_dict(DataConfig, {**to_dict(self.data), **stage.data}, where)


def load_recipe(path: str, _seen: tuple = ()) -> dict:
    """A recipe's mapping; `base: other.yaml` (relative to the recipe) is loaded first and the
    recipe merged over it, so an ablation states only what it changes."""
    if os.path.abspath(path) in _seen:
        raise ConfigError(f"recipe base cycle: {' -> '.join(_seen + (os.path.abspath(path),))}")
    data = load_yaml(path)
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise ConfigError(f"{path}: base must be a recipe path, got {base!r}")
    base_path = os.path.join(os.path.dirname(path), base)
    if not os.path.exists(base_path):
        raise ConfigError(f"{path}: base recipe {base_path} does not exist")
    return deep_merge(load_recipe(base_path, _seen + (os.path.abspath(path),)), data)


def load_config(path: Optional[str], overrides: list[str] = ()) -> JobConfig:
    """Defaults <- recipe YAML (and its bases) <- dotted overrides, validated; errors are
    one-line ConfigErrors."""
    data = to_dict(JobConfig())
    if path:
        data = deep_merge(data, load_recipe(path))
    for item in overrides:
        apply_override(data, item)
    return from_dict(JobConfig, data)


def dump_config(cfg: JobConfig, path: str) -> None:
    with open(path, "w") as f:
        yaml.safe_dump(to_dict(cfg), f, sort_keys=False)


__all__ = ["JobConfig", "ConfigError", "load_config", "dump_config"]
