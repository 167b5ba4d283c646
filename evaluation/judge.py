"""``train.py evaluate-judge``: how often a judge agrees with people on 2AFC pairs (BAPPS layout:
ref/, p0/, p1/ images and judge/*.npy, the fraction of people who preferred p1)."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from datamodules.images import list_images, load_rgb, to_tensor
from pl_modules.scoring.judges import Judge, build_judge
from pl_modules.scoring.metrics import Unavailable


@dataclass
class JudgeConfig:
    dataset: str = ""
    """A 2AFC folder in BAPPS layout: ref/, p0/, p1/, judge/ (same file stems), people's judgments."""
    synthetic_from: str = ""
    """Instead of dataset: build a synthetic 2AFC set with known answers from this image folder (each
    image distorted twice by one kind, at a mild and a strong level; the mild one is the answer) into
    out_dir. It checks judges, not their agreement with people: results say so."""
    out_dir: str = "checkpoints/judge-agreement"
    """Where the synthetic set and judge_agreement.json go."""
    judges: list[str] = field(default_factory=lambda: ["psnr", "ms-ssim", "gmsd", "vif", "haarpsi", "lpips", "dists"])
    """Judges by name (pl_modules/scoring/judges.py): full-reference metrics, or 'clip:<hub id or folder>' (the
    side whose CLIP embedding is closer to the reference's wins); one unavailable here is skipped with
    the reason."""
    bootstrap: int = 1000
    """Bootstrap resamples of the pairs for the 95 % confidence interval."""
    seed: int = 0
    """Seed of the bootstrap resampling and of the synthetic set."""

    def __post_init__(self) -> None:
        if bool(self.dataset) == bool(self.synthetic_from):
            raise ValueError("give exactly one of dataset (a BAPPS folder) and synthetic_from (an image folder)")


# (kind, mild, strong): one distortion at two strengths, so the answer is known.
SYNTHETIC_LEVELS = (("noise", 5.0, 15.0), ("blur", 1.0, 2.5), ("jpeg", 50, 12))


def distort(image: np.ndarray, kind: str, level: float, rng: np.random.Generator) -> np.ndarray:
    if kind == "noise":
        return np.clip(image + rng.normal(0, level, image.shape), 0, 255).astype(np.uint8)
    if kind == "blur":
        from scipy.ndimage import gaussian_filter

        return gaussian_filter(image.astype(np.float64), sigma=(level, level, 0)).round().clip(0, 255).astype(np.uint8)
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=int(level))
    return load_rgb(buffer.getvalue())


def synthetic_2afc(src: str | Path, out: str | Path, seed: int = 0, crop: int = 256) -> Path:
    """A BAPPS-layout set from ``src``: per image and distortion kind, a mild and a strong version
    on random sides; judge/ holds 1.0 where p1 is the mild one (the known answer), else 0.0."""
    from PIL import Image

    from datamodules.images import centre_crop

    out, rng = Path(out), np.random.default_rng(seed)
    for side in ("ref", "p0", "p1", "judge"):
        (out / side).mkdir(parents=True, exist_ok=True)
    for index, path in enumerate(list_images(src)):
        ref = centre_crop(load_rgb(path), crop)
        for kind, mild, strong in SYNTHETIC_LEVELS:
            stem, mild_on_p1 = f"{index:04d}-{kind}", bool(rng.integers(2))
            versions = [distort(ref, kind, level, rng) for level in (mild, strong)]
            p0, p1 = versions[::-1] if mild_on_p1 else versions
            for side, image in (("ref", ref), ("p0", p0), ("p1", p1)):
                Image.fromarray(image).save(out / side / f"{stem}.png")
            np.save(out / "judge" / f"{stem}.npy", np.array([float(mild_on_p1)]))
    return out


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
    dataset = synthetic_2afc(cfg.synthetic_from, Path(cfg.out_dir) / "synthetic-2afc", cfg.seed) \
        if cfg.synthetic_from else cfg.dataset
    source = "synthetic (known answers, not human judgments)" if cfg.synthetic_from else "human 2AFC judgments"
    print(f"2AFC set {dataset}: {source}")
    pairs = load_pairs(dataset)
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
        no_vote = int(np.isnan(prefs).sum())
        prefs = np.nan_to_num(prefs, nan=0.5)  # a judge that cannot decide is a coin: half credit
        score = float(agreement(prefs, human))
        low, high = bootstrap_interval(prefs, human, cfg.bootstrap, cfg.seed)
        results[name] = {"agreement": score, "ci95": [low, high], "pairs": len(pairs), "no_vote": no_vote,
                         "labels": source}
        print(f"{name:<10} 2AFC agreement {score:.4f}  95% CI [{low:.4f}, {high:.4f}]  ({len(pairs)} pairs)")
    Path(cfg.out_dir).mkdir(parents=True, exist_ok=True)
    (Path(cfg.out_dir) / "judge_agreement.json").write_text(json.dumps(results, indent=2) + "\n")
    return results
