"""Stage 1: rate–distortion pretraining of a CompressAI codec; hands over ``final/`` with a manifest."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import lightning as L

from datamodules.codec_data import CodecDataModule, ImageDataConfig
from pl_modules.codec_module import CodecModule
from pl_modules.codecs import ARCHITECTURES, build_codec, load_codec_weights, save_codec
from pl_modules.schedules import SCHEDULES
from stages.config import ConfigError, StageConfig, to_dict, to_yaml
from stages.manifest import Manifest, manifest_path, read_manifest, write_final
from stages.provenance import git_commit
from stages.trainer import last_checkpoint, train_stage

STAGE = "stage1"
WEIGHTS = "codec.safetensors"


@dataclass
class CodecConfig:
    architecture: str = "bmshj2018-hyperprior"
    """CompressAI architecture: bmshj2018-factorized, bmshj2018-hyperprior, mbt2018-mean, mbt2018, cheng2020-anchor, cheng2020-attn."""
    N: int = 128
    """Channels of the transforms."""
    M: int = 192
    """Channels of the latent (ignored by cheng2020-*, whose latent has N channels)."""


@dataclass
class OptimConfig:
    lr: float = 1e-4
    """Adam learning rate of the network."""
    aux_lr: float = 1e-3
    """Adam learning rate of the entropy bottleneck's quantiles (the auxiliary loss)."""
    clip_grad_norm: float = 1.0
    """Clip the network's gradient norm to this (0: off)."""
    schedule: str = "cosine"
    """LR schedule over trainer.max_steps: cosine (decays to final_lr_fraction) or constant."""
    warmup_steps: int = 0
    """Linear LR warm-up steps."""
    final_lr_fraction: float = 0.01
    """Cosine schedule's last LR as a fraction of lr."""

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"optim.schedule must be one of {SCHEDULES}, got '{self.schedule}'")


@dataclass
class Stage1Config(StageConfig):
    name: str = STAGE
    """This stage's folder inside the run (a pipeline names each of its stages)."""
    lmbda: float = 0.0067
    """Rate–distortion trade-off λ (CompressAI's convention: it weighs the distortion)."""
    distortion: str = "mse"
    """Distortion: mse (λ·255²·MSE + bpp) or ms-ssim (λ·(1 − MS-SSIM) + bpp; crops ≥ 192)."""
    codec: CodecConfig = field(default_factory=CodecConfig)
    data: ImageDataConfig = field(default_factory=ImageDataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)

    def __post_init__(self) -> None:
        if self.distortion not in ("mse", "ms-ssim"):
            raise ConfigError(f"distortion must be mse or ms-ssim, got '{self.distortion}'")
        if self.distortion == "ms-ssim" and self.data.crop < 192:
            raise ConfigError(f"data.crop must be at least 192 for ms-ssim, got {self.data.crop}")
        if self.codec.architecture not in ARCHITECTURES:
            raise ConfigError(f"codec.architecture '{self.codec.architecture}' is not one of {sorted(ARCHITECTURES)}")
        if self.lmbda <= 0:
            raise ConfigError(f"lmbda must be positive, got {self.lmbda}")


def run(cfg: Stage1Config) -> Path:
    """Train (resuming from ``last.ckpt`` when the stage folder has one) and write ``final/``."""
    stage_dir = cfg.stage_dir
    L.seed_everything(cfg.trainer.seed, workers=True, verbose=False)
    module = CodecModule(cfg)
    parent = check_parent(cfg.codec, cfg.init_from) if cfg.init_from else None
    if parent and last_checkpoint(stage_dir) is None:
        load_codec_weights(module.codec, manifest_path(cfg.init_from).parent / WEIGHTS)
    trainer, metrics = train_stage(cfg, module, CodecDataModule(cfg.data, cfg.trainer.seed))
    final = stage_dir / "final"
    if trainer.is_global_zero:
        manifest = Manifest(stage=STAGE, codec=to_dict(cfg.codec), lmbda=cfg.lmbda, distortion=cfg.distortion,
                            weights={}, metrics=metrics, git_commit=git_commit(),
                            parent=str(manifest_path(cfg.init_from).resolve()) if parent else None,
                            parent_weights=parent.weights if parent else {})
        write_final(final, manifest, {WEIGHTS: lambda path: save_codec(module.codec.cpu(), path)},
                    extra_text={"config.yaml": to_yaml(cfg)})
    trainer.strategy.barrier()
    return final


def check_parent(codec_cfg: CodecConfig, final_dir: str | Path) -> Manifest:
    """The stage-1 manifest at ``final_dir``, after checking it holds this run's architecture."""
    manifest = read_manifest(final_dir, expect_stage=STAGE)
    if manifest.codec != to_dict(codec_cfg):
        raise ConfigError(f"init_from {final_dir} holds codec {manifest.codec}, this run builds {to_dict(codec_cfg)}")
    return manifest


def load_final(final_dir: str | Path):
    """(codec ready to entropy-code, manifest, sha256 of its weights) from a stage-1 ``final/``."""
    manifest = read_manifest(final_dir, expect_stage=STAGE)
    codec = build_codec(**manifest.codec)
    load_codec_weights(codec, manifest_path(final_dir).parent / WEIGHTS)
    return codec.eval(), manifest, manifest.weights[WEIGHTS]
