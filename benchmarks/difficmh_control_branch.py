"""Diff-ICMH's two control branches side by side in one run: a ControlNet copy of the UNet's encoder
fed ẑ (``prior.control=controlnet``) against ẑ concatenated to the noisy latent through zero-initialised
conv_in channels (``concat``). Per branch, in a fresh process (peak RSS is per process): trainable
parameters, training steps/s and peak RSS on the same batches, then the ratios.

    python benchmarks/difficmh_control_branch.py --images ../shared/data/kodak --crop 128 --batch 4 \
        --preset configs/stage2/difficmh-small.yaml

This measures cost, not quality: docs/results.md compares the two branches' reconstructions on the
trained small-sd preset (configs/stage2/difficmh-small.yaml); the default tiny-sd preset is random.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

TRAIN = """
import json, resource, sys, time
sys.path.insert(0, {root!r})
import torch
from datamodules.images import list_images, load_rgb, to_tensor
from foundation.config import load_config
from pl_modules.difficmh.module import DiffICMHModule
from stages.stage2_difficmh import Stage2DiffICMHConfig
torch.set_num_threads({threads})
cfg = load_config(Stage2DiffICMHConfig, [{preset!r}], ["prior.control={control}", "codec_warmup_steps=0",
                  "data.train_shards=unused", "data.val_dir=unused"])
module = DiffICMHModule(cfg)
groups, aux = module.parameter_groups()
params = [p for g in groups for p in g["params"]]
optimizer = torch.optim.Adam(params, lr=1e-4)
crops = [to_tensor(load_rgb(p))[:, :{crop}, :{crop}] for p in list_images({images!r})[:{batch}]]
batch = {{"image": torch.stack(crops)}}
def step(seed):
    torch.manual_seed(seed)
    terms, aux_loss = module.losses(batch)
    optimizer.zero_grad(set_to_none=True)
    (terms["loss"] + aux_loss).backward()
    optimizer.step()
for s in range({warmup}):
    step(s)
start = time.perf_counter()
for s in range({steps}):
    step(1000 + s)
elapsed = time.perf_counter() - start
print(json.dumps({{"trainable": sum(p.numel() for p in params), "steps_per_s": {steps} / elapsed,
                  "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}}))
"""


def measure(control: str, args: argparse.Namespace) -> dict:
    script = TRAIN.format(root=str(ROOT), preset=str(args.preset.resolve()),
                          control=control, images=str(args.images), crop=args.crop, batch=args.batch,
                          warmup=args.warmup, steps=args.steps, threads=args.threads)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT)
    if out.returncode:
        raise SystemExit(out.stderr[-2000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=Path, default=ROOT.parent / "shared" / "data" / "kodak")
    parser.add_argument("--preset", type=Path, default=ROOT / "configs" / "stage2" / "difficmh-tiny.yaml",
                        help="the Diff-ICMH config whose models are measured")
    parser.add_argument("--crop", type=int, default=128)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    rows = {control: measure(control, args) for control in ("concat", "controlnet")}
    print(f"{'control':<12}{'trainable':>12}{'steps/s':>10}{'peak RSS GiB':>14}")
    for control, row in rows.items():
        print(f"{control:<12}{row['trainable']:>12,}{row['steps_per_s']:>10.2f}{row['peak_rss_gib']:>14.2f}")
    concat, controlnet = rows["concat"], rows["controlnet"]
    print(f"controlnet / concat: trainable {controlnet['trainable'] / concat['trainable']:.1f}×, steps/s "
          f"{controlnet['steps_per_s'] / concat['steps_per_s']:.2f}×, peak RSS "
          f"{controlnet['peak_rss_gib'] / concat['peak_rss_gib']:.2f}×")


if __name__ == "__main__":
    main()
