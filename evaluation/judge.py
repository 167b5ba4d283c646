"""``train.py evaluate-judge``: how often a judge agrees with people on 2AFC pairs (BAPPS layout:
ref/, p0/, p1/ images and judge/*.npy, the fraction of people who preferred p1)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from datamodules.images import list_images, load_rgb, to_tensor
from pl_modules.judges import Judge, build_judge
from pl_modules.metrics import Unavailable


@dataclass
class JudgeConfig:
    dataset: str = "???"
    """A 2AFC folder in BAPPS layout: ref/, p0/, p1/, judge/ (same file stems)."""
    judges: list[str] = field(default_factory=lambda: ["psnr", "ms-ssim", "gmsd", "vif", "haarpsi", "lpips", "dists"])
    """Judges by name (pl_modules/judges.py): full-reference metrics, or 'clip:<hub id or folder>' (the
    side whose CLIP embedding is closer to the reference's wins); one unavailable here is skipped with
    the reason."""
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


def build_judges(specs: list[str]) -> tuple[dict[str, Judge], dict[str, str]]:
    """The judges that can run here, and the reasons of those that cannot."""
    judges, unavailable = {}, {}
    for spec in specs:
        try:
            judges[spec] = build_judge(spec)
        except Unavailable as err:
            unavailable[spec] = str(err)
    return judges, unavailable


def agreement(judge_prefs: np.ndarray, human: np.ndarray) -> np.ndarray:
    """BAPPS 2AFC score over the last axis: credit p·h + (1−p)·(1−h) per pair, where p is the
    judge's and h the people's preference for p1."""
    return np.mean(judge_prefs * human + (1 - judge_prefs) * (1 - human), axis=-1)


def bootstrap_interval(judge_prefs: np.ndarray, human: np.ndarray, resamples: int, seed: int) -> tuple[float, float]:
    """95 % interval of the agreement over pairs resampled with replacement."""
    picks = np.random.default_rng(seed).integers(0, len(human), size=(resamples, len(human)))
    scores = agreement(judge_prefs[picks], human[picks])
    return float(np.percentile(scores, 2.5)), float(np.percentile(scores, 97.5))


def run(cfg: JudgeConfig) -> dict[str, dict]:
    pairs = load_pairs(cfg.dataset)
    human = np.array([p["human"] for p in pairs])
    judges, unavailable = build_judges(cfg.judges)
    results = {}
    for judge, why in unavailable.items():
        results[judge] = {"unavailable": why}
        print(f"{judge:<10} unavailable: {why}")
    for name, judge in judges.items():
        # P(p1 closer), the side the BAPPS judgments count.
        prefs = np.array([judge.prefer(*(to_tensor(load_rgb(p[k])).unsqueeze(0) for k in ("ref", "p1", "p0"))).item()
                          for p in pairs])
        score = float(agreement(prefs, human))
        low, high = bootstrap_interval(prefs, human, cfg.bootstrap, cfg.seed)
        results[name] = {"agreement": score, "ci95": [low, high], "pairs": len(pairs)}
        print(f"{name:<10} 2AFC agreement {score:.4f}  95% CI [{low:.4f}, {high:.4f}]  ({len(pairs)} pairs)")
    return results
