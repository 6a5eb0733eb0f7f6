"""Shared by tests/test_launch_*.py: a tiny 2-rank job, `dcwdist submit` as a real process, and
the checks every finished launch must pass (summary, config snapshot, code version)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import yaml

from tests.conftest import REPO
from tests.distributed import SMALL, TINY, train_env

# SMALL with one step per stage (the stage switch still happens) on the DeepSpeed engine.
JOB = SMALL + ["stages.0.steps=1", "stages.1.steps=1", "zero.enabled=true"]


def submit(run_dir: str, to: str, *extra: str, overrides=JOB, env=None, timeout=240,
           check=True) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "dcwdist.cli", "submit", TINY, "--to", to, "--run-dir", run_dir,
           *extra, *overrides]
    out = subprocess.run(cmd, env=env or train_env(), cwd=REPO, capture_output=True, text=True,
                         timeout=timeout)
    if check and out.returncode != 0:
        raise AssertionError(f"submit exited {out.returncode}\n{out.stdout[-4000:]}\n"
                             f"{out.stderr[-6000:]}")
    return out


def assert_finished_run(run_dir: str, launcher: str, world_size: int = 2) -> dict:
    """The job completed and its run dir holds the config snapshot and the code version."""
    summary = json.load(open(os.path.join(run_dir, "summary.json")))
    assert summary["steps"] == 2 and not summary["stopped"]
    snapshot = yaml.safe_load(open(os.path.join(run_dir, "launch", "config.yaml")))
    assert snapshot["zero"]["enabled"] is True and snapshot["model"]["dim"] == 64
    assert os.path.exists(os.path.join(run_dir, "config.yaml"))  # the trainer's own copy
    record = json.load(open(os.path.join(run_dir, "launch", "record.json")))
    assert record["launcher"] == launcher and record["world_size"] == world_size
    code = record["code"]
    assert code["version"]
    if os.path.isdir(os.path.join(REPO, ".git")):
        assert len(code["git_commit"]) == 40 and code["git_describe"]
    return record
