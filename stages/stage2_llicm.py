"""Stage 2, LL-ICM: joint codec + diffusion restoration from a stage-1 codec; hands over ``final/``
with the codec, the LoRA adapters, the UNet's conv_in and the controller, each alone."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import lightning as L
from lightning.pytorch.utilities import rank_zero_info

from datamodules.pair_data import PairDataConfig, PairDataModule
from foundation.config import ConfigError
from foundation.manifest import Manifest, manifest_path
from pl_modules.core import codec_module
from pl_modules.core.codecs import CODEC_FILE, build_codec, load_codec_weights
from pl_modules.llicm.losses import matched_rate_weight
from pl_modules.llicm.module import STAGE, LLICMConfig, LLICMModule
from stages.config import StageConfig
from stages.runner import check_parent, required_parent, run_stage


@dataclass
class Stage2LLICMConfig(LLICMConfig, StageConfig):
    name: str = STAGE
    """This stage's folder inside the run (a pipeline names each of its stages)."""
    data: PairDataConfig = field(default_factory=PairDataConfig)


def rate_weight(cfg: Stage2LLICMConfig, parent: Manifest) -> float:
    """β as set, or derived from the parent's λ (pl_modules/llicm/losses.py::matched_rate_weight) times beta_scale."""
    if cfg.beta is not None:
        if cfg.beta_scale != 1.0:
            raise ConfigError(f"beta_scale: scales the derived β only, and beta is set ({cfg.beta}); drop one")
        return cfg.beta
    if cfg.beta_scale <= 0:
        raise ConfigError(f"beta_scale: must be positive, got {cfg.beta_scale}")
    if parent.params.get("distortion") != "mse":
        raise ConfigError(f"beta: derived only from an MSE-trained parent, {cfg.init_from} was trained on "
                          f"{parent.params.get('distortion')}; set beta")
    lmbda = parent.params["lmbda"]
    try:
        beta = cfg.beta_scale * matched_rate_weight(lmbda, cfg.alpha, cfg.gamma,
                                                    cfg.prior.residual and not cfg.prior.vae)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    rank_zero_info(f"beta = {beta:.6g}: derived from the parent's λ = {lmbda} "
                   f"(alpha={cfg.alpha}, gamma={cfg.gamma}, beta_scale={cfg.beta_scale})")
    return beta


def run(cfg: Stage2LLICMConfig) -> Path:
    L.seed_everything(cfg.trainer.seed, workers=True, verbose=False)
    parent = check_parent(required_parent(cfg, "a stage-1 final/ (stage 2 starts from a trained codec)"),
                          codec_module.STAGE, cfg.codec)
    module = LLICMModule(cfg, rate_weight(cfg, parent))
    if cfg.rate_match:  # on a resume too: the reference is frozen, so not in checkpoints
        reference = build_codec(cfg.codec.architecture, cfg.codec.N, cfg.codec.M)
        module.hold_rate_to(load_codec_weights(reference, manifest_path(cfg.init_from).parent / CODEC_FILE))
    return run_stage(cfg, module, PairDataModule(cfg.data, cfg.trainer.seed), parent,
                     warm_start=lambda folder: load_codec_weights(module.codec, folder / CODEC_FILE))
