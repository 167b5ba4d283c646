"""Stage-1 training throughput, ours vs a plain PyTorch loop shaped like CompressAI's examples/train.py,
measured side by side in one run; then real/estimated bpp on Kodak of a briefly trained codec.

    python benchmarks/stage1_throughput.py --images ../shared/data/bsds500/train --kodak ../shared/data/kodak
    python benchmarks/stage1_throughput.py ... --overrides compile=true channels_last=true  # the quickstart's

Both sides: the same architecture and size, batch, crop, data folder, loader workers, Adam pair and
gradient clipping. Steps/s is timed after a warm-up, on the same machine, alternating A B A B.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
from lightning.pytorch.callbacks import Callback

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
warnings.filterwarnings("ignore")

from compressai.losses import RateDistortionLoss  # noqa: E402
from torch.utils.data import DataLoader, Dataset  # noqa: E402
from torchvision import transforms  # noqa: E402

from datamodules.images import list_images, load_rgb, to_tensor  # noqa: E402
from datamodules.shards import write_shards  # noqa: E402
from foundation.config import load_config  # noqa: E402
from pl_modules.core.bitstream import encode_image, pad_to_multiple  # noqa: E402
from pl_modules.core.codecs import build_codec  # noqa: E402
from pl_modules.core.rate_distortion import bits_per_pixel  # noqa: E402
from pl_modules.finals import load_final  # noqa: E402
from stages import stage1  # noqa: E402
from stages import trainer as trainer_module  # noqa: E402
from stages.stage1 import Stage1Config  # noqa: E402


class StepTimer(Callback):
    """Wall time between the end of step ``warmup`` and the end of the last step."""

    def __init__(self, warmup: int):
        self.warmup, self.start, self.end = warmup, None, None

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step == self.warmup:
            self.start = time.perf_counter()
        self.end = time.perf_counter()


def timed_stage1(overrides: list[str], warmup: int, steps: int) -> float:
    """Steps/s of a real stage-1 run (Lightning, our data stream), timed after ``warmup`` steps."""
    cfg = load_config(Stage1Config, overrides=[*overrides, f"trainer.max_steps={warmup + steps}",
                                               f"trainer.val_every={10 * (warmup + steps)}", "data.val_max_images=1",
                                               "trainer.checkpoint_every=1000000", "trainer.progress_bar=false"])
    timer = StepTimer(warmup)
    with trainer_module.extra_callbacks(timer):
        stage1.run(cfg)
    return steps / (timer.end - timer.start)


def ours(args, shards: Path, workdir: Path) -> float:
    return timed_stage1([f"output_root={workdir}", f"run=ours-{time.time_ns()}", f"data.train_shards={shards}",
                         f"data.val_dir={args.images}", f"data.crop={args.crop}", f"data.batch_size={args.batch}",
                         f"data.num_workers={args.workers}", f"codec.N={args.N}", f"codec.M={args.M}",
                         "trainer.accelerator=cpu", "trainer.devices=1", *args.overrides], args.warmup, args.steps)


class CroppedFolder(Dataset):
    def __init__(self, folder: str, crop: int):
        self.paths = list_images(folder)
        self.transform = transforms.Compose([transforms.RandomCrop(crop), transforms.ToTensor()])

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index):
        from PIL import Image

        return self.transform(Image.open(self.paths[index]).convert("RGB"))


def reference(args) -> float:
    """The loop of CompressAI's examples/train.py: two backward passes, two Adam optimizers."""
    torch.manual_seed(0)
    net = build_codec("bmshj2018-hyperprior", args.N, args.M).train()
    params = {n: p for n, p in net.named_parameters() if not n.endswith(".quantiles")}
    aux = {n: p for n, p in net.named_parameters() if n.endswith(".quantiles")}
    optimizer = torch.optim.Adam(params.values(), lr=1e-4)
    aux_optimizer = torch.optim.Adam(aux.values(), lr=1e-3)
    criterion = RateDistortionLoss(lmbda=0.0067)
    loader = DataLoader(CroppedFolder(args.images, args.crop), batch_size=args.batch, shuffle=True,
                        num_workers=args.workers, drop_last=True, persistent_workers=args.workers > 0)
    step, start = 0, None
    while step < args.warmup + args.steps:
        for batch in loader:
            optimizer.zero_grad()
            aux_optimizer.zero_grad()
            out = net(batch)
            loss = criterion(out, batch)["loss"]
            loss.backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
            optimizer.step()
            aux_loss = net.aux_loss()
            aux_loss.backward()
            aux_optimizer.step()
            step += 1
            if step == args.warmup:
                start = time.perf_counter()
            if step == args.warmup + args.steps:
                break
    return args.steps / (time.perf_counter() - start)


@torch.no_grad()
def bpp_ratio(args, shards: Path, workdir: Path) -> list[float]:
    cfg = load_config(Stage1Config, overrides=[
        f"output_root={workdir}", "run=ratio", f"data.train_shards={shards}", f"data.val_dir={args.kodak}",
        "data.val_max_images=1", f"data.crop={args.crop}", f"data.batch_size={args.batch}",
        f"data.num_workers={args.workers}", f"codec.N={args.N}", f"codec.M={args.M}", "optim.lr=1e-3",
        f"trainer.max_steps={args.train_steps}", f"trainer.val_every={args.train_steps}",
        "trainer.checkpoint_every=1000000", "trainer.progress_bar=false", "trainer.accelerator=cpu",
        "trainer.devices=1"])
    final = load_final(args.model or stage1.run(cfg))
    codec, sha = final.codec, final.decoder_id
    ratios = []
    for path in list_images(args.kodak):
        x = to_tensor(load_rgb(path)).unsqueeze(0)
        estimated = bits_per_pixel(codec(pad_to_multiple(x, codec.pad_multiple))["likelihoods"], x.shape[-2] * x.shape[-1]).item()
        ratios.append(encode_image(codec, x, sha).bits_per_pixel() / estimated)
    return ratios


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", required=True, help="training image folder (e.g. BSDS500 train)")
    parser.add_argument("--kodak", required=True)
    parser.add_argument("--N", type=int, default=64)
    parser.add_argument("--M", type=int, default=96)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--crop", type=int, default=128)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--train-steps", type=int, default=1500, help="training before the bpp ratio")
    parser.add_argument("--overrides", nargs="*", default=[],
                        help="stage-1 key=value settings of our side only, e.g. compile=true channels_last=true")
    parser.add_argument("--model", help="a stage-1 final/ to measure the bpp ratio on instead of training one")
    args = parser.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        shards = workdir / "shards"
        write_shards(args.images, shards, progress=False)
        pairs = []
        # Round 0 warms caches and lazy imports on both sides and is not counted.
        for round_ in range(args.rounds + 1):
            a, b = ours(args, shards, workdir), reference(args)
            if round_:
                pairs.append(a / b)
            label = f"round {round_}" if round_ else "warm-up"
            print(f"{label}: ours {a:.2f} steps/s, reference loop {b:.2f} steps/s, ratio {a / b:.3f}")
        print(f"throughput ratio ours/reference (median of {args.rounds}): {statistics.median(pairs):.3f}")
        ratios = bpp_ratio(args, shards, workdir)
        trained = args.model or f"a codec trained {args.train_steps} steps"
        print(f"real/estimated bpp on {len(ratios)} Kodak images, {trained}: "
              f"mean {statistics.mean(ratios):.4f}, min {min(ratios):.4f}, max {max(ratios):.4f}")


if __name__ == "__main__":
    main()
