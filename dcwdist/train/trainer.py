"""Single-process trainer: progressive stages, AdamW + warmup/cosine, TensorBoard, final eval.

The step follows DESIGN.md's loss rule: summed token losses divided by the count of loss tokens
of the whole step (all micro-batches), so gradient accumulation gives the same update as one
big batch. DeepSpeed and context parallelism replace `_backward_step`'s plumbing, not its maths.
"""
from __future__ import annotations

import json
import os
import time
from typing import Optional

import torch
from tqdm import tqdm

from dcwdist.attention.config import AttentionConfig
from dcwdist.config import JobConfig, dump_config
from dcwdist.data_pipelines.packing import Batch
from dcwdist.data_pipelines.stream import SyntheticRows
from dcwdist.eval.positions import context_for, format_table, loss_by_position
from dcwdist.model.transformer import Transformer
from dcwdist.train.checkpoint import save_model
from dcwdist.train.logging import ScalarLog
from dcwdist.train.optim import build_optimizer, lr_at
from dcwdist.train.stages import StageConfig


def pick_device(cfg: JobConfig) -> torch.device:
    if cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("device=cuda requested but CUDA is not available")
        return torch.device("cuda")
    return torch.device("cpu")


def build_model(cfg: JobConfig, attn_cfg: AttentionConfig) -> Transformer:
    segmenter = None
    if attn_cfg.kind == "dcw":
        from dcwdist.segmentation import build_segmenter
        segmenter = build_segmenter(cfg.segmentation, cfg.model.dim, attn_cfg)
    return Transformer(cfg.model, attn_cfg, segmenter)


class Trainer:
    def __init__(self, cfg: JobConfig, run_dir: Optional[str] = None, echo=print):
        self.cfg = cfg
        self.echo = echo
        self.run_dir = run_dir or cfg.logging.run_dir.format(name=cfg.name)
        os.makedirs(self.run_dir, exist_ok=True)
        dump_config(cfg, os.path.join(self.run_dir, "config.yaml"))
        self.device = pick_device(cfg)
        use_bf16 = cfg.dtype == "bfloat16" or (cfg.dtype == "auto" and self.device.type == "cuda")
        self.autocast_dtype = torch.bfloat16 if use_bf16 else None
        torch.manual_seed(cfg.seed)
        # One AttentionConfig object shared by every layer; stages edit it in place.
        self.attn_cfg = AttentionConfig(**vars(cfg.attention))
        self.model = build_model(cfg, self.attn_cfg).to(self.device)
        self.scorer_only = cfg.attention.kind == "dcw" and cfg.segmentation.phase == "scorer"
        if self.scorer_only:  # phase 1: only the scorer learns, from its labels
            for name, p in self.model.named_parameters():
                p.requires_grad_(name.startswith("segmenter."))
        self.optimizer = build_optimizer(self.model, cfg.optim)
        self.total_steps = sum(s.steps for s in cfg.stages)
        self.step = 0
        self.sample_index = 0  # global row index into the data stream
        self.log = ScalarLog(os.path.join(self.run_dir, "tb") if cfg.logging.tensorboard else None)
        self.history: list[dict] = []

    # -- stages ---------------------------------------------------------------------------
    def apply_stage(self, stage: StageConfig) -> SyntheticRows:
        for key, value in self.cfg.stage_attention(stage).__dict__.items():
            setattr(self.attn_cfg, key, value)
        self.model.set_rope(stage.rope or self.cfg.model.rope)
        align = self.attn_cfg.block_size if self.attn_cfg.block_based else 1
        return SyntheticRows(self.cfg.data, stage.seq_len, align)

    # -- one optimizer step ---------------------------------------------------------------
    def _forward(self, batch: Batch):
        ctx = context_for(batch)
        with torch.autocast(self.device.type, dtype=self.autocast_dtype,
                            enabled=self.autocast_dtype is not None):
            if self.scorer_only:
                self.model.segmenter(self.model.embed_tokens(batch.tokens), batch.tokens, ctx)
                return None, ctx
            hidden = self.model(batch.tokens, ctx)
            return self.model.loss_sum(hidden, batch.labels), ctx

    def train_step(self, batch: Batch, stage: StageConfig) -> dict:
        lr = lr_at(self.step, self.total_steps, self.cfg.optim)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        num_loss_tokens = max(1, batch.num_loss_tokens)  # the step's global denominator
        rows = batch.tokens.shape[0]
        mb = stage.micro_batch_size
        task_sum, metrics = 0.0, {}
        for s in range(0, rows, mb):
            micro = batch.slice_rows(s, s + mb).to(self.device)
            loss_sum, ctx = self._forward(micro)
            loss = torch.zeros((), device=self.device)
            if loss_sum is not None:
                loss = loss + loss_sum / num_loss_tokens
                task_sum += float(loss_sum.detach())
            for value in ctx.cache.get("aux_losses", {}).values():
                loss = loss + value * (micro.tokens.shape[0] / rows)
            for key, value in ctx.cache.get("metrics", {}).items():
                metrics[key] = metrics.get(key, 0.0) + float(value) * micro.tokens.shape[0] / rows
            if loss.requires_grad:
                loss.backward()
        params = [p for p in self.model.parameters() if p.requires_grad]
        clip = self.cfg.optim.grad_clip or float("inf")
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, clip))
        if not torch.isfinite(torch.tensor(grad_norm)) or task_sum != task_sum:
            raise FloatingPointError(f"non-finite loss or gradient at step {self.step} "
                                     f"(stage {stage.label})")
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        out = {"loss": task_sum / num_loss_tokens, "lr": lr, "grad_norm": grad_norm}
        out.update({f"scorer/{k}": v for k, v in metrics.items()})
        return out

    # -- whole job ------------------------------------------------------------------------
    def fit(self) -> dict:
        cfg = self.cfg
        self.echo(f"dcwdist: {cfg.name}: {cfg.model.num_params() / 1e6:.2f}M params, "
                  f"attention={cfg.attention.kind}, device={self.device}, "
                  f"{len(cfg.stages)} stage(s), {self.total_steps} steps -> {self.run_dir}")
        bar = tqdm(total=self.total_steps, disable=not cfg.logging.progress, unit="step",
                   dynamic_ncols=True)
        for i, stage in enumerate(cfg.stages):
            rows_src = self.apply_stage(stage)
            rows = stage.rows_per_step(dp=1)
            self.echo(f"stage {i} ({stage.label}): seq_len={stage.seq_len} steps={stage.steps} "
                      f"rows/step={rows} rope={self.model.rope_cfg.scaling}"
                      f"x{self.model.rope_cfg.factor:g}")
            for _ in range(stage.steps):
                t0 = time.perf_counter()
                batch = rows_src.batch(self.sample_index, rows)
                self.sample_index += rows
                metrics = self.train_step(batch, stage)
                dt = time.perf_counter() - t0
                metrics.update({"tokens_per_s": rows * stage.seq_len / dt, "stage": i,
                                "seq_len": stage.seq_len})
                self.history.append({"step": self.step, **metrics})
                if self.step % cfg.logging.log_every == 0:
                    self.log.scalars({f"train/{k}": v for k, v in metrics.items()}, self.step)
                bar.set_postfix(stage=stage.label, loss=f"{metrics['loss']:.3f}",
                                tok_s=f"{metrics['tokens_per_s']:.0f}")
                bar.update(1)
            bar.write(f"stage {i} ({stage.label}) done at step {self.step}: "
                      f"loss {self.history[-1]['loss']:.4f}" if stage.steps else
                      f"stage {i} ({stage.label}) has no steps")
        bar.close()
        save_model(self.model, os.path.join(self.run_dir, "model.pt"))
        table = self.evaluate(cfg.stages[-1])
        self.log.close()
        summary = {"steps": self.step, "first_loss": self.history[0]["loss"] if self.history else None,
                   "last_loss": self.history[-1]["loss"] if self.history else None,
                   "eval": table}
        with open(os.path.join(self.run_dir, "summary.json"), "w") as f:
            json.dump({**summary, "history": self.history}, f, indent=1)
        return summary

    def evaluate(self, stage: StageConfig) -> list[dict]:
        align = self.attn_cfg.block_size if self.attn_cfg.block_based else 1
        src = SyntheticRows(self.cfg.data, stage.seq_len, align, held_out=True)
        batches = [src.batch(i, 1).to(self.device) for i in range(self.cfg.data.eval_rows)]
        with torch.autocast(self.device.type, dtype=self.autocast_dtype,
                            enabled=self.autocast_dtype is not None):
            table = loss_by_position(self.model, batches, stage.seq_len)
        self.echo(f"eval: loss by position within document ({self.cfg.data.eval_rows} held-out "
                  f"rows of {stage.seq_len} tokens)\n" + format_table(table))
        with open(os.path.join(self.run_dir, "eval.json"), "w") as f:
            json.dump(table, f, indent=1)
        return table
