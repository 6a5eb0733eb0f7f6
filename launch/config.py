"""What a launch asks for (one dataclass, filled from `dcwdist submit` flags) and the job it
prepares: the resolved training config snapshot, the run directory and the worker command."""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from typing import Literal, Optional

TARGETS = ("local", "slurm", "ray", "mpi")


@dataclass
class LaunchConfig:
    recipe: str
    """YAML recipe (or a run's config.yaml) to train."""
    overrides: list[str] = field(default_factory=list)
    """Dotted overrides applied on top of the recipe before the snapshot is written."""
    to: Literal["local", "slurm", "ray", "mpi"] = "local"
    run_dir: Optional[str] = None
    """Output folder; default logging.run_dir of the resolved config. Made absolute."""
    nodes: int = 1
    nproc_per_node: int = 0
    """Ranks per node; 0 = gpus_per_node, or 1 without GPUs."""
    gpus_per_node: int = 0
    cpus_per_rank: int = 1
    time: str = "01:00:00"
    partition: Optional[str] = None
    account: Optional[str] = None
    job_name: Optional[str] = None
    sbatch_args: list[str] = field(default_factory=list)
    """Extra `#SBATCH` options, e.g. --qos=high."""
    signal_before: int = 120
    """Seconds before the time limit at which Slurm sends SIGUSR1 (checkpoint and stop)."""
    max_requeues: int = 3
    """Slurm: requeue a job stopped by a signal before finishing, at most this many times."""
    master_port: int = 0
    """0 = a free port (local/mpi), derived from the job id (slurm), picked by rank 0 (ray)."""
    master_addr: Optional[str] = None
    """mpi: rendezvous host; default 127.0.0.1, or the hostfile's first host."""
    hostfile: Optional[str] = None
    """mpi: host file passed to mpirun."""
    address: Optional[str] = None
    """ray: GCS address host:port or 'auto'; default $RAY_ADDRESS."""
    ray_start_local: bool = False
    """ray: start a private head on this machine for the job and stop it afterwards."""
    dry_run: bool = False
    python: str = sys.executable
    workdir: str = field(default_factory=os.getcwd)

    def __post_init__(self):
        if self.to not in TARGETS:
            raise ValueError(f"--to must be one of {', '.join(TARGETS)}, got {self.to!r}")
        if self.nodes < 1 or self.nproc_per_node < 0 or self.gpus_per_node < 0:
            raise ValueError("--nodes must be >= 1, --nproc-per-node and --gpus-per-node >= 0")
        if not self.nproc_per_node:
            self.nproc_per_node = self.gpus_per_node or 1
        if self.gpus_per_node and self.nproc_per_node != self.gpus_per_node:
            raise ValueError(f"--nproc-per-node {self.nproc_per_node} != --gpus-per-node "
                             f"{self.gpus_per_node}: one rank per GPU")
        if self.to == "local" and self.nodes != 1:
            raise ValueError("--to local runs on one node; use --to slurm, mpi or ray for more")

    @property
    def world_size(self) -> int:
        return self.nodes * self.nproc_per_node


@dataclass
class Job:
    """A prepared launch: the snapshot every rank trains from, and where results go."""

    launch: LaunchConfig
    run_dir: str
    config_path: str
    cfg: object  # the resolved dcwdist.config.JobConfig

    def train_argv(self) -> list[str]:
        """The command each rank runs (the launcher supplies the rank variables)."""
        return [self.launch.python, "-m", "dcwdist.cli", "train", self.config_path,
                "--run-dir", self.run_dir]

    def worker_env(self, base: Optional[dict] = None) -> dict:
        """Environment for the ranks: launcher-independent defaults, stray rank vars removed."""
        env = dict(os.environ if base is None else base)
        for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
            env.pop(var, None)
        env.update(self.env_defaults(env))
        return env

    def env_defaults(self, env: dict) -> dict:
        out = {"PYTHONUNBUFFERED": "1",
               "OMP_NUM_THREADS": env.get("OMP_NUM_THREADS", str(self.launch.cpus_per_rank))}
        if not self.launch.gpus_per_node:
            out["DS_ACCELERATOR"] = env.get("DS_ACCELERATOR", "cpu")
        if env.get("TORCH_EXTENSIONS_DIR"):
            out["TORCH_EXTENSIONS_DIR"] = env["TORCH_EXTENSIONS_DIR"]
        return out


def prepare(lc: LaunchConfig) -> Job:
    """Resolve and validate the config now (errors before anything is queued)."""
    from dcwdist.config import load_config

    cfg = load_config(lc.recipe, lc.overrides)
    if lc.world_size > 1 and not cfg.zero.enabled:
        raise ValueError(f"{lc.world_size} ranks need the DeepSpeed engine: add the override "
                         "zero.enabled=true")
    if lc.gpus_per_node == 0 and cfg.device == "cuda":
        raise ValueError("device=cuda but --gpus-per-node is 0")
    run_dir = os.path.abspath(os.path.join(lc.workdir, lc.run_dir or
                                           cfg.logging.run_dir.format(name=cfg.name)))
    if lc.to == "slurm" and cfg.checkpoint.resume == "none":
        cfg.checkpoint.resume = "auto"  # a requeued job continues from its newest checkpoint
    return Job(lc, run_dir, os.path.join(run_dir, "launch", "config.yaml"), cfg)
