"""Where the project keeps files outside the repository (its caches) and where it finds the shared
photographs, so no module computes a folder of its own."""
from __future__ import annotations

import os
from pathlib import Path

CACHE_VARIABLE = "DIFFCODEC_CACHE"
SHARED_DATA_VARIABLE = "DIFFCODEC_SHARED_DATA"
CACHE_KINDS = ("presets", "judgments", "metric-weights")


def cache_dir(kind: str) -> Path:
    """The folder of one kind of cached file. ``presets`` and ``judgments`` live in $DIFFCODEC_CACHE
    (default ~/.cache/diffcodec); ``metric-weights`` is torch hub's checkpoint folder
    ($TORCH_HOME/hub/checkpoints), where torchvision, piq and LPIPS look for their weights."""
    if kind not in CACHE_KINDS:
        raise ValueError(f"unknown cache kind '{kind}' (one of {', '.join(CACHE_KINDS)})")
    if kind == "metric-weights":
        import torch

        return Path(torch.hub.get_dir()) / "checkpoints"
    return Path(os.environ.get(CACHE_VARIABLE, Path.home() / ".cache" / "diffcodec")) / kind


def shared_data() -> Path:
    """The shared photographs (Kodak, BSDS500, …): $DIFFCODEC_SHARED_DATA, else ``shared/data`` beside
    the checkout this package was imported from. The folder may be absent (a user's machine)."""
    if os.environ.get(SHARED_DATA_VARIABLE):
        return Path(os.environ[SHARED_DATA_VARIABLE])
    return Path(__file__).resolve().parent.parent.parent / "shared" / "data"
