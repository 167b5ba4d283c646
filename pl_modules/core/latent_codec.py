"""A codec for a diffusion VAE's latent (Diff-ICMH codes z, not pixels).

Mean-scale hyperprior (Minnen et al., 2018) without the autoregressive context: the context model
decodes position by position, which is what makes mbt2018 slow to decode, and a synthesis that
reads the Gaussian conditional's output lets training round straight through
(``round_straight_through``), so the UNet trains on the ẑ the file will hold. The authors' ELIC
variant adds channel groups and a checkerboard context for a few percent of rate; the hyperprior is
the part every CompressAI user can check.

Downsampling: SD's VAE latent is already 8× smaller than the image, so the analysis halves it once
and the hyper-analysis twice more: inputs pad to a multiple of 8 latent pixels (64 image pixels).
A pixel hyperprior's 16× analysis and 64× padding on a latent would pad every image to a multiple
of 512 pixels and code a latent as coarse as 1/128 of the image.
"""
from __future__ import annotations

import torch.nn as nn
from compressai.layers import GDN
from compressai.models import MeanScaleHyperprior
from compressai.models.utils import conv, deconv

LATENT_CHANNELS = 4
"""The latent channels of SD 1.x/2.x, sd-turbo and the tiny presets."""


class LatentMeanScaleHyperprior(MeanScaleHyperprior):
    def __init__(self, N: int, M: int, channels: int = LATENT_CHANNELS):
        super().__init__(N=N, M=M)
        self.g_a = nn.Sequential(conv(channels, N, kernel_size=3, stride=1), GDN(N), conv(N, N), GDN(N),
                                 conv(N, M, kernel_size=3, stride=1))
        self.g_s = nn.Sequential(conv(M, N, kernel_size=3, stride=1), GDN(N, inverse=True), deconv(N, N),
                                 GDN(N, inverse=True), conv(N, channels, kernel_size=3, stride=1))

    def decompress(self, strings, shape):
        # CompressAI's version clamps its output to [0, 1], an image's range; a latent has no such range.
        z_hat = self.entropy_bottleneck.decompress(strings[1], shape)
        scales_hat, means_hat = self.h_s(z_hat).chunk(2, 1)
        indexes = self.gaussian_conditional.build_indexes(scales_hat)
        y_hat = self.gaussian_conditional.decompress(strings[0], indexes, means=means_hat)
        return {"x_hat": self.g_s(y_hat)}
