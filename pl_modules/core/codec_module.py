"""Stage 1: a CompressAI codec trained on ``D + λ·R``, validated on real bitstreams."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torchmetrics.functional.image import multiscale_structural_similarity_index_measure as ms_ssim

from foundation.config import ModuleConfig
from pl_modules.core.base import StageModule
from pl_modules.core.bitstream import decode_image, encode_image, pad_to_multiple
from pl_modules.core.codecs import (ARCHITECTURES, CODEC_FILE, CodecConfig, build_codec, codec_state,
                                    load_codec_weights, require_pixel_codec, round_straight_through, split_parameters)
from pl_modules.core.rate_distortion import MS_SSIM_MIN_SIDE, RD_LOSSES, bits_per_pixel, psnr
from pl_modules.core.schedules import OptimConfig

STAGE = "stage1"
# Validation bitstreams are decoded by the same model that wrote them; no file identity is needed.
IN_MEMORY_ID = "00" * 32
LOGGED_IMAGES = 2


@dataclass
class CodecModuleConfig(ModuleConfig):
    lmbda: float = 0.0067
    """Rate–distortion trade-off λ (CompressAI's convention: it weighs the distortion)."""
    distortion: str = "mse"
    """Distortion: mse (λ·255²·MSE + bpp) or ms-ssim (λ·(1 − MS-SSIM) + bpp; crops ≥ 192)."""
    codec: CodecConfig = field(default_factory=CodecConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    compile: bool = False
    """torch.compile the training step's forward pass (about 1.4× on a CPU after a ~40 s compile;
    falls back to eager where no compiler is installed)."""
    channels_last: bool = False
    """Train in channels-last memory layout (about 1.1× on a CPU)."""
    straight_through: bool = False
    """Train the synthesis on the rounded latent the decoder will see (straight-through gradients),
    the rate on noisy likelihoods as before; hyperpriors without context models only."""
    straight_through_hyper: bool = False
    """With straight_through, round the hyper-latent z too (what the decoder's scales come from).
    Off by default: in the quickstart's 2,200 steps, rounding z cost 23 % more bits at the same λ and
    PSNR (docs/benchmarks.md); z then stays noisy, as in CompressAI's training."""

    def __post_init__(self) -> None:
        if self.distortion not in RD_LOSSES:
            raise ValueError(f"distortion must be mse or ms-ssim, got '{self.distortion}'")
        if self.lmbda <= 0:
            raise ValueError(f"lmbda must be positive, got {self.lmbda}")
        require_pixel_codec(self.codec.architecture, "stage 1")
        if self.straight_through and not ARCHITECTURES[self.codec.architecture].straight_through:
            raise ValueError(f"straight_through: {self.codec.architecture} quantises before its context model; "
                             f"use bmshj2018-hyperprior or mbt2018-mean, or straight_through=false")


class CodecModule(StageModule):
    STAGE = STAGE
    CONFIG = CodecModuleConfig
    VAL_METRICS = ("val/bpp", "val/bpp_estimated", "val/psnr", "val/ms_ssim", "val/loss")
    PROGRESS_KEY = "bpp"

    def __init__(self, cfg: CodecModuleConfig):
        super().__init__(cfg)
        self.codec = build_codec(cfg.codec.architecture, cfg.codec.N, cfg.codec.M)
        self.rd_loss = RD_LOSSES[cfg.distortion]
        if cfg.straight_through:
            round_straight_through(self.codec, cfg.straight_through_hyper)
        if cfg.channels_last:
            self.codec.to(memory_format=torch.channels_last)
        # A compiled function rather than a compiled submodule, whose state-dict keys would change.
        self.rd_terms = compiled(self._rd_terms) if cfg.compile else self._rd_terms

    def parameter_groups(self):
        net, aux = split_parameters(self.codec)
        return [{"params": net}], aux

    def losses(self, batch: dict):
        x = batch["image"]
        return self.rd_terms(x.contiguous(memory_format=torch.channels_last) if self.cfg.channels_last else x)

    def _rd_terms(self, x: torch.Tensor):
        out = self.codec(x)
        bpp = bits_per_pixel(out["likelihoods"], x.shape[0] * x.shape[-2] * x.shape[-1])
        return self.rd_loss(out["x_hat"], x, bpp, self.cfg.lmbda), self.codec.aux_loss()

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        x = batch["image"]
        likelihoods = self.codec(pad_to_multiple(x, self.codec.pad_multiple))["likelihoods"]
        stream = encode_image(self.codec, x, IN_MEMORY_ID)
        decoded = decode_image(self.codec, stream, IN_MEMORY_ID)
        metrics = {"val/bpp": stream.bits_per_pixel(), "val/psnr": psnr(decoded, x),
                   "val/bpp_estimated": bits_per_pixel(likelihoods, x.shape[-2] * x.shape[-1]).item()}
        if min(x.shape[-2:]) >= MS_SSIM_MIN_SIDE:
            metrics["val/ms_ssim"] = ms_ssim(decoded, x, data_range=1.0).item()
        if self.cfg.distortion == "mse" or "val/ms_ssim" in metrics:
            # The objective at the real operating point: real bytes, decoded 8-bit pixels.
            metrics["val/loss"] = self.rd_loss(decoded, x, torch.tensor(metrics["val/bpp"]), self.cfg.lmbda)["loss"].item()
        self.val_means.add(metrics)
        if batch_idx < LOGGED_IMAGES and self.global_rank == 0:
            self.log_image(f"val/reconstruction_{batch_idx}", decoded)

    def final_states(self):
        return {CODEC_FILE: codec_state(self.codec)}

    def load_final_states(self, folder: Path) -> None:
        load_codec_weights(self.codec, folder / CODEC_FILE)


def compiled(function):
    """``torch.compile(function)``, running eagerly where compiling fails (no C++ compiler, say):
    a quickstart on a bare machine must still train."""
    import torch._dynamo

    torch._dynamo.config.suppress_errors = True
    return torch.compile(function)
