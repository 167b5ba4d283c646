"""Stage 1: rate–distortion pretraining of a CompressAI codec; hands over ``final/`` with a manifest."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import lightning as L

from datamodules.codec_data import CodecDataModule, ImageDataConfig
from foundation.config import ConfigError
from pl_modules.core.codec_module import STAGE, CodecModule, CodecModuleConfig
from pl_modules.core.codecs import CODEC_FILE, load_codec_weights
from stages.config import StageConfig
from stages.runner import check_parent, run_stage


@dataclass
class Stage1Config(CodecModuleConfig, StageConfig):
    name: str = STAGE
    """This stage's folder inside the run (a pipeline names each of its stages)."""
    data: ImageDataConfig = field(default_factory=ImageDataConfig)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.distortion == "ms-ssim" and self.data.crop < 192:
            raise ConfigError(f"data.crop must be at least 192 for ms-ssim, got {self.data.crop}")


def run(cfg: Stage1Config) -> Path:
    """Train (resuming from ``last.ckpt`` when the stage folder has one) and write ``final/``."""
    L.seed_everything(cfg.trainer.seed, workers=True, verbose=False)
    module = CodecModule(cfg)
    parent = check_parent(cfg.init_from, STAGE, cfg.codec) if cfg.init_from else None
    return run_stage(cfg, module, CodecDataModule(cfg.data, cfg.trainer.seed), parent,
                     warm_start=lambda folder: load_codec_weights(module.codec, folder / CODEC_FILE))
