"""A stage's ``final/`` → a ready model, chosen by the manifest's ``stage`` field. Evaluation and
the codec commands load every model through here, so neither needs to know the stages that wrote
them; a new method registers its module once."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Optional

import torch
from compressai.models import CompressionModel

from foundation.config import load_config
from foundation.manifest import Manifest, ManifestError, manifest_path, read_manifest
from pl_modules.core.base import StageModule
from pl_modules.core.codec_module import CodecModule
from pl_modules.difficmh.module import DiffICMHModule
from pl_modules.llicm.module import LLICMModule
from pl_modules.vlic.module import VLICModule

FINAL_KINDS: dict[str, type[StageModule]] = {}


def register_final(module: type[StageModule]) -> None:
    if module.STAGE in FINAL_KINDS:
        raise KeyError(f"a loader for stage '{module.STAGE}' is already registered")
    FINAL_KINDS[module.STAGE] = module


register_final(CodecModule)
register_final(LLICMModule)
register_final(DiffICMHModule)
register_final(VLICModule)


@dataclass
class Final:
    model: StageModule
    """In eval mode, its trained weights loaded strictly."""
    manifest: Manifest
    folder: Path

    @property
    def codec(self):
        return self.model.codec

    @property
    def decoder_id(self) -> str:
        return decoder_id(self.manifest)

    @property
    def setting(self) -> Optional[float]:
        """The rate setting λ its codec was trained at (read up the parent chain), the label of an RD point."""
        return rate_setting(self.folder)


def decoder_id(manifest: Manifest) -> str:
    """The id bitstreams carry: sha256 over the stage and every trained weights file the model
    decodes with — a stage-3 decoder shares its parent's codec but not its id."""
    record = json.dumps({"stage": manifest.stage, "weights": sorted(manifest.weights.items())})
    return hashlib.sha256(record.encode()).hexdigest()


def module_config(module: type[StageModule], manifest: Manifest, folder: Path):
    """The module's config from the manifest's params, read back strictly (unknown keys fail); a
    version-1 manifest's from the stage's config.yaml, less the stage-only keys."""
    if manifest.format_version >= 2:
        return load_config(module.CONFIG, [manifest.params])
    import yaml

    names = {f.name for f in fields(module.CONFIG)}
    saved = yaml.safe_load((folder / "config.yaml").read_text())
    return load_config(module.CONFIG, [{k: v for k, v in saved.items() if k in names}])


def load_final(path: str | Path, expect_stage: Optional[str] = None, need_codec: bool = False,
               device: str | torch.device = "cpu") -> Final:
    """``device``: where the networks run (``auto``: the GPU when there is one; see :func:`place`)."""
    manifest = read_manifest(path, expect_stage=expect_stage)
    folder = manifest_path(path).parent
    if manifest.stage not in FINAL_KINDS:
        raise ManifestError(f"{folder}: no loader for stage '{manifest.stage}' (known: {sorted(FINAL_KINDS)})")
    if need_codec and manifest.codec is None:
        raise ManifestError(f"{folder}: a {manifest.stage} model has no codec")
    module = FINAL_KINDS[manifest.stage]
    model = module(module_config(module, manifest, folder))
    model.load_final_states(folder)
    return Final(place(model.eval(), resolve_device(device)), manifest, folder)


def place(model: StageModule, device: str | torch.device) -> StageModule:
    """The model on ``device`` but its entropy codecs on the CPU. Both ends of a bitstream must
    compute the same probabilities bit for bit, and GPU kernels differ between cards, drivers and
    runs (a file written on one machine decodes to garbage on another: CompressAI #279; CPU kernels
    can differ between instruction sets too, far more rarely); the codec is the small part, the
    diffusion decoder the one worth a GPU."""
    model.to(device)
    for module in model.modules():
        if isinstance(module, CompressionModel):
            module.cpu()
    return model


def resolve_device(name: str | torch.device) -> torch.device:
    """``auto``: the GPU when there is one; a named device that is absent is refused in one line."""
    if isinstance(name, torch.device):
        return name
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device '{name}': no CUDA device here (use cpu or auto)")
    try:
        device = torch.device(name)
        torch.empty(0, device=device)  # an absent device or ordinal fails here, not halfway through a model
    except (RuntimeError, AssertionError) as err:
        raise ValueError(f"device '{name}': {str(err).splitlines()[0].split('. ')[0]}") from None
    return device


def rate_setting(path: str | Path) -> Optional[float]:
    """The rate setting of this stage (λ, or Diff-ICMH's rate weight: the module's RATE_SETTING), or
    of the nearest ancestor that has one; None when the chain is broken."""
    try:
        manifest = read_manifest(path, verify=False)
    except ManifestError:
        return None
    key = FINAL_KINDS[manifest.stage].RATE_SETTING if manifest.stage in FINAL_KINDS else "lmbda"
    if key in manifest.params:
        return manifest.params[key]
    return rate_setting(manifest.parent) if manifest.parent else None
