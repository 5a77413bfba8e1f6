"""A private SLURM cluster for tests: its own munged, slurmctld and slurmd(s), all under one temp dir.

Nothing system-wide is used or touched except the installed binaries: the
munge key and socket, the ports, state, spool and logs are the cluster's own,
so a cluster left by another test session (or a real SLURM on the machine)
keeps running undisturbed. Clients find it through SLURM_CONF.

This host is two nodes, each a slurmd of its own, named by loopback addresses
(127.0.0.1 and 127.0.0.2: Linux routes all of 127/8 to this host), so that
multi-node jobs run for real: one task per node, a per-node SLURM_NODEID, a
master address taken from the node list that every node can reach.

    python -m tests.slurm.cluster      # start one by hand; prints the SLURM_CONF to export; Ctrl-C stops it
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol")
NODES = ("127.0.0.1", "127.0.0.2")


class ClusterUnavailable(RuntimeError):
    """SLURM cannot be installed or started here; the message says why."""


def install_slurm() -> None:
    """Install slurm-wlm and munge with apt when they are missing (root only)."""
    if all(shutil.which(d) or Path("/usr/sbin", d).exists() for d in DAEMONS):
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise ClusterUnavailable("slurmctld/slurmd/munged are not installed and cannot be: installing them needs "
                                 "root and apt-get (Debian/Ubuntu: apt-get install slurm-wlm munge)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    wait_lock = ["-o", "DPkg::Lock::Timeout=300"]  # another apt (a parallel test session) may hold the lock
    for command in (["apt-get", *wait_lock, "update", "-qq"],
                    ["apt-get", *wait_lock, "install", "-y", "-qq", "slurm-wlm", "munge"]):
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
        if done.returncode != 0:
            raise ClusterUnavailable(f"`{' '.join(command)}` failed ({done.returncode}): {done.stderr[-1500:]}")


def _daemon(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin", name))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _memory_mb() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) // 1024 - 512  # a little under the total: more than exists drains a node
    return 1024


def _host() -> str:
    return socket.gethostname().split(".")[0]


class SlurmCluster:
    """One partition of this host's nodes (all its CPUs each); jobs run as the submitting user (root)."""

    def __init__(self, root: Path | None = None):
        self.root = Path(root or tempfile.mkdtemp(prefix="ava-slurm-"))
        self.conf = self.root / "slurm.conf"
        self.nodes = list(NODES)
        # At least 2: the tests run 2 ranks on a node; with no task binding a declared CPU only means sharing.
        self.cpus = max(os.cpu_count() or 1, 2)
        self._procs: dict[str, subprocess.Popen] = {}

    @property
    def env(self) -> dict[str, str]:
        """The environment a client (sbatch, squeue, scontrol) needs to talk to this cluster."""
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    def start(self, timeout: float = 60) -> None:
        if os.geteuid() != 0:
            raise ClusterUnavailable("the test cluster's slurmd must run as root to start jobs (run the tests as root)")
        self.root.chmod(0o755)  # jobs and munge clients must reach the socket and the spool
        for sub in ("state", "spool", "log"):
            (self.root / sub).mkdir(exist_ok=True)
        self._start_munged()
        self._write_conf()
        # -D: stay in the foreground, so that stop() ends exactly the processes started here.
        self._spawn("slurmctld", [_daemon("slurmctld"), "-D", "-i", "-f", str(self.conf)])
        for node in self.nodes:
            self._spawn(f"slurmd-{node}", [_daemon("slurmd"), "-D", "-N", node, "-f", str(self.conf)])
        self._wait_idle(timeout)

    def stop(self) -> None:
        """Kill this cluster's jobs, then stop what start() started; the files stay for post-mortems."""
        ctld = self._procs.get("slurmctld")
        if ctld is not None and ctld.poll() is None:
            self._kill_jobs()
        for name in reversed(list(self._procs)):
            proc = self._procs.pop(name)
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=10)

    def log(self, name: str, tail: int = 3000) -> str:
        """The end of a daemon's log: `munged`, `slurmctld` or `slurmd-<node>`."""
        path = self.root / "log" / f"{name}.log"
        return path.read_text(errors="replace")[-tail:] if path.exists() else ""

    def _kill_jobs(self, timeout: float = 30) -> None:
        """Jobs' processes belong to slurmstepd, not slurmd: kill them before the daemons go."""
        def jobs() -> list[str]:
            done = subprocess.run(["squeue", "-h", "-o", "%i"], env=self.env, capture_output=True, text=True,
                                  timeout=30, check=False)
            return done.stdout.split()

        ids = jobs()
        if not ids:
            return
        for command in (["scancel", "--full", "--signal=KILL", *ids], ["scancel", *ids]):
            subprocess.run(command, env=self.env, capture_output=True, timeout=30, check=False)
        deadline = time.monotonic() + timeout
        while jobs() and time.monotonic() < deadline:
            time.sleep(0.5)

    def _start_munged(self) -> None:
        key = self.root / "munge.key"
        if not key.exists():
            key.write_bytes(os.urandom(1024))
            key.chmod(0o400)
        self.munge_socket = self.root / "munge.sock"
        self._spawn("munged", [_daemon("munged"), "--foreground", "--force", f"--socket={self.munge_socket}",
                               f"--key-file={key}", f"--pid-file={self.root / 'munged.pid'}",
                               f"--seed-file={self.root / 'munged.seed'}", f"--log-file={self.root / 'log/munged.log'}"])
        deadline = time.monotonic() + 20
        while not self.munge_socket.exists():
            if self._procs["munged"].poll() is not None or time.monotonic() > deadline:
                raise ClusterUnavailable(f"munged did not start: {self._console('munged')}")
            time.sleep(0.1)

    def _write_conf(self) -> None:
        r = self.root
        nodes = "\n".join(f"NodeName={node} NodeAddr={node} Port={_free_port()} CPUs={self.cpus} "
                          f"RealMemory={_memory_mb()} State=UNKNOWN" for node in self.nodes)
        self.conf.write_text(f"""\
# A private test cluster (tests/slurm/cluster.py); nothing here is shared with a system SLURM.
ClusterName=avatest
SlurmctldHost={_host()}(127.0.0.1)
SlurmctldPort={_free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# cred_expire: a requeued job waits this long before it may start again (default 120 s).
AuthInfo=socket={self.munge_socket},cred_expire=10
CredType=cred/munge
# No cgroups: containers and CI machines often have none that slurmd may use.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/builtin
# Pending jobs (a requeued one waiting out cred_expire) are looked at every 2 s, not every 60 s.
SchedulerParameters=sched_interval=2
MpiDefault=none
JobRequeue=1
ReturnToService=2
SlurmdParameters=config_overrides
# A random first job id: MASTER_PORT is derived from it, so two sessions' jobs do not pick the same ports.
FirstJobId={random.randrange(1000, 19000)}
MinJobAge=600
KillWait=30
SlurmctldTimeout=30
SlurmdTimeout=30
MessageTimeout=20
InactiveLimit=0
StateSaveLocation={r / 'state'}
SlurmdSpoolDir={r / 'spool'}/%n
SlurmctldPidFile={r / 'slurmctld.pid'}
SlurmdPidFile={r}/slurmd-%n.pid
SlurmctldLogFile={r / 'log/slurmctld.log'}
SlurmdLogFile={r / 'log'}/slurmd-%n.log
{nodes}
PartitionName=debug Nodes={','.join(self.nodes)} Default=YES MaxTime=INFINITE State=UP
""")

    def _spawn(self, name: str, command: list[str]) -> None:
        out = open(self.root / "log" / f"{name}.console", "wb")  # noqa: SIM115 -- the daemon owns it
        self._procs[name] = subprocess.Popen(command, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                             stdin=subprocess.DEVNULL, start_new_session=True)

    def _console(self, name: str) -> str:
        path = self.root / "log" / f"{name}.console"
        return path.read_text(errors="replace")[-2000:] if path.exists() else ""

    def _wait_idle(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        states: list[str] = []
        while time.monotonic() < deadline:
            for name, proc in self._procs.items():
                if proc.poll() is not None:
                    raise ClusterUnavailable(f"{name} exited ({proc.returncode}):\n{self.log(name)}\n"
                                             f"{self._console(name)}")
            done = subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], env=self.env, capture_output=True, text=True,
                                  timeout=30, check=False)
            states = done.stdout.split()
            if states == ["idle"] * len(self.nodes):
                return
            time.sleep(0.5)
        raise ClusterUnavailable(f"the nodes did not become idle (sinfo: {states}):\n{self.log('slurmctld')}\n"
                                 + "\n".join(self.log(f"slurmd-{node}") for node in self.nodes))


def main() -> None:
    install_slurm()
    cluster = SlurmCluster()
    try:
        cluster.start()
    except BaseException:
        cluster.stop()
        raise
    print(f"SLURM is up, nodes {', '.join(cluster.nodes)}. export SLURM_CONF={cluster.conf}   "
          f"(Ctrl-C or SIGTERM stops it)", flush=True)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even when started in the background
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        cluster.stop()
        shutil.rmtree(cluster.root, ignore_errors=True)


if __name__ == "__main__":
    main()
