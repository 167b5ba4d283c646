"""Stage 2 (LL-ICM) on a GPU at realistic sizes: Stable Diffusion 2.1's VAE/UNet, a ViT-L/14-sized
CLIP vision tower (random weights, real sizes) and a hyperprior codec, 512-px pairs. Training
steps/s and peak memory of fp32 against bf16-mixed with the frozen weights stored in bf16, in one
run (ratio printed).

    python benchmarks/stage2_gpu.py --images DIR_OF_CLEAN_IMAGES
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Sequence

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.diffusion_prior_gpu import save_sd21_sized  # noqa: E402
from benchmarks.stage1_throughput import StepTimer  # noqa: E402
from datamodules.shards import write_pair_shards, write_shards  # noqa: E402
from foundation.config import load_config  # noqa: E402
from stages import stage1, stage2_llicm  # noqa: E402
from stages import trainer as trainer_module  # noqa: E402


def save_clip_l_vision(folder: Path) -> Path:
    from transformers import CLIPConfig, CLIPModel

    from pl_modules.prior.tiny_models import tiny_clip_tokenizer

    vocab = len(tiny_clip_tokenizer().get_vocab())
    config = CLIPConfig(text_config=dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                         num_attention_heads=2, projection_dim=768),
                        vision_config=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                           num_attention_heads=16, image_size=224, patch_size=14, projection_dim=768),
                        projection_dim=768)
    CLIPModel(config).save_pretrained(folder)
    return folder


def timed_run(overrides: list[str], warmup: int, steps: int, stage=stage2_llicm,
              schema=stage2_llicm.Stage2LLICMConfig, presets: Sequence[Path] = ()) -> tuple[float, float]:
    """(steps/s after ``warmup`` steps, peak GPU memory in GiB) of a real run of ``stage``."""
    cfg = load_config(schema, presets, overrides=[
        *overrides, f"trainer.max_steps={warmup + steps}", f"trainer.val_every={10 * (warmup + steps)}",
        "trainer.checkpoint_every=1000000", "trainer.progress_bar=false"])
    timer = StepTimer(warmup)
    reset_peak()
    with trainer_module.extra_callbacks(timer):
        stage.run(cfg)
    return steps / (timer.end - timer.start), peak_gib()


def reset_peak() -> None:
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def peak_gib() -> float:
    """Peak GPU memory since :func:`reset_peak`; NaN on a CPU (a benchmark's dry run)."""
    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")


def gpu_arguments(doc: str, warmup: int, steps: int) -> argparse.Namespace:
    """--images, --batch, --warmup, --steps of the GPU stage benchmarks; prints the device."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", required=True)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=warmup)
    parser.add_argument("--steps", type=int, default=steps)
    args = parser.parse_args()
    print(torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU (dry run)", torch.__version__, flush=True)
    return args


def main() -> None:
    args = gpu_arguments(__doc__, warmup=5, steps=20)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        prior, clip = save_sd21_sized(tmp / "sd"), save_clip_l_vision(tmp / "clip")
        write_pair_shards(args.images, tmp / "pairs", ["denoise", "dehaze"], progress=False)
        write_shards(args.images, tmp / "images", progress=False)
        # A barely trained codec: stage 2's cost does not depend on how good it is.
        codec = stage1.run(load_config(stage1.Stage1Config, overrides=[
            f"output_root={tmp}", "run=codec", f"data.train_shards={tmp / 'images'}",
            f"data.val_dir={args.images}", "data.val_max_images=1", "trainer.max_steps=2", "trainer.val_every=2",
            "trainer.accelerator=gpu", "trainer.devices=1", "trainer.progress_bar=false"]))
        common = [f"output_root={tmp}", f"init_from={codec}", f"prior.model={prior}", "prior.local_files_only=true",
                  f"clip_model={clip}", f"data.train_shards={tmp / 'pairs'}", f"data.val_dir={args.images}",
                  "data.val_tasks=[denoise]", "data.val_max_images=1", "data.crop=512", "data.val_crop=512",
                  f"data.batch_size={args.batch}", "data.num_workers=8", "data.decoded_cache_mb=4096",
                  "prior.sample_steps=4", "trainer.accelerator=gpu", "trainer.devices=1"]
        compare_precisions(f"stage 2 LL-ICM, batch {args.batch} of 512-px pairs", {
            "fp32": ["trainer.precision=32-true", "prior.frozen_dtype=float32"],
            "bf16-mixed, frozen bf16": ["trainer.precision=bf16-mixed", "prior.frozen_dtype=bfloat16"]}, common, args)


def compare_precisions(label: str, arms: dict[str, list[str]], common: list[str], args, stage=stage2_llicm,
                       schema=stage2_llicm.Stage2LLICMConfig, presets: Sequence[Path] = ()) -> None:
    """The fp32 arm and the bf16 arm (first and second) side by side in one process, and their ratio."""
    results = {}
    for name, extra in arms.items():
        results[name] = timed_run([*common, f"run={name.split(',')[0]}", *extra], args.warmup, args.steps, stage, schema,
                                  presets)
        print(f"{label}, {name}: {results[name][0]:.2f} steps/s, peak {results[name][1]:.2f} GiB", flush=True)
    (slow, slow_mem), (fast, fast_mem) = results.values()
    print(f"bf16 / fp32: {fast / slow:.3f}× steps/s, {fast_mem / slow_mem:.3f}× peak memory")


if __name__ == "__main__":
    main()
