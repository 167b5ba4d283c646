"""Stage 2 (LL-ICM) on tiny random diffusion and CLIP models loaded through from_pretrained."""
import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import SHARED, stage2_overrides, tiny_overrides
from datamodules.shards import read_index
from datamodules.stream import CropStream
from evaluation.evaluate import EvaluateConfig, run
from foundation.config import ConfigError, load_config
from foundation.manifest import read_manifest
from pl_modules.llicm.module import LLICMModule
from pl_modules.llicm.module import CONTROLLER_FILE
from pl_modules.prior.diffusion_prior import CONV_IN_FILE, LORA_FILE, DiffusionPrior
from pl_modules.scoring.metrics import availability
from stages import pipeline, stage2_llicm
from stages.pipeline import PipelineConfig
from stages.stage2_llicm import Stage2LLICMConfig


@pytest.mark.unit
def test_stage2_needs_a_stage1_parent(models, pair_shards, eval_dir):
    with pytest.raises(ConfigError, match="init_from must name a stage-1 final"):
        stage2_llicm.run(load_config(Stage2LLICMConfig, overrides=stage2_overrides(models, pair_shards, eval_dir)))
    with pytest.raises(ConfigError, match=r"stages.0 \(llicm\): init_from must name a stage-1 final"):
        load_config(PipelineConfig, [{"stages": [{"name": "llicm", "kind": "stage2-llicm"}]}])


@pytest.mark.stage
def test_loss_on_a_fixed_batch_falls_and_frozen_weights_stay(models, pair_shards, eval_dir, trained_run):
    _, final = trained_run
    cfg = load_config(Stage2LLICMConfig, overrides=[*stage2_overrides(models, pair_shards, eval_dir),
                                                    f"init_from={final}"])
    module = LLICMModule(cfg, beta=0.01)
    batch = next(iter(CropStream(read_index(pair_shards), 64, 2, seed=0)))
    frozen = {k: v.clone() for k, v in module.state_dict().items() if module.is_frozen_weight(k)}
    assert any(k.startswith("clip.") for k in frozen) and any(k.startswith("prior.vae.") for k in frozen)
    groups, aux = module.parameter_groups()
    optimizer = torch.optim.Adam([*groups, {"params": aux}], lr=1e-3)
    losses = []
    for step in range(30):
        torch.manual_seed(step % 2)  # the same noise and timesteps every other step: a fixed objective
        terms, aux_loss = module.losses(batch)
        optimizer.zero_grad()
        (terms["loss"] + aux_loss).backward()
        optimizer.step()
        losses.append(terms["loss"].item())
    assert sum(losses[-4:]) < 0.7 * sum(losses[:4]), losses
    for key, value in module.state_dict().items():
        if key in frozen:
            assert torch.equal(value, frozen[key]), key


def module_and_batch(models, pair_shards, eval_dir, *overrides: str) -> tuple[LLICMModule, dict]:
    """A module with a random codec and a batch of two 64-px pairs whose degraded and clean differ."""
    torch.manual_seed(0)
    cfg = load_config(Stage2LLICMConfig, overrides=[*stage2_overrides(models, pair_shards, eval_dir), *overrides])
    batch = next(iter(CropStream(read_index(pair_shards), 64, 2, seed=0)))
    assert not torch.equal(batch["degraded"], batch["clean"])
    return LLICMModule(cfg, beta=0.01), batch


@pytest.mark.unit
def test_rate_match_moves_beta_toward_the_parents_rate(models, pair_shards, eval_dir):
    import copy
    import math

    with pytest.raises(ValueError, match="rate_match: needs train_codec=true"):
        module_and_batch(models, pair_shards, eval_dir, "rate_match=true", "train_codec=false")
    for gain in (2.0, 0.25):  # an analysis that inflates its latents spends more bits than its parent
        module, batch = module_and_batch(models, pair_shards, eval_dir, "rate_match=true", "rate_match_step=0.5")
        module.hold_rate_to(copy.deepcopy(module.codec))
        with torch.no_grad():
            module.codec.g_a[-1].weight.mul_(gain)
            module.codec.g_a[-1].bias.mul_(gain)
        terms, _ = module.losses(batch)
        assert terms["beta"] == pytest.approx(0.01)  # this step's β; the next one moves
        spent = math.log(terms["bpp"].item() / terms["bpp_parent"].item())
        assert (spent > 0) == (gain > 1)
        assert module.rate_weight == pytest.approx(0.01 * math.exp(0.5 * spent), rel=1e-5)


@pytest.mark.unit
def test_beta_is_derived_from_an_mse_parent_or_refused_in_one_line(models, pair_shards, eval_dir):
    from foundation.manifest import Manifest
    from stages.stage2_llicm import rate_weight

    cfg = load_config(Stage2LLICMConfig, overrides=[*stage2_overrides(models, pair_shards, eval_dir), "gamma=0.25"])
    parent = Manifest(stage="stage1", weights={}, params={"lmbda": 0.0067, "distortion": "mse"})
    assert rate_weight(cfg, parent) == pytest.approx(1 / (0.0067 * 255**2))  # through a VAE: α alone
    cfg.prior.vae, cfg.prior.residual = False, True  # the residual pixel prior: α + 4γ
    assert rate_weight(cfg, parent) == pytest.approx(2 / (0.0067 * 255**2))
    cfg.beta_scale = 3.0  # a calibration of the derived β against the measured bpp
    assert rate_weight(cfg, parent) == pytest.approx(6 / (0.0067 * 255**2))
    cfg.beta = 0.5
    with pytest.raises(ConfigError, match="beta_scale: scales the derived β only"):
        rate_weight(cfg, parent)
    cfg.beta_scale = 1.0
    assert rate_weight(cfg, parent) == 0.5
    cfg.beta = None
    with pytest.raises(ConfigError, match="derived only from an MSE-trained parent"):
        rate_weight(cfg, Manifest(stage="stage1", weights={}, params={"lmbda": 8.0, "distortion": "ms-ssim"}))
    cfg.alpha, cfg.prior.vae, cfg.prior.residual = 0.0, True, False
    with pytest.raises(ConfigError, match="beta cannot be derived"):
        rate_weight(cfg, parent)


@pytest.mark.unit
def test_the_task_term_alone_reaches_the_codecs_analysis_and_synthesis(models, pair_shards, eval_dir):
    module, batch = module_and_batch(models, pair_shards, eval_dir)
    groups, _ = module.parameter_groups()
    # The condition's input channels start at zero (training starts from the base model), so the
    # codec gets L_task's gradient only once the prior has learnt to read it: two steps first.
    optimizer = torch.optim.Adam(groups[0]["params"], lr=1e-2)
    for _ in range(2):
        optimizer.zero_grad()
        module.losses(batch)[0]["task"].backward()
        optimizer.step()
    module.codec.zero_grad(set_to_none=True)
    module.losses(batch)[0]["task"].backward()
    for name in ("g_a", "g_s"):
        grads = [p.grad for n, p in module.codec.named_parameters() if n.startswith(name)]
        assert all(g is not None for g in grads) and sum(g.abs().sum() for g in grads) > 0, name


@pytest.mark.unit
def test_a_frozen_codec_gets_no_gradient_anywhere(models, pair_shards, eval_dir):
    module, batch = module_and_batch(models, pair_shards, eval_dir, "train_codec=false")
    groups, aux = module.parameter_groups()
    assert aux == [] and not {id(p) for g in groups for p in g["params"]} & {id(p) for p in module.codec.parameters()}
    terms, aux_loss = module.losses(batch)
    (terms["loss"] + aux_loss).backward()
    assert [n for n, p in module.codec.named_parameters() if p.grad is not None] == []
    assert any(p.grad is not None for p in module.controller.parameters())


@pytest.mark.unit
def test_the_codec_gets_the_degraded_image_and_the_restorer_trains_on_the_decoded_file(models, pair_shards, eval_dir):
    from pl_modules.core.bitstream import decode_image, encode_image

    module, batch = module_and_batch(models, pair_shards, eval_dir)
    seen = {}
    module.codec.register_forward_pre_hook(lambda m, args: seen.setdefault("codec_input", args[0]))
    encode = module.prior.encode
    module.prior.encode = lambda image: seen.setdefault("condition", image) is not None and encode(image)
    module.train()
    terms, _ = module.losses(batch)
    assert torch.equal(seen["codec_input"], batch["degraded"])
    restorer_input = seen["condition"].detach()
    assert terms["distortion"].item() == pytest.approx(torch.mean((restorer_input - batch["degraded"]) ** 2).item())
    module.codec.eval().update(force=True)
    with torch.no_grad():
        decoded = torch.cat([decode_image(module.codec, encode_image(module.codec, x[None], "id"), "id")
                             for x in batch["degraded"]])
    # The same 8-bit image, but for float noise landing on the other side of a rounding step.
    assert (restorer_input - decoded).abs().max() <= 1 / 255 + 1e-6
    assert (restorer_input == decoded).float().mean() > 0.999


# train/loss every 2 steps of 12 LL-ICM steps after the shared tiny stage 1, recorded when the restorer
# began training on the decoded file's image (straight-through rounding, 8 bits) with β derived from λ.
GOLDEN_LLICM = [1.3811835, 1.4037081, 1.2907330, 1.0715075, 1.2708395, 1.2704496]


@pytest.mark.stage
@pytest.mark.skipif(not (SHARED / "bsds500").is_dir(), reason="the golden curve was recorded on ../shared's BSDS500")
def test_the_short_loss_curve_is_the_golden_one(models, pair_shards, eval_dir, trained_run, tmp_path):
    from stages.stage2_llicm import run as run_stage2
    from integration.test_stage1 import scalars

    cfg = load_config(Stage2LLICMConfig, overrides=[*stage2_overrides(models, pair_shards, eval_dir),
                                                    f"init_from={trained_run[1]}", f"output_root={tmp_path}",
                                                    "trainer.max_steps=12", "trainer.val_every=12"])
    run_stage2(cfg)
    assert scalars(cfg.stage_dir, "train/loss") == pytest.approx(GOLDEN_LLICM, rel=1e-4)


@pytest.fixture(scope="module")
def chained(models, pair_shards, eval_dir, shard_dir, tmp_path_factory):
    """stage 1 → LL-ICM (joint) and → the baseline (frozen codec), one pipeline."""
    tmp_path = tmp_path_factory.mktemp("chain")
    spec = tmp_path / "p.yaml"
    spec.write_text(yaml.safe_dump({"run": "chain", "output_root": str(tmp_path / "runs"), "stages": [
        {"name": "codec", "kind": "stage1",
         "overrides": [*tiny_overrides(shard_dir, eval_dir), "trainer.max_steps=10", "trainer.val_every=10",
                       "data.val_max_images=1"]},
        {"name": "restore", "kind": "stage2-llicm", "init_from": "codec",
         "overrides": stage2_overrides(models, pair_shards, eval_dir)},
        {"name": "baseline", "kind": "stage2-llicm", "init_from": "codec",
         "overrides": [*stage2_overrides(models, pair_shards, eval_dir), "train_codec=false"]}]}))
    return spec, tmp_path, pipeline.run(load_config(PipelineConfig, [spec]))


@pytest.mark.chain
def test_stage2_chains_from_stage1_in_a_pipeline_and_hands_over_adapters_alone(chained):
    spec, tmp_path, (codec_final, restore_final, baseline_final) = chained
    manifest = read_manifest(restore_final, expect_stage="stage2-llicm")
    assert manifest.parent_weights == read_manifest(codec_final).weights
    # β derived from the parent's λ; through the tiny prior's VAE only α's MSE counts: α/(λ·255²).
    assert manifest.params["beta"] == pytest.approx(1 / (read_manifest(codec_final).params["lmbda"] * 255**2))
    assert set(manifest.weights) == {"codec.safetensors", LORA_FILE, CONV_IN_FILE, CONTROLLER_FILE}
    for key in ("val/all/bpp", "val/all/psnr", "val/denoise/psnr", "val/dehaze/accuracy"):
        assert key in manifest.metrics, key
    assert 0 < manifest.metrics["val/all/bpp"] < 10
    # One validation image per task: each task's accuracy is 0 or 1, and "all" is their per-image mean.
    per_task = [manifest.metrics[f"val/{task}/accuracy"] for task in ("denoise", "dehaze")]
    assert set(per_task) <= {0.0, 1.0}
    assert manifest.metrics["val/all/accuracy"] == pytest.approx(sum(per_task) / 2)
    lpips_logged = any(key.endswith("/lpips") for key in manifest.metrics)
    assert lpips_logged == (availability(["lpips"])["lpips"] is None)  # only with VGG weights on the machine
    # The adapters load alone into a fresh prior, through peft's layout.
    cfg = load_config(Stage2LLICMConfig, [restore_final / "config.yaml"])
    fresh = DiffusionPrior(cfg.prior)
    fresh.load_trained(restore_final)
    lora = {k: v for k, v in fresh.unet.state_dict().items() if "lora_B" in k}
    assert lora and any(v.abs().sum() > 0 for v in lora.values())
    # A second call finds both stages finished.
    pipeline.run(load_config(PipelineConfig, [spec]))
    ckpt = torch.load(tmp_path / "runs" / "chain" / "restore" / "last.ckpt", weights_only=False)
    assert not any(k.startswith(("prior.vae.", "clip.")) for k in ckpt["state_dict"])
    # The baseline kept the stage-1 codec exactly; joint training changed it.
    codec = load_file(codec_final / "codec.safetensors")
    baseline, joint = load_file(baseline_final / "codec.safetensors"), load_file(restore_final / "codec.safetensors")
    assert all(torch.equal(codec[k], baseline[k]) for k in codec if "g_a" in k)
    assert not all(torch.equal(codec[k], joint[k]) for k in codec if "g_a" in k)


@pytest.mark.chain
def test_codec_commands_work_for_a_restorer_and_its_file_names_the_whole_decoder(chained, eval_dir, tmp_path,
                                                                                 monkeypatch):
    import numpy as np
    from PIL import Image

    from datamodules.images import list_images, load_rgb, to_tensor, to_uint8
    from pl_modules.core.bitstream import decode_image, unpack
    from pl_modules.finals import load_final
    from train import main

    spec, runs, (codec_final, restore_final, _) = chained
    image = list_images(eval_dir)[0]
    monkeypatch.chdir(runs)
    # On the CPU like the recomputation below (a GPU's rounding would differ; finals.place).
    assert main(["compress", str(image), "-m", str(restore_final), "-o", "r.bin", "--seed", "7", "--device", "cpu"]) == 0
    assert main(["compress", str(image), "-m", str(codec_final), "-o", "c.bin", "--device", "cpu"]) == 0
    restorer, codec_only = unpack((runs / "r.bin").read_bytes()), unpack((runs / "c.bin").read_bytes())
    assert restorer.sampler.seed == 7 and codec_only.sampler is None
    assert restorer.decoder_id != codec_only.decoder_id  # more than the codec decodes a restorer's file
    (runs / "checkpoints").symlink_to(runs / "runs", target_is_directory=True)  # where users keep runs
    for name in ("r", "c"):  # each file finds its own decoder under checkpoints/
        assert main(["decompress", f"{name}.bin", "-o", f"{name}.png", "--device", "cpu"]) == 0
    model = load_final(restore_final)
    decoded = decode_image(model.codec, restorer, model.decoder_id)
    expected = to_uint8(model.model.restore(decoded, seed=7, steps=restorer.sampler.steps)[0])
    assert np.array_equal(np.asarray(Image.open(runs / "r.png")), expected)
    assert main(["decompress", "r.bin", "-o", "again.png", "--device", "cpu"]) == 0  # deterministic given the seed
    assert np.array_equal(np.asarray(Image.open(runs / "again.png")), expected)
    x = to_tensor(load_rgb(image)).unsqueeze(0)
    assert np.asarray(Image.open(runs / "c.png")).shape == to_uint8(x).shape


@pytest.mark.chain
def test_evaluate_scores_restorers_per_task_against_the_clean_image(chained, eval_dir, tmp_path):
    from datamodules.degradations import degrade
    from datamodules.images import centre_crop, list_images, load_rgb, to_tensor
    from evaluation.paired import read_rows
    from pl_modules.core.bitstream import round_trip
    from pl_modules.core.rate_distortion import psnr
    from pl_modules.finals import load_final

    _, _, (_, restore_final, baseline_final) = chained
    curves = run(EvaluateConfig(images=str(eval_dir), classical=[], metrics=["psnr"], tasks=["denoise", "dehaze"],
                                restorers=[f"llicm={restore_final}", f"baseline={baseline_final}"], max_images=1,
                                restore_crop=64, restore_seeds=2, fid_kid=False, out_dir=str(tmp_path / "out"),
                                device="cpu"))
    assert set(curves) == {f"{name}-{task}{suffix}" for name in ("llicm", "baseline") for task in ("denoise", "dehaze")
                           for suffix in ("", "-decoded")}
    assert curves["llicm-denoise"]["results"]["bpp"] == curves["llicm-denoise-decoded"]["results"]["bpp"]
    for curve in curves.values():
        assert len(curve["results"]["bpp"]) == 1 and 0 < curve["results"]["bpp"][0] < 10
    # Recomputed by hand: the image degraded with its index as seed, coded, restored with both
    # sampling seeds, each scored against the clean crop and averaged.
    final = load_final(restore_final, need_codec=True)
    clean = centre_crop(load_rgb(list_images(eval_dir)[0]), 64)
    target = to_tensor(clean).unsqueeze(0)
    degraded = to_tensor(degrade(clean, "dehaze", 0)).unsqueeze(0)
    _, decoded = round_trip(final.model.codec, degraded, final.decoder_id)
    restored = [final.model.restore(decoded, seed)[0] for seed in (0, 1)]
    row = next(iter(read_rows(tmp_path / "out" / "per_image.csv")[("llicm-dehaze", str(final.setting))].values()))
    assert row["psnr"] == pytest.approx(sum(psnr(r, target) for r in restored) / 2, abs=1e-6)
    assert row["psnr"] != pytest.approx(sum(psnr(r, degraded) for r in restored) / 2, abs=0.01)
    assert curves["llicm-dehaze-decoded"]["results"]["psnr-rgb"][0] == pytest.approx(psnr(decoded, target), abs=1e-6)
    assert (tmp_path / "out" / "llicm-denoise.json").is_file()
    with pytest.raises(ValueError, match="name=path/to/final"):
        run(EvaluateConfig(images=str(eval_dir), classical=[], metrics=["psnr"], restorers=[str(restore_final)],
                           fid_kid=False, out_dir=str(tmp_path / "bad")))


@pytest.mark.fault
def test_stage2_resumes_from_a_checkpoint_without_frozen_weights_to_identical_adapters(
        models, pair_shards, eval_dir, trained_run, tmp_path):
    from integration.test_stage1 import CrashAt

    from stages import stage2_llicm
    from stages import trainer as trainer_module

    _, parent = trained_run
    # rate_match: β's dual variable and the frozen parent codec must come back on resume too.
    overrides = [*stage2_overrides(models, pair_shards, eval_dir), f"init_from={parent}", "trainer.max_steps=8",
                 "trainer.val_every=8", "trainer.checkpoint_every=2", "rate_match=true", "rate_match_step=0.5"]
    straight = stage2_llicm.run(load_config(Stage2LLICMConfig, overrides=[*overrides, f"output_root={tmp_path / 'a'}"]))

    cfg = load_config(Stage2LLICMConfig, overrides=[*overrides, f"output_root={tmp_path / 'b'}"])
    with pytest.raises(RuntimeError, match="simulated crash"), trainer_module.extra_callbacks(CrashAt(5)):
        stage2_llicm.run(cfg)
    ckpt = torch.load(cfg.stage_dir / "last.ckpt", weights_only=False)
    assert ckpt["global_step"] == 4 and not any(LLICMModule(cfg).is_frozen_weight(k) for k in ckpt["state_dict"])
    assert ckpt["state_dict"]["rate_log_scale"] != 0
    resumed = stage2_llicm.run(cfg)
    for name in (LORA_FILE, CONV_IN_FILE, CONTROLLER_FILE, "codec.safetensors"):
        a, b = load_file(straight / name), load_file(resumed / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


@pytest.mark.fault
def test_two_process_ddp_trains_the_pixel_preset_and_averages_validation_over_ranks(
        pair_shards, eval_dir, trained_run, tmp_path):
    """Under DDP every trained part must get a gradient each step (DDP fails on the second step
    otherwise) and validation items split across ranks must average exactly as on one process."""
    import os
    import subprocess
    import sys

    from conftest import ROOT
    from integration.test_distributed import free_port

    _, parent = trained_run
    command = [sys.executable, str(ROOT / "train.py"), "stage2-llicm", "-c", str(ROOT / "configs/stage2/llicm-tiny.yaml"),
               f"init_from={parent}", f"output_root={tmp_path}", "codec.N=32", "codec.M=48",
               f"data.train_shards={pair_shards}", f"data.val_dir={eval_dir}", "data.val_tasks=[denoise,dehaze]",
               "data.val_crop=64", "data.batch_size=2", "data.num_workers=0", "data.val_max_images=1",
               "prior.sample_steps=2", "trainer.max_steps=4", "trainer.val_every=4", "trainer.checkpoint_every=2",
               "trainer.progress_bar=false", "trainer.accelerator=cpu", "trainer.strategy=ddp", "trainer.devices=2"]
    env = {**os.environ, "MASTER_PORT": str(free_port()), "DIFFCODEC_CACHE": str(tmp_path / "cache")}
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    manifest = read_manifest(tmp_path / "default" / "stage2-llicm" / "final", expect_stage="stage2-llicm")
    metrics = manifest.metrics
    # One (image, task) item per rank: the overall mean is the mean of the two tasks' values.
    for key in ("psnr", "bpp"):
        expected = (metrics[f"val/denoise/{key}"] + metrics[f"val/dehaze/{key}"]) / 2
        assert metrics[f"val/all/{key}"] == pytest.approx(expected, abs=2e-6), key  # manifests keep 6 decimals
    assert metrics["val/denoise/psnr"] != metrics["val/dehaze/psnr"]
    assert torch.load(tmp_path / "default" / "stage2-llicm" / "last.ckpt", weights_only=False)["global_step"] == 4
