"""`dcwdist submit --to ray` against a real local Ray cluster (`ray start --head` on 127.0.0.1,
started once for the module by the launcher's own LocalHead): a 2-rank job completes; a rank
that raises while its peer waits in a collective is reported with its traceback."""
import subprocess
import sys

import pytest

from tests.conftest import REPO
from tests.distributed import train_env
from tests.launch_common import assert_finished_run, submit

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def ray_head():
    from dcwdist.launch.ray_launcher import LocalHead

    env = dict(train_env(), PYTHONPATH=REPO)  # workers import tests.launch_faults
    head = LocalHead(num_cpus=2).start(env=env)
    yield head
    head.stop()


def test_ray_two_ranks_complete_and_record_config_and_code_version(ray_head, tmp_path):
    out = submit(str(tmp_path), "ray", "--nproc-per-node", "2", "--address", ray_head.address)
    text = out.stdout + out.stderr
    assert "rendezvous 127.0.0.1:" in text
    assert "(rank0 pid=" in text and "(rank1 pid=" in text  # worker logs streamed back
    assert "world=2 (dp=2 x cp=1)" in text and "all 2 rank(s) finished" in text
    assert_finished_run(str(tmp_path), "ray")


def test_failing_rank_is_reported_with_its_traceback(ray_head):
    driver = ("import sys; from dcwdist.launch.ray_launcher import run_ranks, RankFailure\n"
              "from tests.launch_faults import fail_on_rank\n"
              f"try: run_ranks({ray_head.address!r}, 2, fail_on_rank, (1,))\n"
              "except RankFailure as e: print('RANK', e.rank); print(e.traceback); sys.exit(1)\n")
    env = dict(train_env(), PYTHONPATH=REPO)
    res = subprocess.run([sys.executable, "-c", driver], env=env, cwd=REPO, capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 1, res.stdout + res.stderr
    assert "RANK 1" in res.stdout
    tb = res.stdout[res.stdout.index("RANK 1"):]
    assert "repr=rank1" in tb  # Ray writes its own header line instead of "Traceback ..."
    assert 'launch_faults.py", line' in tb and "in fail_on_rank" in tb
    assert "ValueError: rank 1 of 2 failed on purpose" in tb
