"""`dcwdist submit --to local`: torchrun with 2 real ranks; local and mpi dry runs; the config
is validated before anything starts."""
import shlex

from tests.launch_common import JOB, assert_finished_run, submit


def test_local_two_ranks_complete_and_record_config_and_code_version(tmp_path):
    out = submit(str(tmp_path), "local", "--nproc-per-node", "2")
    assert "world=2 (dp=2 x cp=1)" in out.stdout + out.stderr
    record = assert_finished_run(str(tmp_path), "local")
    assert "torch.distributed.run" in record["launcher_command"]


def test_dry_run_prints_the_command_and_writes_nothing(tmp_path):
    run_dir = tmp_path / "run"
    out = submit(str(run_dir), "local", "--nproc-per-node", "2", "--dry-run")
    cmd = shlex.split(out.stdout.strip())
    assert cmd[1:5] == ["-m", "torch.distributed.run", "--nnodes", "1"]
    assert cmd[cmd.index("--nproc-per-node") + 1] == "2"
    assert cmd[-5:] == ["dcwdist.cli", "train", f"{run_dir}/launch/config.yaml", "--run-dir",
                        str(run_dir)]
    assert not run_dir.exists()


def test_several_ranks_without_zero_are_refused_before_launch(tmp_path):
    out = submit(str(tmp_path / "r"), "local", "--nproc-per-node", "2",
                 overrides=[o for o in JOB if o != "zero.enabled=true"], check=False)
    assert out.returncode == 2 and "zero.enabled=true" in out.stderr
    assert not (tmp_path / "r").exists()
