"""FID and KID between originals and reconstructions on 256×256 patches, the protocol of HiFiC
(Mentzer et al. 2020) and MS-ILLM (Muckley et al. 2023): a patch grid plus a second grid shifted by
half a patch, so that small evaluation sets still give enough samples. Needs the FID Inception
weights in torch hub's cache; without them both are unavailable."""
from __future__ import annotations

from functools import cache

import numpy as np
import torch

from pl_modules.scoring.metrics import hub_weights

FID_WEIGHTS = "pt_inception-2015-12-05-6726825d.pth"
unavailable = hub_weights(FID_WEIGHTS)


def patches(x: torch.Tensor, size: int = 256) -> torch.Tensor:
    """Every patch of the aligned grid and of the grid shifted by size/2 (1×3×H×W → N×3×size×size)."""
    out = []
    for offset in (0, size // 2):
        body = x[..., offset:, offset:]
        rows, cols = body.shape[-2] // size, body.shape[-1] // size
        out += [body[..., r * size:(r + 1) * size, c * size:(c + 1) * size] for r in range(rows) for c in range(cols)]
    return torch.cat(out) if out else x.new_zeros(0, 3, size, size)


@cache
def _inception():
    from piq.feature_extractors import InceptionV3

    return InceptionV3(output_blocks=[3], resize_input=True, normalize_input=True).eval()


@torch.no_grad()
def inception_features(x: torch.Tensor, size: int = 256) -> np.ndarray:
    """2048-d pool features of every patch of one image."""
    crops = patches(x.clamp(0, 1), size)
    if len(crops) == 0:
        return np.zeros((0, 2048), np.float32)
    return _inception()(crops)[0].flatten(1).numpy()


def fid_kid(real: np.ndarray, fake: np.ndarray) -> dict[str, float]:
    import piq

    real_t, fake_t = torch.from_numpy(real).double(), torch.from_numpy(fake).double()
    return {"fid": piq.FID().compute_metric(real_t, fake_t).item(),
            "kid": piq.KID(subset_size=min(1000, len(real))).compute_metric(real_t, fake_t).item()}
