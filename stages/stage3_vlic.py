"""Stage 3, VLIC: Diffusion-DPO post-training of a stage-2 diffusion decoder on 2AFC judgments;
hands over a self-contained ``final/`` (the stage-2 decoder's files and the adapter)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import lightning as L

from datamodules.pair_data import PairDataConfig, PairDataModule
from foundation.config import ConfigError
from foundation.manifest import manifest_path, read_manifest
from pl_modules.vlic.module import DECODERS, STAGE, VLICConfig, VLICModule
from stages.config import StageConfig
from stages.runner import required_parent, run_stage


@dataclass
class Stage3VLICConfig(VLICConfig, StageConfig):
    name: str = STAGE
    """This stage's folder inside the run (a pipeline names each of its stages)."""
    data: PairDataConfig = field(default_factory=PairDataConfig)


def run(cfg: Stage3VLICConfig) -> Path:
    L.seed_everything(cfg.trainer.seed, workers=True, verbose=False)
    parent = read_manifest(required_parent(cfg, "a stage-2 final/ (stage 3 post-trains its decoder)"))
    if parent.stage not in DECODERS:
        raise ConfigError(f"init_from {cfg.init_from} was written by {parent.stage}; stage 3 post-trains a stage-2 "
                          f"decoder ({', '.join(sorted(DECODERS))})")
    for key, value in (("decoder_stage", parent.stage), ("decoder_params", parent.params)):
        if getattr(cfg, key) and getattr(cfg, key) != value:
            raise ConfigError(f"{key} differs from init_from's manifest; leave it empty (it is filled from there)")
    # The module reads its decoder from the parent's manifest; the stage's own config stays as given,
    # so that a pipeline finds a finished stage unchanged.
    module = VLICModule(dataclasses.replace(cfg, decoder_stage=parent.stage, decoder_params=parent.params))
    module.attach_decoder(manifest_path(cfg.init_from).parent)
    return run_stage(cfg, module, PairDataModule(cfg.data, cfg.trainer.seed), parent)
