"""Stage 2, LL-ICM: the codec trained jointly with a diffusion restorer, so that the image restored
from the decoded (degraded) one is close to the ideal clean image. Frozen CLIP features of the
decoded image drive a controller whose tokens condition the UNet's cross-attention."""
from __future__ import annotations

from typing import TYPE_CHECKING

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch.optim.lr_scheduler import LambdaLR
from torchmetrics.functional.image import multiscale_structural_similarity_index_measure as ms_ssim

from datamodules.degradations import TASKS
from evaluation.metrics import availability, measure
from pl_modules.bitstream import decode_image, encode_image
from pl_modules.codecs import build_codec, split_parameters
from pl_modules.controller import DegradationController, FrozenClipImageEncoder
from pl_modules.diffusion_prior import DiffusionPrior
from pl_modules.image_means import ImageMeans
from pl_modules.losses import MS_SSIM_MIN_SIDE, bits_per_pixel, llicm_loss, psnr
from pl_modules.schedules import lr_factor, step_seed

if TYPE_CHECKING:
    from stages.stage2_llicm import Stage2LLICMConfig

_IN_MEMORY_SHA = "00" * 32
VAL_METRICS = tuple(f"val/{task}/{m}" for task in (*TASKS, "all")
                    for m in ("bpp", "psnr", "ms_ssim", "lpips", "accuracy"))


class LLICMModule(L.LightningModule):
    def __init__(self, cfg: Stage2LLICMConfig):
        super().__init__()
        from stages.config import to_dict

        self.cfg = cfg
        self.save_hyperparameters(to_dict(cfg))
        self.automatic_optimization = False  # network and entropy-model quantiles have their own optimizers
        self.codec = build_codec(cfg.codec.architecture, cfg.codec.N, cfg.codec.M)
        self.prior = DiffusionPrior(cfg.prior)
        self.clip = FrozenClipImageEncoder(cfg.clip_model, cfg.prior.local_files_only)
        self.controller = DegradationController(self.clip.dim, self.prior.unet.config.cross_attention_dim,
                                                len(TASKS), cfg.content_tokens)
        self.val_means = ImageMeans(VAL_METRICS)
        self.lpips_unavailable = availability(["lpips"])["lpips"]
        self.validated_at_step = -1
        # Checkpoints leave out the frozen pretrained weights (GBs at SD size); on_load_checkpoint
        # checks that nothing else is missing.
        self.strict_loading = False

    def is_frozen_weight(self, key: str) -> bool:
        """Pretrained and never trained: the VAE, CLIP and the UNet but for what the prior trains."""
        if key.startswith(("prior.vae.", "clip.")):
            return True
        unet = "prior.unet."
        return key.startswith(unet) and not self.prior.is_trained(key[len(unet):])

    def trained_parameters(self) -> tuple[list[dict], list[torch.nn.Parameter]]:
        """(network parameter groups, auxiliary parameters): what the config trains; everything else
        is frozen and stays so."""
        self.codec.requires_grad_(self.cfg.train_codec)
        groups = [{"params": [*self.prior.trainable_parameters(), *self.controller.parameters()]}]
        aux = []
        if self.cfg.train_codec:
            codec_net, aux = split_parameters(self.codec)
            groups.append({"params": codec_net, "lr": self.cfg.codec_lr or self.cfg.optim.lr})
        return groups, aux

    def configure_optimizers(self):
        optim = self.cfg.optim
        groups, aux = self.trained_parameters()
        net = torch.optim.AdamW(groups, lr=optim.lr, weight_decay=0.0)
        schedule = LambdaLR(net, lambda step: lr_factor(step, self.cfg.trainer.max_steps, optim.warmup_steps,
                                                         optim.schedule, optim.final_lr_fraction))
        return [net, *([torch.optim.Adam(aux, lr=optim.aux_lr)] if aux else [])], [schedule]

    def losses(self, batch: dict) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """(LL-ICM loss terms, auxiliary entropy-model loss) of one batch of pairs."""
        degraded, clean, labels = batch["degraded"], batch["clean"], batch["task"]
        out = self.codec(degraded)
        bpp = bits_per_pixel(out["likelihoods"], degraded.shape[0] * degraded.shape[-2] * degraded.shape[-1])
        x_hat = out["x_hat"]
        condition = self.prior.encode(x_hat)  # frozen VAE, but differentiable: L_task reaches the codec
        with torch.no_grad():
            target = self.prior.encode(clean)
        logits, tokens = self.controller(self.clip(x_hat.detach()))
        noise = torch.randn_like(target)
        timesteps = torch.randint(0, self.prior.scheduler.config.num_train_timesteps, (len(target),),
                                  device=target.device)
        noisy = self.prior.scheduler.add_noise(target, noise, timesteps)
        prediction = self.prior.denoise(noisy, timesteps, condition, tokens)
        goal = self.prior.training_target(target, noise, timesteps)
        terms = llicm_loss(x_hat, degraded, bpp, prediction, goal, logits, labels, self.cfg.alpha, self.cfg.beta,
                           self.cfg.gamma, self.cfg.classification)
        aux_loss = self.codec.aux_loss() if self.cfg.train_codec else torch.zeros((), device=bpp.device)
        return terms, aux_loss

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        torch.manual_seed(step_seed(self.cfg.trainer.seed, self.global_step, self.global_rank))
        terms, aux_loss = self.losses(batch)
        finite = bool(torch.isfinite(terms["loss"]) and torch.isfinite(aux_loss))
        if not self.trainer.strategy.reduce_boolean_decision(finite, all=True):
            raise FloatingPointError(f"non-finite loss at step {self.global_step}; last.ckpt holds the last good state")
        optimizers = self.optimizers()
        optimizers = optimizers if isinstance(optimizers, list) else [optimizers]
        for optimizer in optimizers:
            optimizer.zero_grad(set_to_none=True)
        self.manual_backward(terms["loss"] + aux_loss)
        if self.cfg.optim.clip_grad_norm > 0:
            self.clip_gradients(optimizers[0], gradient_clip_val=self.cfg.optim.clip_grad_norm,
                                gradient_clip_algorithm="norm")
        optimizers[0].step()
        for optimizer in optimizers[1:]:
            optimizer.optimizer.step()  # raw: one global step per batch (see CodecModule)
        self.lr_schedulers().step()
        if self.global_step % self.cfg.trainer.log_every == 0 and self.logger is not None:
            scalars = {f"train/{k}": v.item() for k, v in terms.items()}
            scalars["train/lr"] = self.lr_schedulers().get_last_lr()[0]
            self.logger.log_metrics(scalars, step=self.global_step)
        self.log("loss", terms["loss"].detach(), prog_bar=True, logger=False)
        return terms["loss"]

    def on_validation_epoch_start(self) -> None:
        self.codec.update(force=True)
        self.val_means.reset()
        if self.lpips_unavailable:
            rank_zero_warn(f"validation LPIPS: unavailable: {self.lpips_unavailable}")

    @torch.no_grad()
    def restore(self, decoded: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(restored image, task logits) from a decoded image, sampled with a fixed seed."""
        logits, tokens = self.controller(self.clip(decoded))
        generator = torch.Generator(device=decoded.device).manual_seed(seed)
        latents = self.prior.sample(self.prior.encode(decoded), tokens, generator)
        return self.prior.decode(latents), logits

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        degraded, clean, label = batch["degraded"], batch["clean"], int(batch["task"])
        stream = encode_image(self.codec, degraded, _IN_MEMORY_SHA)
        decoded = decode_image(self.codec, stream, _IN_MEMORY_SHA)
        restored, logits = self.restore(decoded, seed=batch["seed"])  # per item: the same under any world size
        metrics = {"bpp": stream.bits_per_pixel(), "psnr": psnr(restored, clean),
                   "accuracy": float(logits.argmax(-1).item() == label)}
        if min(clean.shape[-2:]) >= MS_SSIM_MIN_SIDE:
            metrics["ms_ssim"] = ms_ssim(restored, clean, data_range=1.0).item()
        if not self.lpips_unavailable:
            metrics.update(measure(["lpips"], restored, clean))
        for scope in (TASKS[label], "all"):
            self.val_means.add({f"val/{scope}/{k}": v for k, v in metrics.items()})

    def on_validation_epoch_end(self) -> None:
        self.log_dict(self.val_means.means(self.trainer.strategy), sync_dist=False)
        self.validated_at_step = self.global_step

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if not self.is_frozen_weight(k)}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        expected = {k for k in self.state_dict() if not self.is_frozen_weight(k)}
        missing, unexpected = expected - set(checkpoint["state_dict"]), set(checkpoint["state_dict"]) - expected
        if missing or unexpected:
            raise ValueError(f"checkpoint does not match this stage-2 model: missing {sorted(missing)[:5]}, "
                             f"unexpected {sorted(unexpected)[:5]}")
        # As in CodecModule: CompressAI resizes the coder tables that update() sized.
        prefix = "codec."
        self.codec.load_state_dict({k[len(prefix):]: v for k, v in checkpoint["state_dict"].items()
                                    if k.startswith(prefix)})
