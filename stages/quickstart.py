"""``train.py quickstart``: from a bare install to a trained codec and a table of real-bitstream results."""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from datamodules.images import write_skimage_photos
from datamodules.shards import INDEX, write_shards
from evaluation.learned import evaluate_folder, mean_row
from pl_modules.finals import load_final
from stages import stage1
from stages.stage1 import Stage1Config

PRESET = Path(__file__).resolve().parent.parent / "configs" / "quickstart.yaml"


@dataclass
class QuickstartConfig:
    workdir: str = "checkpoints/quickstart"
    """Where photos, shards and the run go."""
    train_dir: str = ""
    """Training photos; empty: scikit-image's bundled colour photographs less the held-out ones."""
    held_out: list[str] = field(default_factory=lambda: ["astronaut.png", "coffee.png"])
    """scikit-image photos kept out of training, for validation and the results table."""
    kodak_dir: str = "../shared/data/kodak"
    """Also evaluate on this folder (Kodak) when it exists; skipped with a note otherwise."""
    stage1: Stage1Config = field(default_factory=Stage1Config)


def run(cfg: QuickstartConfig) -> dict:
    workdir = Path(cfg.workdir)
    held_out_dir = prepare_photos(cfg, workdir / "photos")
    shards = Path(cfg.stage1.data.train_shards)
    if not (shards / INDEX).is_file():
        print(write_shards(cfg.train_dir or workdir / "photos" / "train", shards).report())
    final = stage1.run(cfg.stage1)
    loaded = load_final(final)
    codec, sha = loaded.codec, loaded.decoder_id
    sets = {"held-out photos": held_out_dir}
    if Path(cfg.kodak_dir).is_dir():
        sets["Kodak"] = Path(cfg.kodak_dir)
    else:
        print(f"note: {cfg.kodak_dir} not found; Kodak is left out of the table")
    results = {name: evaluate_folder(codec, sha, folder) for name, folder in sets.items()}
    (workdir / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    print(table(results))
    print(f"\ncodec: {final}\ntry:   python train.py compress IMAGE -m {final} -o out.bin")
    return results


def prepare_photos(cfg: QuickstartConfig, photos: Path) -> Path:
    """Split scikit-image's photographs into train/ and held_out/ once; returns held_out/."""
    held_out = photos / "held_out"
    if not held_out.is_dir():
        staging = photos / "all"
        paths = write_skimage_photos(staging)
        for path in paths:
            target = held_out if path.name in cfg.held_out else photos / "train"
            target.mkdir(parents=True, exist_ok=True)
            shutil.move(str(path), target / path.name)
        staging.rmdir()
    return held_out


def table(results: dict[str, list[dict]]) -> str:
    lines = [f"{'images':<18}{'n':>4}{'bpp':>8}{'PSNR':>9}{'MS-SSIM':>9}{'JPEG PSNR at that bpp':>24}"]
    for name, rows in results.items():
        m = mean_row(rows)
        lines.append(f"{name:<18}{len(rows):>4}{m['bpp']:>8.3f}{m['psnr']:>9.2f}{m['ms_ssim']:>9.4f}"
                     f"{m['jpeg_psnr_at_bpp']:>24.2f}")
    return "\n".join(lines)
