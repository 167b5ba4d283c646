"""The Lightning Trainer every stage runs under: checkpoints for resume, logs, launch settings."""
from __future__ import annotations

import io
from contextlib import contextmanager
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.plugins.io import TorchCheckpointIO

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
        strategy=cfg.strategy,
        precision=cfg.precision,
        logger=TensorBoardLogger(save_dir=stage_dir, name="tb", version=""),
        callbacks=[*_EXTRA_CALLBACKS, checkpoint],
        plugins=[AtomicCheckpointIO()],
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
    trainer.fit(module, datamodule=datamodule, ckpt_path=last_checkpoint(stage_dir))
    if module.validated_at_step != trainer.global_step:
        trainer.validate(module, datamodule=datamodule, verbose=False)
    return trainer, {k: round(float(v), 6) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}


def last_checkpoint(stage_dir: str | Path) -> Path | None:
    path = Path(stage_dir) / LAST
    return path if path.is_file() else None


def _devices(devices: str) -> int | str | list[int]:
    if devices.isdigit():
        return int(devices)
    if "," in devices:
        return [int(d) for d in devices.split(",") if d.strip()]
    return devices
