"""`dcwdist submit --to mpi`: real mpirun (Open MPI) with 2 ranks reading OMPI_COMM_WORLD_*."""
import os
import shlex
import shutil
import subprocess

import pytest

from tests.conftest import REPO
from tests.distributed import train_env
from tests.launch_common import assert_finished_run, submit

pytestmark = pytest.mark.skipif(shutil.which("mpirun") is None,
                                reason="mpirun not installed (apt-get install openmpi-bin)")


def test_mpirun_two_ranks_complete_and_record_config_and_code_version(tmp_path):
    out = submit(str(tmp_path), "mpi", "--nproc-per-node", "2")
    assert "world=2 (dp=2 x cp=1)" in out.stdout + out.stderr
    record = assert_finished_run(str(tmp_path), "mpi")
    cmd = record["launcher_command"]
    assert cmd[1:3] == ["-np", "2"] and "dcwdist.cli" in cmd
    if os.geteuid() == 0:
        assert "--allow-run-as-root" in cmd and "--oversubscribe" in cmd


def test_ranks_from_mpirun_env_match_mpi4py(tmp_path):
    """read_dist_env under a real mpirun agrees with MPI itself (mpi4py's COMM_WORLD)."""
    pytest.importorskip("mpi4py")
    out = submit(str(tmp_path), "mpi", "--nproc-per-node", "2", "--dry-run")
    mpirun = shlex.split(out.stdout.strip())
    prog = ("from mpi4py import MPI; from dcwdist.parallel.env import read_dist_env; "
            "e = read_dist_env(); c = MPI.COMM_WORLD; "
            "print('rank', e.rank, c.Get_rank(), e.world_size, c.Get_size(), e.launcher)")
    cmd = mpirun[:mpirun.index("-m")] + ["-c", prog]  # same mpirun flags, python -c
    res = subprocess.run(cmd, env=train_env(), cwd=REPO, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr
    lines = sorted(line for line in res.stdout.splitlines() if line.startswith("rank"))
    assert lines == ["rank 0 0 2 2 OMPI_COMM_WORLD_RANK", "rank 1 1 2 2 OMPI_COMM_WORLD_RANK"]
