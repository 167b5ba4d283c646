"""``small-sd``: a small latent-diffusion model trained on first use, so that Diff-ICMH's evidence on
a CPU means something. tiny-sd (tiny_models.py) has Stable Diffusion's structure with random
weights: its latent carries nothing of the image and its UNet's features mean nothing, so neither
an RD curve nor the semantic-consistency loss measured on it says anything.

small-sd is trained in two phases on random crops of BSDS500's training photographs (scikit-image's
bundled photographs where ``../shared`` is absent):
1. a VAE (4 latent channels, 4× downsampling, no attention, so that its cost and memory grow
   linearly with the pixels and a 2048² image decodes in bounded memory) on MSE with a small KL
   term, as SD's VAE minus its adversarial and LPIPS terms (no VGG weights offline); the latent
   is then scaled to unit variance (``scaling_factor``), as SD's is;
2. a latent UNet (attention at the lower of its two resolutions) trained as an ε-denoiser of
   that VAE's latents under SD's noise schedule, on the empty prompt through a small random text
   encoder: tags reach it later, through the LoRA that Diff-ICMH trains.
4× rather than SD's 8×: a VAE this small keeps far more of the image in a 1/4-side latent, and the
latent hyperprior's padding stays at 32 image pixels. The folder holds ``preset.json`` with the
recipe, the data's digest and the VAE's reconstruction PSNR on Kodak.
"""
from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from datamodules.images import list_images, load_rgb, to_tensor, write_skimage_photos
from datamodules.stream import random_crop
from foundation.locations import cache_dir, shared_data
from pl_modules.prior.tiny_models import save_sd_scheduler, save_tiny_text_encoder

SHARED_DATA = shared_data()
TEXT_WIDTH = 32


@dataclass(frozen=True)
class SmallSDRecipe:
    vae_steps: int = 1800
    unet_steps: int = 1500
    vae_crop: int = 32
    """The VAE has no attention, so small crops teach it what large ones would, at a quarter of the cost."""
    unet_crop: int = 64
    batch_size: int = 16
    lr: float = 1e-3
    """Peak learning rate of both phases (Adam), decayed to zero on a cosine."""
    kl_weight: float = 1e-6
    seed: int = 0


RECIPE = SmallSDRecipe()


def training_folder() -> Path:
    folder = SHARED_DATA / "bsds500" / "train"
    if folder.is_dir():
        return folder
    fallback = cache_dir("presets") / "skimage-photos"
    if not fallback.is_dir():
        write_skimage_photos(fallback)
    return fallback


def small_sd_key(recipe: SmallSDRecipe = RECIPE, images: Path | None = None) -> str:
    """Digest of the training images' names and bytes and of the recipe: the preset's cache key."""
    digest = hashlib.sha256(repr(sorted(asdict(recipe).items())).encode())
    for path in list_images(images or training_folder()):
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:10]


def build_small_sd(folder: Path, recipe: SmallSDRecipe = RECIPE, images: Path | None = None,
                   kodak: Path = SHARED_DATA / "kodak") -> Path:
    """Train the preset into ``folder`` (diffusers' layout: vae/, unet/, scheduler/, text_encoder/,
    tokenizer/), printing progress; minutes on a CPU."""
    from diffusers import DDIMScheduler

    start = time.time()
    source = images or training_folder()
    crops = CropSampler(source, recipe.seed)
    print(f"small-sd: training a VAE and a latent UNet on {len(crops.images)} photos of {source} "
          f"({recipe.vae_steps} + {recipe.unet_steps} steps); built once, then cached", flush=True)
    torch.manual_seed(recipe.seed)
    vae, unet = small_vae(), small_latent_unet()
    save_sd_scheduler(folder)
    save_tiny_text_encoder(folder, TEXT_WIDTH)
    vae_loss = train_vae(vae, crops, recipe)
    vae.register_to_config(scaling_factor=latent_scaling(vae, crops, recipe))
    vae.save_pretrained(folder / "vae")
    scheduler = DDIMScheduler.from_pretrained(folder, subfolder="scheduler")
    unet_loss = train_latent_unet(unet, vae, scheduler, empty_prompt(folder), crops, recipe)
    unet.save_pretrained(folder / "unet")
    report = {"recipe": asdict(recipe), "images": str(source), "n_images": len(crops.images),
              "vae_final_mse": vae_loss, "unet_final_eps_mse": unet_loss,
              "scaling_factor": vae.config.scaling_factor, "seconds": round(time.time() - start, 1)}
    if kodak.is_dir():
        report["vae_kodak_psnr"] = reconstruction_psnr(vae, list_images(kodak))
    (folder / "preset.json").write_text(json.dumps(report, indent=2))
    print(f"small-sd: built in {report['seconds']:.0f} s; VAE reconstruction on Kodak "
          f"{report.get('vae_kodak_psnr', float('nan')):.2f} dB", flush=True)
    return folder


def small_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=16,
                         block_out_channels=(32, 64, 64), down_block_types=("DownEncoderBlock2D",) * 3,
                         up_block_types=("UpDecoderBlock2D",) * 3, mid_block_add_attention=False, sample_size=64)


def small_latent_unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, norm_num_groups=16,
                                block_out_channels=(32, 64), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=TEXT_WIDTH,
                                attention_head_dim=8)


class CropSampler:
    """Random crops (with flips) of a folder's photos, held in memory; a fixed seed fixes the stream."""

    def __init__(self, folder: Path, seed: int):
        self.images = [load_rgb(path) for path in list_images(folder)]
        if not self.images:
            raise FileNotFoundError(f"no images in {folder}")
        self.rng = np.random.default_rng(seed)

    def batch(self, size: int, crop: int) -> torch.Tensor:
        picks = self.rng.integers(0, len(self.images), size)
        return torch.stack([to_tensor(random_crop(self.images[i], crop, self.rng)) for i in picks])


def fit(params, recipe: SmallSDRecipe, steps: int, phase: str, batch_loss, status) -> float:
    """Adam with a cosine decay to zero over ``steps`` on ``batch_loss() -> (loss, tracked value)``;
    prints ``status(mean tracked value)`` every 200 steps and returns the last 100 steps' mean."""
    optimizer = torch.optim.Adam(params, lr=recipe.lr)
    decay = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * step / steps)))
    recent: list[float] = []
    for step in range(steps):
        loss, tracked = batch_loss()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        decay.step()
        recent = (recent + [tracked])[-100:]
        if (step + 1) % 200 == 0 or step + 1 == steps:
            print(f"small-sd: {phase} step {step + 1}/{steps}, {status(np.mean(recent))}", flush=True)
    return float(np.mean(recent))


def train_vae(vae, crops: CropSampler, recipe: SmallSDRecipe) -> float:
    """MSE on [-1, 1] pixels of a posterior sample's decoding + kl_weight·KL; the last 100 steps' mean MSE
    (on [-1, 1]: 4× the MSE on [0, 1])."""
    def batch_loss():
        x = crops.batch(recipe.batch_size, recipe.vae_crop) * 2 - 1
        posterior = vae.encode(x).latent_dist
        mse = (vae.decode(posterior.sample()).sample - x).pow(2).mean()
        return mse + recipe.kl_weight * posterior.kl().mean(), mse.item()

    return fit(vae.parameters(), recipe, recipe.vae_steps, "VAE", batch_loss,
               lambda mse: f"PSNR {psnr_of(mse / 4):.2f} dB")


@torch.no_grad()
def latent_scaling(vae, crops: CropSampler, recipe: SmallSDRecipe, batches: int = 8) -> float:
    """1 / the standard deviation of the latents (posterior means) of fresh crops: unit-variance latents."""
    latents = torch.cat([vae.encode(crops.batch(recipe.batch_size, recipe.unet_crop) * 2 - 1).latent_dist.mode()
                         for _ in range(batches)])
    return float(1.0 / latents.std())


@torch.no_grad()
def empty_prompt(folder: Path) -> torch.Tensor:
    """The text encoder's tokens of the empty prompt (1×77×D), as the prior makes them."""
    from transformers import CLIPTextModel, CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer")
    text = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder")
    tokens = tokenizer([""], padding="max_length", max_length=text.config.max_position_embeddings,
                       return_tensors="pt").input_ids
    return text(tokens).last_hidden_state


def train_latent_unet(unet, vae, scheduler, context: torch.Tensor, crops: CropSampler, recipe: SmallSDRecipe) -> float:
    """ε-prediction MSE on the frozen VAE's scaled latents; the last 100 steps' mean."""
    def batch_loss():
        with torch.no_grad():
            x = crops.batch(recipe.batch_size, recipe.unet_crop) * 2 - 1
            z = vae.encode(x).latent_dist.mode() * vae.config.scaling_factor
        noise = torch.randn_like(z)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (len(z),))
        prediction = unet(scheduler.add_noise(z, noise, t), t, encoder_hidden_states=context.expand(len(z), -1, -1)).sample
        loss = (prediction - noise).pow(2).mean()
        return loss, loss.item()

    return fit(unet.parameters(), recipe, recipe.unet_steps, "latent UNet", batch_loss, lambda mse: f"ε-mse {mse:.4f}")


@torch.no_grad()
def reconstruction_psnr(vae, paths: list[Path]) -> float:
    """Mean PSNR of whole images through the VAE (posterior mean), 8-bit, as a decoder would write them."""
    values = []
    for path in paths:
        x = to_tensor(load_rgb(path))[None]
        height, width = x.shape[-2:]
        pad = (0, -width % 4, 0, -height % 4)
        z = vae.encode(torch.nn.functional.pad(x, pad, mode="replicate") * 2 - 1).latent_dist.mode()
        y = ((vae.decode(z).sample[..., :height, :width] + 1) / 2).clamp(0, 1).mul(255).round() / 255
        values.append(psnr_of((y - x).pow(2).mean().item()))
    return float(np.mean(values))


def psnr_of(mse_01: float) -> float:
    """PSNR of an MSE measured on [0, 1] images."""
    return 10 * math.log10(1 / max(mse_01, 1e-12))
