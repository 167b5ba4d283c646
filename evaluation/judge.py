"""``train.py evaluate-judge``: how often a judge agrees with people on 2AFC pairs (BAPPS layout:
ref/, p0/, p1/ images and judge/*.npy, the fraction of people who preferred p1)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from datamodules.images import list_images, load_rgb, to_tensor
from pl_modules.features import ClipFidelity
from pl_modules.metrics import METRICS, Unavailable, availability


@dataclass
class JudgeConfig:
    dataset: str = "???"
    """A 2AFC folder in BAPPS layout: ref/, p0/, p1/, judge/ (same file stems)."""
    judges: list[str] = field(default_factory=lambda: ["psnr", "ms-ssim", "gmsd", "vif", "haarpsi", "lpips", "dists"])
    """Judges: full-reference metric names, or 'clip:<hub id or folder>' (the side whose CLIP embedding
    is closer to the reference's wins); one unavailable here is skipped with the reason."""
    bootstrap: int = 1000
    """Bootstrap resamples of the pairs for the 95 % confidence interval."""
    seed: int = 0
    """Seed of the bootstrap resampling."""


def load_pairs(folder: str | Path) -> list[dict]:
    folder = Path(folder)
    pairs = []
    for ref in list_images(folder / "ref"):
        stem = ref.stem
        p0, p1 = (next((folder / side).glob(f"{stem}.*"), None) for side in ("p0", "p1"))
        judge = folder / "judge" / f"{stem}.npy"
        if p0 is None or p1 is None or not judge.is_file():
            raise FileNotFoundError(f"{folder}: pair {stem} lacks p0/, p1/ or judge/{stem}.npy")
        pairs.append({"ref": ref, "p0": p0, "p1": p1, "human": float(np.load(judge).reshape(-1)[0])})
    if not pairs:
        raise FileNotFoundError(f"no pairs in {folder}/ref")
    return pairs


def metric_judge(name: str) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], float]:
    metric = METRICS[name]

    def judge(ref: torch.Tensor, p0: torch.Tensor, p1: torch.Tensor) -> float:
        s0, s1 = metric.compute(p0, ref), metric.compute(p1, ref)
        return 0.5 if s0 == s1 else float((s1 < s0) if metric.lower_is_better else (s1 > s0))
    return judge


def clip_judge(name_or_path: str) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], float]:
    clip = ClipFidelity(name_or_path)

    def judge(ref: torch.Tensor, p0: torch.Tensor, p1: torch.Tensor) -> float:
        ref_e, e0, e1 = clip.embed(ref), clip.embed(p0), clip.embed(p1)
        s0, s1 = (ref_e * e0).sum().item(), (ref_e * e1).sum().item()
        return 0.5 if s0 == s1 else float(s1 > s0)
    return judge


def build_judges(names: list[str]) -> tuple[dict[str, Callable], dict[str, str]]:
    """name → judge(ref, p0, p1) giving 1 when it prefers p1, 0 for p0, 0.5 for a tie; and the
    reasons of the judges that cannot run here."""
    judges, unavailable = {}, {}
    metric_names = [n for n in names if not n.startswith("clip:")]
    for name, why in availability(metric_names).items():
        if why:
            unavailable[name] = why
        else:
            judges[name] = metric_judge(name)
    for name in (n for n in names if n.startswith("clip:")):
        try:
            judges[name] = clip_judge(name.split(":", 1)[1])
        except Unavailable as err:
            unavailable[name] = str(err)
    return judges, unavailable


def agreement(judge_prefs: np.ndarray, human: np.ndarray) -> float:
    """BAPPS 2AFC score: credit p·h + (1−p)·(1−h) per pair (h: people preferring p1)."""
    return float(np.mean(judge_prefs * human + (1 - judge_prefs) * (1 - human)))


def bootstrap_interval(judge_prefs: np.ndarray, human: np.ndarray, resamples: int, seed: int) -> tuple[float, float]:
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(human), size=(resamples, len(human)))
    scores = np.mean(judge_prefs[picks] * human[picks] + (1 - judge_prefs[picks]) * (1 - human[picks]), axis=1)
    return float(np.percentile(scores, 2.5)), float(np.percentile(scores, 97.5))


def run(cfg: JudgeConfig) -> dict[str, dict]:
    pairs = load_pairs(cfg.dataset)
    human = np.array([p["human"] for p in pairs])
    judges, unavailable = build_judges(cfg.judges)
    results = {}
    for judge, why in unavailable.items():
        results[judge] = {"unavailable": why}
        print(f"{judge:<10} unavailable: {why}")
    for judge, prefers_p1 in judges.items():
        prefs = np.array([prefers_p1(*(to_tensor(load_rgb(p[k])).unsqueeze(0) for k in ("ref", "p0", "p1")))
                          for p in pairs])
        score = agreement(prefs, human)
        low, high = bootstrap_interval(prefs, human, cfg.bootstrap, cfg.seed)
        results[judge] = {"agreement": score, "ci95": [low, high], "pairs": len(pairs)}
        print(f"{judge:<10} 2AFC agreement {score:.4f}  95% CI [{low:.4f}, {high:.4f}]  ({len(pairs)} pairs)")
    return results
