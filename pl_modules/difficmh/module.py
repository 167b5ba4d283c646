"""Stage 2, Diff-ICMH: one bitstream for people and machines. The image's diffusion latent z is coded
by a latent hyperprior; the diffusion UNet (frozen base, LoRA, a control branch fed the decoded ẑ)
generates the reconstruction, guided by image tags that travel losslessly in the bitstream.

Loss: ``ε-MSE + rate_weight·R + guide_weight·MSE(ẑ, z) + sc_weight·SC``, where SC (semantic
consistency) compares the pretrained UNet's features of z and ẑ. The first ``codec_warmup_steps``
train the latent codec alone on its rate and guide terms, so that the UNet starts from a ẑ that
already resembles z (the authors warm the codec up the same way, in a separate run).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torchmetrics.functional.image import multiscale_structural_similarity_index_measure as ms_ssim

from foundation.config import ModuleConfig
from pl_modules.core.base import StageModule
from pl_modules.core.bitstream import (Bitstream, BitstreamError, Sampler, codec_device, decode_output, pack,
                                       pad_to_multiple, quantize_8bit, unpack)
from pl_modules.core.codec_module import IN_MEMORY_ID
from pl_modules.core.codecs import (ARCHITECTURES, CODEC_FILE, CodecConfig, build_codec, codec_state,
                                    load_codec_weights, round_straight_through, split_parameters)
from pl_modules.core.rate_distortion import MS_SSIM_MIN_SIDE, bits_per_pixel, psnr
from pl_modules.core.schedules import OptimConfig
from pl_modules.difficmh.losses import SC_DISTANCES, semantic_consistency
from pl_modules.difficmh.tag_coding import TagError, decode_tags, encode_tags
from pl_modules.difficmh.taggers import TaggerConfig, build_tagger
from pl_modules.prior.diffusion_prior import DiffusionPrior, DiffusionPriorConfig
from pl_modules.scoring.metrics import availability, measure

STAGE = "stage2-difficmh"
SC_TIMESTEPS = ("zero", "shared")


@dataclass
class DiffICMHConfig(ModuleConfig):
    codec: CodecConfig = field(default_factory=lambda: CodecConfig(architecture="latent-mean-hyperprior", N=128, M=192))
    """The latent codec (latent-mean-hyperprior: pl_modules/core/latent_codec.py says why)."""
    prior: DiffusionPriorConfig = field(default_factory=lambda: DiffusionPriorConfig(text_encoder=True,
                                                                                      control="controlnet"))
    """The latent diffusion model (vae/, unet/, text_encoder/); the control branch is fed ẑ."""
    tagger: TaggerConfig = field(default_factory=TaggerConfig)
    """Where the encoder's tags come from; the vocabulary is part of the bitstream format."""
    rate_weight: float = 4.0
    """Weight of the rate R in bpp (the paper's λ ∈ {2, 4, 8, 16, 32}: larger is fewer bits)."""
    guide_weight: float = 2.0
    """Weight of MSE(ẑ, z), which keeps ẑ a latent the UNet knows."""
    sc_weight: float = 1.0
    """Weight of the semantic-consistency loss (0: off)."""
    sc_blocks: list[str] = field(default_factory=lambda: ["mid_block"])
    """UNet blocks whose outputs SC compares (mid_block, down_blocks.N, up_blocks.N)."""
    sc_timestep: str = "zero"
    """zero: the clean latents at t = 0; shared: the same random t and noise for z and ẑ."""
    sc_distance: str = "cosine"
    """cosine (over channels) or normalized_l2 (pl_modules/difficmh/losses.py::semantic_consistency)."""
    tag_dropout: float = 0.1
    """Probability of training on the empty prompt instead of the tags (classifier-free guidance)."""
    guidance_scale: float = 5.0
    """Classifier-free guidance on the tags at decoding (1: none); written into each bitstream."""
    codec_warmup_steps: int = 0
    """Steps that train the latent codec alone (rate + guide) before the diffusion terms join."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    codec_lr: float = 0.0
    """Learning rate of the codec (0: optim.lr)."""

    def __post_init__(self) -> None:
        spec = ARCHITECTURES[self.codec.architecture]
        if spec.in_channels == 3 or not spec.straight_through:
            raise ValueError(f"codec.architecture: Diff-ICMH codes the diffusion latent with a straight-through "
                             f"latent codec (latent-mean-hyperprior), not {self.codec.architecture}")
        if not self.prior.vae or self.prior.condition_channels != spec.in_channels:
            raise ValueError(f"prior.vae must be true and prior.condition_channels {spec.in_channels}: the UNet is "
                             f"conditioned on the decoded latent")
        if not self.prior.text_encoder:
            raise ValueError("prior.text_encoder must be true: the tags reach the UNet through it")
        if self.sc_timestep not in SC_TIMESTEPS or self.sc_distance not in SC_DISTANCES:
            raise ValueError(f"sc_timestep must be one of {SC_TIMESTEPS} and sc_distance one of {SC_DISTANCES}, got "
                             f"'{self.sc_timestep}', '{self.sc_distance}'")
        if not self.sc_blocks:
            raise ValueError("sc_blocks must name at least one UNet block")
        if not 0.0 <= self.tag_dropout <= 1.0 or self.guidance_scale < 0:
            raise ValueError(f"tag_dropout must be in [0, 1] and guidance_scale ≥ 0, got {self.tag_dropout}, "
                             f"{self.guidance_scale}")
        if min(self.rate_weight, self.guide_weight, self.sc_weight) < 0:
            raise ValueError("rate_weight, guide_weight and sc_weight must be ≥ 0")


class DiffICMHModule(StageModule):
    STAGE = STAGE
    CONFIG = DiffICMHConfig
    VAL_METRICS = ("val/bpp", "val/tag_bpp", "val/psnr", "val/ms_ssim", "val/lpips", "val/latent_mse", "val/sc")
    PROGRESS_KEY = "bpp"
    RATE_SETTING = "rate_weight"

    def __init__(self, cfg: DiffICMHConfig):
        super().__init__(cfg)
        self.codec = build_codec(cfg.codec.architecture, cfg.codec.N, cfg.codec.M)
        round_straight_through(self.codec)  # the UNet trains on the ẑ the file will hold
        self.prior = DiffusionPrior(cfg.prior)
        blocks = dict(self.prior.unet.named_modules())
        unknown = [b for b in cfg.sc_blocks if b not in blocks]
        if unknown:
            raise ValueError(f"sc_blocks: the UNet has no blocks {unknown}; e.g. mid_block, down_blocks.0, up_blocks.1")
        self.tagger = build_tagger(cfg.tagger)
        self.lpips_unavailable = availability(["lpips"])["lpips"]
        digest = self.tagger.vocabulary.digest
        if cfg.tagger.vocabulary_digest and cfg.tagger.vocabulary_digest != digest:
            raise ValueError(f"tagger.vocabulary: {cfg.tagger.vocabulary} is not the vocabulary this model was "
                             f"trained with (sha256 {cfg.tagger.vocabulary_digest[:12]}…, the file has {digest[:12]}…); "
                             f"its bitstreams' tags would decode to other words")

    def manifest_params(self) -> dict:
        params = super().manifest_params()
        params["tagger"]["vocabulary_digest"] = self.tagger.vocabulary.digest
        return params

    @property
    def pad_multiple(self) -> int:
        """Image pixels an input side is padded to: the codec's multiple in latent pixels, times the VAE's."""
        return self.codec.pad_multiple * self.prior.vae_scale

    def is_frozen_weight(self, key: str) -> bool:
        if key.startswith(("prior.vae.", "prior.text_model.")):
            return True
        unet = "prior.unet."
        return key.startswith(unet) and not self.prior.is_trained(key[len(unet):])

    def parameter_groups(self):
        codec_net, aux = split_parameters(self.codec)
        return [{"params": self.prior.trainable_parameters()},
                {"params": codec_net, "lr": self.cfg.codec_lr or self.cfg.optim.lr}], aux

    def prompt(self, tags: list[str]) -> str:
        """The text the UNet reads for a tag set: in vocabulary order, the order the file gives them
        back in, so that training and decoding prompt alike."""
        return ", ".join(sorted(set(tags), key=self.tagger.vocabulary.index.__getitem__))

    # ---- training ----------------------------------------------------------------------------
    def batch_tags(self, batch: dict) -> list[list[str]]:
        """Each training image's tags: from the tagger, or with tagger.kind=sidecar from the shards
        (written from the tag files beside the images: `train.py shards`)."""
        if self.cfg.tagger.kind != "sidecar":
            return [self.tagger(image[None]) for image in batch["image"]]
        listed = batch.get("tags") or [None] * len(batch["image"])
        for key, tags in zip(batch.get("keys", ["?"] * len(listed)), listed):
            if tags is None:
                raise TagError(f"tagger.kind=sidecar: training sample {key} carries no tags; write the shards from a "
                               f"folder with a {self.cfg.tagger.sidecar_suffix} file beside every image")
            try:
                self.tagger.vocabulary.indices(tags)
            except TagError as err:
                raise TagError(f"training sample {key}: {err}") from None
        return listed

    def tag_context(self, batch: dict, drop: bool) -> torch.Tensor:
        """Cross-attention tokens of each image's tags, each set dropped to the empty prompt with
        probability tag_dropout when ``drop``."""
        prompts = []
        for tags in self.batch_tags(batch):
            keep = not drop or torch.rand(()).item() >= self.cfg.tag_dropout
            prompts.append(self.prompt(tags) if keep else "")
        return self.prior.encode_text(prompts)

    def sc_distance(self, z: torch.Tensor, z_hat: torch.Tensor, blocks: list[str], timestep: str) -> torch.Tensor:
        """SC between z and ẑ at t = 0 (``zero``) or at a random t and noise shared by both (``shared``)."""
        if timestep == "zero":
            t, noise = torch.zeros(len(z), dtype=torch.long, device=z.device), torch.zeros_like(z)
        else:
            t = torch.randint(0, self.prior.scheduler.config.num_train_timesteps, (len(z),), device=z.device)
            noise = torch.randn_like(z)
        return self.feature_distance(z, z_hat, blocks, t, noise, self.cfg.sc_distance)

    def feature_distance(self, z: torch.Tensor, z_hat: torch.Tensor, blocks: list[str], t: torch.Tensor,
                         noise: torch.Tensor, distance: str) -> torch.Tensor:
        """How far ẑ lies from z in the pretrained UNet's features of ``blocks``, both noised alike,
        under the empty prompt (the latent's own semantics, not the tags')."""
        context = self.prior.encode_text([""] * len(z))
        with torch.no_grad():
            target = self.prior.base_features(z, blocks, t, noise, context)
        return semantic_consistency(target, self.prior.base_features(z_hat, blocks, t, noise, context), distance)

    @torch.no_grad()
    def latent_measures(self, x: torch.Tensor, data: bytes, decoder_id: str, blocks: list[str],
                        timesteps: list[int], seed: int = 0) -> dict[str, float]:
        """What the file ``data`` of ``x`` carries before the diffusion decoder adds anything:
        ``vae_psnr``, the PSNR of the VAE's decoding of ẑ itself (8-bit), and ``feat_<block>_t<t>``,
        the cosine feature distance between z and ẑ per block and timestep (noise fixed by ``seed``).
        Measured on blocks and timesteps the SC loss did not see, the latter says whether SC made ẑ
        semantically closer to z or only fitted the features it was trained on."""
        x = x.to(self.device)
        z = self.prior.encode(pad_to_multiple(x, self.pad_multiple))
        z_hat = self.decoded_latent(unpack(data), decoder_id)
        height, width = x.shape[-2:]
        out = {"vae_psnr": psnr(quantize_8bit(self.prior.decode(z_hat)[..., :height, :width]), x)}
        noise = torch.randn(z.shape, generator=torch.Generator().manual_seed(seed)).to(z)
        for t in timesteps:
            steps = torch.full((len(z),), t, dtype=torch.long, device=z.device)
            for block in blocks:
                out[f"feat_{block}_t{t}"] = self.feature_distance(z, z_hat, [block], steps, noise, "cosine").item()
        return out

    def losses(self, batch: dict):
        x = batch["image"]
        with torch.no_grad():
            z = self.prior.encode(x)
        out = self.codec(z)
        z_hat = out["x_hat"]
        bpp = bits_per_pixel(out["likelihoods"], x.shape[0] * x.shape[-2] * x.shape[-1])
        guide = torch.mean((z_hat - z) ** 2)
        sc = torch.zeros((), device=x.device)
        if self.global_step < self.cfg.codec_warmup_steps:
            # DDP reduces a gradient for every trained parameter each step: give the resting ones
            # zeros (Adam then leaves them where they are) rather than none.
            eps = 0.0 * sum(p.sum() for p in self.prior.trainable_parameters())
        else:
            eps = self.prior.diffusion_loss(z, z_hat, self.tag_context(batch, drop=True)).mean()
            if self.cfg.sc_weight > 0:
                sc = self.sc_distance(z, z_hat, self.cfg.sc_blocks, self.cfg.sc_timestep)
        loss = eps + self.cfg.rate_weight * bpp + self.cfg.guide_weight * guide + self.cfg.sc_weight * sc
        return {"loss": loss, "eps": eps, "bpp": bpp, "guide": guide, "sc": sc}, self.codec.aux_loss()

    # ---- the bitstream -----------------------------------------------------------------------
    def sampler_settings(self, seed: int) -> Sampler:
        return Sampler(steps=self.cfg.prior.sample_steps, seed=seed, guidance=self.cfg.guidance_scale)

    @torch.no_grad()
    def encode(self, x: torch.Tensor, decoder_id: str, seed: int = 0, path: Optional[Path] = None) -> Bitstream:
        if x.shape[1] != 3:
            raise BitstreamError(f"Diff-ICMH codes RGB images, got {x.shape[1]} channels")
        tags = encode_tags(self.tagger(x, path), self.tagger.vocabulary)
        z = self.prior.encode(pad_to_multiple(x.to(self.device), self.pad_multiple))
        out = self.codec.compress(z.to(codec_device(self.codec)))
        return Bitstream(decoder_id, x.shape[-2], x.shape[-1], tuple(int(d) for d in out["shape"]),
                         [[bytes(s) for s in group] for group in out["strings"]], codec=self.codec.architecture,
                         sampler=self.sampler_settings(seed), tags=tags)

    def decoded_latent(self, stream: Bitstream, decoder_id: str) -> torch.Tensor:
        if stream.sampler is None or stream.tags is None:
            raise BitstreamError("a Diff-ICMH bitstream carries its sampler settings and tag section; this one does not")
        return decode_output(self.codec, stream, decoder_id, input_stride=self.prior.vae_scale).to(self.device)

    def stream_tags(self, stream: Bitstream) -> list[str]:
        try:
            return decode_tags(stream.tags, self.tagger.vocabulary)
        except TagError as err:
            raise BitstreamError(str(err)) from None

    @torch.no_grad()
    def decode(self, stream: Bitstream, decoder_id: str) -> torch.Tensor:
        """Deterministic given the file: ẑ, the tags and the sampler settings it holds."""
        z_hat = self.decoded_latent(stream, decoder_id)
        context = self.prior.encode_text([self.prompt(self.stream_tags(stream))])
        return quantize_8bit(self.sample(z_hat, context, stream.sampler)[..., : stream.height, : stream.width])

    def sample(self, z_hat: torch.Tensor, context: torch.Tensor, sampler: Sampler) -> torch.Tensor:
        """Images generated from ẑ and the tags' tokens, guided as ``sampler`` says."""
        unconditional = self.prior.encode_text([""] * len(z_hat)) if sampler.guidance != 1.0 else None
        generator = torch.Generator().manual_seed(sampler.seed)
        latents = self.prior.sample(z_hat, context, generator, sampler.steps, sampler.guidance, unconditional)
        return self.prior.decode(latents)

    # ---- the diffusion-decoder interface stage 3 post-trains through ---------------------------
    @torch.no_grad()
    def decoder_inputs(self, batch: dict) -> dict[str, torch.Tensor]:
        """What the decoder has of each clean image of a batch once its bits are decoded (real
        bitstreams): ẑ as the control branch's condition and the decoded tags' tokens; the VAE's
        picture of ẑ as ``decoded``. (Diff-ICMH codes the image itself: a pair's degraded half is unused.)"""
        streams = [self.encode(x[None], IN_MEMORY_ID) for x in batch["clean"]]
        z_hat = torch.cat([self.decoded_latent(s, IN_MEMORY_ID) for s in streams])
        context = self.prior.encode_text([self.prompt(self.stream_tags(s)) for s in streams])
        height, width = batch["clean"].shape[-2:]
        return {"decoded": self.prior.decode(z_hat)[..., :height, :width], "condition": z_hat, "context": context,
                "bpp": torch.tensor([s.bits_per_pixel() for s in streams])}

    @torch.no_grad()
    def generate(self, inputs: dict[str, torch.Tensor], seed: int, steps: int | None = None) -> torch.Tensor:
        """The images of :meth:`decoder_inputs`, generated from a fixed seed with this model's guidance."""
        sampler = Sampler(steps=steps or self.cfg.prior.sample_steps, seed=seed, guidance=self.cfg.guidance_scale)
        height, width = inputs["decoded"].shape[-2:]
        return self.sample(inputs["condition"], inputs["context"], sampler)[..., :height, :width]

    def round_trip(self, x: torch.Tensor, decoder_id: str, seed: int = 0) -> tuple[bytes, torch.Tensor]:
        data = pack(self.encode(x, decoder_id, seed))
        return data, self.decode(unpack(data), decoder_id)

    # ---- validation and hand-over ------------------------------------------------------------
    def validation_step(self, batch: dict, batch_idx: int) -> None:
        x = batch["image"]
        stream = self.encode(x, IN_MEMORY_ID, seed=batch_idx, path=batch.get("path"))
        data = pack(stream)
        decoded = self.decode(stream, IN_MEMORY_ID)
        z = self.prior.encode(pad_to_multiple(x, self.pad_multiple))
        z_hat = self.decoded_latent(stream, IN_MEMORY_ID)
        pixels = x.shape[-2] * x.shape[-1]
        metrics = {"val/bpp": 8 * len(data) / pixels, "val/tag_bpp": 8 * len(stream.tags) / pixels,
                   "val/psnr": psnr(decoded, x), "val/latent_mse": torch.mean((z_hat - z) ** 2).item(),
                   "val/sc": self.sc_distance(z, z_hat, self.cfg.sc_blocks, "zero").item()}
        if min(x.shape[-2:]) >= MS_SSIM_MIN_SIDE:
            metrics["val/ms_ssim"] = ms_ssim(decoded, x, data_range=1.0).item()
        if not self.lpips_unavailable:
            metrics["val/lpips"] = measure(["lpips"], decoded, x)["lpips"]
        self.val_means.add(metrics)

    def on_validation_epoch_start(self) -> None:
        super().on_validation_epoch_start()
        if self.lpips_unavailable:
            rank_zero_warn(f"validation LPIPS: unavailable: {self.lpips_unavailable}")

    def final_states(self):
        return {**self.prior.trained_state(), CODEC_FILE: codec_state(self.codec)}

    def load_final_states(self, folder: Path) -> None:
        load_codec_weights(self.codec, folder / CODEC_FILE)
        self.prior.load_trained(folder)
