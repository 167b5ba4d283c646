"""Rate–distortion losses in CompressAI's convention (λ weighs distortion, not rate), the rate
estimate and PSNR: what every stage with a codec shares."""
from __future__ import annotations

import math

import torch
from torchmetrics.functional.image import multiscale_structural_similarity_index_measure

# Five scales of an 11-px window need at least this many pixels on the short side.
MS_SSIM_MIN_SIDE = 161


def bits_per_pixel(likelihoods: dict[str, torch.Tensor], num_pixels: int) -> torch.Tensor:
    """Estimated rate: −Σ log2 p over every latent, divided by the pixels of the input (batch included)."""
    return sum(torch.log(lk).sum() for lk in likelihoods.values()) / (-math.log(2) * num_pixels)


def mse_rd_loss(x_hat: torch.Tensor, x: torch.Tensor, bpp: torch.Tensor, lmbda: float) -> dict[str, torch.Tensor]:
    """``λ·255²·MSE + bpp`` on images in [0, 1]."""
    mse = torch.mean((x_hat - x) ** 2)
    return {"loss": lmbda * 255**2 * mse + bpp, "bpp": bpp, "mse": mse}


def msssim_rd_loss(x_hat: torch.Tensor, x: torch.Tensor, bpp: torch.Tensor, lmbda: float) -> dict[str, torch.Tensor]:
    """``λ·(1 − MS-SSIM) + bpp`` on images in [0, 1] of at least 161 px."""
    ms_ssim = multiscale_structural_similarity_index_measure(x_hat.float(), x.float(), data_range=1.0)
    return {"loss": lmbda * (1 - ms_ssim) + bpp, "bpp": bpp, "ms_ssim": ms_ssim}


RD_LOSSES = {"mse": mse_rd_loss, "ms-ssim": msssim_rd_loss}


def psnr(x_hat: torch.Tensor, x: torch.Tensor, data_range: float = 1.0) -> float:
    mse = torch.mean((x_hat.double() - x.double()) ** 2).item()
    return float("inf") if mse == 0 else 10 * math.log10(data_range**2 / mse)
