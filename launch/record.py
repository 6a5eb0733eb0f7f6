"""What ran: the launchers (never the trainer) write RUN_DIR/launch/ before any rank starts.

  launch/config.yaml   the resolved config every rank trains from (recipe + overrides)
  launch/record.json   code version (git describe/commit/dirty, else the package version),
                       launcher, options, submit command, host, time; later events appended
                       (job id, nodes, requeues) by `python -m dcwdist.launch.record RUN_DIR`
  launch/git.diff      uncommitted changes to tracked files, when the checkout is dirty
  launch/job.sbatch    the rendered batch script (Slurm)
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import os
import socket
import subprocess
import sys
from typing import Optional

MAX_DIFF_BYTES = 2 << 20


def _git(root: str, *args: str) -> Optional[str]:
    try:  # safe.directory: a checkout owned by another user still reports its version
        out = subprocess.run(["git", "-c", "safe.directory=*", "-C", root, *args],
                             capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout if out.returncode == 0 else None


def package_version() -> str:
    try:
        from importlib.metadata import version
        return version("dcwdist")
    except Exception:  # not installed: the source tree's own
        import dcwdist
        return getattr(dcwdist, "__version__", "unknown")


def code_version(root: Optional[str] = None) -> dict:
    """{'version', 'git_commit', 'git_describe', 'git_dirty', 'git_root'}; git keys only when
    the package's source lives in a git checkout."""
    import dcwdist
    root = root or os.path.dirname(os.path.dirname(os.path.abspath(dcwdist.__file__)))
    info: dict = {"package": "dcwdist", "version": package_version()}
    commit = _git(root, "rev-parse", "HEAD")
    if commit:
        status = _git(root, "status", "--porcelain", "--untracked-files=no") or ""
        info.update(git_root=_git(root, "rev-parse", "--show-toplevel").strip(),
                    git_commit=commit.strip(), git_dirty=bool(status.strip()),
                    git_describe=(_git(root, "describe", "--always", "--dirty", "--tags")
                                  or commit[:12]).strip())
    return info


def describe(info: dict) -> str:
    """One line, e.g. 'dcwdist 0.1.0 (cd9deff-dirty)'."""
    return f"dcwdist {info['version']}" + (f" ({info['git_describe']})"
                                           if "git_describe" in info else "")


def launch_dir(run_dir: str) -> str:
    return os.path.join(run_dir, "launch")


def write_record(job, launcher_cmd: Optional[list[str]] = None, extra_files: dict = None) -> dict:
    """Write config snapshot + record.json (+ git.diff, extra files) into RUN_DIR/launch/."""
    from dcwdist.config import dump_config

    d = launch_dir(job.run_dir)
    os.makedirs(d, exist_ok=True)
    dump_config(job.cfg, job.config_path)
    code = code_version()
    if code.get("git_dirty"):
        diff = _git(code["git_root"], "diff", "HEAD") or ""
        with open(os.path.join(d, "git.diff"), "w") as f:
            f.write(diff[:MAX_DIFF_BYTES])
    for name, text in (extra_files or {}).items():
        with open(os.path.join(d, name), "w") as f:
            f.write(text)
    record = {
        "launcher": job.launch.to,
        "created": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "host": socket.gethostname(),
        "user": os.environ.get("USER") or str(os.getuid()),
        "submit_command": sys.argv,
        "launcher_command": launcher_cmd,
        "train_command": job.train_argv(),
        "world_size": job.launch.world_size,
        "code": code,
        "launch": dataclasses.asdict(job.launch),
        "events": [],
    }
    _dump(d, record)
    return record


def _dump(d: str, record: dict) -> None:
    tmp = os.path.join(d, "record.json.tmp")
    with open(tmp, "w") as f:
        json.dump(record, f, indent=1)
    os.replace(tmp, os.path.join(d, "record.json"))


def read_record(run_dir: str) -> dict:
    with open(os.path.join(launch_dir(run_dir), "record.json")) as f:
        return json.load(f)


def note(run_dir: str, **fields) -> dict:
    """Append an event (job id, nodes, start of a requeued run ...) to record.json."""
    record = read_record(run_dir)
    fields.setdefault("time", datetime.datetime.now().astimezone().isoformat(timespec="seconds"))
    record["events"].append(fields)
    if "job_id" in fields:
        record["job_id"] = fields["job_id"]
    _dump(launch_dir(run_dir), record)
    return record


def _main(argv: list[str]) -> int:
    """`python -m dcwdist.launch.record RUN_DIR [key=value ...]`: note the start of a batch job
    with the scheduler's variables (Slurm job id, node list, restart count)."""
    if not argv:
        print(_main.__doc__, file=sys.stderr)
        return 2
    fields = dict(kv.split("=", 1) for kv in argv[1:])
    for var, key in (("SLURM_JOB_ID", "job_id"), ("SLURM_JOB_NODELIST", "nodes"),
                     ("SLURM_RESTART_COUNT", "restart_count")):
        if var in os.environ:
            fields.setdefault(key, os.environ[var])
    note(argv[0], event=fields.pop("event", "start"), host=socket.gethostname(), **fields)
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))


def run_blocking(job, cmd: list[str], banner: str) -> int:
    """Print (dry run) or record and run a launcher command in the foreground; its exit code."""
    import shlex
    if job.launch.dry_run:
        print(shlex.join(cmd))
        return 0
    write_record(job, cmd)
    print(f"dcwdist: {banner} -> {job.run_dir}", flush=True)
    return subprocess.run(cmd, env=job.worker_env(), cwd=job.launch.workdir).returncode
