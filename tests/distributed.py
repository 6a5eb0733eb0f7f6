"""Run `dcwdist train` as real processes (torchrun for several ranks) and read back results."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

from tests.conftest import REPO

TINY = os.path.join(REPO, "recipes/tiny_cpu.yaml")
# 2 layers x 64 wide; stage 0: 4 rows of 384 per step, stage 1: 2 rows of 768.
SMALL = ["attention.kind=dense", "model.dim=64", "model.n_layers=2", "stages.0.seq_len=384", "stages.0.steps=3",
         "stages.0.batch_tokens=1536", "stages.0.micro_batch_size=1", "stages.1.seq_len=768",
         "stages.1.steps=2", "stages.1.batch_tokens=1536", "stages.1.micro_batch_size=1",
         "stages.1.rope.original_max_len=384", "data.eval_rows=1", "logging.progress=false"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_env() -> dict:
    env = dict(os.environ)
    env.update({"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
                "MASTER_ADDR": "127.0.0.1",
                "TORCH_EXTENSIONS_DIR": env.get("TORCH_EXTENSIONS_DIR", os.path.expanduser(
                    "~/.cache/dcwdist/torch_extensions"))})
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT"):
        env.pop(var, None)
    return env


def train_cmd(run_dir: str, overrides: list[str], nproc: int = 1) -> list[str]:
    cli = ["-m", "dcwdist.cli", "train", TINY, *overrides, "--run-dir", run_dir]
    if nproc == 1:
        return [sys.executable, *cli]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
            "--master-addr", "127.0.0.1", "--master-port", str(free_port()), *cli]


def run_train(run_dir: str, overrides: list[str], nproc: int = 1, timeout: int = 300) -> dict:
    """Train to completion; returns summary.json (losses per step under 'history')."""
    proc = subprocess.run(train_cmd(run_dir, overrides, nproc), env=train_env(), cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"train exited {proc.returncode}\n{proc.stdout[-3000:]}\n"
                             f"{proc.stderr[-5000:]}")
    summary = json.load(open(os.path.join(run_dir, "summary.json")))
    summary["stdout"] = proc.stdout + proc.stderr
    return summary


def losses(summary: dict) -> list[float]:
    return [h["loss"] for h in summary["history"]]
