"""Stage 1 on a GPU: training steps/s in fp32 vs bf16-mixed (same run, same data, ratio printed),
and peak GPU memory of validation's real-bitstream path on a full-resolution 4K image.

    python benchmarks/stage1_gpu.py --images DIR_OF_TRAINING_IMAGES --image ONE_PHOTO
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.stage1_throughput import timed_stage1  # noqa: E402
from datamodules.images import load_rgb, to_tensor  # noqa: E402
from datamodules.shards import write_shards  # noqa: E402
from pl_modules.core.bitstream import decode_image, encode_image, pad_to_multiple  # noqa: E402
from pl_modules.core.codecs import build_codec  # noqa: E402


def training(args, workdir: Path) -> None:
    shards = workdir / "shards"
    write_shards(args.images, shards, progress=False)
    speeds = {}
    for precision in ("32-true", "bf16-mixed"):
        speeds[precision] = timed_stage1([
            f"output_root={workdir}", f"run={precision}", f"data.train_shards={shards}", f"data.val_dir={args.images}",
            "data.crop=256", f"data.batch_size={args.batch}", f"data.num_workers={args.workers}",
            "data.decoded_cache_mb=2048", f"codec.N={args.N}", f"codec.M={args.M}", "trainer.accelerator=gpu",
            "trainer.devices=1", f"trainer.precision={precision}"], args.warmup, args.steps)
        print(f"train {precision}: {speeds[precision]:.2f} steps/s ({speeds[precision] * args.batch:.0f} crops/s), "
              f"hyperprior N={args.N} M={args.M}, batch {args.batch}, 256-px crops", flush=True)
    print(f"bf16-mixed / fp32 throughput: {speeds['bf16-mixed'] / speeds['32-true']:.3f}")


@torch.no_grad()
def full_resolution(args) -> None:
    codec = build_codec("bmshj2018-hyperprior", args.N, args.M).cuda().eval()
    codec.update(force=True)
    photo = to_tensor(load_rgb(args.image)).unsqueeze(0).cuda()
    x = F.interpolate(photo, size=(2160, 3840), mode="bicubic").clamp(0, 1)
    for name, work in (("forward (likelihoods)", lambda: codec(pad_to_multiple(x, codec.pad_multiple))),
                       ("compress + decompress", lambda: decode_image(codec, encode_image(codec, x, "00" * 32), "00" * 32))):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        work()
        torch.cuda.synchronize()
        print(f"3840x2160 {name}: {time.perf_counter() - start:.2f} s, peak GPU memory "
              f"{torch.cuda.max_memory_allocated() / 2**30:.2f} GiB", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", required=True)
    parser.add_argument("--image", required=True)
    parser.add_argument("--N", type=int, default=128)
    parser.add_argument("--M", type=int, default=192)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=30)
    parser.add_argument("--steps", type=int, default=300)
    args = parser.parse_args()
    print(torch.cuda.get_device_name(), torch.__version__, flush=True)
    full_resolution(args)
    with tempfile.TemporaryDirectory() as tmp:
        training(args, Path(tmp))


if __name__ == "__main__":
    main()
