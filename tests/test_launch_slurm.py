"""`dcwdist submit --to slurm` against a real single-node Slurm (munged + slurmctld + slurmd
started by the session fixture in tests/slurm_cluster.py): the rendered script, a 2-rank job
run by srun to completion, status, and SIGUSR1 -> checkpoint, exit 0, requeue, resume."""
import json
import os
import re
import subprocess
import sys
import time

from tests.conftest import REPO
from tests.distributed import train_env
from tests.launch_common import JOB, assert_finished_run, submit
from tests.slurm_cluster import slurm_cluster  # noqa: F401  (session fixture)


def dcwdist(env, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dcwdist.cli", *args], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=60)


def job_id_of(out: str) -> str:
    m = re.search(r"submitted Slurm job (\d+)", out)
    assert m, out
    return m.group(1)


def wait_state(env, job, states=("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"), timeout=400):
    deadline, line = time.time() + timeout, ""
    while time.time() < deadline:
        line = dcwdist(env, "status", job).stdout
        if any(f": {s}" in line for s in states):
            return line
        time.sleep(1)
    raise AssertionError(f"job {job} not in {states} after {timeout} s: {line}")


def test_dry_run_renders_the_sbatch_script(tmp_path):
    run_dir = tmp_path / "run"
    out = submit(str(run_dir), "slurm", "--nodes", "2", "--gpus-per-node", "4", "--time",
                 "02:00:00", "--partition", "gpu", "--account", "proj", "--sbatch-arg=--qos=hi",
                 "--dry-run")
    lines = out.stdout.splitlines()
    for expected in ("#!/bin/bash", "#SBATCH --job-name=tiny_cpu", "#SBATCH --nodes=2",
                     "#SBATCH --ntasks-per-node=4", "#SBATCH --gpus-per-node=4",
                     "#SBATCH --time=02:00:00", "#SBATCH --partition=gpu",
                     "#SBATCH --account=proj", "#SBATCH --qos=hi",
                     f"#SBATCH --output={run_dir}/slurm-%j.out", "#SBATCH --signal=USR1@120",
                     "#SBATCH --requeue",
                     'export MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | '
                     'head -n 1)'):
        assert expected in lines, f"missing {expected!r} in\n{out.stdout}"
    srun = [line for line in lines if line.startswith("srun ")]
    assert srun == [f"srun --kill-on-bad-exit=1 {sys.executable} -m dcwdist.cli train "
                    f"{run_dir}/launch/config.yaml --run-dir {run_dir}"]
    assert not any("DS_ACCELERATOR" in line for line in lines)  # GPU job: DeepSpeed picks
    assert not run_dir.exists()
    cpu = submit(str(run_dir), "slurm", "--nproc-per-node", "2", "--dry-run").stdout
    assert "#SBATCH --ntasks-per-node=2" in cpu and "export DS_ACCELERATOR=cpu" in cpu
    assert "--gpus-per-node" not in cpu and "--partition" not in cpu


def test_srun_job_completes_and_records_config_and_code_version(slurm_cluster, tmp_path):
    env = slurm_cluster.env(train_env())
    out = submit(str(tmp_path), "slurm", "--nproc-per-node", "2", "--time", "00:10:00", env=env)
    job = job_id_of(out.stdout)
    assert f"tail -f {tmp_path}/slurm-{job}.out" in out.stdout
    line = wait_state(env, job)
    log = open(tmp_path / f"slurm-{job}.out").read()
    assert ": COMPLETED" in line, f"{line}\n{log[-3000:]}\n{slurm_cluster.logs()}"
    assert "world=2 (dp=2 x cp=1)" in log and f"dcwdist: job {job} on " in log
    record = assert_finished_run(str(tmp_path), "slurm")
    assert record["job_id"] == job
    start = [e for e in record["events"] if e["event"] == "start"]
    assert start and start[0]["nodes"] == slurm_cluster.host
    assert open(tmp_path / "launch" / "job.sbatch").read().startswith("#!/bin/bash")
    assert dcwdist(env, "status", str(tmp_path)).stdout.startswith(f"job {job} ")


def test_sigusr1_checkpoints_exits_zero_then_requeues_and_resumes(slurm_cluster, tmp_path):
    env = slurm_cluster.env(train_env())
    over = [o for o in JOB if not o.startswith("stages.0.steps")] + ["stages.0.steps=80"]
    out = submit(str(tmp_path), "slurm", "--nproc-per-node", "2", "--max-requeues", "1",
                 overrides=over, env=env)
    job = job_id_of(out.stdout)
    deadline = time.time() + 150
    while not (tmp_path / "last_step").exists():  # handlers are installed: training runs
        assert time.time() < deadline, open(tmp_path / f"slurm-{job}.out").read()[-3000:]
        time.sleep(0.1)
    sent = dcwdist(env, "cancel", job, "--signal", "USR1")
    assert sent.returncode == 0 and "sent USR1" in sent.stdout, sent.stderr
    line = wait_state(env, job)
    log = open(tmp_path / f"slurm-{job}.out").read()
    assert ": COMPLETED" in line and "restarts 1" in line, f"{line}\n{log[-4000:]}"
    first, second = log.split("requeueing job")
    stopped = re.search(r"stopped by SIGUSR1 at step (\d+); checkpoint saved", first)
    assert stopped, first[-3000:]
    assert f"saved checkpoint step{int(stopped.group(1)):08d}" in first
    assert f"resumed at step {stopped.group(1)}" in second
    summary = json.load(open(tmp_path / "summary.json"))
    assert summary["steps"] == 81 and not summary["stopped"]
    events = [e["event"] for e in json.load(open(tmp_path / "launch" / "record.json"))["events"]]
    assert events == ["submitted", "start", "requeue", "start"]  # requeue only after exit 0
    assert os.path.exists(tmp_path / "checkpoints" / "step00000081")


def test_plain_srun_rendezvous_is_the_first_host_of_the_allocation(slurm_cluster, monkeypatch):
    from dcwdist.parallel.env import export_torch_env, read_dist_env

    monkeypatch.setenv("SLURM_CONF", slurm_cluster.conf)  # scontrol needs the cluster config
    env = {"SLURM_PROCID": "3", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1",
           "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_JOB_ID": "4321"}
    dist_env = read_dist_env(env)
    assert (dist_env.rank, dist_env.world_size, dist_env.local_rank) == (3, 8, 1)
    export_torch_env(dist_env, env)
    assert (env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"]) == ("3", "8", "1")
    assert env["MASTER_ADDR"] == "gpu07" and env["MASTER_PORT"] == "24321"
