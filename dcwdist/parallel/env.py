"""Rank discovery from whichever launcher started us: torchrun, srun, mpirun (Open MPI or
MPICH/PMI), Ray workers (which set the torchrun variables). No module reads these elsewhere."""
from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass

_SOURCES = (  # (rank, world size, local rank) variable names, by launcher
    ("RANK", "WORLD_SIZE", "LOCAL_RANK"),
    ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK"),
    ("PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID"),
    ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"),
)


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    launcher: str = "none"

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def read_dist_env(environ=None) -> DistEnv:
    """The first launcher whose variables are present wins; none means one process."""
    env = os.environ if environ is None else environ
    for rank_var, size_var, local_var in _SOURCES:
        if rank_var in env and size_var in env:
            return DistEnv(rank=int(env[rank_var]), world_size=int(env[size_var]),
                           local_rank=int(env.get(local_var, 0)), launcher=rank_var)
    return DistEnv()


def export_torch_env(env: DistEnv, environ=None) -> None:
    """torch.distributed's env:// rendezvous reads RANK/WORLD_SIZE/MASTER_*: fill them in."""
    target = os.environ if environ is None else environ
    target.setdefault("RANK", str(env.rank))
    target.setdefault("WORLD_SIZE", str(env.world_size))
    target.setdefault("LOCAL_RANK", str(env.local_rank))
    if env.launcher == "SLURM_PROCID":  # plain srun: the allocation's first host, a job port
        if "MASTER_ADDR" not in target:
            first = slurm_first_host(target)
            if first:
                target["MASTER_ADDR"] = first
        if "SLURM_JOB_ID" in target:
            target.setdefault("MASTER_PORT", str(slurm_master_port(target["SLURM_JOB_ID"])))
    target.setdefault("MASTER_ADDR", "127.0.0.1")
    target.setdefault("MASTER_PORT", "29500")


def slurm_master_port(job_id: str) -> int:
    """A port that differs between jobs sharing a node (the sbatch template uses the same)."""
    return 20000 + int(job_id) % 20000


def slurm_first_host(environ) -> str | None:
    """First host of the job's node list (`scontrol show hostnames`), or None."""
    nodelist = environ.get("SLURM_JOB_NODELIST") or environ.get("SLURM_NODELIST")
    if not nodelist:
        return None
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True,
                             text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    hosts = out.stdout.split()
    return hosts[0] if out.returncode == 0 and hosts else None
