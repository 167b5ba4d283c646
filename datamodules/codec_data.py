"""Data of codec training: a resumable crop stream over shards, and full images for validation."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from datamodules.images import list_images, load_rgb, to_tensor
from datamodules.shards import read_index
from datamodules.stream import Augmentation, CropStream


@dataclass
class ImageDataConfig:
    train_shards: str = "???"
    """Folder of WebDataset shards with index.json (written by `train.py shards`)."""
    val_dir: str = "???"
    """Folder of full-size validation images (e.g. ../shared/data/kodak)."""
    crop: int = 256
    """Side of the random training crops."""
    batch_size: int = 8
    """Crops per batch, per rank."""
    num_workers: int = 2
    """Loader processes per rank; a resumed run must use the same count to replay the same batches."""
    decoded_cache_mb: int = 0
    """Keep up to this many MB of decoded images per loader worker (for data sets that fit: decode once)."""
    val_max_images: int = 0
    """Validate on the first this-many images only (0: all)."""
    augment: Augmentation = field(default_factory=Augmentation)
    """Variations of the training crops beyond position and flip (rescaling, quarter turns, channel order)."""

    def __post_init__(self) -> None:
        if self.crop < 64 or self.crop % 64:
            raise ValueError(f"data.crop must be a multiple of 64 and at least 64, got {self.crop}")


class ImageFolder(Dataset):
    """Full images at their own size (batch size 1): validation codes what a user would code."""

    def __init__(self, folder: str | Path, max_images: int = 0, rank: int = 0, world_size: int = 1):
        paths = list_images(folder)
        if max_images:
            paths = paths[:max_images]
        if not paths:
            raise ValueError(f"no images in validation folder {folder}")
        self.paths = paths[rank::world_size]  # disjoint, unpadded: each image is counted once

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict:
        return {"image": to_tensor(load_rgb(self.paths[index])), "name": self.paths[index].name,
                "path": str(self.paths[index])}


class CodecDataModule(L.LightningDataModule):
    def __init__(self, cfg: ImageDataConfig, seed: int):
        super().__init__()
        self.cfg, self.seed = cfg, seed

    def train_dataloader(self) -> DataLoader:
        # Called after Lightning restored a checkpoint, so global_step is where a resumed run stands.
        trainer = self.trainer
        stream = CropStream(read_index(self.cfg.train_shards), self.cfg.crop, self.cfg.batch_size, self.seed,
                            rank=trainer.global_rank, world_size=trainer.world_size, start_batch=trainer.global_step,
                            cache_mb=self.cfg.decoded_cache_mb, augment=self.cfg.augment)
        return DataLoader(stream, batch_size=None, num_workers=self.cfg.num_workers,
                          persistent_workers=False, pin_memory=torch.cuda.is_available())

    def val_dataloader(self) -> DataLoader:
        folder = ImageFolder(self.cfg.val_dir, self.cfg.val_max_images, self.trainer.global_rank,
                             self.trainer.world_size)
        return DataLoader(folder, batch_size=1,
                          num_workers=min(self.cfg.num_workers, 2), collate_fn=_single)


def _single(items: list[dict]) -> dict:
    (item,) = items
    return {"image": item["image"].unsqueeze(0), "name": item["name"], "path": item["path"]}
