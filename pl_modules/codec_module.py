"""Stage 1: a CompressAI codec trained on ``D + λ·R``, validated on real bitstreams."""
from __future__ import annotations

from typing import TYPE_CHECKING

import lightning as L
import torch
from torch.optim.lr_scheduler import LambdaLR

from pl_modules.bitstream import decode_image, encode_image, pad_to_multiple
from pl_modules.codecs import build_codec, split_parameters
from pl_modules.image_means import ImageMeans
from pl_modules.losses import MS_SSIM_MIN_SIDE, RD_LOSSES, bits_per_pixel, psnr
from pl_modules.schedules import lr_factor, step_seed
from torchmetrics.functional.image import multiscale_structural_similarity_index_measure as ms_ssim

if TYPE_CHECKING:
    from stages.stage1 import Stage1Config

# Validation bitstreams are decoded by the same model that wrote them; no file identity is needed.
_IN_MEMORY_SHA = "00" * 32
LOGGED_IMAGES = 2
VAL_METRICS = ("val/bpp", "val/bpp_estimated", "val/psnr", "val/ms_ssim", "val/loss")


class CodecModule(L.LightningModule):
    def __init__(self, cfg: Stage1Config):
        super().__init__()
        from stages.config import to_dict

        self.cfg = cfg
        self.save_hyperparameters(to_dict(cfg))
        # Two optimizers (network, entropy-model quantiles) as in CompressAI's examples/train.py.
        self.automatic_optimization = False
        self.codec = build_codec(cfg.codec.architecture, cfg.codec.N, cfg.codec.M)
        self.rd_loss = RD_LOSSES[cfg.distortion]
        self.skipped_samples = 0
        self.validated_at_step = -1
        self.val_means = ImageMeans(VAL_METRICS)

    def configure_optimizers(self):
        net, aux = split_parameters(self.codec)
        optim = self.cfg.optim
        net_opt = torch.optim.Adam(net, lr=optim.lr)
        aux_opt = torch.optim.Adam(aux, lr=optim.aux_lr)
        schedule = LambdaLR(net_opt, lambda step: lr_factor(step, self.cfg.trainer.max_steps, optim.warmup_steps,
                                                             optim.schedule, optim.final_lr_fraction))
        return [net_opt, aux_opt], [schedule]

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        # Quantisation noise is drawn from the global generator: reseeding it from (seed, step, rank)
        # makes a resumed run draw what the uninterrupted run drew.
        torch.manual_seed(step_seed(self.cfg.trainer.seed, self.global_step, self.global_rank))
        x = batch["image"]
        out = self.codec(x)
        bpp = bits_per_pixel(out["likelihoods"], x.shape[0] * x.shape[-2] * x.shape[-1])
        rd = self.rd_loss(out["x_hat"], x, bpp, self.cfg.lmbda)
        aux_loss = self.codec.aux_loss()
        finite = bool(torch.isfinite(rd["loss"]) and torch.isfinite(aux_loss))
        # Every rank must stop together, or the others would wait on this one's gradients forever.
        if not self.trainer.strategy.reduce_boolean_decision(finite, all=True):
            raise FloatingPointError(f"non-finite loss at step {self.global_step} (rank {self.global_rank}: rd "
                                     f"{rd['loss'].item()}, aux {aux_loss.item()}); last.ckpt holds the last good state")
        net_opt, aux_opt = self.optimizers()
        net_opt.zero_grad(set_to_none=True)
        aux_opt.zero_grad(set_to_none=True)
        # The two losses share no parameters, so one backward pass gives both sets of gradients.
        self.manual_backward(rd["loss"] + aux_loss)
        if self.cfg.optim.clip_grad_norm > 0:
            self.clip_gradients(net_opt, gradient_clip_val=self.cfg.optim.clip_grad_norm, gradient_clip_algorithm="norm")
        net_opt.step()
        # The raw step: Lightning counts every LightningOptimizer.step as a global step, and a
        # step here must be one batch so that max_steps, the LR schedule and resume agree.
        aux_opt.optimizer.step()
        self.lr_schedulers().step()
        self.skipped_samples += int(batch["skipped"])
        if self.global_step % self.cfg.trainer.log_every == 0:
            self._log_train(rd, aux_loss)
        return rd["loss"]

    def _log_train(self, rd: dict, aux_loss: torch.Tensor) -> None:
        """Straight to the logger: Lightning's per-step metric bookkeeping costs ~5 % of a CPU step."""
        scalars = {f"train/{k}": v.item() for k, v in rd.items()}
        scalars["train/aux_loss"] = aux_loss.item()
        scalars["train/lr"] = self.lr_schedulers().get_last_lr()[0]
        scalars["train/skipped_samples"] = float(self.skipped_samples)
        if self.logger is not None:
            self.logger.log_metrics(scalars, step=self.global_step)
        self.log("bpp", scalars["train/bpp"], prog_bar=True, logger=False)

    def on_validation_epoch_start(self) -> None:
        self.codec.update(force=True)
        self.val_means.reset()

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        x = batch["image"]
        likelihoods = self.codec(pad_to_multiple(x))["likelihoods"]
        stream = encode_image(self.codec, x, _IN_MEMORY_SHA)
        decoded = decode_image(self.codec, stream, _IN_MEMORY_SHA)
        metrics = {"val/bpp": stream.bits_per_pixel(), "val/psnr": psnr(decoded, x),
                   "val/bpp_estimated": bits_per_pixel(likelihoods, x.shape[-2] * x.shape[-1]).item()}
        if min(x.shape[-2:]) >= MS_SSIM_MIN_SIDE:
            metrics["val/ms_ssim"] = ms_ssim(decoded, x, data_range=1.0).item()
        if self.cfg.distortion == "mse" or "val/ms_ssim" in metrics:
            # The objective at the real operating point: real bytes, decoded 8-bit pixels.
            metrics["val/loss"] = self.rd_loss(decoded, x, torch.tensor(metrics["val/bpp"]), self.cfg.lmbda)["loss"].item()
        self.val_means.add(metrics)
        if batch_idx < LOGGED_IMAGES and self.global_rank == 0:
            self._log_image(f"val/reconstruction_{batch_idx}", decoded)

    def on_validation_epoch_end(self) -> None:
        # Already reduced over ranks: every rank logs the same global means.
        self.log_dict(self.val_means.means(self.trainer.strategy), sync_dist=False)
        self.validated_at_step = self.global_step

    def _log_image(self, tag: str, image: torch.Tensor) -> None:
        experiment = getattr(self.logger, "experiment", None)
        if experiment is not None and hasattr(experiment, "add_image"):
            experiment.add_image(tag, image[0].cpu(), self.global_step)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["skipped_samples"] = self.skipped_samples

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.skipped_samples = checkpoint.get("skipped_samples", 0)
        # The entropy coder's tables were sized by update() before the checkpoint; CompressAI's own
        # load_state_dict resizes ours to match, which Lightning's generic load would refuse.
        prefix = "codec."
        self.codec.load_state_dict({k[len(prefix):]: v for k, v in checkpoint["state_dict"].items()
                                    if k.startswith(prefix)})
