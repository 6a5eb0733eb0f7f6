"""MPI: `mpirun -np N python -m dcwdist.cli train SNAPSHOT`. The trainer reads
OMPI_COMM_WORLD_RANK/SIZE/LOCAL_RANK (Open MPI) or PMI_RANK/PMI_SIZE/MPI_LOCALRANKID (MPICH
hydra); the rendezvous host/port are passed to every rank. As root, Open MPI needs
--allow-run-as-root; --oversubscribe lets a small machine hold more ranks than cores."""
from __future__ import annotations

import os
import shutil
import subprocess

from dcwdist.launch.config import Job
from dcwdist.launch.local import free_port
from dcwdist.launch.record import run_blocking


def mpirun_path() -> str:
    path = shutil.which("mpirun")
    if not path:
        raise FileNotFoundError("mpirun not found: install Open MPI (apt-get install "
                                "openmpi-bin libopenmpi-dev) or MPICH")
    return path


def flavor(mpirun: str) -> str:
    """'openmpi' or 'mpich' (hydra), from `mpirun --version`."""
    try:
        out = subprocess.run([mpirun, "--version"], capture_output=True, text=True, timeout=30)
        text = (out.stdout + out.stderr).lower()
    except (OSError, subprocess.TimeoutExpired):
        text = ""
    return "mpich" if ("hydra" in text or "mpich" in text) else "openmpi"


def _first_host(hostfile: str) -> str:
    with open(hostfile) as f:
        for line in f:
            words = line.split("#", 1)[0].split()
            if words:
                return words[0].split(":")[0]
    raise ValueError(f"{hostfile} lists no hosts")


def command(job: Job, mpirun: str | None = None, kind: str | None = None) -> list[str]:
    lc = job.launch
    mpirun = mpirun or mpirun_path()
    kind = kind or flavor(mpirun)
    addr = lc.master_addr or (_first_host(lc.hostfile) if lc.hostfile else "127.0.0.1")
    env = {"MASTER_ADDR": addr, "MASTER_PORT": str(lc.master_port or free_port()),
           **job.env_defaults(os.environ)}
    cmd = [mpirun, "-np", str(lc.world_size)]
    if kind == "openmpi":
        if os.geteuid() == 0:
            cmd += ["--allow-run-as-root"]
        if os.geteuid() == 0 or not lc.hostfile:
            cmd += ["--oversubscribe"]
        cmd += ["--bind-to", "none"]  # torch threads, not one core per rank
        if lc.hostfile:
            cmd += ["--hostfile", lc.hostfile, "--map-by", f"ppr:{lc.nproc_per_node}:node"]
        for key, value in env.items():
            cmd += ["-x", f"{key}={value}"]
        cmd += ["-x", "PATH"] + (["-x", "PYTHONPATH"] if "PYTHONPATH" in os.environ else [])
    else:
        if lc.hostfile:
            cmd += ["-f", lc.hostfile, "-ppn", str(lc.nproc_per_node)]
        for key, value in env.items():
            cmd += ["-genv", key, value]
    return cmd + job.train_argv()


def run(job: Job) -> int:
    return run_blocking(job, command(job), f"mpirun, {job.launch.world_size} rank(s)")
