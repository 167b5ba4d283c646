"""Stage 3 (VLIC) on a GPU at realistic sizes: a Diffusion-DPO step on Stable Diffusion 2.1's
VAE/UNet (random weights, real sizes) behind an LL-ICM decoder with a ViT-L/14-sized CLIP, 512-px
crops, the reference as the same UNet with its adapter disabled (no second copy). Steps/s and
peak memory, fp32 against bf16-mixed, in one run (ratio printed).
A step draws two 4-step DDIM reconstructions per crop, judges them (PSNR) and runs the model and
the reference on winner and loser.

    python benchmarks/stage3_gpu.py --images DIR_OF_CLEAN_IMAGES --batch 2
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.diffusion_prior_gpu import save_sd21_sized  # noqa: E402
from benchmarks.stage2_gpu import compare_precisions, gpu_arguments, save_clip_l_vision  # noqa: E402
from datamodules.shards import write_pair_shards, write_shards  # noqa: E402
from foundation.config import load_config  # noqa: E402
from stages import stage1, stage2_llicm, stage3_vlic  # noqa: E402


def main() -> None:
    args = gpu_arguments(__doc__, warmup=3, steps=10)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        prior, clip = save_sd21_sized(tmp / "sd"), save_clip_l_vision(tmp / "clip")
        write_pair_shards(args.images, tmp / "pairs", ["dehaze"], progress=False)
        write_shards(args.images, tmp / "images", progress=False)
        gpu = ["trainer.accelerator=gpu", "trainer.devices=1", "trainer.progress_bar=false"]
        # A barely trained codec and decoder: a DPO step's cost does not depend on how good they are.
        codec = stage1.run(load_config(stage1.Stage1Config, overrides=[
            f"output_root={tmp}", "run=codec", f"data.train_shards={tmp / 'images'}", f"data.val_dir={args.images}",
            "data.val_max_images=1", "trainer.max_steps=2", "trainer.val_every=2", *gpu]))
        data = [f"data.train_shards={tmp / 'pairs'}", f"data.val_dir={args.images}", "data.val_tasks=[dehaze]",
                "data.val_max_images=1", "data.crop=512", "data.val_crop=512", f"data.batch_size={args.batch}",
                "data.num_workers=8", "data.decoded_cache_mb=4096"]
        decoder = stage2_llicm.run(load_config(stage2_llicm.Stage2LLICMConfig, overrides=[
            f"output_root={tmp}", "run=decoder", f"init_from={codec}", f"prior.model={prior}",
            "prior.local_files_only=true", f"clip_model={clip}", "prior.sample_steps=4", *data,
            "trainer.max_steps=2", "trainer.val_every=2", *gpu]))
        common = [f"output_root={tmp}", f"init_from={decoder}", *data, "val_seeds=1", *gpu]
        compare_precisions(f"stage 3 VLIC DPO, batch {args.batch} of 512-px crops",
                           {"fp32": ["trainer.precision=32-true"], "bf16-mixed": ["trainer.precision=bf16-mixed"]},
                           common, args, stage3_vlic, stage3_vlic.Stage3VLICConfig)


if __name__ == "__main__":
    main()
