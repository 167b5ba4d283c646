"""Stage 2, LL-ICM: joint codec + diffusion restoration from a stage-1 codec; hands over ``final/``
with the codec, the LoRA adapters, the UNet's conv_in and the controller, each alone."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import lightning as L
from safetensors.torch import save_file

from datamodules.pair_data import PairDataConfig, PairDataModule
from pl_modules.codecs import load_codec_weights, save_codec
from pl_modules.diffusion_prior import DiffusionPriorConfig
from pl_modules.llicm_module import LLICMModule
from stages import stage1
from stages.config import ConfigError, StageConfig, to_dict, to_yaml
from stages.manifest import Manifest, manifest_path, write_final
from stages.provenance import git_commit
from stages.stage1 import CodecConfig, OptimConfig
from stages.trainer import last_checkpoint, train_stage

STAGE = "stage2-llicm"
CONTROLLER_FILE = "controller.safetensors"


@dataclass
class Stage2LLICMConfig(StageConfig):
    name: str = STAGE
    """This stage's folder inside the run (a pipeline names each of its stages)."""
    codec: CodecConfig = field(default_factory=CodecConfig)
    """The stage-1 codec's architecture; must match init_from's manifest."""
    prior: DiffusionPriorConfig = field(default_factory=DiffusionPriorConfig)
    clip_model: str = "???"
    """CLIP (hub id or local folder) whose frozen image features drive the controller."""
    content_tokens: int = 4
    """Cross-attention tokens describing content (one more names the degradation)."""
    train_codec: bool = True
    """Train the codec jointly (LL-ICM) or keep the stage-1 codec frozen (the baseline's first half)."""
    alpha: float = 1.0
    """Weight of MSE(X̂, X): the decoded image against the degraded input."""
    beta: float = 0.01
    """Weight of the rate R in bpp."""
    gamma: float = 1.0
    """Weight of the diffusion loss toward the ideal (clean) image."""
    classification: float = 0.1
    """Weight of the controller's degradation classification (cross-entropy)."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """AdamW for the prior and the controller (lr, schedule, clipping), Adam for the quantiles (aux_lr)."""
    codec_lr: float = 0.0
    """Learning rate of the codec when it trains jointly (0: optim.lr); a pretrained codec usually
    wants less than the modules that start from scratch. The schedule scales it too."""
    data: PairDataConfig = field(default_factory=PairDataConfig)

    def __post_init__(self) -> None:
        if not self.init_from:
            raise ConfigError("init_from must name a stage-1 final/ (stage 2 starts from a trained codec)")
        if self.prior.frozen_dtype == "bfloat16" and self.trainer.precision != "bf16-mixed":
            raise ConfigError("prior.frozen_dtype=bfloat16 needs trainer.precision=bf16-mixed")
        if not self.prior.condition_channels:
            raise ConfigError("prior.condition_channels must be the UNet's input channels: the decoded image "
                              "conditions the restoration")


def run(cfg: Stage2LLICMConfig) -> Path:
    stage_dir = cfg.stage_dir
    L.seed_everything(cfg.trainer.seed, workers=True, verbose=False)
    parent = stage1.check_parent(cfg.codec, cfg.init_from)
    module = LLICMModule(cfg)
    if last_checkpoint(stage_dir) is None:
        load_codec_weights(module.codec, manifest_path(cfg.init_from).parent / stage1.WEIGHTS)
    trainer, metrics = train_stage(cfg, module, PairDataModule(cfg.data, cfg.trainer.seed))
    final = stage_dir / "final"
    if trainer.is_global_zero:
        module = module.cpu()
        states = {**module.prior.trained_state(),
                  CONTROLLER_FILE: {k: v.contiguous() for k, v in module.controller.state_dict().items()}}
        writers = {name: (lambda path, state=state: save_file(state, str(path))) for name, state in states.items()}
        writers[stage1.WEIGHTS] = lambda path: save_codec(module.codec, path)
        manifest = Manifest(stage=STAGE, codec=to_dict(cfg.codec), lmbda=parent.lmbda, distortion=parent.distortion,
                            weights={}, metrics=metrics, git_commit=git_commit(),
                            parent=str(manifest_path(cfg.init_from).resolve()), parent_weights=parent.weights)
        write_final(final, manifest, writers, extra_text={"config.yaml": to_yaml(cfg)})
    trainer.strategy.barrier()
    return final


def load_final(final_dir: str | Path) -> tuple[LLICMModule, Manifest, str]:
    """(model ready to code and restore, manifest, sha256 of its codec weights) from a stage-2 final/;
    the pretrained prior and CLIP load from where the config names them."""
    from safetensors.torch import load_file

    from stages.config import load_config
    from stages.manifest import read_manifest

    manifest = read_manifest(final_dir, expect_stage=STAGE)
    folder = manifest_path(final_dir).parent
    module = LLICMModule(load_config(Stage2LLICMConfig, [folder / "config.yaml"]))
    load_codec_weights(module.codec, folder / stage1.WEIGHTS)
    module.prior.load_trained(folder)
    module.controller.load_state_dict(load_file(str(folder / CONTROLLER_FILE)), strict=True)
    return module.eval(), manifest, manifest.weights[stage1.WEIGHTS]
