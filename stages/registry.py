"""Stage kinds a pipeline YAML can name: each is a config schema and the function that runs it."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from stages import stage1, stage2_difficmh, stage2_llicm, stage3_vlic


@dataclass(frozen=True)
class StageKind:
    schema: type
    run: Callable[..., Path]
    manifest_stage: str
    """The ``stage`` its manifests carry, which init_from and skip checks expect."""
    summary: str
    """One line for ``train.py --help``."""
    rd_prefix: str = "val/"
    """Where its manifest's validation metrics sit (``<prefix>bpp``, ``<prefix>psnr``): RD curves read them."""
    parent: str = ""
    """What its init_from must name when it cannot start without one (checked before any stage runs)."""


STAGE_KINDS: dict[str, StageKind] = {}


def register_stage(name: str, kind: StageKind) -> None:
    if name in STAGE_KINDS:
        raise KeyError(f"stage kind '{name}' is already registered")
    STAGE_KINDS[name] = kind


register_stage("stage1", StageKind(stage1.Stage1Config, stage1.run, stage1.STAGE,
                                    "rate–distortion pretraining of a CompressAI codec"))
register_stage("stage2-llicm", StageKind(stage2_llicm.Stage2LLICMConfig, stage2_llicm.run, stage2_llicm.STAGE,
                                         "LL-ICM: joint codec + CLIP-guided diffusion restoration (LoRA)",
                                         rd_prefix="val/all/", parent="a stage-1 final/ or an earlier stage"))
register_stage("stage2-difficmh", StageKind(stage2_difficmh.Stage2DiffICMHConfig, stage2_difficmh.run,
                                            stage2_difficmh.STAGE,
                                            "Diff-ICMH: latent codec + tag-guided diffusion decoder with semantic "
                                            "consistency (LoRA, ControlNet)"))
register_stage("stage3-vlic", StageKind(stage3_vlic.Stage3VLICConfig, stage3_vlic.run, stage3_vlic.STAGE,
                                        "VLIC: Diffusion-DPO post-training of a stage-2 decoder on 2AFC judgments",
                                        parent="a stage-2 final/ or an earlier stage"))
