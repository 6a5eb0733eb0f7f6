"""`dcwdist submit | status | cancel` (registered into dcwdist.cli's parser)."""
from __future__ import annotations

import argparse

SUBMIT_HELP = """Resolve RECIPE + overrides into RUN_DIR/launch/config.yaml (with the code version
in RUN_DIR/launch/record.json), then start `dcwdist train` on every rank:

  local  torchrun (python -m torch.distributed.run) with --nproc-per-node ranks, in the foreground
  mpi    mpirun -np NODES*NPROC (Open MPI or MPICH; --allow-run-as-root --oversubscribe as root)
  slurm  render slurm/train.sbatch (--signal=USR1@120, --requeue, master = first host of
         `scontrol show hostnames`) and sbatch it; prints the job id; --dry-run prints the script
  ray    one actor per rank in a placement group on --address / RAY_ADDRESS, or on a private
         head with --ray-start-local; logs stream back, a failing rank prints its traceback

Several ranks need zero.enabled=true. Examples:
  dcwdist submit recipes/tiny_cpu.yaml --to local --nproc-per-node 2 zero.enabled=true
  dcwdist submit recipes/llama_1b_4k_to_128k.yaml --to slurm --nodes 4 --gpus-per-node 8 \\
      --time 24:00:00 --partition gpu --account myproj zero.enabled=true --dry-run"""


def cmd_submit(args) -> int:
    from dcwdist.launch.config import LaunchConfig, prepare

    lc = LaunchConfig(
        recipe=args.recipe, overrides=list(args.overrides), to=args.to, run_dir=args.run_dir,
        nodes=args.nodes, nproc_per_node=args.nproc_per_node, gpus_per_node=args.gpus_per_node,
        cpus_per_rank=args.cpus_per_rank, time=args.time, partition=args.partition,
        account=args.account, job_name=args.job_name, sbatch_args=list(args.sbatch_arg),
        signal_before=args.signal_before, max_requeues=args.max_requeues,
        master_port=args.master_port, master_addr=args.master_addr, hostfile=args.hostfile,
        address=args.address, ray_start_local=args.ray_start_local, dry_run=args.dry_run)
    job = prepare(lc)
    if lc.to == "slurm":
        from dcwdist.launch import slurm
        return slurm.submit(job, args.template or slurm.TEMPLATE)
    if lc.to == "mpi":
        from dcwdist.launch import mpi
        return mpi.run(job)
    if lc.to == "ray":
        from dcwdist.launch import ray_launcher
        return ray_launcher.run(job)
    from dcwdist.launch import local
    return local.run(job)


def cmd_status(args) -> int:
    from dcwdist.launch import slurm
    return slurm.status(args.job)


def cmd_cancel(args) -> int:
    from dcwdist.launch import slurm
    if args.final and not args.signal:
        raise ValueError("--final goes with --signal (a plain cancel never requeues)")
    return slurm.cancel(args.job, args.signal, args.final)


def register(sub) -> None:
    p = sub.add_parser("submit", help="launch training on local ranks, mpirun, Slurm or Ray",
                       description=SUBMIT_HELP,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("recipe", help="YAML recipe, e.g. recipes/tiny_cpu.yaml")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. zero.enabled=true")
    p.add_argument("--to", default="local", choices=("local", "slurm", "ray", "mpi"),
                   help="launcher (default: local)")
    p.add_argument("--run-dir", default=None, help="output folder (default: logging.run_dir)")
    g = p.add_argument_group("shape")
    g.add_argument("--nodes", type=int, default=1, help="nodes (slurm, mpi, ray)")
    g.add_argument("--nproc-per-node", type=int, default=0,
                   help="ranks per node (default: --gpus-per-node, or 1)")
    g.add_argument("--gpus-per-node", type=int, default=0, help="GPUs per node, one per rank")
    g.add_argument("--cpus-per-rank", type=int, default=1,
                   help="CPUs per rank (slurm --cpus-per-task, ray bundle, OMP_NUM_THREADS)")
    g = p.add_argument_group("slurm")
    g.add_argument("--time", default="01:00:00", help="time limit, e.g. 24:00:00")
    g.add_argument("--partition", default=None, help="partition (default: the cluster's)")
    g.add_argument("--account", default=None, help="account to charge")
    g.add_argument("--job-name", default=None, help="job name (default: the config's name)")
    g.add_argument("--sbatch-arg", action="append", default=[], metavar="OPT",
                   help="extra #SBATCH option, repeatable, e.g. --sbatch-arg=--qos=high")
    g.add_argument("--signal-before", type=int, default=120, metavar="S",
                   help="send SIGUSR1 (checkpoint and stop) S seconds before the limit")
    g.add_argument("--max-requeues", type=int, default=3,
                   help="requeue a job stopped before its last step at most this often")
    g.add_argument("--template", default=None, help="sbatch template (default slurm/train.sbatch)")
    g = p.add_argument_group("mpi")
    g.add_argument("--hostfile", default=None, help="mpirun host file (default: this node)")
    g.add_argument("--master-addr", default=None,
                   help="rendezvous host (default 127.0.0.1 or the hostfile's first)")
    g.add_argument("--master-port", type=int, default=0, help="rendezvous port (default: free)")
    g = p.add_argument_group("ray")
    g.add_argument("--address", default=None, help="Ray GCS address HOST:PORT or auto "
                   "(default: $RAY_ADDRESS)")
    g.add_argument("--ray-start-local", action="store_true",
                   help="start a private Ray head on 127.0.0.1 for this job, stop it after")
    p.add_argument("--dry-run", action="store_true",
                   help="print the sbatch script / command instead of running it")
    p.set_defaults(func=cmd_submit)

    p = sub.add_parser("status", help="state of a Slurm job",
                       description="State, elapsed time, nodes, exit code and log of a Slurm "
                       "job (squeue/scontrol, sacct when the job has left the controller).")
    p.add_argument("job", help="Slurm job id, or a run directory submitted with --to slurm")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("cancel", help="cancel a Slurm job (or signal it to checkpoint)",
                       description="scancel a job. With --signal USR1 (or TERM) every rank "
                       "checkpoints at the end of its step and exits 0 instead of dying; a job "
                       "that has requeues left then requeues itself and resumes, unless --final.")
    p.add_argument("job", help="Slurm job id, or a run directory submitted with --to slurm")
    p.add_argument("--signal", default=None, metavar="SIG",
                   help="send SIG (e.g. USR1) instead of cancelling")
    p.add_argument("--final", action="store_true",
                   help="with --signal: turn requeueing off first, so the job stops for good")
    p.set_defaults(func=cmd_cancel)
