"""A real two-node SLURM cluster on one machine: munged, slurmctld and two slurmd (``n1``, ``n2``,
one CPU each; Debian's build allows several slurmd per host) under one folder. The SLURM tests
run jobs through it; ``docs/launch.md`` stands it up by hand with
``python tests/slurm_cluster.py start /tmp/slurm`` (``stop`` ends it and removes its state)."""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "scontrol")


def unavailable() -> str | None:
    """Why no cluster can run here (None: it can)."""
    missing = [d for d in DAEMONS if shutil.which(d) is None]
    if missing:
        return f"no SLURM here ({', '.join(missing)} missing; apt-get install slurm-wlm munge)"
    if os.geteuid() != 0:
        return "slurmd must run as root to start jobs"
    return None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Cluster:
    """Nodes ``n1`` and ``n2`` at 127.0.0.1, one partition; ``env`` points the SLURM commands at it."""

    def __init__(self, root: Path, cpus_per_node: int = 1):
        self.root, self.cpus = Path(root), cpus_per_node
        self.conf = self.root / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}

    def start(self, timeout: float = 60) -> "Cluster":
        for folder in ("state", "spool/n1", "spool/n2", "munge"):
            (self.root / folder).mkdir(parents=True, exist_ok=True)
        key = self.root / "munge" / "munge.key"
        key.write_bytes(os.urandom(128))
        key.chmod(0o600)
        self._write_conf()
        munge = self.root / "munge"
        subprocess.run(["munged", "--force", f"--key-file={key}", f"--socket={munge}/socket",
                        f"--pid-file={munge}/munged.pid", f"--log-file={munge}/munged.log",
                        f"--seed-file={munge}/seed"], check=True, env=self.env)
        subprocess.run(["slurmctld"], check=True, env=self.env)
        for node in ("n1", "n2"):
            subprocess.run(["slurmd", "-N", node], check=True, env=self.env)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            states = self.run("sinfo", "-h", "-N", "-o", "%T", check=False).stdout.split()
            if len(states) == 2 and all(s == "idle" for s in states):
                return self
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"the SLURM nodes did not come up in {timeout:.0f} s (see {self.root}/*.log)")

    def _write_conf(self) -> None:
        root, ports = self.root, [_free_port() for _ in range(3)]
        self.conf.write_text(f"""ClusterName=diffcodec-test
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# cred_expire is also how long a requeued job waits before it may start: 120 s by default.
AuthInfo=socket={root}/munge/socket,cred_expire=10
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
ReturnToService=2
MinJobAge=600
SlurmctldPort={ports[0]}
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool/%n
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd-%n.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd-%n.log
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
NodeName=n1 NodeAddr=127.0.0.1 NodeHostname=localhost Port={ports[1]} CPUs={self.cpus} State=UNKNOWN
NodeName=n2 NodeAddr=127.0.0.1 NodeHostname=localhost Port={ports[2]} CPUs={self.cpus} State=UNKNOWN
PartitionName=test Nodes=n1,n2 Default=YES MaxTime=INFINITE State=UP
""")

    def run(self, *command: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(command, capture_output=True, text=True, env=self.env, check=check, timeout=60)

    def job_states(self, job: str) -> list[str]:
        """The state of every task of a job (an array has one per task)."""
        out = self.run("scontrol", "show", "job", "-o", job, check=False).stdout
        return [f.split("=", 1)[1] for line in out.splitlines() for f in line.split() if f.startswith("JobState=")]

    def wait(self, job: str, timeout: float) -> list[str]:
        """Wait until every task of ``job`` has ended; their final states."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            states = self.job_states(job)
            if states and all(s in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")
                              for s in states):
                return states
            time.sleep(1)
        self.run("scancel", job, check=False)
        raise TimeoutError(f"job {job} did not end in {timeout:.0f} s: {self.job_states(job)}")

    def stop(self) -> None:
        """Cancel every job, end the daemons, remove the cluster's state."""
        self.run("scancel", "--full", "-u", "root", check=False)
        for pid_file in [*self.root.glob("slurmd-*.pid"), self.root / "slurmctld.pid", self.root / "munge/munged.pid"]:
            try:
                os.kill(int(pid_file.read_text()), signal.SIGTERM)
            except (FileNotFoundError, ValueError, ProcessLookupError):
                pass
        time.sleep(1)
        shutil.rmtree(self.root, ignore_errors=True)


if __name__ == "__main__":
    action, folder = sys.argv[1], Path(sys.argv[2])
    if action == "start":
        Cluster(folder).start()
        print(f"export SLURM_CONF={folder / 'slurm.conf'}")
    else:
        Cluster(folder).stop()
