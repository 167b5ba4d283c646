"""Data of stage 2: (degraded, clean, task) crops from pair shards for training; for validation,
clean images degraded by every task with fixed seeds, so each validation sees the same pairs."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch.utils.data import DataLoader, Dataset

from datamodules.codec_data import CodecDataModule, ImageDataConfig
from datamodules.degradations import TASKS, degrade
from datamodules.images import centre_crop, list_images, load_rgb, to_tensor


@dataclass
class PairDataConfig(ImageDataConfig):
    train_shards: str = "???"
    """Folder of pair shards (written by `train.py shards --pairs`)."""
    val_dir: str = "???"
    """Folder of clean validation images, degraded here by every task in val_tasks."""
    batch_size: int = 4
    """Pairs per batch, per rank."""
    val_tasks: list[str] = field(default_factory=lambda: ["dehaze", "denoise", "derain", "deraindrop", "deshadow",
                                                          "inpaint"])
    """Tasks validated (each image degraded by each, seeds fixed)."""
    val_crop: int = 256
    """Validation images are centre-cropped to this side (a multiple of 64)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.val_crop < 64 or self.val_crop % 64:
            raise ValueError(f"data.val_crop must be a multiple of 64 and at least 64, got {self.val_crop}")
        unknown = [t for t in self.val_tasks if t not in TASKS]
        if unknown:
            raise ValueError(f"data.val_tasks: unknown tasks {unknown}; choose from {list(TASKS)}")


class DegradedFolder(Dataset):
    """Every (image, task) of a folder, centre-cropped, degraded with a seed fixed by its index."""

    def __init__(self, cfg: PairDataConfig, rank: int = 0, world_size: int = 1):
        paths = list_images(cfg.val_dir)[: cfg.val_max_images or None]
        items = [(path, task) for path in paths for task in cfg.val_tasks]
        self.items = list(enumerate(items))[rank::world_size]
        self.crop = cfg.val_crop

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        seed, (path, task) = self.items[index]
        clean = centre_crop(load_rgb(path), self.crop)
        return {"degraded": to_tensor(degrade(clean, task, seed)).unsqueeze(0), "clean": to_tensor(clean).unsqueeze(0),
                "task": torch.tensor(TASKS.index(task)), "name": f"{path.name}:{task}", "seed": seed}


class PairDataModule(CodecDataModule):
    """Training crops come from pair shards through the same resumable stream as stage 1's."""

    def val_dataloader(self) -> DataLoader:
        folder = DegradedFolder(self.cfg, self.trainer.global_rank, self.trainer.world_size)
        return DataLoader(folder, batch_size=None, num_workers=min(self.cfg.num_workers, 2))
