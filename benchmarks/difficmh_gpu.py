"""Diff-ICMH at Stable Diffusion 2.1-base's size on a GPU: training steps/s and peak memory of
fp32 against bf16-mixed with the frozen weights stored in bf16 (one run, ratio printed), then the
bf16 final's compress and decompress of a 2048² photo (peak GPU memory and time; the issue's goal
is ≤ 8 GiB for the decode). Random weights at real sizes (SD 2.1's VAE, UNet and OpenCLIP-H text
encoder configurations), saved and loaded through from_pretrained; configs/stage2/difficmh-sd21.yaml
otherwise (ControlNet branch, LoRA rank 16, gradient checkpointing, latent tiles of 96), with no
tagger (the text encoder still reads every prompt) and no codec warm-up (every timed step is a
joint one).

    python benchmarks/difficmh_gpu.py --images DIR_OF_CLEAN_IMAGES --batch 2
    python benchmarks/difficmh_gpu.py --images DIR --tiny     # the tiny preset, a dry run on a CPU
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.diffusion_prior_gpu import save_sd21_sized  # noqa: E402
from benchmarks.stage2_gpu import compare_precisions, peak_gib, reset_peak  # noqa: E402
from datamodules.images import list_images, to_tensor  # noqa: E402
from datamodules.shards import write_shards  # noqa: E402
from pl_modules.core.bitstream import pack, unpack  # noqa: E402
from pl_modules.difficmh.module import STAGE  # noqa: E402
from pl_modules.finals import load_final  # noqa: E402
from stages import stage2_difficmh  # noqa: E402

SD21_TEXT = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16,
                 projection_dim=512, hidden_act="gelu", max_position_embeddings=77, vocab_size=49408)


def save_sd21_text_encoder(folder: Path) -> Path:
    """OpenCLIP ViT-H/14's text tower as SD 2.1 ships it (text_encoder/), with the tiny tokenizer:
    the token ids differ from the real ones, the sizes and the cost do not."""
    from transformers import CLIPTextConfig, CLIPTextModel

    from pl_modules.prior.tiny_models import tiny_clip_tokenizer

    tokenizer = tiny_clip_tokenizer()
    tokenizer.save_pretrained(folder / "tokenizer")
    vocab = tokenizer.get_vocab()
    CLIPTextModel(CLIPTextConfig(**SD21_TEXT, bos_token_id=vocab["<|startoftext|>"],
                                 eos_token_id=vocab["<|endoftext|>"])).save_pretrained(folder / "text_encoder")
    return folder


def timed(label: str, work):
    """``work()``'s result, its time and peak GPU memory printed under ``label``."""
    reset_peak()
    start = time.perf_counter()
    result = work()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    print(f"{label}: {time.perf_counter() - start:.1f} s, peak {peak_gib():.2f} GiB", flush=True)
    return result


def code_large_photo(final: Path, photo: Path, size: int) -> None:
    """Compress and decompress ``photo`` resized to size², on the GPU (the entropy codec on the CPU)."""
    loaded = load_final(final, device="auto")
    with Image.open(photo) as image:
        x = to_tensor(np.asarray(image.convert("RGB").resize((size, size), Image.BICUBIC))).unsqueeze(0)
    data = timed(f"compress {size}²", lambda: pack(loaded.model.encode(x, loaded.decoder_id, seed=0)))
    print(f"  {8 * len(data) / size**2:.4f} bpp", flush=True)
    decoded = timed(f"decompress {size}²", lambda: loaded.model.decode(unpack(data), loaded.decoder_id))
    assert decoded.shape[-2:] == (size, size)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", required=True)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--crop", type=int, default=512)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--decode-size", type=int, default=2048)
    parser.add_argument("--decode-steps", type=int, default=10,
                        help="sampling steps of the coded file (memory does not depend on them; time does)")
    parser.add_argument("--tiny", action="store_true")
    args = parser.parse_args()
    print(torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU (dry run)", torch.__version__, flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_shards(args.images, tmp / "images", progress=False)
        if args.tiny:
            preset, prior = ROOT / "configs" / "stage2" / "difficmh-tiny.yaml", "tiny-sd"
        else:
            preset, prior = ROOT / "configs" / "stage2" / "difficmh-sd21.yaml", str(save_sd21_sized(tmp / "sd"))
            save_sd21_text_encoder(tmp / "sd")
        device = ["trainer.accelerator=gpu", "trainer.devices=1"] if torch.cuda.is_available() else []
        common = [f"output_root={tmp}", f"prior.model={prior}", "prior.local_files_only=true", "tagger.kind=none",
                  "codec_warmup_steps=0", f"prior.sample_steps={args.decode_steps}",
                  f"data.train_shards={tmp / 'images'}", f"data.val_dir={args.images}", "data.val_max_images=1",
                  f"data.crop={args.crop}", f"data.batch_size={args.batch}",
                  f"data.num_workers={8 if device else 0}", *device]
        compare_precisions(f"stage 2 Diff-ICMH, batch {args.batch} of {args.crop}-px crops", {
            "fp32": ["trainer.precision=32-true", "prior.frozen_dtype=float32"],
            "bf16-mixed, frozen bf16": ["trainer.precision=bf16-mixed", "prior.frozen_dtype=bfloat16"]},
            common, args, stage2_difficmh, stage2_difficmh.Stage2DiffICMHConfig, [preset])
        code_large_photo(tmp / "bf16-mixed" / STAGE / "final", list_images(args.images)[0], args.decode_size)


if __name__ == "__main__":
    main()
