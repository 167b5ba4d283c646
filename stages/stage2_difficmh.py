"""Stage 2, Diff-ICMH: a latent codec and a tag-guided diffusion decoder trained together from a
pretrained latent diffusion model (no earlier stage: a pixel codec's final cannot seed a codec of
latents, so the codec warms up inside this stage); hands over ``final/`` with the latent codec,
the LoRA adapters and the control branch, each alone."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import lightning as L

from datamodules.codec_data import CodecDataModule, ImageDataConfig
from pl_modules.core.codecs import CODEC_FILE, load_codec_weights
from pl_modules.difficmh.module import STAGE, DiffICMHConfig, DiffICMHModule
from stages.config import StageConfig
from stages.runner import check_parent, run_stage


@dataclass
class Stage2DiffICMHConfig(DiffICMHConfig, StageConfig):
    name: str = STAGE
    """This stage's folder inside the run (a pipeline names each of its stages)."""
    data: ImageDataConfig = field(default_factory=ImageDataConfig)
    """Crops are multiples of 64 (ImageDataConfig), which covers any VAE of 8× or less times the latent
    codec's 8."""


def run(cfg: Stage2DiffICMHConfig) -> Path:
    """Train (resuming from ``last.ckpt`` when the stage folder has one) and write ``final/``;
    ``init_from`` may name an earlier Diff-ICMH final to continue from (its codec and adapters)."""
    L.seed_everything(cfg.trainer.seed, workers=True, verbose=False)
    module = DiffICMHModule(cfg)
    parent = check_parent(cfg.init_from, STAGE, cfg.codec) if cfg.init_from else None

    def warm_start(folder: Path) -> None:
        load_codec_weights(module.codec, folder / CODEC_FILE)
        module.prior.load_trained(folder)

    return run_stage(cfg, module, CodecDataModule(cfg.data, cfg.trainer.seed), parent, warm_start=warm_start)
