"""The trainer: progressive stages on a DeepSpeed ZeRO engine (or plain torch for one process),
sharded checkpoints with exact resume, TensorBoard, and a final evaluation table.

Loss rule (DESIGN.md): every rank divides its summed token losses by the step's global count of
loss tokens (an all-reduce), so any dp layout and any gradient accumulation gives the
single-process update. Row k of the data stream is a pure function of k, and the checkpoint
stores the global sample index, so resume continues exactly, also with a different dp degree.
"""
from __future__ import annotations

import json
import os
import random
import time
from typing import Callable, Optional

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from dcwdist.attention.config import AttentionConfig
from dcwdist.config import JobConfig, dump_config
from dcwdist.configtree import to_dict
from dcwdist.data_pipelines.packing import Batch
from dcwdist.data_pipelines import build_rows
from dcwdist.data_pipelines.shards import rank_slice
from dcwdist.eval.positions import context_for, format_table, loss_by_position
from dcwdist.model.transformer import Transformer
from dcwdist.parallel.dims import ParallelDims
from dcwdist.parallel.stage import check_cp_stage
from dcwdist.parallel.zigzag import cp_context
from dcwdist.parallel.env import DistEnv, export_torch_env, read_dist_env
from dcwdist.train.checkpoint import CheckpointManager, save_model
from dcwdist.train.engine import build_backend
from dcwdist.train.logging import ScalarLog, peak_memory_gib, peak_tflops
from dcwdist.train.optim import lr_at
from dcwdist.train.signals import StopRequest
from dcwdist.train.stages import StageConfig


def build_model(cfg: JobConfig, attn_cfg: AttentionConfig) -> Transformer:
    if cfg.model.init_from:  # a local HF Llama/Qwen2 checkpoint sets the shape (in place)
        from dcwdist.hf import adopt_hf_config, load_hf_weights
        adopt_hf_config(cfg.model, cfg.stages)
    segmenter = None
    if attn_cfg.kind == "dcw":
        from dcwdist.segmentation import build_segmenter
        segmenter = build_segmenter(cfg.segmentation, cfg.model.dim, attn_cfg)
    model = Transformer(cfg.model, attn_cfg, segmenter)
    if cfg.model.init_from:  # strict: only the scorer and alpha/gates keep their init
        load_hf_weights(model, cfg.model.init_from)
    return model


def memory_options(model_cfg) -> str:
    """', activations: checkpointed + tiled MLP (4096) + offload' for the start line; '' if none."""
    parts = [name for name, on in (("checkpointed", model_cfg.activation_checkpointing),
                                   (f"tiled MLP ({model_cfg.tiled_mlp})", model_cfg.tiled_mlp),
                                   ("offload", model_cfg.offload_activations)) if on]
    return f", activations: {' + '.join(parts)}" if parts else ""


def init_distributed(cfg: JobConfig, env: DistEnv, device: torch.device) -> None:
    """Process group from the launcher's variables; DeepSpeed needs one even for one process."""
    if dist.is_initialized() or not (env.distributed or cfg.zero.enabled):
        return
    if not env.distributed and "MASTER_PORT" not in os.environ:
        import socket
        with socket.socket() as sock:  # a lone process: any free local port will do
            sock.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(sock.getsockname()[1])
    export_torch_env(env)
    backend = cfg.parallel.backend
    if backend == "auto":
        backend = "nccl" if device.type == "cuda" else "gloo"
    if cfg.zero.enabled:
        import deepspeed
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)
    else:
        dist.init_process_group(backend)


def _all_reduce(t: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    return t


class Trainer:
    def __init__(self, cfg: JobConfig, run_dir: Optional[str] = None, echo: Callable = print):
        self.cfg = cfg
        self.env = read_dist_env()
        self.rank = self.env.rank
        self.is_main = self.rank == 0
        self.echo = echo if self.is_main else (lambda *a, **k: None)
        if cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available()):
            torch.cuda.set_device(self.env.local_rank)
            self.device = torch.device("cuda", self.env.local_rank)
        else:
            self.device = torch.device("cpu")
        init_distributed(cfg, self.env, self.device)
        self.world_size = self.env.world_size
        self.run_dir = run_dir or cfg.logging.run_dir.format(name=cfg.name)
        if self.is_main:
            os.makedirs(self.run_dir, exist_ok=True)
            dump_config(cfg, os.path.join(self.run_dir, "config.yaml"))
        self.bf16 = cfg.dtype == "bfloat16" or (cfg.dtype == "auto" and self.device.type == "cuda")
        torch.manual_seed(cfg.seed)
        if cfg.deterministic:
            from dcwdist.train.determinism import set_deterministic
            set_deterministic()
        # One AttentionConfig shared by every layer; stages edit it in place.
        self.attn_cfg = AttentionConfig(**vars(cfg.attention))
        self.model = build_model(cfg, self.attn_cfg).to(self.device)
        self.scorer_only = cfg.attention.kind == "dcw" and cfg.segmentation.phase == "scorer"
        if cfg.attention.kind == "dcw":  # scorer: only the segmenter; frozen: all but it
            from dcwdist.segmentation.phases import apply_phase
            if cfg.segmentation.scorer == "oracle" and cfg.segmentation.phase == "scorer":
                raise ValueError("segmentation.scorer=oracle has no scorer to train: "
                                 "use segmentation.phase=joint or frozen")
            # The oracle reads labels: its unused scorer stays out of the optimizer.
            apply_phase(self.model, "frozen" if cfg.segmentation.scorer == "oracle"
                        else cfg.segmentation.phase)
        self.backend = None
        self.dims: Optional[ParallelDims] = None
        self.total_steps = sum(s.steps for s in cfg.stages)
        self.step = 0
        self.stage_index, self.stage_step = 0, 0
        self.sample_index = 0  # global row index into the data stream
        self.ckpt = CheckpointManager(cfg.checkpoint, cfg.checkpoint.dir or
                                      os.path.join(self.run_dir, "checkpoints"), self.rank, self.echo)
        self.log = ScalarLog(os.path.join(self.run_dir, "tb")
                             if cfg.logging.tensorboard and self.is_main else None)
        self.history: list[dict] = []
        self.peak_tflops = peak_tflops(cfg.logging.peak_tflops, self.device)

    @property
    def module(self) -> Transformer:
        return self.backend.module if self.backend is not None else self.model

    # -- stages ---------------------------------------------------------------------------
    def apply_stage(self, stage: StageConfig):
        """Switch attention settings, RoPE, parallel layout and batch shape to `stage`."""
        for key, value in self.cfg.stage_attention(stage).__dict__.items():
            setattr(self.attn_cfg, key, value)
        self.model.set_rope(stage.rope or self.cfg.model.rope)
        cp = stage.cp or self.cfg.parallel.cp
        if self.dims is None or self.dims.cp != cp:
            self.dims = ParallelDims.build(self.world_size, cp, self.rank)
        if cp > 1:  # context parallel: check the layout now, not at the first forward
            check_cp_stage(self.attn_cfg, stage.seq_len, cp, self.model.segmenter)
        rows = stage.rows_per_step(self.dims.dp)
        if rows % self.dims.dp:
            raise ValueError(f"stage {stage.label}: {rows} rows per step do not split over "
                             f"dp={self.dims.dp} ranks; adjust batch_tokens")
        self.rows_per_rank = rows // self.dims.dp
        self.micro = min(stage.micro_batch_size, self.rows_per_rank)
        if self.rows_per_rank % self.micro:
            raise ValueError(f"stage {stage.label}: {self.rows_per_rank} rows per rank are not a "
                             f"multiple of micro_batch_size={self.micro}")
        grad_accum = self.rows_per_rank // self.micro
        if self.backend is None:
            self.backend = build_backend(self.model, self.cfg.zero, self.cfg.optim, self.micro,
                                         grad_accum, self.bf16, self.world_size)
        else:
            self.backend.set_stage(self.micro, grad_accum)
        return self._rows(stage)

    def _rows(self, stage: StageConfig, held_out: bool = False):
        """The data source for this stage; rank 0 prepares caches first, the others wait."""
        align = self.attn_cfg.block_size if self.attn_cfg.block_based else 1
        data = self.cfg.stage_data(stage)
        if self.is_main or self.world_size == 1:
            rows = build_rows(data, stage.seq_len, align, held_out=held_out)
        if dist.is_available() and dist.is_initialized():
            dist.barrier()
        if not self.is_main and self.world_size > 1:
            rows = build_rows(data, stage.seq_len, align, held_out=held_out)
        return rows

    # -- one optimizer step ---------------------------------------------------------------
    def _autocast(self):
        # DeepSpeed's bf16 mode casts the module itself; plain torch uses autocast.
        enabled = self.bf16 and self.backend.name == "torch"
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=enabled)

    def _forward(self, batch: Batch):
        if self.dims.cp > 1:  # this cp rank's shard; ctx.group selects the CP path
            align = self.attn_cfg.block_size if self.attn_cfg.block_based else 1
            batch, ctx = cp_context(batch, self.attn_cfg.kind, self.dims.cp_group, align,
                                    balance=self.cfg.parallel.cp_balance, attn_cfg=self.attn_cfg,
                                    core=self.cfg.parallel.cp_core)
        else:
            ctx = context_for(batch)
        module = self.module
        with self._autocast():
            if self.scorer_only:
                module.segmenter(module.embed_tokens(batch.tokens), batch.tokens, ctx)
                return None, ctx
            return self.backend(batch.tokens, ctx, batch.labels), ctx

    def _check_finite(self, value: torch.Tensor, stage: StageConfig, what: str) -> bool:
        """True if finite on every rank; else stop (raise) or, with optim.nonfinite=skip,
        False on every rank together."""
        bad = torch.tensor([0.0 if torch.isfinite(value).all() else 1.0])
        if float(_all_reduce(bad)) == 0:
            return True
        if self.cfg.optim.nonfinite == "skip":
            self.echo(f"non-finite {what} at step {self.step + 1} (stage {stage.label}); "
                      "batch skipped (optim.nonfinite=skip)")
            return False
        raise FloatingPointError(f"non-finite {what} at step {self.step + 1} "
                                 f"(stage {stage.label}); stopping")

    def train_step(self, batch: Batch, stage: StageConfig) -> dict:
        """One optimizer step on this rank's rows `batch` (rows_per_rank of them)."""
        lr = lr_at(self.step, self.total_steps, self.cfg.optim)
        self.backend.set_lr(lr)
        rows_global = batch.tokens.shape[0] * (self.dims.dp if self.dims else 1)
        cp = self.dims.cp if self.dims else 1  # the cp ranks of a row all hold it here
        count = _all_reduce(torch.tensor([float(batch.num_loss_tokens)])) / cp
        num_loss_tokens = max(1.0, float(count))  # the step's global denominator
        task_sum = torch.zeros(1, dtype=torch.float64)
        objective = 0.0  # task + weighted aux losses: what the optimizer minimises
        skipped = False
        metrics: dict[str, float] = {}
        for s in range(0, batch.tokens.shape[0], self.micro):
            micro = batch.slice_rows(s, s + self.micro).to(self.device)
            # The scorer's aux losses and metrics are computed whole on each of the cp ranks.
            share = micro.tokens.shape[0] / rows_global / cp
            loss_sum, ctx = self._forward(micro)
            if s == 0 and self.stage_step == 0 and ctx.cache.get("cp_core"):  # DCW under CP
                self.echo(f"cp_core (dcw core/window keys) by layer: {ctx.cache['cp_core']}")
            loss = torch.zeros((), device=self.device)
            if loss_sum is not None:
                loss = loss + loss_sum.float() / num_loss_tokens
                task_sum += float(loss_sum.detach())
            for value in ctx.cache.get("aux_losses", {}).values():
                loss = loss + value * share
            for key, value in ctx.cache.get("metrics", {}).items():
                metrics[key] = metrics.get(key, 0.0) + float(value) * micro.tokens.shape[0] / cp
            loss_host = loss.detach().cpu()  # one device sync per micro-batch
            if not self._check_finite(loss_host, stage, "loss"):
                skipped = True  # every rank leaves the loop at the same micro-batch
                break
            objective += float(loss_host)
            self.backend.backward(loss)
        if skipped:
            self.backend.drop_step()
            grad_norm = float("nan")
        else:
            grad_norm = self.backend.step()  # (the torch backend never steps on inf/nan)
            skipped = not self._check_finite(torch.tensor([grad_norm]), stage, "gradient norm")
        self.step += 1
        self.stage_step += 1
        sums = _all_reduce(torch.tensor([float(task_sum), objective] + list(metrics.values()),
                                        dtype=torch.float64))
        out = {"loss": float(sums[0]) / num_loss_tokens, "objective": float(sums[1]), "lr": lr,
               "grad_norm": grad_norm, "loss_tokens": num_loss_tokens, "skipped": float(skipped)}
        if self.scorer_only:  # no task loss in phase 1: show what is being minimised
            out["loss"] = out["objective"]
        out.update({f"scorer/{k}": float(v) / rows_global for k, v in zip(metrics, sums[2:])})
        return out

    # -- checkpoints ----------------------------------------------------------------------
    def _client_state(self) -> dict:
        return {"step": self.step, "stage": self.stage_index, "stage_step": self.stage_step,
                "sample_index": self.sample_index, "world_size": self.world_size,
                "rng": {"torch": torch.get_rng_state(), "python": random.getstate(),
                        "numpy": np.random.get_state()}}

    def save_checkpoint(self) -> str:
        extra = {"config.yaml": json.dumps(to_dict(self.cfg), indent=1)}
        if hasattr(self.backend, "ds_config"):
            extra["ds_config.json"] = json.dumps(self.backend.ds_config, indent=1)
        tag = self.ckpt.save(self.backend, self.step, self._client_state(), extra)
        self.echo(f"saved checkpoint {tag} (step {self.step}, stage {self.stage_index})")
        return tag

    def _restore(self, state: dict) -> None:
        self.step, self.stage_index = state["step"], state["stage"]
        self.stage_step, self.sample_index = state["stage_step"], state["sample_index"]
        rng = state["rng"]
        torch.set_rng_state(rng["torch"])
        random.setstate(rng["python"])
        np.random.set_state(rng["numpy"])

    # -- whole job ------------------------------------------------------------------------
    def fit(self) -> dict:
        cfg = self.cfg
        stop = StopRequest.install()
        try:
            return self._fit(stop)
        finally:
            stop.uninstall()
            self.log.close()

    def _fit(self, stop: StopRequest) -> dict:
        cfg = self.cfg
        rows_src = self.apply_stage(cfg.stages[0])
        self.echo(f"dcwdist: {cfg.name}: {cfg.model.num_params() / 1e6:.2f}M params, "
                  f"attention={cfg.attention.kind}, backend={self.backend.name}"
                  f"{f' zero-{cfg.zero.stage}' if cfg.zero.enabled else ''}, "
                  f"world={self.world_size} (dp={self.dims.dp} x cp={self.dims.cp}), "
                  f"device={self.device}{memory_options(cfg.model)}, {len(cfg.stages)} stage(s), "
                  f"{self.total_steps} steps{', deterministic' if cfg.deterministic else ''} "
                  f"-> {self.run_dir}")
        state = self.ckpt.resume(self.backend, cfg.checkpoint.resume)
        if state is not None:
            self._restore(state)
            self.echo(f"resumed at step {self.step} (stage {self.stage_index}, sample "
                      f"{self.sample_index}; saved with world size {state['world_size']})")
        bar = tqdm(total=self.total_steps, initial=self.step, unit="step", mininterval=1.0,
                   disable=not (cfg.logging.progress and self.is_main), dynamic_ncols=True)
        for i in range(self.stage_index, len(cfg.stages)):
            stage = cfg.stages[i]
            if i != self.stage_index:
                self.stage_index, self.stage_step = i, 0
            rows_src = self.apply_stage(stage)
            self.echo(f"stage {i} ({stage.label}): seq_len={stage.seq_len} steps={stage.steps} "
                      f"rows/step={self.rows_per_rank * self.dims.dp} micro={self.micro} "
                      f"dp={self.dims.dp} x cp={self.dims.cp} "
                      f"rope={self.model.rope_cfg.scaling}x{self.model.rope_cfg.factor:g}")
            while self.stage_step < stage.steps:
                t0 = time.perf_counter()
                batch = rows_src.batch(*rank_slice(self.sample_index, self.rows_per_rank *
                                                   self.dims.dp, self.dims.dp_rank, self.dims.dp))
                self.sample_index += self.rows_per_rank * self.dims.dp
                metrics = self.train_step(batch, stage)
                dt = time.perf_counter() - t0
                tokens = self.rows_per_rank * self.dims.dp * stage.seq_len
                density = (1.0 if self.attn_cfg.kind == "dense"
                           else metrics.get("scorer/flops_realised"))  # DCW's realised fraction
                metrics.update(self._throughput(tokens, dt, batch, density))
                metrics.update({"stage": i, "seq_len": stage.seq_len})
                self.history.append({"step": self.step, **metrics})
                if self.step % cfg.logging.log_every == 0:
                    self.log.scalars({f"train/{k}": v for k, v in metrics.items()}, self.step)
                    self.log.scalars(self._alphas(), self.step)
                bar.set_postfix(stage=stage.label, loss=f"{metrics['loss']:.3f}",
                                tok_s=f"{metrics['tokens_per_s']:.0f}")
                bar.update(1)
                if self.is_main:
                    with open(os.path.join(self.run_dir, "last_step"), "w") as f:
                        f.write(str(self.step))
                drill = cfg.checkpoint.stop_at == self.step  # same step on every rank
                if stop.agreed() or drill:
                    bar.close()
                    self.save_checkpoint()
                    why = "checkpoint.stop_at" if drill else stop.signame
                    self.echo(f"stopped by {why} at step {self.step}; checkpoint saved, "
                              "resume with checkpoint.resume=auto")
                    return {"steps": self.step, "stopped": True, **self._loss_summary()}
                if cfg.checkpoint.every and self.step % cfg.checkpoint.every == 0:
                    self.save_checkpoint()
            if stage.steps:
                bar.write(f"stage {i} ({stage.label}) done at step {self.step}: "
                          f"loss {self.history[-1]['loss']:.4f}" if self.history
                          and self.is_main else "", end="\n" if self.is_main else "")
                if not cfg.checkpoint.every or self.step % cfg.checkpoint.every:
                    self.save_checkpoint()
                if i < len(cfg.stages) - 1:  # validation loss by stage (the last: below)
                    self.evaluate(stage, table=False)
        bar.close()
        weights = self.backend.full_state_dict()  # collective under ZeRO-3
        if self.is_main:
            save_model(weights, os.path.join(self.run_dir, "model.pt"))
        table = self.evaluate(cfg.stages[-1])  # every rank: ZeRO-3 gathers weights collectively
        summary = {"steps": self.step, "stopped": False, **self._loss_summary(), "eval": table}
        if self.is_main:
            with open(os.path.join(self.run_dir, "summary.json"), "w") as f:
                json.dump({**summary, "history": self.history}, f, indent=1)
        return summary

    def _loss_summary(self) -> dict:
        return {"first_loss": self.history[0]["loss"] if self.history else None,
                "last_loss": self.history[-1]["loss"] if self.history else None,
                "losses": [h["loss"] for h in self.history]}

    def _throughput(self, tokens: int, dt: float, batch: Batch,
                    density: Optional[float]) -> dict:
        """tokens/s, peak memory, and MFU on dense-equivalent FLOPs (6N + causal attention) and,
        where the attention density is known, on computed FLOPs (6N + density x attention)."""
        m = self.cfg.model
        out = {"tokens_per_s": tokens / dt, "peak_mem_gib": peak_memory_gib(self.device)}
        if self.peak_tflops:
            n_params = m.num_params() - m.vocab_size * m.dim * (1 if m.tie_embeddings else 2)
            doc_lens = torch.stack([(batch.doc_ids == d).sum(1) for d in
                                    range(int(batch.doc_ids.max()) + 1)]).double()
            pairs = float((doc_lens * (doc_lens + 1) / 2).sum()) * self.dims.dp
            attn = 3 * 4 * m.head_dim * m.n_heads * m.n_layers * pairs  # fwd + bwd
            dense_flops = 6 * n_params * tokens + attn
            peak = self.peak_tflops * 1e12 * self.world_size
            out["mfu_dense_equiv"] = dense_flops / dt / peak
            if density is not None:
                out["mfu_computed"] = (6 * n_params * tokens + attn * density) / dt / peak
        return out

    def _alphas(self) -> dict:
        out = {}
        for i, layer in enumerate(self.module.layers):
            alpha = getattr(layer.self_attn.attn, "alpha", None)
            if alpha is not None and alpha.numel():  # (ZeRO-3 leaves partitioned params empty)
                out[f"alpha/layer{i}"] = float(alpha.detach().float().reshape(-1)[0])
        return out

    def evaluate(self, stage: StageConfig, table: bool = True) -> list[dict]:
        """Held-out loss of `stage`'s length: TensorBoard eval/*, and (table) the printed
        loss-by-position table + eval.json."""
        src = self._rows(stage, held_out=True)
        batches = [src.batch(i, 1).to(self.device) for i in range(self.cfg.data.eval_rows)]
        totals: dict = {}
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            rows = loss_by_position(self.module, batches, stage.seq_len, totals=totals)
        self.log.scalars({f"eval/{k}": v for k, v in totals.items()}
                         | {"eval/seq_len": stage.seq_len}, self.step)
        if not table:
            self.echo(f"eval ({stage.label}): loss {totals['loss']:.4f}, answer tokens "
                      f"{totals['answer_loss']:.4f}")
            return rows
        self.echo(f"eval: loss by position within document ({self.cfg.data.eval_rows} held-out "
                  f"rows of {stage.seq_len} tokens)\n" + format_table(rows))
        if self.is_main:
            with open(os.path.join(self.run_dir, "eval.json"), "w") as f:
                json.dump(rows, f, indent=1)
        return rows
