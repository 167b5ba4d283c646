"""``train.py evaluate``: learned codecs (stage manifests) and classical anchors on one image folder,
every bpp from real bytes over the original pixel count. Writes one CompressAI-format JSON per
method, one CSV of per-image rows, and RD plots of every metric."""
from __future__ import annotations

import csv
import json
import os
from collections import defaultdict
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from datamodules.images import centre_crop, list_images, load_rgb, to_tensor
from evaluation import distribution, preference
from evaluation.classical import CODECS, code
from evaluation.rd import plot_rd
from pl_modules.core.bitstream import round_trip
from pl_modules.finals import load_final, resolve_device
from pl_modules.scoring import features
from pl_modules.scoring.judges import build_judge
from pl_modules.scoring.metrics import Unavailable, availability, measure

# CompressAI's results keys for the metrics that have one.
RESULT_KEYS = {"psnr": "psnr-rgb"}


@dataclass
class EvaluateConfig:
    images: str = "???"
    """Folder of evaluation images (e.g. ../shared/data/kodak)."""
    models: list[str] = field(default_factory=list)
    """Codecs' final/ folders (stage 1, Diff-ICMH, or stage 3 after it), each as a path (a point of the
    ``models_name`` curve) or 'name=path'; one name's finals form one curve (e.g. a λ sweep's)."""
    models_name: str = "ours"
    """Name of the curve of the models given without a name."""
    latent_blocks: list[str] = field(default_factory=lambda: ["down_blocks.0", "down_blocks.1", "mid_block",
                                                              "up_blocks.1"])
    """Diff-ICMH finals: UNet blocks at which the feature distance between z and ẑ is reported (beside
    ``vae_psnr``, the VAE's own decoding of ẑ: what the codec carries before the diffusion decoder)."""
    latent_timesteps: list[int] = field(default_factory=lambda: [0, 250])
    """… and the timesteps (noise fixed per image) at which it is measured."""
    classical: list[str] = field(default_factory=lambda: ["jpeg", "webp", "avif", "jpeg2000", "jpegxl", "hevc"])
    """Classical anchors, each at its quality ladder; one unavailable here is skipped with the reason."""
    metrics: list[str] = field(default_factory=lambda: ["psnr", "ms-ssim", "gmsd", "vif", "haarpsi", "lpips",
                                                        "dists", "brisque"])
    """Metrics per image; one whose weights are absent is reported unavailable and skipped."""
    task_backbones: list[str] = field(default_factory=list)
    """Machine-task fidelity backbones: 'torchvision:<name>' (weights from torch hub's cache),
    'timm:<name>' (HF cache) or 'timm:<name>=<weights file>', 'hf:<hub id or folder>' (transformers)."""
    clip_model: str = ""
    """CLIP (hub id or local folder) for embedding similarity and CLIP-IQA; empty: none."""
    fid_kid: bool = True
    """FID and KID on 256-px patches (HiFiC/MS-ILLM protocol), when the Inception weights are cached."""
    restorers: list[str] = field(default_factory=list)
    """Restorers' final/ folders (stage 2, or stage 3 after it) as 'name=path'; one name's folders form
    one curve per task (e.g. llicm=… and baseline=…, the latter trained with train_codec=false on the same codec)."""
    tasks: list[str] = field(default_factory=lambda: ["dehaze", "denoise", "derain", "deraindrop", "deshadow",
                                                      "inpaint"])
    """Degradations the restorers are evaluated on (each image degraded with a seed fixed by its index)."""
    post_trained: list[str] = field(default_factory=list)
    """Stage-3 final/ folders as 'name=path': each one's win rate over its stage-2 reference (same bits,
    same seeds), per judge, with a bootstrap interval over images, on the restorers' tasks and crop."""
    win_judges: list[str] = field(default_factory=lambda: ["psnr", "ms-ssim"])
    """Judges of the win rate (pl_modules/scoring/judges.py); the training judge and at least one independent one."""
    win_seeds: int = 2
    """Sampling seeds per image and task for the win rate."""
    restore_seeds: int = 1
    """Sampling seeds per image and task for the restorers; an image's row averages its seeds, so that
    per-image comparisons (``train.py paired``) are not pretending the seeds are independent images."""
    restore_crop: int = 0
    """Centre crop of at most this side for the restorers (0: the whole image, cut to a multiple of
    64); sampling a diffusion prior over whole images is slow on a CPU."""
    out_dir: str = "checkpoints/evaluation"
    """Where the JSONs, the CSV and the plots go."""
    workers: int = 2
    """Processes coding the classical anchors in parallel."""
    max_images: int = 0
    """Evaluate the first this-many images only (0: all)."""
    device: str = "auto"
    """Where the learned models run: auto (the GPU when there is one), cpu, cuda, cuda:1; their
    entropy codecs stay on the CPU, so the files are the ones any machine decodes."""


def run(cfg: EvaluateConfig) -> dict[str, dict]:
    resolve_device(cfg.device)  # an absent device is refused before the anchors take minutes
    unknown = [c for c in cfg.classical if c not in CODECS]
    if unknown:
        raise ValueError(f"unknown classical codecs {unknown}; choose from {sorted(CODECS)}")
    images = list_images(cfg.images)[: cfg.max_images or None]
    reasons = availability(cfg.metrics)
    metrics = [m for m, why in reasons.items() if why is None]
    unavailable = {m: why for m, why in reasons.items() if why}
    feature_measures, feature_unavailable = features.build(cfg.task_backbones, cfg.clip_model)
    unavailable.update(feature_unavailable)
    for name, why in unavailable.items():
        print(f"metric {name}: unavailable: {why}")
    fid = cfg.fid_kid and distribution.unavailable() is None
    if cfg.fid_kid and not fid:
        unavailable["fid"] = unavailable["kid"] = distribution.unavailable()
    _WORKER.update(features=feature_measures, fid=fid)
    for codec in cfg.classical:
        why = CODECS[codec].unavailable()
        if why:
            print(f"codec {codec}: unavailable: {why}")
            unavailable[codec] = why
    # The anchors' worker processes fork before the learned models start CUDA: a forked child cannot use it.
    classical = classical_rows(cfg, images, metrics, [c for c in cfg.classical if c not in unavailable])
    rows = learned_rows(cfg, images, metrics) + restoration_rows(cfg, images, metrics) + classical
    originals = {p.name: distribution.inception_features(to_tensor(load_rgb(p)).unsqueeze(0)) for p in images} if fid else {}
    curves = write_outputs(Path(cfg.out_dir), rows, unavailable, originals)
    if cfg.post_trained:
        curves["win_rates"] = win_rates(cfg, images)
    return curves


def win_rates(cfg: EvaluateConfig, images: list[Path]) -> dict[str, dict]:
    """Each post-trained decoder against its stage-2 reference, by every judge available here;
    written to win_rates.json and printed."""
    judges, unavailable = {}, {}
    for spec in cfg.win_judges:
        try:
            judges[spec] = build_judge(spec)
        except Unavailable as err:
            unavailable[spec] = str(err)
    results = {}
    for spec in cfg.post_trained:
        name, _, folder = spec.partition("=")
        final = load_final(folder, need_codec=True, device=cfg.device)
        if not hasattr(final.model, "generate_reference"):
            raise ValueError(f"post_trained '{name}': a {final.manifest.stage} model has no reference to be compared with")
        prefs = preference.paired_preferences(final, images, cfg.tasks, cfg.win_seeds, judges, cfg.restore_crop)
        results[name] = {"judges": {judge: preference.win_rate(prefs[judge]) for judge in judges},
                         "psnr_post": float(prefs["psnr_post"].mean()),
                         "psnr_reference": float(prefs["psnr_reference"].mean()),
                         "unavailable": unavailable}
        for judge, r in results[name]["judges"].items():
            print(f"{name}: win rate over its reference by {judge}: {r['win_rate']:.3f} "
                  f"[{r['win_rate_ci_low']:.3f}, {r['win_rate_ci_high']:.3f}] ({r['n_pairs']} pairs, {r['n_images']} images)")
        # A win rate counts consistent differences however small: the PSNRs say how far the decoder moved.
        print(f"{name}: mean PSNR {results[name]['psnr_post']:.2f} dB against its reference's "
              f"{results[name]['psnr_reference']:.2f} dB")
    Path(cfg.out_dir).mkdir(parents=True, exist_ok=True)
    (Path(cfg.out_dir) / "win_rates.json").write_text(json.dumps(results, indent=2) + "\n")
    return results


def measure_all(metrics: list[str], x_hat: torch.Tensor, x: torch.Tensor) -> dict:
    """Per-image metrics, feature fidelity, and (kept out of the CSV) the patches' Inception features."""
    values = measure(metrics, x_hat, x)
    for feature_measure in _WORKER["features"]:
        values.update(feature_measure(x_hat, x))
    if _WORKER["fid"]:
        values["_inception"] = distribution.inception_features(x_hat)
    return values


def learned_rows(cfg: EvaluateConfig, images: list[Path], metrics: list[str]) -> list[dict]:
    rows = []
    for spec in cfg.models:
        name, model = named_path(spec, cfg.models_name)
        final = load_final(model, need_codec=True, device=cfg.device)
        decoder, sha = final.model, final.decoder_id
        setting = final.setting  # read up the parent chain once, not per image
        probes = hasattr(decoder, "latent_measures")
        for index, path in enumerate(tqdm(images, desc=f"{name} {setting}", unit="img")):
            x = to_tensor(load_rgb(path)).unsqueeze(0)
            data, decoded = decoder.round_trip(x, sha, seed=index)
            decoded = decoded.cpu()
            row = {"method": name, "setting": setting, "image": path.name,
                   "bpp": 8 * len(data) / (x.shape[-2] * x.shape[-1]), **measure_all(metrics, decoded, x)}
            if probes:
                row.update(decoder.latent_measures(x, data, sha, cfg.latent_blocks, cfg.latent_timesteps, seed=index))
            rows.append(row)
    return rows


def named_path(spec: str, default_name: str) -> tuple[str, str]:
    """'name=path' → (name, path); a bare path (which may itself hold '=', as sweep folders do) →
    (default_name, path)."""
    name, sep, path = spec.partition("=")
    if sep and "/" not in name and not Path(spec).exists():
        return name, path
    return default_name, spec


def restoration_rows(cfg: EvaluateConfig, images: list[Path], metrics: list[str]) -> list[dict]:
    """Degrade, code (bpp of the degraded image's file), restore, and score against the clean image;
    the decoded image unrestored is scored too (``<name>-<task>-decoded``), so that the restorer's
    share of the result shows.
    Images are centre-cropped to a multiple of 64 (and to restore_crop) so that codec and VAE need no
    padding."""
    from datamodules.degradations import TASKS, degrade

    for task in cfg.tasks:
        if task not in TASKS:
            raise ValueError(f"unknown task '{task}'; choose from {list(TASKS)}")
    if 0 < cfg.restore_crop < 64:
        raise ValueError(f"restore_crop must be 0 or at least 64, got {cfg.restore_crop}")
    if cfg.restore_seeds < 1:
        raise ValueError(f"restore_seeds must be at least 1, got {cfg.restore_seeds}")
    rows = []
    for spec in cfg.restorers:
        name, _, folder = spec.partition("=")
        if not folder:
            raise ValueError(f"restorer '{spec}' must be 'name=path/to/final'")
        final = load_final(folder, need_codec=True, device=cfg.device)
        if not hasattr(final.model, "restore"):
            raise ValueError(f"restorer '{name}': a {final.manifest.stage} model does not restore images")
        model, sha = final.model, final.decoder_id
        setting = final.setting
        for seed, path in enumerate(tqdm(images, desc=f"{name} λ={setting}", unit="img")):
            clean = centre_crop(load_rgb(path), cfg.restore_crop)
            height, width = clean.shape[:2]
            for task in cfg.tasks:
                degraded = to_tensor(degrade(clean, task, seed)).unsqueeze(0)
                data, decoded = round_trip(model.codec, degraded, sha)
                target = to_tensor(clean).unsqueeze(0)
                restored = [measure_all(metrics, model.restore(decoded, seed * cfg.restore_seeds + k)[0].cpu(), target)
                            for k in range(cfg.restore_seeds)]
                # FID/KID against the crop that was restored, not the whole original.
                reference = {"_inception_ref": distribution.inception_features(target)} if _WORKER["fid"] else {}
                for method, values in ((f"{name}-{task}", seed_mean(restored)),
                                       (f"{name}-{task}-decoded", measure_all(metrics, decoded, target))):
                    rows.append({"method": method, "setting": setting, "image": path.name, **reference,
                                 "bpp": 8 * len(data) / (height * width), **values})
    return rows


def seed_mean(per_seed: list[dict]) -> dict:
    """One image's metrics over its sampling seeds: means, and every seed's Inception patches."""
    out = {k: sum(v[k] for v in per_seed) / len(per_seed) for k in per_seed[0] if k != "_inception"}
    if "_inception" in per_seed[0]:
        out["_inception"] = np.concatenate([v["_inception"] for v in per_seed])
    return out


def classical_rows(cfg: EvaluateConfig, images: list[Path], metrics: list[str], codecs: list[str]) -> list[dict]:
    jobs = [(codec, setting, str(path), metrics) for codec in codecs for setting in CODECS[codec].ladder
            for path in images]
    if not jobs:
        return []
    with ProcessPoolExecutor(max_workers=max(1, cfg.workers), initializer=_init_worker,
                             initargs=(cfg.task_backbones, cfg.clip_model, _WORKER["fid"])) as pool:
        futures = [pool.submit(_classical_row, *job) for job in jobs]
        return [f.result() for f in tqdm(as_completed(futures), total=len(futures), desc="classical", unit="file")]


_WORKER: dict[str, list] = {}


def _init_worker(task_backbones: list[str], clip_model: str, fid: bool) -> None:
    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"
    _WORKER.update(features=features.build(task_backbones, clip_model)[0], fid=fid)


def _classical_row(codec: str, setting: float, path: str, metrics: list[str]) -> dict:
    image = load_rgb(Path(path))
    data, decoded = code(image, codec, setting)
    return {"method": codec, "setting": setting, "image": Path(path).name,
            "bpp": 8 * len(data) / (image.shape[0] * image.shape[1]),
            **measure_all(metrics, to_tensor(decoded).unsqueeze(0), to_tensor(image).unsqueeze(0))}


def write_outputs(out_dir: Path, rows: list[dict], unavailable: dict[str, str],
                  originals: dict[str, np.ndarray]) -> dict[str, dict]:
    out_dir.mkdir(parents=True, exist_ok=True)
    metrics = list(dict.fromkeys(k for row in rows for k in row
                                 if k not in ("method", "setting", "image", "bpp") and not k.startswith("_")))
    with open(out_dir / "per_image.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["method", "setting", "image", "bpp", *metrics], extrasaction="ignore")
        writer.writeheader()
        writer.writerows(sorted(rows, key=lambda r: (r["method"], r["setting"], r["image"])))
    curves = {}
    by_method: dict[str, dict[float, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for row in rows:
        by_method[row["method"]][row["setting"]].append(row)
    for method, settings in by_method.items():
        present = [m for m in metrics if all(m in row for group in settings.values() for row in group)]
        points = sorted((_point(group, present, originals) for group in settings.values()), key=lambda p: p["bpp"])
        keys = ["bpp", *present, *(["fid", "kid"] if originals else [])]
        results = {RESULT_KEYS.get(k, k): [p[k] for p in points] for k in keys}
        curves[method] = {"name": method, "description": f"{len(next(iter(settings.values())))} images, bpp from "
                          "file bytes", "results": results, "unavailable": unavailable}
        (out_dir / f"{method}.json").write_text(json.dumps(curves[method], indent=2) + "\n")
    if curves:
        plot_rd(list(curves.values()), out_dir / "rd.png")
    return curves


def _point(group: list[dict], metrics: list[str], originals: dict[str, np.ndarray]) -> dict[str, float]:
    """One RD point: per-image means, and FID/KID over the patches of all its images."""
    point = {k: sum(r[k] for r in group) / len(group) for k in ["bpp", *metrics]}
    if originals:
        real = np.concatenate([r["_inception_ref"] if "_inception_ref" in r else originals[r["image"]] for r in group])
        point.update(distribution.fid_kid(real, np.concatenate([r["_inception"] for r in group])))
    return point
