"""Stage 2, LL-ICM: the codec trained jointly with a diffusion restorer, so that the image restored
from the decoded (degraded) one is close to the ideal clean image. Frozen CLIP features of the
decoded image drive a controller whose tokens condition the UNet's cross-attention."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from lightning.pytorch.utilities import rank_zero_warn
from safetensors.torch import load_file
from torchmetrics.functional.image import multiscale_structural_similarity_index_measure as ms_ssim

from datamodules.degradations import TASKS
from foundation.config import ModuleConfig
from pl_modules.core.base import StageModule
from pl_modules.core.bitstream import BitstreamError, Sampler, decode_image, encode_image
from pl_modules.core.codec_module import IN_MEMORY_ID
from pl_modules.core.codecs import (ARCHITECTURES, CODEC_FILE, CodecConfig, as_decoded, build_codec, codec_state,
                                    load_codec_weights, require_pixel_codec, round_straight_through, split_parameters)
from pl_modules.core.rate_distortion import MS_SSIM_MIN_SIDE, bits_per_pixel, psnr
from pl_modules.core.schedules import OptimConfig
from pl_modules.llicm.controller import DegradationController, FrozenClipImageEncoder
from pl_modules.llicm.losses import llicm_loss
from pl_modules.prior.diffusion_prior import DiffusionPrior, DiffusionPriorConfig
from pl_modules.scoring.metrics import availability, measure

STAGE = "stage2-llicm"
CONTROLLER_FILE = "controller.safetensors"


@dataclass
class LLICMConfig(ModuleConfig):
    codec: CodecConfig = field(default_factory=CodecConfig)
    """The stage-1 codec's architecture; must match init_from's manifest."""
    prior: DiffusionPriorConfig = field(default_factory=DiffusionPriorConfig)
    clip_model: str = "???"
    """CLIP (hub id or local folder) whose frozen image features drive the controller."""
    content_tokens: int = 4
    """Cross-attention tokens describing content (one more names the degradation)."""
    train_codec: bool = True
    """Train the codec jointly (LL-ICM) or keep the stage-1 codec frozen (the baseline's first half)."""
    alpha: float = 1.0
    """Weight of MSE(X̂, X): the decoded image against the degraded input (the paper's Eq. 5);
    0 leaves the rate and the task alone (its Eq. 1), so the codec is not paid to keep noise."""
    beta: Optional[float] = None
    """Weight of the rate R in bpp; null: derived from the parent's λ so that the codec keeps its
    trade-off, β = (α + 4γ)/(λ·255²) for the residual pixel prior, α/(λ·255²) otherwise
    (pl_modules/llicm/losses.py::matched_rate_weight says what that rests on); judge it by the bpp."""
    beta_scale: float = 1.0
    """Multiplier on the derived β (beta null). The formula holds at the restorer's identity start
    only; a codec trained jointly for the task spends more bits than it predicts, so rate-matched
    comparisons raise this until the measured bpp matches the parent's (docs/results.md)."""
    rate_match: bool = False
    """Hold the joint codec to its parent's rate: a frozen copy of the stage-1 codec codes the same
    batch, and β follows by dual ascent, ``log β += rate_match_step · log(bpp / bpp_parent)`` each step
    (averaged over ranks; kept in checkpoints), from its set or derived value. Rate-matched arms then
    match by construction on the training data; the measured bpp still judges."""
    rate_match_step: float = 0.05
    """Dual-ascent step on log β per step."""
    gamma: float = 1.0
    """Weight of the diffusion loss toward the ideal (clean) image."""
    eight_bit: bool = True
    """The restorer trains on X̂ clamped and rounded to 8 bits, as the file decodes it (the latents are
    always rounded as the decoder rounds them, gradients straight through); false: clamped floats."""
    classification: float = 0.1
    """Weight of the controller's degradation classification (cross-entropy)."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Adam for the prior and the controller (lr, schedule, clipping), Adam for the quantiles (aux_lr)."""
    codec_lr: float = 0.0
    """Learning rate of the codec when it trains jointly (0: optim.lr); a pretrained codec usually
    wants less than the modules that start from scratch. The schedule scales it too."""

    def __post_init__(self) -> None:
        require_pixel_codec(self.codec.architecture, "LL-ICM")
        if not ARCHITECTURES[self.codec.architecture].straight_through:
            raise ValueError(f"codec.architecture: the restorer trains on the decoded image, which needs "
                             f"straight-through rounding (bmshj2018-hyperprior, mbt2018-mean), not "
                             f"{self.codec.architecture}")
        if self.prior.frozen_dtype == "bfloat16" and self.trainer.precision != "bf16-mixed":
            raise ValueError("prior.frozen_dtype=bfloat16 needs trainer.precision=bf16-mixed")
        if self.rate_match and not self.train_codec:
            raise ValueError("rate_match: needs train_codec=true (a frozen codec keeps its parent's rate already)")
        if self.rate_match_step <= 0:
            raise ValueError(f"rate_match_step must be positive, got {self.rate_match_step}")
        if not self.prior.condition_channels:
            raise ValueError("prior.condition_channels must be the UNet's input channels: the decoded image "
                             "conditions the restoration")


class LLICMModule(StageModule):
    STAGE = STAGE
    CONFIG = LLICMConfig
    VAL_METRICS = tuple(f"val/{task}/{m}" for task in (*TASKS, "all")
                        for m in ("bpp", "psnr", "ms_ssim", "lpips", "accuracy"))

    def __init__(self, cfg: LLICMConfig, beta: Optional[float] = None):
        """``beta``: the rate weight when the config leaves it to be derived (the stage derives it
        from the parent; a final loaded to restore images needs none)."""
        super().__init__(cfg)
        self.beta = cfg.beta if cfg.beta is not None else beta
        self.codec = build_codec(cfg.codec.architecture, cfg.codec.N, cfg.codec.M)
        # Training decodes as the file does: rounded latents, noisy likelihoods for the rate.
        round_straight_through(self.codec)
        self.prior = DiffusionPrior(cfg.prior)
        self.clip = FrozenClipImageEncoder(cfg.clip_model, cfg.prior.local_files_only)
        self.controller = DegradationController(self.clip.dim, self.prior.unet.config.cross_attention_dim,
                                                len(TASKS), cfg.content_tokens)
        self.lpips_unavailable = availability(["lpips"])["lpips"]
        self.rate_reference: Optional[torch.nn.Module] = None
        if cfg.rate_match:
            # log(β used / β): the dual variable, in the state dict so that resume keeps it.
            self.register_buffer("rate_log_scale", torch.zeros(()))

    def hold_rate_to(self, parent_codec: torch.nn.Module) -> None:
        """rate_match: the stage-1 codec, frozen, whose bpp on each batch the joint codec is held to."""
        self.rate_reference = parent_codec.requires_grad_(False)

    @property
    def rate_weight(self) -> float:
        return self.beta * float(torch.exp(self.rate_log_scale))

    def is_frozen_weight(self, key: str) -> bool:
        """Pretrained and never trained: the VAE, CLIP and the UNet but for what the prior trains."""
        if key.startswith(("prior.vae.", "clip.", "rate_reference.")):
            return True
        unet = "prior.unet."
        return key.startswith(unet) and not self.prior.is_trained(key[len(unet):])

    def parameter_groups(self):
        self.codec.requires_grad_(self.cfg.train_codec)
        groups = [{"params": [*self.prior.trainable_parameters(), *self.controller.parameters()]}]
        aux = []
        if self.cfg.train_codec:
            codec_net, aux = split_parameters(self.codec)
            groups.append({"params": codec_net, "lr": self.cfg.codec_lr or self.cfg.optim.lr})
        return groups, aux

    def losses(self, batch: dict) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """(LL-ICM loss terms, auxiliary entropy-model loss) of one batch of pairs."""
        if self.beta is None:
            raise ValueError("beta is not set: give it in the config or derive it from the parent (stage 2's run)")
        degraded, clean, labels = batch["degraded"], batch["clean"], batch["task"]
        out = self.codec(degraded)
        pixels = degraded.shape[0] * degraded.shape[-2] * degraded.shape[-1]
        bpp = bits_per_pixel(out["likelihoods"], pixels)
        x_hat = as_decoded(out["x_hat"], self.cfg.eight_bit)
        condition = self.prior.encode(x_hat)  # frozen VAE, but differentiable: L_task reaches the codec
        with torch.no_grad():
            target = self.prior.encode(clean)
        logits, tokens = self.controller(self.clip(x_hat.detach()))
        task = self.prior.diffusion_loss(target, condition, tokens).mean()
        beta = self.rate_weight if self.cfg.rate_match else self.beta
        terms = llicm_loss(x_hat, degraded, bpp, task, logits, labels, self.cfg.alpha, beta,
                           self.cfg.gamma, self.cfg.classification)
        if self.cfg.rate_match:
            if self.rate_reference is None:
                raise ValueError("rate_match: no parent codec to hold the rate to (the stage attaches it)")
            with torch.no_grad():
                parent_bpp = bits_per_pixel(self.rate_reference(degraded)["likelihoods"], pixels)
            terms.update(bpp_parent=parent_bpp, beta=torch.tensor(beta))
            self.step_rate_weight(torch.log(bpp.detach() / parent_bpp))  # β of the next step
        aux_loss = self.codec.aux_loss() if self.cfg.train_codec else torch.zeros((), device=bpp.device)
        return terms, aux_loss

    def step_rate_weight(self, log_ratio: torch.Tensor) -> None:
        """One dual-ascent step of rate_match: β grows while the codec spends more than its parent.
        Inside the training step, so that a checkpoint taken after it holds the updated β."""
        # Every rank takes the same step: the mean log-ratio over the ranks' batches.
        log_ratio = self.reduce_over_ranks(log_ratio, "mean")
        self.rate_log_scale += self.cfg.rate_match_step * log_ratio.to(self.rate_log_scale)

    def manifest_params(self) -> dict:
        return {**super().manifest_params(), "beta": self.beta}

    def on_validation_epoch_start(self) -> None:
        super().on_validation_epoch_start()
        if self.lpips_unavailable:
            rank_zero_warn(f"validation LPIPS: unavailable: {self.lpips_unavailable}")

    @torch.no_grad()
    def restore(self, decoded: torch.Tensor, seed: int, steps: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(restored image, task logits) from a decoded image, sampled with a fixed seed."""
        inputs = self.inputs_of_decoded(decoded.to(self.device))
        return self.generate(inputs, seed, steps), inputs["logits"]

    # ---- the diffusion-decoder interface stage 3 post-trains through ---------------------------
    @torch.no_grad()
    def decoder_inputs(self, batch: dict) -> dict[str, torch.Tensor]:
        """What the decoder has of each (degraded, clean) pair once its bits are decoded: the codec's
        decoded image of the degraded input (real bitstreams, or the pair's ``decoded`` image when it
        comes from preference shards) as the UNet's condition, and the controller's tokens."""
        decoded = batch.get("decoded")
        if decoded is None:
            streams = [encode_image(self.codec, x[None], IN_MEMORY_ID) for x in batch["degraded"]]
            decoded = torch.cat([decode_image(self.codec, s, IN_MEMORY_ID) for s in streams]).to(self.device)
            return {**self.inputs_of_decoded(decoded), "bpp": torch.tensor([s.bits_per_pixel() for s in streams])}
        return self.inputs_of_decoded(decoded.to(self.device))

    def inputs_of_decoded(self, decoded: torch.Tensor) -> dict[str, torch.Tensor]:
        logits, tokens = self.controller(self.clip(decoded))
        return {"decoded": decoded, "condition": self.prior.encode(decoded), "context": tokens, "logits": logits}

    @torch.no_grad()
    def generate(self, inputs: dict[str, torch.Tensor], seed: int, steps: int | None = None) -> torch.Tensor:
        """The restored images of :meth:`decoder_inputs`, sampled from a fixed seed."""
        generator = torch.Generator().manual_seed(seed)
        return self.prior.decode(self.prior.sample(inputs["condition"], inputs["context"], generator, steps))

    def sampler_settings(self, seed: int) -> Sampler:
        return Sampler(steps=self.cfg.prior.sample_steps, seed=seed)

    def reconstruct(self, decoded: torch.Tensor, sampler: Sampler | None) -> torch.Tensor:
        if sampler is None:
            raise BitstreamError("the bitstream lacks the sampler settings its diffusion decoder needs")
        return self.restore(decoded, sampler.seed, sampler.steps)[0]

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        degraded, clean, label = batch["degraded"], batch["clean"], int(batch["task"])
        stream = encode_image(self.codec, degraded, IN_MEMORY_ID)
        decoded = decode_image(self.codec, stream, IN_MEMORY_ID)
        restored, logits = self.restore(decoded, seed=batch["seed"])  # per item: the same under any world size
        metrics = {"bpp": stream.bits_per_pixel(), "psnr": psnr(restored, clean),
                   "accuracy": float(logits.argmax(-1).item() == label)}
        if min(clean.shape[-2:]) >= MS_SSIM_MIN_SIDE:
            metrics["ms_ssim"] = ms_ssim(restored, clean, data_range=1.0).item()
        if not self.lpips_unavailable:
            metrics.update(measure(["lpips"], restored, clean))
        for scope in (TASKS[label], "all"):
            self.val_means.add({f"val/{scope}/{k}": v for k, v in metrics.items()})

    def final_states(self):
        return {**self.prior.trained_state(), CONTROLLER_FILE: self.controller.state_dict(),
                CODEC_FILE: codec_state(self.codec)}

    def load_final_states(self, folder: Path) -> None:
        load_codec_weights(self.codec, folder / CODEC_FILE)
        self.prior.load_trained(folder)
        self.controller.load_state_dict(load_file(str(folder / CONTROLLER_FILE)), strict=True)
