"""A real single-node Slurm cluster on localhost for tests: munged + slurmctld + slurmd from a
temp directory, private ports, private munge socket and key (nothing under /etc is touched).

Client commands (sbatch, squeue, scancel, scontrol, srun) find it through SLURM_CONF, which
`SlurmCluster.env()` sets. Run `python -m tests.slurm_cluster` to keep one up by hand.
Gotchas (PLATFORM_NOTES): proctrack/cgroup fails silently (jobs COMPLETED with no output, node
drains) so proctrack/linuxproc; the node line must match the hardware (`slurmd -C`); a requeued
job waits cred_expire (default 120 s) before it may start again, so it is 5 s here.
"""
from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time

SLURM_CONF = """\
ClusterName=dcwtest
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={munge_socket},cred_expire=5
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd.pid
SlurmctldLogFile={d}/slurmctld.log
SlurmdLogFile={d}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
MailProg=/bin/true
MpiDefault=none
ReturnToService=2
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
KillWait=10
MinJobAge=600
SchedulerParameters=sched_interval=1
{node} NodeAddr=127.0.0.1 RealMemory={mem}
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def installed() -> bool:
    return all(shutil.which(b) for b in ("sbatch", "slurmctld", "slurmd", "munged"))


class SlurmCluster:
    def __init__(self, root: str | None = None):
        # Short path: munge and slurm keep unix sockets under it.
        self.own_dir = root is None
        self.dir = root or tempfile.mkdtemp(prefix="dcwslurm-", dir="/tmp")
        self.conf = os.path.join(self.dir, "slurm.conf")
        self.munge_socket = os.path.join(self.dir, "munge", "munge.socket")
        self.procs: list[subprocess.Popen] = []

    def env(self, base: dict | None = None) -> dict:
        env = dict(os.environ if base is None else base)
        env["SLURM_CONF"] = self.conf
        return env

    # -- lifecycle ------------------------------------------------------------------------
    def start(self, timeout: float = 30.0) -> "SlurmCluster":
        try:
            self._start_munge()
            self._write_conf()
            for daemon in ("slurmctld", "slurmd"):
                log = open(os.path.join(self.dir, f"{daemon}.stdout"), "w")
                self.procs.append(subprocess.Popen([daemon, "-D"], env=self.env(), stdout=log,
                                                   stderr=subprocess.STDOUT,
                                                   start_new_session=True))
            self._wait_idle(timeout)
        except BaseException:
            self.stop(remove=False)  # keep the logs the error points at
            raise
        return self

    def _start_munge(self) -> None:
        munge = pwd.getpwnam("munge")
        mdir = os.path.dirname(self.munge_socket)
        os.makedirs(mdir)
        os.chmod(self.dir, 0o755)
        key = os.path.join(mdir, "munge.key")
        with open(key, "wb") as f:
            f.write(os.urandom(1024))
        os.chmod(key, 0o400)
        for path in (mdir, key):
            os.chown(path, munge.pw_uid, munge.pw_gid)
        os.chmod(mdir, 0o755)  # munged: "execute permissions for all required"
        cmd = ["runuser", "-u", "munge", "--", "munged", "-F", f"--socket={self.munge_socket}",
               f"--key-file={key}", f"--log-file={mdir}/munged.log",
               f"--pid-file={mdir}/munged.pid", f"--seed-file={mdir}/munged.seed"]
        self.procs.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL,
                                           stderr=subprocess.DEVNULL, start_new_session=True))
        deadline = time.time() + 10
        while not os.path.exists(self.munge_socket):
            if self.procs[-1].poll() is not None or time.time() > deadline:
                raise RuntimeError(f"munged did not start (see {mdir}/munged.log)")
            time.sleep(0.1)

    def _write_conf(self) -> None:
        for sub in ("state", "spool"):
            os.makedirs(os.path.join(self.dir, sub), exist_ok=True)
        node = subprocess.run(["slurmd", "-C"], capture_output=True, text=True,
                              check=True).stdout.splitlines()[0]
        host = node.split()[0].split("=", 1)[1]
        node = " ".join(w for w in node.split() if not w.startswith("RealMemory="))
        with open(self.conf, "w") as f:
            f.write(SLURM_CONF.format(host=host, d=self.dir, node=node, mem=1000,
                                      munge_socket=self.munge_socket, ctld_port=_free_port(),
                                      slurmd_port=_free_port()))
        self.host = host

    def _wait_idle(self, timeout: float) -> None:
        deadline = time.time() + timeout
        out = ""
        while time.time() < deadline:
            for p in self.procs:
                if p.poll() is not None:
                    raise RuntimeError(f"{p.args[0]} exited {p.returncode}; logs in {self.dir}")
            r = subprocess.run(["sinfo", "-h", "-o", "%T"], env=self.env(), capture_output=True,
                               text=True)
            out = r.stdout.strip() + r.stderr.strip()
            if r.returncode == 0 and out.startswith("idle"):
                return
            time.sleep(0.3)
        raise RuntimeError(f"slurm node not idle after {timeout:.0f} s ({out!r}); logs in "
                           f"{self.dir}")

    def stop(self, remove: bool = True) -> None:
        """Stop the daemons we started, by PID (their own sessions), slurmd first; remove the
        temp dir (state, logs) when we made it."""
        for p in reversed(self.procs):
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        for p in reversed(self.procs):
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        self.procs.clear()
        if remove and self.own_dir:
            shutil.rmtree(self.dir, ignore_errors=True)

    def logs(self) -> str:
        out = []
        for name in ("slurmctld.log", "slurmd.log"):
            path = os.path.join(self.dir, name)
            if os.path.exists(path):
                out.append(f"== {name}\n" + open(path).read()[-3000:])
        return "\n".join(out)


try:
    import pytest

    @pytest.fixture(scope="session")
    def slurm_cluster():
        """A started SlurmCluster; skipped only when Slurm is not installed."""
        if not installed():
            pytest.skip("Slurm is not installed (apt-get install slurm-wlm munge; CI does)")
        cluster = SlurmCluster().start()
        yield cluster
        cluster.stop()
except ImportError:  # used outside pytest
    pass


if __name__ == "__main__":
    cluster = SlurmCluster().start()
    print(f"export SLURM_CONF={cluster.conf}   # Ctrl-C stops the cluster")
    try:
        signal.pause()
    except KeyboardInterrupt:
        pass
    finally:
        cluster.stop()
