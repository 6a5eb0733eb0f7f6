"""Ray: one actor per rank in a placement group; rank 0's actor names the rendezvous (its node
address and a free port there); each actor sets the torchrun variables and runs the trainer
in-process. Worker output streams back to the driver prefixed with the rank; the first rank
that fails is reported with its remote traceback, and the others are killed (they would wait
forever in a collective).

The driver (this process) must run on a node of the cluster (`--address HOST:6379` or
`RAY_ADDRESS`); for a remote cluster wrap it in `ray job submit -- dcwdist submit ...`.
`--ray-start-local` starts a private head here (LocalHead) and stops it afterwards.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import Callable, Optional, Sequence

from dcwdist.launch.config import Job
from dcwdist.launch.record import write_record


class RankFailure(RuntimeError):
    def __init__(self, rank: int, traceback: str):
        super().__init__(f"rank {rank} failed:\n{traceback}")
        self.rank, self.traceback = rank, traceback


class LocalHead:
    """`ray start --head --block` on 127.0.0.1 in its own session; stop() ends only it."""

    def __init__(self, num_cpus: int, num_gpus: int = 0, temp_dir: Optional[str] = None):
        self.num_cpus, self.num_gpus = num_cpus, num_gpus
        # Ray keeps unix sockets under temp_dir: keep the path short.
        self.own_dir = temp_dir is None
        self.temp_dir = temp_dir or tempfile.mkdtemp(prefix="dcwray-", dir="/tmp")
        self.port = _free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.proc: Optional[subprocess.Popen] = None

    def start(self, timeout: float = 60.0, env: Optional[dict] = None) -> "LocalHead":
        ray_bin = os.path.join(os.path.dirname(sys.executable), "ray")
        ray_bin = ray_bin if os.path.exists(ray_bin) else shutil.which("ray") or "ray"
        cmd = [ray_bin, "start", "--head", "--block", "--node-ip-address", "127.0.0.1",
               "--port", str(self.port), "--num-cpus", str(self.num_cpus),
               "--num-gpus", str(self.num_gpus), "--temp-dir", self.temp_dir,
               "--disable-usage-stats", "--include-dashboard", "false",
               "--dashboard-host", "127.0.0.1"]
        env = dict(os.environ if env is None else env,
                   RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")  # keep 127.0.0.1 (see _stay_on_loopback)
        self.log = os.path.join(self.temp_dir, "ray_start.log")
        self.proc = subprocess.Popen(cmd, env=env, stdout=open(self.log, "w"),
                                     stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + timeout
        while time.time() < deadline:  # ready once the raylet's socket exists
            if self.proc.poll() is not None:
                raise RuntimeError(f"ray start exited {self.proc.returncode}: "
                                   f"{open(self.log).read()[-2000:]}")
            sockets = os.path.join(self.temp_dir, "session_latest", "sockets")
            if os.path.exists(os.path.join(sockets, "raylet")):
                return self
            time.sleep(0.2)
        tail = open(self.log).read()[-2000:]
        self.stop()
        raise RuntimeError(f"ray head not up after {timeout:.0f} s: {tail}")

    def stop(self, timeout: float = 30.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.kill(self.proc.pid, signal.SIGTERM)  # `ray start --block` stops its processes
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # leftovers of our session only
        except ProcessLookupError:
            pass
        self.proc.wait()
        if self.own_dir:  # session logs; the job's output was streamed already
            shutil.rmtree(self.temp_dir, ignore_errors=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train(argv: list[str]) -> int:
    from dcwdist.cli import main
    rc = main(argv)
    if rc:
        raise RuntimeError(f"dcwdist {' '.join(argv)} exited {rc} (see the log above)")
    return rc


def _make_worker_class():
    import ray

    @ray.remote
    class RankWorker:
        def __init__(self, rank: int, workdir: str, env: dict):
            self.rank = rank
            os.environ.update(env)
            os.chdir(workdir)

        def __repr__(self):  # Ray prefixes streamed log lines with it
            return f"rank{self.rank}"

        def where(self) -> tuple:
            ctx = ray.get_runtime_context()
            return (ctx.get_node_id(), ray.util.get_node_ip_address(),
                    [str(g) for g in ray.get_gpu_ids()], _free_port())

        def run(self, env: dict, fn: Callable, args: Sequence):
            os.environ.update(env)
            return fn(*args)

    return RankWorker


def run_ranks(address: str, world_size: int, fn: Callable, args: Sequence = (),
              env: Optional[dict] = None, workdir: Optional[str] = None,
              cpus_per_rank: float = 1, gpus_per_rank: float = 0,
              echo: Callable = print) -> list:
    """Run fn(*args) on `world_size` ranks with torchrun-style variables set; returns their
    results in rank order, or raises RankFailure for the first rank that raised."""
    if address.split(":")[0] in ("127.0.0.1", "localhost"):
        _stay_on_loopback()
    import ray
    from ray.exceptions import RayError
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    ray.init(address=address, log_to_driver=True, logging_level="WARNING")
    pg, workers = None, []
    try:
        bundle = {"CPU": cpus_per_rank, **({"GPU": gpus_per_rank} if gpus_per_rank else {})}
        pg = placement_group([dict(bundle) for _ in range(world_size)], strategy="PACK")
        if not pg.wait(timeout_seconds=120):
            raise RuntimeError(f"Ray cannot place {world_size} x {bundle} "
                               f"(cluster: {ray.cluster_resources()})")
        cls = _make_worker_class()
        workers = [cls.options(num_cpus=cpus_per_rank, num_gpus=gpus_per_rank,
                               scheduling_strategy=PlacementGroupSchedulingStrategy(
                                   pg, placement_group_bundle_index=r)).remote(
                                       r, workdir or os.getcwd(), env or {})
                   for r in range(world_size)]
        where = ray.get([w.where.remote() for w in workers])
        master_addr, master_port = where[0][1], where[0][3]
        echo(f"dcwdist: ray: {world_size} rank(s) on {len({w[0] for w in where})} node(s), "
             f"rendezvous {master_addr}:{master_port}")
        refs = [w.run.remote(_rank_env(r, where, master_addr, master_port), fn, args)
                for r, w in enumerate(workers)]
        rank_of = {ref: r for r, ref in enumerate(refs)}
        pending, results = list(refs), {}
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            ref = done[0]
            try:
                results[rank_of[ref]] = ray.get(ref)
            except RayError as e:  # the remote traceback of a raise; else why the actor died
                text = getattr(e, "traceback_str", None) or str(e)
                raise RankFailure(rank_of[ref], re.sub(r"\x1b\[[0-9;]*m", "", text)) from None
        return [results[r] for r in range(world_size)]
    finally:
        for w in workers:
            ray.kill(w)
        if pg is not None:
            remove_placement_group(pg)
        ray.shutdown()


def _stay_on_loopback() -> None:
    """Ray swaps a loopback address for the eth0 one (then cannot reach a head bound to
    127.0.0.1) unless its 'cluster on Windows/OSX' switch is off: set it before and after import."""
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    if "ray" in sys.modules:
        from ray._private import ray_constants
        ray_constants.ENABLE_RAY_CLUSTER = False


def _rank_env(rank: int, where: list, addr: str, port: int) -> dict:
    """torchrun variables; LOCAL_RANK counts ranks on the same node, whose GPUs are all made
    visible to each of them (in rank order) so LOCAL_RANK indexes the right device."""
    node = where[rank][0]
    same = [r for r in range(len(where)) if where[r][0] == node]
    env = {"RANK": str(rank), "WORLD_SIZE": str(len(where)),
           "LOCAL_RANK": str(same.index(rank)), "LOCAL_WORLD_SIZE": str(len(same)),
           "MASTER_ADDR": addr, "MASTER_PORT": str(port)}
    gpus = [g for r in same for g in where[r][2]]
    if gpus:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(gpus)
    return env


def run(job: Job) -> int:
    lc = job.launch
    address = lc.address or os.environ.get("RAY_ADDRESS")
    if job.launch.dry_run:
        print(f"ray: {lc.world_size} actor(s) x {{CPU: {lc.cpus_per_rank}"
              f"{', GPU: 1' if lc.gpus_per_node else ''}}} in a PACK placement group on "
              f"{'a local head (ray start --head)' if lc.ray_start_local else address}, "
              f"each running: {' '.join(job.train_argv()[1:])}")
        return 0
    if not address and not lc.ray_start_local:
        raise ValueError("--to ray needs --address HOST:PORT, RAY_ADDRESS, or --ray-start-local")
    write_record(job, ["ray", address or "local-head"])
    head = None
    if lc.ray_start_local:
        head = LocalHead(num_cpus=max(lc.world_size * lc.cpus_per_rank, os.cpu_count() or 1),
                         num_gpus=lc.gpus_per_node).start()
        address = head.address
        print(f"dcwdist: started a local Ray head at {address} ({head.temp_dir})", flush=True)
    try:
        run_ranks(address, lc.world_size, _train, (job.train_argv()[3:],),
                  env=job.env_defaults(os.environ), workdir=lc.workdir,
                  cpus_per_rank=lc.cpus_per_rank, gpus_per_rank=1 if lc.gpus_per_node else 0)
    except RankFailure as e:
        print(f"dcwdist: ray: {e}", file=sys.stderr)
        return 1
    finally:
        if head is not None:
            head.stop()
    print(f"dcwdist: ray: all {lc.world_size} rank(s) finished -> {job.run_dir}")
    return 0
