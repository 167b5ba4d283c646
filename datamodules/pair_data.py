"""Data of stage 2: (degraded, clean, task) crops from pair shards for training; for validation,
clean images degraded by every task with fixed seeds, so each validation sees the same pairs."""
from __future__ import annotations

from dataclasses import dataclass, field

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from datamodules.degradations import TASKS, degrade
from datamodules.images import list_images, load_rgb, to_tensor
from datamodules.shards import read_index
from datamodules.stream import CropStream


@dataclass
class PairDataConfig:
    train_shards: str = "???"
    """Folder of pair shards (written by `train.py shards --pairs`)."""
    val_dir: str = "???"
    """Folder of clean validation images, degraded here by every task in val_tasks."""
    val_tasks: list[str] = field(default_factory=lambda: ["dehaze", "denoise", "derain", "deraindrop", "deshadow",
                                                          "inpaint"])
    """Tasks validated (each image degraded by each, seeds fixed)."""
    crop: int = 256
    """Side of the random training crops (a multiple of 64)."""
    val_crop: int = 256
    """Validation images are centre-cropped to this side (a multiple of 64)."""
    batch_size: int = 4
    """Pairs per batch, per rank."""
    num_workers: int = 2
    """Loader processes per rank (keep it across a resume)."""
    decoded_cache_mb: int = 0
    """Decoded pairs kept per loader worker (for data sets that fit)."""
    val_max_images: int = 0
    """Validate on the first this-many clean images only (0: all)."""

    def __post_init__(self) -> None:
        for name in ("crop", "val_crop"):
            if getattr(self, name) < 64 or getattr(self, name) % 64:
                raise ValueError(f"data.{name} must be a multiple of 64, got {getattr(self, name)}")
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
        image = load_rgb(path)
        top, left = max(0, (image.shape[0] - self.crop) // 2), max(0, (image.shape[1] - self.crop) // 2)
        clean = image[top: top + self.crop, left: left + self.crop]
        return {"degraded": to_tensor(degrade(clean, task, seed)).unsqueeze(0), "clean": to_tensor(clean).unsqueeze(0),
                "task": torch.tensor(TASKS.index(task)), "name": f"{path.name}:{task}"}


class PairDataModule(L.LightningDataModule):
    def __init__(self, cfg: PairDataConfig, seed: int):
        super().__init__()
        self.cfg, self.seed = cfg, seed

    def train_dataloader(self) -> DataLoader:
        trainer = self.trainer
        stream = CropStream(read_index(self.cfg.train_shards), self.cfg.crop, self.cfg.batch_size, self.seed,
                            rank=trainer.global_rank, world_size=trainer.world_size, start_batch=trainer.global_step,
                            cache_mb=self.cfg.decoded_cache_mb)
        return DataLoader(stream, batch_size=None, num_workers=self.cfg.num_workers,
                          pin_memory=torch.cuda.is_available())

    def val_dataloader(self) -> DataLoader:
        folder = DegradedFolder(self.cfg, self.trainer.global_rank, self.trainer.world_size)
        return DataLoader(folder, batch_size=None, num_workers=min(self.cfg.num_workers, 2))
