"""Slurm: render slurm/train.sbatch from the LaunchConfig, record, sbatch; status and cancel.

Every rank is an `srun` task running `python -m dcwdist.cli train SNAPSHOT`; the trainer reads
SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID (dcwdist.parallel.env) and the script exports the
rendezvous (first host of `scontrol show hostnames`, a port derived from the job id).
"""
from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys

from dcwdist.launch.config import Job
from dcwdist.launch.record import note, read_record, write_record

TEMPLATE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "slurm",
                        "train.sbatch")
_SAFE = re.compile(r"^[\w@%+=:,./-]+$")


def _check_safe(what: str, value: str) -> str:
    if not _SAFE.match(value):
        raise ValueError(f"{what} {value!r}: only letters, digits and @%+=:,./- are allowed "
                         "in Slurm paths and names")
    return value


def render(job: Job, template: str = TEMPLATE) -> str:
    lc = job.launch
    optional = []
    if lc.gpus_per_node:
        optional.append(f"--gpus-per-node={lc.gpus_per_node}")
    if lc.partition:
        optional.append(f"--partition={lc.partition}")
    if lc.account:
        optional.append(f"--account={lc.account}")
    optional += lc.sbatch_args
    env = job.env_defaults(os.environ)
    values = {
        "job_name": _check_safe("job name", lc.job_name or job.cfg.name),
        "nodes": lc.nodes, "ntasks_per_node": lc.nproc_per_node,
        "cpus_per_task": lc.cpus_per_rank, "time": lc.time,
        "optional": "".join(f"#SBATCH {opt}\n" for opt in optional),
        "run_dir": _check_safe("run dir", job.run_dir),
        "workdir": shlex.quote(lc.workdir),
        "signal_before": lc.signal_before, "max_requeues": lc.max_requeues,
        "master_port": lc.master_port or "$((20000 + SLURM_JOB_ID % 20000))",
        "exports": "\n".join(f"export {k}={shlex.quote(v)}" for k, v in sorted(env.items())),
        "python": shlex.quote(lc.python),
        "train_command": shlex.join(job.train_argv()),
    }
    with open(template) as f:
        text = f.read()

    def sub(m):
        if m.group(1) not in values:
            raise ValueError(f"{template}: unknown placeholder {{{{{m.group(1)}}}}}")
        return str(values[m.group(1)])

    return re.sub(r"\{\{(\w+)\}\}", sub, text)


def _need(binary: str) -> str:
    path = shutil.which(binary)
    if not path:
        raise FileNotFoundError(f"{binary} not found: is this a Slurm login node? "
                                "(apt-get install slurm-wlm munge for a local test cluster)")
    return path


def submit(job: Job, template: str = TEMPLATE) -> int:
    script = render(job, template)
    if job.launch.dry_run:
        print(script, end="")
        return 0
    write_record(job, ["sbatch", os.path.join(job.run_dir, "launch", "job.sbatch")],
                 {"job.sbatch": script})
    path = os.path.join(job.run_dir, "launch", "job.sbatch")
    out = subprocess.run([_need("sbatch"), "--parsable", path], capture_output=True, text=True,
                         cwd=job.launch.workdir)
    if out.returncode != 0:
        print(f"dcwdist: sbatch failed ({out.returncode}): {out.stderr.strip()}", file=sys.stderr)
        return out.returncode
    job_id = out.stdout.strip().split(";")[0]
    note(job.run_dir, event="submitted", job_id=job_id)
    lc = job.launch
    print(f"submitted Slurm job {job_id}: {lc.world_size} rank(s) on {lc.nodes} node(s) -> "
          f"{job.run_dir}\n"
          f"  follow: tail -f {job.run_dir}/slurm-{job_id}.out\n"
          f"  status: dcwdist status {job_id}\n"
          f"  stop:   dcwdist cancel {job_id}   (--signal USR1: checkpoint, then stop)")
    return 0


def resolve_job(job_or_run_dir: str) -> str:
    """A job id, or a run directory whose launch record holds one."""
    if os.path.isdir(job_or_run_dir):
        job_id = read_record(job_or_run_dir).get("job_id")
        if not job_id:
            raise ValueError(f"{job_or_run_dir}: its launch record has no Slurm job id")
        return str(job_id)
    if not re.match(r"^\d+(_\d+)?$", job_or_run_dir):
        raise ValueError(f"{job_or_run_dir!r} is neither a Slurm job id nor a run directory")
    return job_or_run_dir


def job_state(job_id: str) -> dict:
    """{'JobState', 'ExitCode', 'StdOut', ...} from squeue/scontrol; {} for an unknown job."""
    out = subprocess.run([_need("scontrol"), "show", "job", "-o", job_id], capture_output=True,
                         text=True)
    if out.returncode != 0 or not out.stdout.strip():
        return {}
    fields = {}
    for word in out.stdout.split():
        if "=" in word:
            key, value = word.split("=", 1)
            fields.setdefault(key, value)
    return fields


def status(job_or_run_dir: str) -> int:
    job_id = resolve_job(job_or_run_dir)
    state = job_state(job_id)
    if not state:
        sacct = shutil.which("sacct")
        if sacct:
            out = subprocess.run([sacct, "-X", "-n", "-j", job_id, "-o",
                                  "JobID,JobName,State,ExitCode,Elapsed"],
                                 capture_output=True, text=True)
            if out.returncode == 0 and out.stdout.strip():
                print(out.stdout.strip())
                return 0
        print(f"dcwdist: job {job_id} is unknown to Slurm (finished too long ago?)",
              file=sys.stderr)
        return 1
    print(f"job {job_id} ({state.get('JobName', '?')}): {state.get('JobState')}"
          f"{' (' + state['Reason'] + ')' if state.get('Reason') not in (None, 'None') else ''}"
          f", elapsed {state.get('RunTime')}, limit {state.get('TimeLimit')}, "
          f"nodes {state.get('NodeList') or '-'}, exit {state.get('ExitCode')}, "
          f"restarts {state.get('Restarts', 0)}")
    if state.get("StdOut"):
        print(f"  log: {state['StdOut']}")
    return 0


def cancel(job_or_run_dir: str, signal: str | None = None, final: bool = False) -> int:
    """scancel, or send `signal` to every rank; `final`: the job may not requeue itself."""
    job_id = resolve_job(job_or_run_dir)
    if final:
        out = subprocess.run([_need("scontrol"), "update", f"JobId={job_id}", "Requeue=0"],
                             capture_output=True, text=True)
        if out.returncode != 0:
            print(f"dcwdist: scontrol update failed: {out.stderr.strip()}", file=sys.stderr)
            return out.returncode
    cmd = [_need("scancel")] + ([f"--signal={signal}"] if signal else []) + [job_id]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        print(f"dcwdist: scancel failed: {out.stderr.strip()}", file=sys.stderr)
        return out.returncode
    print(f"sent {signal} to job {job_id}: ranks checkpoint and stop"
          f"{'' if final else ' (then it requeues itself if it has requeues left)'}"
          if signal else f"cancelled job {job_id}")
    return 0
