"""The diffusion prior at Stable Diffusion 2.1's size on a GPU: peak memory of tiled vs whole-image
VAE decoding of a 2K image, and LoRA training steps of the UNet in fp32 vs bf16 autocast, with and
without gradient checkpointing. Weights are random (the sizes are SD 2.1's, from its configs); the
models go through save_pretrained/from_pretrained like real weights.

    python benchmarks/diffusion_prior_gpu.py [--tiny]   # --tiny: the CPU-sized preset, for a dry run
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pl_modules.prior.diffusion_prior import DiffusionPrior, DiffusionPriorConfig  # noqa: E402
from pl_modules.prior.tiny_models import save_tiny_diffusion  # noqa: E402

SD21_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, norm_num_groups=32,
                block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4, sample_size=768, scaling_factor=0.18215)
SD21_UNET = dict(sample_size=96, in_channels=4, out_channels=4, layers_per_block=2, cross_attention_dim=1024,
                 block_out_channels=(320, 640, 1280, 1280), attention_head_dim=(5, 10, 20, 20),
                 use_linear_projection=True,
                 down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)


def save_sd21_sized(folder: Path) -> Path:
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel

    AutoencoderKL(**SD21_VAE).save_pretrained(folder / "vae")
    UNet2DConditionModel(**SD21_UNET).save_pretrained(folder / "unet")
    DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                  set_alpha_to_one=False, steps_offset=1).save_pretrained(folder / "scheduler")
    return folder


def peak(fn) -> tuple[float, float]:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - start, torch.cuda.max_memory_allocated() / 2**30


def vae_memory(folder: Path, side: int) -> None:
    latents = torch.randn(1, 4, side // 8, side // 8, device="cuda")
    for tile in (0, 512):
        model = DiffusionPrior(DiffusionPriorConfig(model=str(folder), vae_tile=tile, lora_rank=0,
                                                    condition_channels=0, local_files_only=True)).cuda().eval()
        with torch.no_grad(), torch.autocast("cuda", torch.bfloat16):
            seconds, gib = peak(lambda: model.decode(latents))
        print(f"VAE decode {side}x{side}, tile {tile or 'off'}: {seconds:.2f} s, peak {gib:.2f} GiB", flush=True)
        del model
        torch.cuda.empty_cache()


def unet_training(folder: Path, batch: int, latent: int, steps: int, context_dim: int) -> None:
    """fp32; bf16 autocast over fp32 weights; bf16 autocast with the frozen weights stored in bf16
    (the trained LoRA and conv_in weights stay fp32, as diffusers' training scripts do)."""
    modes = (("fp32", False, False), ("bf16 autocast", True, False), ("bf16 autocast, frozen bf16", True, True))
    for checkpointing in (False, True):
        for name, autocast, frozen_bf16 in modes:
            model = DiffusionPrior(DiffusionPriorConfig(model=str(folder), gradient_checkpointing=checkpointing,
                                                        local_files_only=True)).cuda()
            trained = model.trainable_parameters()
            if frozen_bf16:
                model.unet.to(torch.bfloat16)
                for p in trained:
                    p.data = p.data.float()
            optimizer = torch.optim.AdamW(trained, lr=1e-4)
            noisy = torch.randn(batch, 4, latent, latent, device="cuda")
            condition = torch.randn_like(noisy)
            context = torch.randn(batch, 77, context_dim, device="cuda")
            t = torch.randint(0, 1000, (batch,), device="cuda")
            model.unet.train()

            def step():
                with torch.autocast("cuda", torch.bfloat16, enabled=autocast):
                    loss = (model.denoise(noisy, t, condition, context).float() - noisy).pow(2).mean()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()

            for _ in range(3):
                step()
            seconds, gib = peak(lambda: [step() for _ in range(steps)])
            print(f"UNet LoRA step, batch {batch} of {latent * 8}px, checkpointing {checkpointing}, {name}: "
                  f"{steps / seconds:.2f} steps/s, peak {gib:.2f} GiB", flush=True)
            del model, optimizer
            torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--unet-only", action="store_true")
    args = parser.parse_args()
    print(torch.cuda.get_device_name(), torch.__version__, flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        if args.tiny:
            folder = save_tiny_diffusion(Path(tmp))
            vae_memory(folder, 1024)
            unet_training(folder, batch=2, latent=32, steps=3, context_dim=32)
        else:
            folder = save_sd21_sized(Path(tmp))
            if not args.unet_only:
                vae_memory(folder, 2048)
            unet_training(folder, batch=4, latent=64, steps=10, context_dim=1024)


if __name__ == "__main__":
    main()
