"""Training backends: a DeepSpeed ZeRO engine, or plain torch AdamW for one process.

Both expose the same five verbs (backward, step, set_lr, save, load) so the trainer's step is
one piece of code. The DeepSpeed config is derived from our dataclasses (one source of truth).

Gradient rule (DESIGN.md): each rank's loss is its summed token losses over the global count of
loss tokens; DeepSpeed averages gradients over the dp x cp world, so the loss handed to it is
multiplied by the world size, which turns the average back into the sum = the single-process
gradient.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Optional

import torch

from dcwdist.train.optim import OptimConfig, build_optimizer, param_groups


@dataclass
class ZeroConfig:
    """DeepSpeed ZeRO: optimizer state (and grads / params) sharded over all dp x cp ranks."""

    enabled: bool = False
    """Train through a DeepSpeed engine; false runs plain torch AdamW (one process only)."""
    stage: int = 1
    """ZeRO stage: 1 optimizer state, 2 + gradients, 3 + parameters."""
    offload_optimizer: bool = False
    """Keep optimizer state on the CPU (ZeRO-Offload)."""
    offload_param: bool = False
    """Keep parameters on the CPU (stage 3 only)."""
    torch_adam: bool = True
    """Use torch's AdamW inside DeepSpeed (its fused Adam needs a JIT build that can fail)."""

    def __post_init__(self):
        if self.stage not in (0, 1, 2, 3):
            raise ValueError(f"zero.stage must be 0, 1, 2 or 3, got {self.stage}")
        if self.offload_param and self.stage != 3:
            raise ValueError("zero.offload_param needs zero.stage=3")


def deepspeed_config(zero: ZeroConfig, optim: OptimConfig, micro_batch: int, grad_accum: int,
                     bf16: bool) -> dict:
    """The DeepSpeed JSON config implied by our configs."""
    zopt: dict = {"stage": zero.stage}
    if zero.offload_optimizer:
        zopt["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if zero.offload_param:
        zopt["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    return {
        # We own the micro-batch loop: every engine.step() is an accumulation boundary, so the
        # number of micro-batches may change between stages without touching the engine.
        "managed_gradient_accumulation": False,
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": optim.grad_clip,
        # torch_adam belongs in params (DeepSpeed pops it there); at the optimizer level it was
        # ignored and a GPU run tried to JIT-build FusedAdam.
        "optimizer": {"type": "AdamW",
                      "params": {"lr": optim.lr, "betas": [optim.beta1, optim.beta2],
                                 "eps": optim.eps, "weight_decay": optim.weight_decay,
                                 "torch_adam": zero.torch_adam}},
        "zero_optimization": zopt,
        "bf16": {"enabled": bf16},
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }


class TorchBackend:
    """One process, plain AdamW + global-norm clipping."""

    name = "torch"

    def __init__(self, model: torch.nn.Module, optim: OptimConfig):
        self.module = model
        self.optim_cfg = optim
        self.optimizer = build_optimizer(model, optim)

    def set_stage(self, micro_batch: int, grad_accum: int) -> None:
        pass

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def drop_step(self) -> None:
        """Discard the accumulated gradients without updating (a skipped batch)."""
        self.optimizer.zero_grad(set_to_none=True)

    def step(self) -> float:
        params = [p for p in self.module.parameters() if p.requires_grad]
        clip = self.optim_cfg.grad_clip or float("inf")
        norm = float(torch.nn.utils.clip_grad_norm_(params, clip))
        if torch.isfinite(torch.tensor(norm)):
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    def __call__(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def full_state_dict(self) -> dict:
        return self.module.state_dict()

    def save(self, ckpt_dir: str, tag: str, client_state: dict) -> None:
        path = os.path.join(ckpt_dir, tag)
        os.makedirs(path, exist_ok=True)
        torch.save({"model": self.module.state_dict(), "optimizer": self.optimizer.state_dict(),
                    "client_state": client_state}, os.path.join(path, "state.pt"))

    def load(self, ckpt_dir: str, tag: str, saved_world_size: int = 1) -> dict:
        state = torch.load(os.path.join(ckpt_dir, tag, "state.pt"), map_location="cpu",
                           weights_only=False)
        self.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        return state["client_state"]


class DeepSpeedBackend:
    """A DeepSpeed engine; the optimizer is sharded over every rank of the world."""

    name = "deepspeed"

    def __init__(self, model: torch.nn.Module, zero: ZeroConfig, optim: OptimConfig,
                 micro_batch: int, grad_accum: int, bf16: bool, world_size: int):
        import deepspeed

        self.world_size = world_size
        self.ds_config = deepspeed_config(zero, optim, micro_batch, grad_accum, bf16)
        self.engine, *_ = deepspeed.initialize(
            model=model, model_parameters=param_groups(model, optim.weight_decay),
            config=self.ds_config)
        self.module = self.engine.module

    def set_stage(self, micro_batch: int, grad_accum: int) -> None:
        pass  # unmanaged accumulation: nothing in the engine depends on the batch shape

    def set_lr(self, lr: float) -> None:
        for group in self.engine.optimizer.param_groups:
            group["lr"] = lr

    def backward(self, loss: torch.Tensor) -> None:
        # Our loss is already the global token mean; undo DeepSpeed's 1/world average.
        self.engine.backward(loss * self.world_size, scale_wrt_gas=False)

    def step(self) -> float:
        self.engine.step()  # unmanaged mode: finalize the accumulated gradients and update
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    def __call__(self, *args, **kwargs):
        # Through the engine, not engine.module: ZeRO-3 keeps its micro-step count there.
        return self.engine(*args, **kwargs)

    def full_state_dict(self) -> Optional[dict]:
        """Whole-model weights on rank 0 (collective: every rank must call it under ZeRO-3)."""
        if self.engine.zero_optimization_partition_weights():
            return self.engine._zero3_consolidated_16bit_state_dict()
        return self.module.state_dict()

    def save(self, ckpt_dir: str, tag: str, client_state: dict) -> None:
        self.engine.save_checkpoint(ckpt_dir, tag=tag, client_state=client_state,
                                    save_latest=False)
        if self.engine.global_rank == 0:
            with open(os.path.join(ckpt_dir, tag, "ds_config.json"), "w") as f:
                json.dump(self.ds_config, f, indent=1)

    def load(self, ckpt_dir: str, tag: str, saved_world_size: int) -> dict:
        if saved_world_size != self.world_size and self.engine.zero_optimization_stage() > 0:
            # Sharded optimizer state cannot be re-split directly: go through DeepSpeed's
            # universal checkpoint (one file per parameter), converted once, kept in the tag.
            ckpt_dir, tag = self._universal(os.path.join(ckpt_dir, tag)), "universal"
        path, client_state = self.engine.load_checkpoint(ckpt_dir, tag=tag)
        self.engine._config.load_universal_checkpoint = False
        if path is None:
            raise RuntimeError(f"DeepSpeed could not load {os.path.join(ckpt_dir, tag)}")
        return client_state

    def _universal(self, tag_dir: str) -> str:
        import torch.distributed as dist
        out = os.path.join(tag_dir, "universal")
        if self.engine.global_rank == 0 and not os.path.isdir(os.path.join(out, "zero")):
            import subprocess
            import sys
            tmp = out + ".tmp"
            subprocess.run([sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal",
                            "--input_folder", tag_dir, "--output_folder", tmp,
                            "--num_extract_workers", "1", "--num_merge_workers", "1",
                            "--inject_missing_state"], check=True, capture_output=True)
            os.replace(tmp, out)
        dist.barrier()
        self.engine._config.load_universal_checkpoint = True
        return tag_dir


def build_backend(model, zero: ZeroConfig, optim: OptimConfig, micro_batch: int,
                  grad_accum: int, bf16: bool, world_size: int,
                  device: Optional[torch.device] = None):
    if zero.enabled:
        return DeepSpeedBackend(model, zero, optim, micro_batch, grad_accum, bf16, world_size)
    if world_size > 1:
        raise ValueError(f"{world_size} processes need zero.enabled=true (the DeepSpeed engine "
                         "does the data-parallel reduction)")
    return TorchBackend(model, optim)
