"""The diffusion prior every diffusion stage shares (LL-ICM, Diff-ICMH, VLIC): a latent-diffusion
VAE, UNet and noise scheduler loaded through diffusers' ``from_pretrained`` from a hub id or a local
folder, with LoRA on the UNet's attention projections (peft). Without a VAE (``vae=false``) the same
UNet works on pixels, as DeepFloyd IF's stages do; the CPU-sized ``tiny-pixel`` preset is such a prior.
The condition enters by conv_in concatenation or a ControlNet (control_branch.py); at zero init
either computes exactly what the pretrained UNet did. Post-training needs the trained decoder itself as its frozen reference:
``freeze_as_reference`` folds what was trained (LoRA, conv_in, or the whole UNet) into the base
weights and adds a new adapter, so that ``adapters_disabled()`` is exactly that decoder.
"""
from __future__ import annotations

import contextlib
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from pl_modules.prior.control_branch import (CONTROL_KINDS, CONTROLNET_FILE, build_controlnet, controlled_unet,
                                             expand_conv_in)
from pl_modules.prior.latent_tiles import tiled
from pl_modules.prior.presets import resolve_pretrained

LORA_FILE = "unet_lora.safetensors"
CONV_IN_FILE = "unet_conv_in.safetensors"
UNET_FILE = "unet.safetensors"


@dataclass
class DiffusionPriorConfig:
    model: str = "???"
    """A diffusers pipeline folder or hub id with vae/, unet/, scheduler/ (e.g. stabilityai/sd-turbo),
    or a preset built here and loaded the same way: tiny-sd (SD-structured, random) or tiny-pixel."""
    vae: bool = True
    """Latent diffusion through the folder's vae/; false: the UNet works on pixels in [-1, 1]."""
    train_unet: bool = False
    """Train every UNet weight instead of LoRA adapters (needs lora_rank=0): for priors too small or
    too briefly pretrained for LoRA to have something to adapt, such as the tiny presets."""
    local_files_only: bool = False
    """Never download: load from the folder or the HF cache only."""
    lora_rank: int = 8
    """LoRA rank on the UNet's attention projections."""
    lora_alpha: int = 8
    """LoRA scale numerator (scale = alpha / rank)."""
    lora_targets: list[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])
    """UNet module names that get LoRA adapters."""
    condition_channels: int = 4
    """Channels of the condition (the image to restore, or the decoded latent), in the UNet's space:
    its input channels (4 for SD's latents, 3 on pixels), or 0 for an unconditional prior."""
    control: str = "concat"
    """How the condition enters: concat (extra zero-initialised conv_in channels) or controlnet
    (a trainable copy of the UNet's encoder injected through zero convolutions)."""
    gradient_checkpointing: bool = True
    """Trade compute for memory in the UNet during training."""
    vae_tile: int = 512
    """Encode/decode images larger than this many pixels in overlapping tiles (0: never tile)."""
    latent_tile: int = 0
    """Sample larger latents in overlapping tiles of this many latent pixels, a multiple of 8 (0: never)."""
    residual: bool = False
    """The UNet predicts the clean sample minus the condition (needs a scheduler that predicts
    `sample` and a condition in the UNet's output space): with a zero conv_out, as in the tiny-pixel
    preset, restoration starts from the identity, which a prior trained from scratch needs."""
    sample_steps: int = 4
    """DDIM steps when sampling; few-step models (sd-turbo) need 1–4."""
    text_encoder: bool = False
    """Also load the frozen text encoder and tokenizer (text_encoder/, tokenizer/), for prompt tokens."""
    frozen_dtype: str = "float32"
    """Store the frozen VAE and UNet weights in float32 or bfloat16 (needs bf16-mixed precision);
    bfloat16 cut LoRA training memory by a third on an H200 (docs/benchmarks.md). Trained weights stay float32."""


class DiffusionPrior(nn.Module):
    def __init__(self, cfg: DiffusionPriorConfig):
        super().__init__()
        from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel

        self.cfg = cfg
        _check(cfg)
        model = resolve_pretrained(cfg.model)
        load = dict(local_files_only=cfg.local_files_only)
        self.vae = AutoencoderKL.from_pretrained(model, subfolder="vae", **load).requires_grad_(False) if cfg.vae else None
        self.unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet", **load).requires_grad_(False)
        self.scheduler = DDIMScheduler.from_pretrained(model, subfolder="scheduler", **load)
        if cfg.text_encoder:
            from transformers import CLIPTextModel, CLIPTokenizer

            self.text_model = CLIPTextModel.from_pretrained(model, subfolder="text_encoder", **load)
            self.text_model.requires_grad_(False).eval()
            self.tokenizer = CLIPTokenizer.from_pretrained(model, subfolder="tokenizer", **load)
        if cfg.condition_channels not in (0, self.unet.config.in_channels):
            raise ValueError(f"prior.condition_channels must be 0 or the UNet's {self.unet.config.in_channels} input "
                             f"channels (the image to restore enters in the UNet's own space), got {cfg.condition_channels}")
        if cfg.residual and (self.scheduler.config.prediction_type != "sample"
                             or cfg.condition_channels != self.unet.config.out_channels):
            raise ValueError("prior.residual needs a scheduler with prediction_type 'sample' and a condition with "
                             "the UNet's output channels")
        self.controlnet = None
        if cfg.condition_channels and cfg.control == "controlnet":
            self.controlnet = build_controlnet(self.unet, cfg.condition_channels)  # from the untouched UNet
        elif cfg.condition_channels:
            expand_conv_in(self.unet, cfg.condition_channels)
        self.reference_adapter: str | None = None
        """Set by freeze_as_reference: the one adapter that trains on the frozen decoder."""
        if cfg.lora_rank:
            self._add_lora()
        if cfg.vae_tile and self.vae is not None:
            self.vae.enable_tiling()
            self.vae.tile_sample_min_size = cfg.vae_tile
            self.vae.tile_latent_min_size = cfg.vae_tile // self.vae_scale
        if cfg.gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
            if self.controlnet is not None:
                self.controlnet.enable_gradient_checkpointing()
        if cfg.frozen_dtype == "bfloat16":
            if self.vae is not None:
                self.vae.to(torch.bfloat16)
            for name, param in self.unet.named_parameters():
                if not self.is_trained(name):
                    param.data = param.data.to(torch.bfloat16)

    def _add_lora(self, rank: int | None = None, alpha: int | None = None, targets: list[str] | None = None,
                  name: str = "default") -> None:
        from peft import LoraConfig

        self.unet.add_adapter(LoraConfig(r=rank or self.cfg.lora_rank, lora_alpha=alpha or self.cfg.lora_alpha,
                                         target_modules=list(targets or self.cfg.lora_targets),
                                         init_lora_weights="gaussian"), adapter_name=name)

    def freeze_as_reference(self, adapter: str, rank: int, alpha: int, targets: list[str]) -> None:
        """Fold what this prior trained (LoRA merged into its layers, conv_in, or the whole UNet) into
        frozen base weights, then put a new LoRA adapter named ``adapter`` on top. With adapters
        disabled the UNet is then exactly the decoder it was, so post-training (stage 3's
        Diffusion-DPO) has its frozen reference without a second copy in memory; it also gives LoRA
        to a UNet whose base was trained whole (the tiny pixel prior)."""
        frozen_dtype = torch.bfloat16 if self.cfg.frozen_dtype == "bfloat16" else torch.float32
        self.unet.float()  # fused in float32: a LoRA delta under bf16's step would round away
        if self.cfg.lora_rank:
            self.unet.fuse_lora(lora_scale=1.0)
            self.unet.unload_lora()
        self.unet.requires_grad_(False).to(frozen_dtype)
        if self.controlnet is not None:
            self.controlnet.requires_grad_(False)
        self.reference_adapter = adapter
        self._add_lora(rank, alpha, targets, name=adapter)
        for param in self.trainable_parameters():
            param.data = param.data.float()  # peft casts a new adapter to its base layer's dtype

    @contextmanager
    def adapters_disabled(self) -> Iterator[None]:
        """The UNet without its trainable adapter: the reference decoder once freeze_as_reference ran."""
        self.unet.disable_adapters()
        try:
            yield
        finally:
            self.unet.enable_adapters()

    @contextmanager
    def features(self, blocks: list[str]) -> Iterator[dict[str, torch.Tensor]]:
        """Capture the outputs of named UNet blocks (``mid_block``, ``down_blocks.1``, …) during the
        passes run inside the block, for feature-space losses; the hooks are always removed on exit."""
        modules = dict(self.unet.named_modules())
        unknown = [b for b in blocks if b not in modules]
        if unknown:
            raise ValueError(f"the UNet has no blocks {unknown}; e.g. mid_block, down_blocks.0, up_blocks.1")
        captured: dict[str, torch.Tensor] = {}

        def keep(name: str):
            return lambda _module, _inputs, out: captured.__setitem__(name, out[0] if isinstance(out, tuple) else out)

        handles = [modules[b].register_forward_hook(keep(b)) for b in blocks]
        try:
            yield captured
        finally:
            for handle in handles:
                handle.remove()

    @property
    def vae_scale(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1) if self.vae is not None else 1

    @property
    def latent_scale(self) -> float:
        return self.vae.config.scaling_factor

    def _frozen_autocast(self, device: torch.device):
        """Frozen bf16 weights take bf16 inputs: Lightning's bf16-mixed autocast gives them that in
        training; this gives it everywhere else too (evaluate, restore, benchmarks). With float32
        weights it leaves whatever autocast the caller runs under in force (disabling it would feed
        a bf16-mixed run's bf16 activations to float32 weights)."""
        if self.cfg.frozen_dtype != "bfloat16":
            return contextlib.nullcontext()
        return torch.autocast(device.type, torch.bfloat16)

    def is_trained(self, unet_parameter: str) -> bool:
        """Whether training changes this UNet parameter: all of them with train_unet; otherwise LoRA
        and a concatenated condition's conv_in (whose new channels start at zero); after
        freeze_as_reference, its adapter alone. (A ControlNet trains whole, until freeze_as_reference.)"""
        if self.reference_adapter is not None:
            return "lora_" in unet_parameter and f".{self.reference_adapter}." in unet_parameter
        return (self.cfg.train_unet or "lora_" in unet_parameter
                or (self.controlnet is None and self.cfg.condition_channels > 0 and unet_parameter.startswith("conv_in.")))

    def trainable_parameters(self) -> list[nn.Parameter]:
        params = [p for n, p in self.unet.named_parameters() if self.is_trained(n)]
        if self.controlnet is not None and self.reference_adapter is None:
            params += list(self.controlnet.parameters())
        for p in params:
            p.requires_grad_(True)
        return params

    @torch.no_grad()
    def encode_text(self, prompts: list[str]) -> torch.Tensor:
        """Cross-attention tokens of prompts (B×77×D), as Stable Diffusion's pipelines make them."""
        length = self.text_model.config.max_position_embeddings
        tokens = self.tokenizer(prompts, padding="max_length", max_length=length,
                                truncation=True, return_tensors="pt").input_ids.to(self.text_model.device)
        return self.text_model(tokens).last_hidden_state

    def encode(self, image: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] → scaled latents (the posterior mean: deterministic), or pixels in [-1, 1];
        float32 whatever the VAE's dtype, as :meth:`decode` (a latent codec's weights are float32)."""
        if self.vae is None:
            return image * 2 - 1
        with self._frozen_autocast(image.device):
            return self.vae.encode(image * 2 - 1).latent_dist.mode().float() * self.latent_scale

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        # float32 out whatever the VAE's dtype: metrics and codecs downstream expect it.
        if self.vae is None:
            pixels = latents
        else:
            with self._frozen_autocast(latents.device):
                pixels = self.vae.decode(latents / self.latent_scale).sample
        return ((pixels.float() + 1) / 2).clamp(0, 1)

    def training_target(self, clean: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """What the UNet should predict for ``clean`` noised with ``noise`` at ``timesteps``, by the
        scheduler's prediction type (epsilon, v_prediction or sample)."""
        kind = self.scheduler.config.prediction_type
        if kind == "epsilon":
            return noise
        if kind == "v_prediction":
            return self.scheduler.get_velocity(clean, noise, timesteps)
        if kind == "sample":
            return clean
        raise ValueError(f"unsupported scheduler prediction_type '{kind}'")

    def denoise(self, noisy: torch.Tensor, timesteps: torch.Tensor, condition: torch.Tensor | None,
                context: torch.Tensor) -> torch.Tensor:
        """The UNet's prediction for noisy latents, given the condition latent and cross-attention tokens."""
        with self._frozen_autocast(noisy.device):
            if self.controlnet is not None:
                prediction = controlled_unet(self.unet, self.controlnet, noisy, timesteps, condition, context)
            else:
                inputs = torch.cat([noisy, condition], dim=1) if self.cfg.condition_channels else noisy
                prediction = self.unet(inputs, timesteps, encoder_hidden_states=context).sample
        return prediction + condition if self.cfg.residual else prediction

    def diffusion_loss(self, x0: torch.Tensor, condition: torch.Tensor | None, context: torch.Tensor,
                       noise: torch.Tensor | None = None, timesteps: torch.Tensor | None = None) -> torch.Tensor:
        """Per-sample MSE of the UNet's prediction against its training target, for ``x0`` noised with
        ``noise`` at ``timesteps`` (drawn here when not given). Passes that must be compared — model
        and reference in Diffusion-DPO, z and ẑ in the semantic-consistency loss — share them."""
        noise = torch.randn_like(x0) if noise is None else noise
        if timesteps is None:
            timesteps = torch.randint(0, self.scheduler.config.num_train_timesteps, (len(x0),), device=x0.device)
        noisy = self.scheduler.add_noise(x0, noise, timesteps)
        prediction = self.denoise(noisy, timesteps, condition, context)
        target = self.training_target(x0, noise, timesteps)
        return (prediction.float() - target.float()).pow(2).flatten(1).mean(1)

    @torch.no_grad()
    def sample(self, condition: torch.Tensor, context: torch.Tensor, generator: torch.Generator | None = None,
               steps: int | None = None, guidance: float = 1.0,
               unconditional: torch.Tensor | None = None) -> torch.Tensor:
        """DDIM from pure noise to latents, conditioned on ``condition`` (a latent) and ``context``;
        with ``guidance`` ≠ 1, classifier-free guidance away from the ``unconditional`` context
        (the condition latent is kept in both passes: only the text is guided)."""
        self.scheduler.set_timesteps(steps or self.cfg.sample_steps, device=condition.device)
        # Drawn on the generator's device (decoders': the CPU), so a file's seed means one noise everywhere.
        latents = torch.randn(condition.shape[0], self.unet.config.out_channels, *condition.shape[-2:],
                              generator=generator, device=generator.device if generator else condition.device,
                              dtype=condition.dtype).to(condition.device)
        latents = latents * self.scheduler.init_noise_sigma
        for t in self.scheduler.timesteps:
            noisy, timesteps = self.scheduler.scale_model_input(latents, t), t.expand(len(latents))
            prediction = self.denoise_tiled(noisy, timesteps, condition, context)
            if guidance != 1.0:
                free = self.denoise_tiled(noisy, timesteps, condition, unconditional)
                prediction = free + guidance * (prediction - free)
            latents = self.scheduler.step(prediction, t, latents).prev_sample
        return latents

    def denoise_tiled(self, noisy: torch.Tensor, timesteps: torch.Tensor, condition: torch.Tensor | None,
                      context: torch.Tensor) -> torch.Tensor:
        """:meth:`denoise` in blended tiles of ``latent_tile`` (latent_tiles.py); whole when it fits one."""
        tile = self.cfg.latent_tile
        if not tile or max(noisy.shape[-2:]) <= tile:
            return self.denoise(noisy, timesteps, condition, context)
        return tiled(lambda x, c: self.denoise(x, timesteps, c, context), noisy, condition, tile,
                     self.unet.config.out_channels)

    def base_features(self, x0: torch.Tensor, blocks: list[str], timesteps: torch.Tensor, noise: torch.Tensor,
                      context: torch.Tensor) -> dict[str, torch.Tensor]:
        """Features of named blocks of the pretrained UNet alone (adapters off, no condition) for
        ``x0`` noised with ``noise`` at ``timesteps``: a fixed feature space, in which the
        semantic-consistency loss compares z and ẑ. Differentiable in ``x0``."""
        noisy = self.scheduler.add_noise(x0, noise, timesteps)
        if self.controlnet is None and self.cfg.condition_channels:
            noisy = torch.cat([noisy, torch.zeros_like(noisy[:, : self.cfg.condition_channels])], dim=1)
        adapters = self.adapters_disabled() if self.cfg.lora_rank or self.reference_adapter else contextlib.nullcontext()
        with adapters, self.features(blocks) as captured, self._frozen_autocast(x0.device):
            self.unet(noisy, timesteps, encoder_hidden_states=context)
        return {name: feature.float() for name, feature in captured.items()}

    def trained_state(self) -> dict[str, dict[str, torch.Tensor]]:
        """File name → tensors of what training changes: LoRA (peft's layout, loadable with
        ``set_peft_model_state_dict``) and conv_in or the ControlNet, each alone; or the whole UNet
        with train_unet; after freeze_as_reference, the new adapter alone."""
        from peft.utils import get_peft_model_state_dict

        if self.reference_adapter is not None:
            states = {adapter_file(self.reference_adapter):
                      get_peft_model_state_dict(self.unet, adapter_name=self.reference_adapter)}
        else:
            states = {}
            if self.cfg.train_unet:
                states[UNET_FILE] = self.unet.state_dict()
            elif self.cfg.lora_rank:
                states[LORA_FILE] = get_peft_model_state_dict(self.unet)
            if self.controlnet is not None:
                states[CONTROLNET_FILE] = self.controlnet.state_dict()
            elif self.cfg.condition_channels and not self.cfg.train_unet:
                states[CONV_IN_FILE] = self.unet.conv_in.state_dict()
        return {name: {k: v.detach().cpu().contiguous() for k, v in state.items()} for name, state in states.items()}

    def save_trained(self, folder: str | Path) -> dict[str, Path]:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        states = self.trained_state()
        for name, state in states.items():
            save_file(state, str(folder / name))
        return {name: folder / name for name in states}

    def load_trained(self, folder: str | Path) -> None:
        """Strictly: every adapter key of this configuration must be in the file, and nothing else."""
        folder = Path(folder)
        if self.reference_adapter is not None:
            self._load_adapter(folder / adapter_file(self.reference_adapter), self.reference_adapter)
            return
        if self.cfg.train_unet:
            self.unet.load_state_dict(load_file(str(folder / UNET_FILE)), strict=True)
        elif self.cfg.lora_rank:
            self._load_adapter(folder / LORA_FILE, "default")
        if self.controlnet is not None:
            self.controlnet.load_state_dict(load_file(str(folder / CONTROLNET_FILE)), strict=True)
        elif self.cfg.condition_channels and not self.cfg.train_unet:
            self.unet.conv_in.load_state_dict(load_file(str(folder / CONV_IN_FILE)), strict=True)

    def _load_adapter(self, path: Path, name: str) -> None:
        from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

        state = load_file(str(path))
        expected = {k: v.shape for k, v in get_peft_model_state_dict(self.unet, adapter_name=name).items()}
        missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
        resized = sorted(k for k in set(state) & set(expected) if state[k].shape != expected[k])
        if missing or unexpected or resized:
            raise ValueError(f"{path} does not match this LoRA configuration: missing {missing[:3]}, "
                             f"unexpected {unexpected[:3]}, other shapes {resized[:3]}")
        set_peft_model_state_dict(self.unet, state, adapter_name=name)


def adapter_file(name: str) -> str:
    return f"unet_lora_{name}.safetensors"


def _check(cfg: DiffusionPriorConfig) -> None:
    if cfg.frozen_dtype not in ("float32", "bfloat16"):
        raise ValueError(f"prior.frozen_dtype must be float32 or bfloat16, got '{cfg.frozen_dtype}'")
    if cfg.latent_tile % 8 or cfg.latent_tile < 0:
        raise ValueError(f"prior.latent_tile must be 0 or a positive multiple of 8, got {cfg.latent_tile}")
    if cfg.control not in CONTROL_KINDS:
        raise ValueError(f"prior.control must be one of {CONTROL_KINDS}, got '{cfg.control}'")
    if cfg.train_unet and cfg.lora_rank:
        raise ValueError("prior.train_unet=true trains the whole UNet: set prior.lora_rank=0")
