"""Local: N ranks on this machine through torchrun (`python -m torch.distributed.run`), which
sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT for the trainer."""
from __future__ import annotations

import socket

from dcwdist.launch.config import Job
from dcwdist.launch.record import run_blocking


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def command(job: Job) -> list[str]:
    lc = job.launch
    if lc.world_size == 1:  # one process needs no rendezvous
        return job.train_argv()
    return [lc.python, "-m", "torch.distributed.run", "--nnodes", "1",
            "--nproc-per-node", str(lc.nproc_per_node), "--master-addr", "127.0.0.1",
            "--master-port", str(lc.master_port or free_port()), *job.train_argv()[1:]]


def run(job: Job) -> int:
    return run_blocking(job, command(job), f"{job.launch.world_size} local rank(s)")
