"""Per-image results of a learned codec through real bitstreams (what `compress` would write)."""
from __future__ import annotations

from pathlib import Path

import torch
from torchmetrics.functional.image import multiscale_structural_similarity_index_measure as ms_ssim

from datamodules.images import list_images, load_rgb, to_tensor
from evaluation.classical import psnr_at_bpp
from pl_modules.core.bitstream import round_trip
from pl_modules.core.rate_distortion import MS_SSIM_MIN_SIDE, psnr


@torch.no_grad()
def evaluate_folder(codec, weights_sha256: str, folder: str | Path, anchor: str | None = "jpeg") -> list[dict]:
    """One row per image: real bpp (container bytes over original pixels), PSNR, MS-SSIM, and the
    anchor codec's PSNR at the same bpp."""
    rows = []
    for path in list_images(folder):
        image = load_rgb(path)
        x = to_tensor(image).unsqueeze(0)
        data, decoded = round_trip(codec, x, weights_sha256)
        row = {"image": path.name, "bpp": 8 * len(data) / (x.shape[-2] * x.shape[-1]), "psnr": psnr(decoded, x),
               "ms_ssim": ms_ssim(decoded, x, data_range=1.0).item() if min(x.shape[-2:]) >= MS_SSIM_MIN_SIDE
               else float("nan")}
        if anchor:
            row[f"{anchor}_psnr_at_bpp"] = psnr_at_bpp(image, row["bpp"], anchor)[1]
        rows.append(row)
    return rows


def mean_row(rows: list[dict]) -> dict:
    keys = [k for k in rows[0] if k != "image"]
    return {k: sum(r[k] for r in rows) / len(rows) for k in keys}
