"""Models by preset name: folders built on first use in $DIFFCODEC_CACHE (default ~/.cache/diffcodec)
and loaded through the same ``from_pretrained`` path as a hub id or a local folder. The random ones
(tiny_models.py) are built in a second; the trained ones (trained_presets.py) train for minutes, and
their folder names carry a digest of their training data and recipe, so that other data or another
recipe never loads a stale model."""
from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from foundation.locations import cache_dir
from pl_modules.prior import tiny_models, trained_presets

# Bump when a builder changes, so that no stale folder is loaded under a preset's name.
PRESET_VERSION = 2


@dataclass(frozen=True)
class Preset:
    build: Callable[[Path], object]
    """Writes the model into an empty folder."""
    cache_key: Callable[[], str] = lambda: ""
    """What else the folder depends on (training data, steps), as a short digest."""


PRESETS = {"tiny-sd": Preset(tiny_models.save_tiny_diffusion),
           "tiny-pixel": Preset(tiny_models.save_tiny_pixel_diffusion),
           "tiny-clip": Preset(tiny_models.save_tiny_clip),
           "tiny-vlm": Preset(tiny_models.save_tiny_vlm),
           "small-sd": Preset(trained_presets.build_small_sd, trained_presets.small_sd_key)}


def resolve_pretrained(name: str) -> str:
    """A preset's folder (built on first use), or ``name`` unchanged: a hub id or a folder."""
    return str(preset_folder(name)) if name in PRESETS else name


def preset_folder(name: str) -> Path:
    """The folder of a preset, built on first use. Built aside and renamed into place, so concurrent
    ranks never load a half-written folder."""
    preset = PRESETS[name]
    root = cache_dir("presets")
    key = preset.cache_key()
    folder = root / f"{name}-v{PRESET_VERSION}{'-' + key if key else ''}"
    if not folder.is_dir():
        root.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=root, prefix=f".{name}-"))
        try:
            preset.build(staging)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)  # an interrupted build leaves nothing half-made behind
            raise
        try:
            staging.rename(folder)
        except OSError:  # another process finished first; its folder is identical (fixed seeds)
            shutil.rmtree(staging)
    return folder
