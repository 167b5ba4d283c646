"""Sampling a latent larger than the UNet should see at once: overlapping tiles, blended with
linear ramps across each overlap (MultiDiffusion, Bar-Tal et al., 2023), so that memory follows
the tile and not the image."""
from __future__ import annotations

from typing import Callable, Optional

import torch


def tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    """Offsets of tiles of ``tile`` along a side of ``size``, overlapping by at least ``overlap``;
    the last one ends at the edge (a side shorter than a tile is one tile of its own size)."""
    if size <= tile:
        return [0]
    starts = list(range(0, size - tile, tile - overlap))
    return starts + [size - tile]


def blend_ramp(height: int, width: int, overlap: int, device=None) -> torch.Tensor:
    """1×1×H×W weights rising linearly over ``overlap`` pixels from each edge (never 0)."""
    def ramp(n: int) -> torch.Tensor:
        i = torch.arange(n, device=device, dtype=torch.float32)
        return torch.minimum(torch.minimum(i + 1, n - i), torch.tensor(float(overlap + 1), device=device)) / (overlap + 1)
    return (ramp(height)[:, None] * ramp(width)[None, :])[None, None]


def tiled(predict: Callable[[torch.Tensor, Optional[torch.Tensor]], torch.Tensor], noisy: torch.Tensor,
          condition: Optional[torch.Tensor], tile: int, out_channels: int) -> torch.Tensor:
    """``predict(noisy window, condition window)`` over tiles of ``tile`` overlapping by a quarter,
    blended into one prediction of ``out_channels``."""
    height, width = noisy.shape[-2:]
    overlap = tile // 4
    total = torch.zeros(len(noisy), out_channels, height, width, device=noisy.device)
    weight = torch.zeros(1, 1, height, width, device=noisy.device)
    for top in tile_starts(height, tile, overlap):
        for left in tile_starts(width, tile, overlap):
            window = (..., slice(top, top + tile), slice(left, left + tile))
            part = predict(noisy[window], None if condition is None else condition[window])
            ramp = blend_ramp(*part.shape[-2:], overlap, device=noisy.device)
            total[window] += part.float() * ramp
            weight[window] += ramp
    return (total / weight).to(noisy.dtype)
