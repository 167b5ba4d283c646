"""SLURM: the batch script a pipeline run (or a sweep's job array, one run per task) is submitted
as, and the trainer keys that must match it, so that Lightning maps SLURM's tasks to its ranks."""
from __future__ import annotations

import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from foundation.config import ConfigError
from foundation.files import atomic_write_text

TRAIN_PY = Path(__file__).resolve().parent.parent / "train.py"


@dataclass
class SlurmConfig:
    nodes: int = 1
    """Nodes per job (per array task in a sweep: each point is a full multi-node job)."""
    gpus_per_node: int = 1
    """GPUs per node; 0: CPU nodes (no --gpus-per-node, trainer.accelerator=cpu)."""
    tasks_per_node: int = 0
    """Tasks (ranks) per node; 0: one per GPU, or one on CPU nodes. On GPU nodes it must equal
    gpus_per_node: Lightning runs one task per device."""
    cpus_per_task: int = 8
    """CPU cores per task, for the data loader workers."""
    mem: str = ""
    """Memory per node (--mem, e.g. 64G; empty: the partition's default)."""
    time: str = "24:00:00"
    """Wall-clock limit; SLURM signals SIGUSR1 90 s before it, the run saves and requeues itself."""
    partition: str = ""
    """SLURM partition (empty: the cluster's default)."""
    account: str = ""
    """SLURM account (empty: none)."""
    qos: str = ""
    """Quality of service (empty: none)."""
    extra: list[str] = field(default_factory=list)
    """More #SBATCH lines, e.g. '--constraint=h100'."""

    def __post_init__(self) -> None:
        for key in ("nodes", "cpus_per_task"):
            if getattr(self, key) < 1:
                raise ConfigError(f"slurm.{key} must be at least 1, got {getattr(self, key)}")
        if self.gpus_per_node < 0 or self.tasks_per_node < 0:
            raise ConfigError("slurm.gpus_per_node and slurm.tasks_per_node cannot be negative")
        if self.gpus_per_node and self.tasks_per_node not in (0, self.gpus_per_node):
            raise ConfigError(f"slurm.tasks_per_node={self.tasks_per_node} on nodes with {self.gpus_per_node} GPUs: "
                              f"Lightning runs one task per GPU; leave it 0 or set it to gpus_per_node")

    @property
    def tasks(self) -> int:
        """Tasks per node."""
        return self.tasks_per_node or max(self.gpus_per_node, 1)


@dataclass
class LaunchConfig:
    """Where a run (a pipeline, or each point of a sweep) runs; both schemas take these keys."""

    launcher: str = "local"
    """local: run here (or under torchrun/srun already); slurm: write a batch script (a job array for a
    sweep), the trainer keys set to match slurm.*, and with submit=true submit it."""
    submit: bool = False
    """With launcher=slurm, call sbatch on the written script."""
    slurm: SlurmConfig = field(default_factory=SlurmConfig)

    def __post_init__(self) -> None:
        if self.launcher not in ("local", "slurm"):
            raise ConfigError(f"launcher must be local or slurm, got '{self.launcher}'")


def trainer_overrides(slurm: SlurmConfig) -> list[str]:
    """The trainer keys every stage of a run launched as ``slurm`` says must take."""
    world = slurm.nodes * slurm.tasks
    return [f"trainer.num_nodes={slurm.nodes}", f"trainer.devices={slurm.tasks}",
            f"trainer.accelerator={'gpu' if slurm.gpus_per_node else 'cpu'}",
            f"trainer.strategy={'ddp' if world > 1 else 'auto'}", "trainer.progress_bar=false"]


def write_script(slurm: SlurmConfig, job_name: str, command: list[str], path: Path, array: int = 0) -> Path:
    """The batch script: ``srun`` of ``command`` (train.py's arguments) on every task; ``array`` > 0
    makes a job array whose tasks find their index in ``$SLURM_ARRAY_TASK_ID``. Logs go beside it."""
    log_dir = path.parent / "logs"
    lines = ["#!/bin/bash", f"#SBATCH --job-name={job_name}", f"#SBATCH --nodes={slurm.nodes}",
             f"#SBATCH --ntasks-per-node={slurm.tasks}", f"#SBATCH --cpus-per-task={slurm.cpus_per_task}",
             f"#SBATCH --time={slurm.time}",
             "#SBATCH --signal=SIGUSR1@90   # Lightning saves a checkpoint and requeues the job on it",
             "#SBATCH --requeue", f"#SBATCH --output={log_dir}/{'%A_%a' if array else '%j'}.out",
             "#SBATCH --open-mode=append     # a requeued job keeps the log of its first run"]
    lines += [f"#SBATCH --array=0-{array - 1}"] if array else []
    lines += [f"#SBATCH --gpus-per-node={slurm.gpus_per_node}"] if slurm.gpus_per_node else []
    lines += [f"#SBATCH --{key}={getattr(slurm, key)}" for key in ("mem", "partition", "account", "qos")
              if getattr(slurm, key)]
    lines += [f"#SBATCH {line}" for line in slurm.extra]
    lines += ["", f"srun {shlex.quote(sys.executable)} {shlex.quote(str(TRAIN_PY))} "
              + " ".join(f'"{arg}"' if "$" in arg else shlex.quote(arg) for arg in command), ""]
    log_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, "\n".join(lines))
    return path


def submit(script: Path) -> str:
    """``sbatch`` the script; the job id."""
    try:
        result = subprocess.run(["sbatch", "--parsable", str(script)], capture_output=True, text=True, timeout=60)
    except FileNotFoundError:
        raise ConfigError("submit=true: sbatch is not on this machine's PATH (submit from a SLURM login node, "
                          f"or run `sbatch {script}` there)") from None
    if result.returncode != 0:
        raise ConfigError(f"sbatch {script} failed: {result.stderr.strip().splitlines()[-1] if result.stderr else result.returncode}")
    return result.stdout.strip().split(";")[0]


def launch(script: Path, submit_now: bool) -> None:
    """Say where the script is and submit it, or say how to."""
    print(f"wrote {script}")
    if submit_now:
        print(f"submitted job {submit(script)}")
    else:
        print(f"submit with: sbatch {script}")
