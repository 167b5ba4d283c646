"""The Lightning Trainer every stage runs under: checkpoints for resume, logs, launch settings."""
from __future__ import annotations

import io
import os
import signal
import subprocess
import threading
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.plugins.environments import SLURMEnvironment
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.strategies import DDPStrategy

from foundation.config import TrainerConfig
from foundation.files import atomic_write_bytes

LAST = "last.ckpt"
_EXTRA_CALLBACKS: list[Callback] = []


@contextmanager
def extra_callbacks(*callbacks: Callback):
    """Add callbacks to every trainer built inside the block: instrumentation (step timers in
    benchmarks, fault injection in tests) that is no part of a stage's config."""
    depth = len(_EXTRA_CALLBACKS)
    _EXTRA_CALLBACKS.extend(callbacks)
    try:
        yield
    finally:
        del _EXTRA_CALLBACKS[depth:]


class AtomicCheckpointIO(TorchCheckpointIO):
    """A run killed while saving keeps its previous last.ckpt instead of a truncated one."""

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        atomic_write_bytes(path, buffer.getvalue())


class Requeued(Exception):
    """The run stopped on SIGUSR1 after saving last.ckpt; the same command resumes it."""


class SaveAndRequeueOnSignal(Callback):
    """SLURM sends SIGUSR1 ahead of the time limit (``--signal=SIGUSR1@90``) or on ``scancel
    --signal=USR1``. At the end of the step in which any rank got it, every rank saves last.ckpt
    together (the state a step-boundary checkpoint has: a resumed run continues bit-identically),
    rank zero requeues the job under SLURM, and the stage stops with :class:`Requeued`, so that no
    final/ is written for a half-trained stage. Replaces Lightning's own handler, which saves an
    ``hpc_ckpt`` from inside the signal handler, mid-step, that our resume would not read."""

    def __init__(self):
        self.signalled = False
        self.previous = None

    def setup(self, trainer, pl_module, stage: str) -> None:
        # From setup, not on_train_start: a signal during start-up (data, compile, the logger's first
        # write) must not kill the job unrequeued; the first step's end acts on it. Only for fit: the
        # final validation has no step end to act at (a signal there ends the job as SLURM meant; the
        # rerun resumes from last.ckpt and validates again).
        if stage == "fit" and threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGUSR1, self._on_signal)

    def teardown(self, trainer, pl_module, stage: str) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGUSR1, self.previous)
            self.previous = None

    def _on_signal(self, signum, frame) -> None:
        self.signalled = True

    def on_train_batch_end(self, trainer, *args) -> None:
        if not trainer.strategy.reduce_boolean_decision(self.signalled, all=False):
            return
        path = Path(trainer.default_root_dir) / LAST
        trainer.save_checkpoint(path)
        job, requeued = _slurm_job_id(), ""
        if job and trainer.is_global_zero:
            result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
            requeued = (f"; job {job} requeued" if result.returncode == 0
                        else f"; scontrol requeue {job} failed: {result.stderr.strip()}")
        raise Requeued(f"SIGUSR1: saved {path} at step {trainer.global_step}{requeued}; the same command resumes")


def _slurm_job_id() -> str | None:
    """What ``scontrol requeue`` takes: the job, or the array task (``<array job>_<task>``)."""
    if "SLURM_ARRAY_JOB_ID" in os.environ:
        return f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    return os.environ.get("SLURM_JOB_ID")


def build_trainer(cfg: TrainerConfig, stage_dir: str | Path) -> L.Trainer:
    stage_dir = Path(stage_dir)
    checkpoint = ModelCheckpoint(dirpath=stage_dir, filename="step-{step}", save_top_k=0, save_last=True,
                                 every_n_train_steps=cfg.checkpoint_every, save_on_train_epoch_end=False)
    checkpoint.CHECKPOINT_NAME_LAST = LAST.removesuffix(".ckpt")
    return L.Trainer(
        default_root_dir=stage_dir,
        max_steps=cfg.max_steps,
        max_epochs=-1,
        val_check_interval=cfg.val_every,
        check_val_every_n_epoch=None,
        use_distributed_sampler=False,  # data modules split data between ranks themselves
        num_sanity_val_steps=0,
        log_every_n_steps=cfg.log_every,
        accelerator=cfg.accelerator,
        devices=_devices(cfg.devices),
        num_nodes=cfg.num_nodes,
        strategy=_strategy(cfg),
        precision=cfg.precision,
        logger=TensorBoardLogger(save_dir=stage_dir, name="tb", version=""),
        callbacks=[*_EXTRA_CALLBACKS, SaveAndRequeueOnSignal(), checkpoint],
        plugins=[AtomicCheckpointIO(), *([SLURMEnvironment(auto_requeue=False)] if SLURMEnvironment.detect() else [])],
        enable_progress_bar=cfg.progress_bar,
        enable_model_summary=False,
    )


def train_stage(cfg, module: L.LightningModule, datamodule: L.LightningDataModule) -> tuple[L.Trainer, dict]:
    """Fit (resuming from the stage's last.ckpt when there is one), validate the final weights if the
    last validation was not at the last step, and return the trainer and the ``val/`` metrics."""
    from stages.provenance import write_provenance

    stage_dir = cfg.stage_dir
    trainer = build_trainer(cfg.trainer, stage_dir)
    if trainer.is_global_zero:
        write_provenance(stage_dir, cfg)
    with named_distributed_failures(cfg.trainer):
        trainer.fit(module, datamodule=datamodule, ckpt_path=last_checkpoint(stage_dir))
        if module.validated_at_step != trainer.global_step:
            trainer.validate(module, datamodule=datamodule, verbose=False)
    return trainer, {k: round(float(v), 6) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}


def last_checkpoint(stage_dir: str | Path) -> Path | None:
    path = Path(stage_dir) / LAST
    return path if path.is_file() else None


def _strategy(cfg: TrainerConfig):
    """DDP with the configured process-group timeout; any other strategy by its Lightning name."""
    if cfg.strategy not in ("ddp", "ddp_find_unused_parameters_true"):
        return cfg.strategy
    return DDPStrategy(timeout=timedelta(seconds=cfg.ddp_timeout_s),
                       find_unused_parameters=cfg.strategy.endswith("_true"))


class PeerLost(RuntimeError):
    """A rank of a multi-process run timed out on, or lost, its peers."""


@contextmanager
def named_distributed_failures(cfg: TrainerConfig):
    """Turn torch's long distributed errors into one line naming what to check."""
    try:
        yield
    except (RuntimeError, TimeoutError) as err:
        text = str(err)
        if not any(k in text for k in ("Timed out", "timed out", "Connection closed", "Connection reset",
                                       "DistStoreError", "DistNetworkError", "Socket Timeout")):
            raise
        rank = os.environ.get("RANK", os.environ.get("SLURM_PROCID", "?"))
        where = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
        raise PeerLost(f"rank {rank}: a peer died or could not be reached (master {where}) within "
                       f"trainer.ddp_timeout_s={cfg.ddp_timeout_s} s: {text.splitlines()[0][:200]}") from None


def _devices(devices: str) -> int | str | list[int]:
    if devices.isdigit():
        return int(devices)
    if "," in devices:
        return [int(d) for d in devices.split(",") if d.strip()]
    return devices
