"""Win rate of a post-trained (stage-3) decoder over its reference, the stage-2 decoder it started
from: the same bits and sampling seeds for both, a judge deciding which is closer to the clean
image, ties counting ½, and a 95 % bootstrap interval over images (the seeds of an image are
averaged within it, so the interval does not pretend they are independent)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from datamodules.degradations import degrade
from datamodules.images import centre_crop, load_rgb, to_tensor
from evaluation.paired import bootstrap_mean
from pl_modules.core.rate_distortion import psnr
from pl_modules.finals import Final
from pl_modules.scoring.judges import Judge


@torch.no_grad()
def paired_preferences(final: Final, images: list[Path], tasks: list[str], seeds: int, judges: dict[str, Judge],
                       crop: int) -> dict[str, np.ndarray]:
    """Per judge, an images × (tasks · seeds) array of P(post-trained closer); also the PSNR of both.
    A decoder that codes the image itself (Diff-ICMH) has no tasks: one clean input per image."""
    model = final.model
    rows: dict[str, list[list[float]]] = {name: [] for name in [*judges, "psnr_post", "psnr_reference"]}
    for index, path in enumerate(tqdm(images, desc=f"win rate {final.folder.parent.name}", unit="img")):
        clean = centre_crop(load_rgb(path), crop)
        target = to_tensor(clean).unsqueeze(0)
        per_image: dict[str, list[float]] = {name: [] for name in rows}
        batches = ([{"degraded": to_tensor(degrade(clean, task, index)).unsqueeze(0), "clean": target} for task in tasks]
                   if model.restores else [{"clean": target}])
        for batch in batches:
            inputs = model.decoder_inputs(batch)
            for k in range(seeds):
                seed = index * seeds + k
                post, reference = model.generate(inputs, seed).cpu(), model.generate_reference(inputs, seed).cpu()
                for name, judge in judges.items():
                    per_image[name].append(judge.prefer(target, post, reference).item())
                per_image["psnr_post"].append(psnr(post, target))
                per_image["psnr_reference"].append(psnr(reference, target))
        for name, values in per_image.items():
            rows[name].append(values)
    return {name: np.array(values) for name, values in rows.items()}


def win_rate(prefs: np.ndarray, resamples: int = 2000, seed: int = 0) -> dict[str, float]:
    """Mean preference with a 95 % bootstrap interval that resamples images (rows)."""
    mean, low, high = bootstrap_mean(prefs.mean(axis=1), resamples, seed)
    return {"win_rate": mean, "win_rate_ci_low": low, "win_rate_ci_high": high, "n_pairs": int(prefs.size),
            "n_images": int(len(prefs))}
