"""``train.py quickstart``: from a bare install through all three stages on scikit-image's bundled
photographs (a codec, an LL-ICM restorer on it, VLIC post-training of that restorer) to a report of
real-bitstream results and the post-trained decoder's win rate. A second run skips finished stages."""
from __future__ import annotations

import dataclasses
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from datamodules.images import write_skimage_grey_photos, write_skimage_photos
from datamodules.shards import INDEX, write_pair_shards, write_shards
from evaluation import evaluate
from evaluation.learned import evaluate_folder, mean_row
from foundation.config import ConfigError
from pl_modules.finals import load_final
from stages.pipeline import PipelineStage, PlannedStage, StaleStageError, run_or_skip
from stages.stage1 import Stage1Config
from stages.stage2_llicm import Stage2LLICMConfig
from stages.stage3_vlic import Stage3VLICConfig

PRESET = Path(__file__).resolve().parent.parent / "configs" / "quickstart.yaml"
WIN_RATE_KEYS = ("win_rate", "win_rate_ci_low", "win_rate_ci_high", "n_pairs")


@dataclass
class QuickstartConfig:
    workdir: str = "checkpoints/quickstart"
    """Where photos, shards, the run and the report go."""
    train_dir: str = ""
    """Training photos of every stage; empty: scikit-image's bundled photographs less the held-out ones
    (stage 1 on the colour and the grey ones, stages 2 and 3 on the colour ones)."""
    held_out: list[str] = field(default_factory=lambda: ["astronaut.png", "coffee.png"])
    """scikit-image photos kept out of training, for validation and the results table."""
    kodak_dir: str = "../shared/data/kodak"
    """Also evaluate on this folder (Kodak) when it exists; skipped with a note otherwise."""
    anchors: list[str] = field(default_factory=lambda: ["jpeg"])
    """Classical codecs whose RD curves the report draws beside the learned codec's."""
    win_seeds: int = 2
    """Sampling seeds per held-out image for the stage-3 win rate."""
    restore_crop: int = 128
    """Centre crop of the held-out images the restorers and the win rate work on."""
    stage1: Stage1Config = field(default_factory=Stage1Config)
    stage2: Stage2LLICMConfig = field(default_factory=Stage2LLICMConfig)
    """LL-ICM on the stage-1 codec; its data.val_tasks are the tasks its training pairs are made of."""
    stage3: Stage3VLICConfig = field(default_factory=Stage3VLICConfig)


def run(cfg: QuickstartConfig) -> dict:
    workdir = Path(cfg.workdir)
    held_out_dir = prepare_photos(cfg, workdir / "photos")
    if cfg.train_dir:
        prepare_shards(cfg, Path(cfg.train_dir), Path(cfg.train_dir))
    else:
        prepare_shards(cfg, workdir / "photos" / "train", workdir / "photos" / "train" / "colour")
    finals = train(cfg)
    sets = {"held-out photos": held_out_dir}
    if Path(cfg.kodak_dir).is_dir():
        sets["Kodak"] = Path(cfg.kodak_dir)
    else:
        print(f"note: {cfg.kodak_dir} not found; Kodak is left out of the table")
    codec = load_final(finals[0])
    results = {"stage1": {name: evaluate_folder(codec.codec, codec.decoder_id, folder) for name, folder in sets.items()}}
    print(table(results["stage1"]))
    results.update(report(cfg, finals, sets.get("Kodak", held_out_dir), workdir / "report"))
    (workdir / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    print(f"\nreport: {workdir / 'report'} (RD JSONs, per_image.csv, rd.png, win_rates.json)")
    print(f"codec: {finals[0]}\ntry:   python train.py compress IMAGE -m {finals[0]} -o out.bin")
    return results


def train(cfg: QuickstartConfig) -> list[Path]:
    """The three stages, each from the final/ of the one before, skipped when finished."""
    finals: list[Path] = []
    stages = (("stage1", cfg.stage1), ("stage2-llicm", cfg.stage2), ("stage3-vlic", cfg.stage3))
    for index, (kind, stage_cfg) in enumerate(stages):
        if finals:
            stage_cfg = dataclasses.replace(stage_cfg, init_from=str(finals[-1]))
        planned = PlannedStage(PipelineStage(name=stage_cfg.name, kind=kind), stage_cfg, finals[-1] if finals else None)
        try:
            finals.append(run_or_skip(planned, f"[{index + 1}/{len(stages)}] {kind}")[0])
        except StaleStageError:
            # The quickstart has no --force: an earlier quickstart's stage (another recipe) is in the way.
            raise ConfigError(f"{stage_cfg.stage_dir} holds a quickstart stage trained with another config; "
                              f"remove that folder or pass workdir=<a new folder>") from None
    return finals


def report(cfg: QuickstartConfig, finals: list[Path], images: Path, out_dir: Path) -> dict:
    """RD JSONs, CSV and plots of the codec and the anchors, and the post-trained decoder's win rate
    over the stage-2 decoder by the training judge (and a second one). PSNR alone and no restorer
    curves: the table has MS-SSIM, and the whole report must take about a minute on a CPU."""
    judge, also = cfg.stage3.judging.judge, cfg.stage3.judging.also_judges
    agreeing = f" (pairs kept where {', '.join(also)} agreed)" if also else ""
    print(f"\nstage 3 was judged by '{judge}'{agreeing}, offline full-reference metrics standing in for a VLM "
          f"judge (configs/pipelines/ name real ones)")
    evaluation = evaluate.run(evaluate.EvaluateConfig(
        images=str(images), models=[str(finals[0])], models_name="stage1", classical=list(cfg.anchors),
        metrics=["psnr"], fid_kid=False, tasks=list(cfg.stage2.data.val_tasks), post_trained=[f"vlic={finals[2]}"],
        win_judges=[judge, cfg.stage3.second_judge], win_seeds=cfg.win_seeds, restore_crop=cfg.restore_crop,
        out_dir=str(out_dir)))
    judged = evaluation["win_rates"]["vlic"]["judges"]
    return {**{key: judged[judge][key] for key in WIN_RATE_KEYS}, "win_judge": judge, "win_rates": judged,
            "win_rate_images": str(images)}


def prepare_photos(cfg: QuickstartConfig, photos: Path) -> Path:
    """Split scikit-image's photographs into train/colour/, train/grey/ and held_out/ once; returns
    held_out/. The grey ones train the codec only: with them among stage 2's pairs, the restorer's
    two samples of a bitstream lay 53 dB apart instead of 33, too alike for stage 3 to learn from."""
    held_out = photos / "held_out"
    if not held_out.is_dir():
        staging = photos / "all"
        written = {"colour": write_skimage_photos(staging / "colour"),
                   "grey": write_skimage_grey_photos(staging / "grey")}
        for kind, paths in written.items():
            for path in paths:
                target = held_out if path.name in cfg.held_out else photos / "train" / kind
                target.mkdir(parents=True, exist_ok=True)
                shutil.move(str(path), target / path.name)
            (staging / kind).rmdir()
        staging.rmdir()
    return held_out


def prepare_shards(cfg: QuickstartConfig, codec_photos: Path, pair_photos: Path) -> None:
    """Stage 1's image shards and stage 2's (degraded, clean) pairs, written once."""
    clean, pairs = Path(cfg.stage1.data.train_shards), Path(cfg.stage2.data.train_shards)
    if not (clean / INDEX).is_file():
        print(write_shards(codec_photos, clean).report())
    if not (pairs / INDEX).is_file():
        print(write_pair_shards(pair_photos, pairs, list(cfg.stage2.data.val_tasks),
                                seed=cfg.stage2.trainer.seed).report())


def table(results: dict[str, list[dict]]) -> str:
    lines = [f"{'images':<18}{'n':>4}{'bpp':>8}{'PSNR':>9}{'MS-SSIM':>9}{'JPEG PSNR at that bpp':>24}"]
    for name, rows in results.items():
        m = mean_row(rows)
        lines.append(f"{name:<18}{len(rows):>4}{m['bpp']:>8.3f}{m['psnr']:>9.2f}{m['ms_ssim']:>9.4f}"
                     f"{m['jpeg_psnr_at_bpp']:>24.2f}")
    return "\n".join(lines)
