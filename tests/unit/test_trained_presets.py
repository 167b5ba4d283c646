"""small-sd, the preset trained on first use: its two phases train, it loads through from_pretrained
like any diffusers folder, and its cache key follows its data and recipe. (Built here with a few
steps on small crops; the preset itself is never trained by the tests.)"""
import json
import shutil
from dataclasses import replace

import pytest
import torch

from datamodules.images import list_images
from pl_modules.prior import trained_presets
from pl_modules.prior.diffusion_prior import DiffusionPrior, DiffusionPriorConfig
from pl_modules.prior.presets import PRESETS, preset_folder

pytestmark = pytest.mark.unit

RECIPE = replace(trained_presets.RECIPE, vae_steps=80, unet_steps=10, vae_crop=32, unet_crop=32, batch_size=4)


def test_both_phases_train_and_the_folder_loads_as_a_latent_prior(photo_dir, eval_dir, tmp_path):
    torch.manual_seed(0)
    untrained = trained_presets.reconstruction_psnr(trained_presets.small_vae(), list_images(eval_dir))
    folder = trained_presets.build_small_sd(tmp_path / "small-sd", RECIPE, images=photo_dir, kodak=eval_dir)
    report = json.loads((folder / "preset.json").read_text())
    assert report["n_images"] == len(list_images(photo_dir)) and report["recipe"]["vae_steps"] == RECIPE.vae_steps
    assert report["vae_kodak_psnr"] > untrained + 1, (untrained, report)  # 13.7 against 12.2 dB here
    assert report["unet_final_eps_mse"] < 1.0  # below predicting zero noise, which scores 1 on unit noise

    prior = DiffusionPrior(DiffusionPriorConfig(model=str(folder), local_files_only=True, text_encoder=True,
                                                control="controlnet", lora_rank=4, lora_alpha=4,
                                                gradient_checkpointing=False, vae_tile=0))
    x = torch.rand(2, 3, 64, 64)
    z = prior.encode(x)
    assert prior.vae_scale == 4 and z.shape == (2, 4, 16, 16)
    assert prior.latent_scale == pytest.approx(report["scaling_factor"]) and report["scaling_factor"] != 1.0
    assert prior.decode(prior.sample(z, prior.encode_text(["", ""]), torch.Generator().manual_seed(0), 2)).shape == x.shape


def test_the_cache_key_follows_the_training_images_and_the_recipe(photo_dir, tmp_path, monkeypatch):
    images = tmp_path / "images"
    shutil.copytree(photo_dir, images)
    key = trained_presets.small_sd_key(RECIPE, images)
    assert trained_presets.small_sd_key(RECIPE, images) == key
    assert trained_presets.small_sd_key(replace(RECIPE, unet_steps=21), images) != key
    first = list_images(images)[0]
    shutil.copy(first, images / f"extra{first.suffix}")
    assert trained_presets.small_sd_key(RECIPE, images) != key

    # The registry names the folder by that key and builds it once.
    built = []
    monkeypatch.setenv("DIFFCODEC_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(PRESETS, "small-sd", replace(PRESETS["small-sd"], build=lambda f: built.append(f),
                                                     cache_key=lambda: key))
    folder = preset_folder("small-sd")
    assert folder.name.endswith(f"-{key}") and folder.is_dir() and len(built) == 1
    assert preset_folder("small-sd") == folder and len(built) == 1


def test_an_interrupted_build_leaves_no_folder_behind(tmp_path, monkeypatch):
    def interrupted(folder):
        (folder / "vae").mkdir()
        raise KeyboardInterrupt

    monkeypatch.setenv("DIFFCODEC_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(PRESETS, "small-sd", replace(PRESETS["small-sd"], build=interrupted, cache_key=lambda: "k"))
    with pytest.raises(KeyboardInterrupt):
        preset_folder("small-sd")
    assert list((tmp_path / "cache" / "presets").iterdir()) == []
