"""The one way a stage runs: train (resuming from its own last.ckpt), then hand over ``final/``
with the module's trained weights, the resolved config and a manifest of what it trained with."""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

from safetensors.torch import save_file

from foundation.config import ConfigError, to_dict, to_yaml
from foundation.manifest import Manifest, manifest_path, read_manifest, write_final
from pl_modules.core.base import StageModule
from stages.provenance import git_commit
from stages.trainer import last_checkpoint, train_stage


def required_parent(cfg, what: str) -> str:
    """``cfg.init_from``, which a stage that continues another's work cannot run without."""
    if not cfg.init_from:
        raise ConfigError(f"init_from must name {what}")
    return cfg.init_from


def check_parent(init_from: str | Path, expect_stage: str, codec_cfg=None) -> Manifest:
    """The manifest at ``init_from``, after checking the stage that wrote it and, when given, that it
    holds this run's codec architecture."""
    manifest = read_manifest(init_from, expect_stage=expect_stage)
    if codec_cfg is not None and manifest.codec != to_dict(codec_cfg):
        raise ConfigError(f"init_from {init_from} holds codec {manifest.codec}, this run builds {to_dict(codec_cfg)}")
    return manifest


def run_stage(cfg, module: StageModule, datamodule, parent: Optional[Manifest] = None,
              warm_start: Optional[Callable[[Path], None]] = None) -> Path:
    """Fit ``module`` and write ``final/``. ``warm_start(parent folder)`` loads the parent's weights,
    only when the stage starts afresh (a resumed run has them, trained further, in last.ckpt)."""
    if parent is not None and warm_start is not None and last_checkpoint(cfg.stage_dir) is None:
        warm_start(manifest_path(cfg.init_from).parent)
    trainer, metrics = train_stage(cfg, module, datamodule)
    final = cfg.stage_dir / "final"
    if trainer.is_global_zero:
        module = module.cpu()
        # A stage that keeps its parent's codec frozen hands on the parent's description of it.
        codec = to_dict(cfg.codec) if hasattr(cfg, "codec") else (parent.codec if parent else None)
        manifest = Manifest(stage=module.STAGE, weights={}, params=module.manifest_params(),
                            codec=codec, metrics=metrics,
                            git_commit=git_commit(),
                            parent=str(manifest_path(cfg.init_from).resolve()) if parent else None,
                            parent_weights=parent.weights if parent else {})
        writers = {name: (lambda path, state=state: save_file(_contiguous(state), str(path)))
                   for name, state in module.final_states().items()}
        write_final(final, manifest, writers, extra_text={"config.yaml": to_yaml(cfg)})
    trainer.strategy.barrier()
    return final


def _contiguous(state: dict) -> dict:
    return {k: v.detach().cpu().contiguous() for k, v in state.items()}
