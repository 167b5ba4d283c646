"""Shared fixtures: real photographs (../shared/data, else scikit-image's) and tiny configs."""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
SHARED = ROOT.parent / "shared" / "data"

from datamodules.images import write_skimage_photos  # noqa: E402
from datamodules.shards import write_pair_shards, write_shards  # noqa: E402
from foundation.config import load_config  # noqa: E402
from pl_modules.prior.tiny_models import save_tiny_clip, save_tiny_diffusion  # noqa: E402
from stages.stage1 import Stage1Config  # noqa: E402


@pytest.fixture(scope="session")
def photo_dir(tmp_path_factory) -> Path:
    """A dozen training photographs: BSDS500 train where ../shared exists, else scikit-image's."""
    out = tmp_path_factory.mktemp("photos")
    source = SHARED / "bsds500" / "train"
    if source.is_dir():
        for path in sorted(source.glob("*.jpg"))[:12]:
            shutil.copy(path, out / path.name)
    else:
        write_skimage_photos(out)
    return out


@pytest.fixture(scope="session")
def eval_dir(tmp_path_factory) -> Path:
    """Two evaluation photographs: Kodak where ../shared exists, else two scikit-image photos."""
    out = tmp_path_factory.mktemp("eval")
    kodak = SHARED / "kodak"
    if kodak.is_dir():
        for name in ("kodim04.png", "kodim23.png"):
            shutil.copy(kodak / name, out / name)
    else:
        for path in write_skimage_photos(tmp_path_factory.mktemp("sk"))[:2]:
            shutil.copy(path, out / path.name)
    return out


@pytest.fixture(scope="session")
def shard_dir(tmp_path_factory, photo_dir) -> Path:
    out = tmp_path_factory.mktemp("shards")
    write_shards(photo_dir, out, samples_per_shard=4, progress=False)
    return out


def tiny_overrides(shard_dir: Path, eval_dir: Path) -> list[str]:
    """The real stage-1 schema, shrunk: a small hyperprior on 64-px crops, two validation images."""
    return [f"data.train_shards={shard_dir}", f"data.val_dir={eval_dir}", "codec.N=32", "codec.M=48",
            "data.crop=64", "data.batch_size=4", "data.num_workers=0", "optim.lr=1e-3", "trainer.max_steps=40",
            "trainer.val_every=40", "trainer.checkpoint_every=10", "trainer.log_every=5",
            "trainer.progress_bar=false", "trainer.accelerator=cpu", "trainer.devices=1"]


def tiny_stage1(out_root: Path, shard_dir: Path, eval_dir: Path, *overrides: str) -> Stage1Config:
    return load_config(Stage1Config, overrides=[f"output_root={out_root}", *tiny_overrides(shard_dir, eval_dir),
                                                *overrides])


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, shard_dir, eval_dir):
    """One tiny stage-1 run shared by the tests that need a trained codec: (config, final/)."""
    from stages import stage1

    cfg = tiny_stage1(tmp_path_factory.mktemp("runs"), shard_dir, eval_dir, "run=shared")
    return cfg, stage1.run(cfg)


@pytest.fixture(scope="session")
def models(tmp_path_factory):
    """A tiny SD-structured prior and a tiny CLIP, saved and loaded back through from_pretrained."""
    root = tmp_path_factory.mktemp("models")
    return save_tiny_diffusion(root / "sd"), save_tiny_clip(root / "clip")


@pytest.fixture(scope="session")
def pair_shards(tmp_path_factory, photo_dir):
    """(degraded, clean) shards of four photos, denoise and dehaze."""
    folder = tmp_path_factory.mktemp("clean")
    for path in sorted(photo_dir.iterdir())[:4]:
        (folder / path.name).write_bytes(path.read_bytes())
    out = tmp_path_factory.mktemp("pairs")
    write_pair_shards(folder, out, ["denoise", "dehaze"], samples_per_shard=4, progress=False)
    return out


def stage2_overrides(models, pair_shards, eval_dir) -> list[str]:
    """The real LL-ICM schema, shrunk: tiny prior and CLIP, 64-px pairs, six steps."""
    sd, clip = models
    return [f"prior.model={sd}", "prior.local_files_only=true", "prior.gradient_checkpointing=false",
            "prior.vae_tile=0", "prior.sample_steps=2", f"clip_model={clip}", "codec.N=32", "codec.M=48",
            f"data.train_shards={pair_shards}", f"data.val_dir={eval_dir}", "data.val_tasks=[denoise,dehaze]",
            "data.crop=64", "data.val_crop=64", "data.batch_size=2", "data.num_workers=0", "data.val_max_images=1",
            "optim.lr=1e-3", "trainer.max_steps=6", "trainer.val_every=6", "trainer.checkpoint_every=3",
            "trainer.log_every=2", "trainer.progress_bar=false", "trainer.accelerator=cpu", "trainer.devices=1"]
