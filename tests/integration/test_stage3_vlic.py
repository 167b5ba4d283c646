"""Stage 3 (VLIC) on tiny random models: Diffusion-DPO of an LL-ICM decoder against itself frozen."""
import hashlib
import math
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import stage2_overrides
from datamodules.images import list_images, load_rgb, to_tensor, to_uint8
from datamodules.shards import read_index
from datamodules.stream import CropStream
from evaluation.evaluate import EvaluateConfig, run as evaluate
from foundation.config import ConfigError, load_config
from foundation.manifest import read_manifest
from pl_modules.core.bitstream import decode_image, encode_image
from pl_modules.finals import load_final
from pl_modules.vlic.dpo_watch import ROUNDING_PSNR_DB, DivergenceConfig, DivergenceWatch, pair_psnr
from pl_modules.vlic.module import DPODiverged, VLICModule
from stages import stage3_vlic
from stages.stage2_llicm import Stage2LLICMConfig
from stages.stage2_llicm import run as run_stage2
from stages.stage3_vlic import Stage3VLICConfig


def stage3_overrides(pair_shards, eval_dir, parent):
    return [f"init_from={parent}", f"data.train_shards={pair_shards}", f"data.val_dir={eval_dir}",
            "data.val_tasks=[denoise,dehaze]", "data.crop=64", "data.val_crop=64", "data.batch_size=2",
            "data.num_workers=0", "data.val_max_images=1", "adapter.rank=4", "adapter.alpha=4", "optim.lr=1e-3",
            "trainer.max_steps=6", "trainer.val_every=6", "trainer.checkpoint_every=3", "trainer.log_every=2",
            "trainer.progress_bar=false", "trainer.accelerator=cpu", "trainer.devices=1", "val_seeds=1",
            "second_judge=gmsd"]  # 64-px crops are below MS-SSIM's minimum side


@pytest.fixture(scope="module")
def parent(models, pair_shards, eval_dir, trained_run, tmp_path_factory):
    """A tiny LL-ICM final (tiny-sd prior with LoRA and conv_in, tiny CLIP) from the shared stage 1."""
    cfg = load_config(Stage2LLICMConfig, overrides=[*stage2_overrides(models, pair_shards, eval_dir),
                                                    f"init_from={trained_run[1]}",
                                                    f"output_root={tmp_path_factory.mktemp('s2')}"])
    return run_stage2(cfg)


@pytest.fixture(scope="module")
def stage3_final(parent, pair_shards, eval_dir, tmp_path_factory):
    cfg = load_config(Stage3VLICConfig, overrides=[*stage3_overrides(pair_shards, eval_dir, parent),
                                                   f"output_root={tmp_path_factory.mktemp('s3')}"])
    return cfg, stage3_vlic.run(cfg)


def module_from(parent, **changes):
    manifest = read_manifest(parent)
    cfg = load_config(VLICModule.CONFIG, [{"decoder_stage": manifest.stage, "decoder_params": manifest.params,
                                           "adapter": {"rank": 4, "alpha": 4}, **changes}])
    module = VLICModule(cfg)
    module.attach_decoder(parent)
    return module


@pytest.mark.stage
def test_stage3_needs_a_stage2_parent(trained_run, pair_shards, eval_dir, tmp_path):
    with pytest.raises(ConfigError, match="init_from must name a stage-2 final"):
        stage3_vlic.run(load_config(Stage3VLICConfig, overrides=[f"data.train_shards={pair_shards}",
                                                                 f"data.val_dir={eval_dir}"]))
    cfg = load_config(Stage3VLICConfig, overrides=[*stage3_overrides(pair_shards, eval_dir, trained_run[1]),
                                                   f"output_root={tmp_path}"])
    with pytest.raises(ConfigError, match="written by stage1; stage 3 post-trains a stage-2 decoder"):
        stage3_vlic.run(cfg)


@pytest.mark.stage
def test_the_reference_is_the_stage2_decoder_and_dpo_learns_the_judges_choices(parent, pair_shards):
    stage2 = load_final(parent).model
    module = module_from(parent)
    batch = next(iter(CropStream(read_index(pair_shards), 64, 6, seed=0)))
    inputs = module.decoder_inputs({"degraded": batch["degraded"][:1], "clean": batch["clean"][:1]})
    assert torch.equal(inputs["decoded"], decode_image(stage2.codec, encode_image(stage2.codec, batch["degraded"][:1],
                                                                                  "00" * 32), "00" * 32))
    assert torch.allclose(module.generate_reference(inputs, seed=3), stage2.restore(inputs["decoded"], seed=3)[0],
                          atol=1e-4)
    frozen = {k: v.clone() for k, v in module.state_dict().items() if module.is_frozen_weight(k)}
    assert any(k.startswith("decoder.codec.") for k in frozen) and any(k.startswith("decoder.clip.") for k in frozen)

    def train(labels: str, steps: int = 12) -> tuple[list[float], float]:
        torch.manual_seed(0)
        learner = module_from(parent, labels=labels)
        pairs = learner.draw_pairs(batch, 11, labels)
        judged = module.judge.prefer(batch["clean"], pairs["a"], pairs["b"])
        optimizer = torch.optim.Adam(learner.prior.trainable_parameters(), lr=3e-3)
        losses = []
        for _ in range(steps):
            torch.manual_seed(1)  # the same noise and timesteps every step: a fixed objective
            terms = learner.dpo_terms(pairs)
            optimizer.zero_grad()
            terms["loss"].backward()
            optimizer.step()
            losses.append(terms["dpo"].item())
        # Agreement with the judge: the model's implicit preference on the judge's own labels.
        torch.manual_seed(1)
        with torch.no_grad():
            scored = learner.dpo_terms({**pairs, "prefs": judged})
        return losses, scored["implicit_acc"].item()

    real, real_agreement = train("judge")
    assert real[0] == pytest.approx(math.log(2), abs=1e-3)  # the adapter starts at zero: model = reference
    assert real[-1] < 0.5 * real[0]
    coin, coin_agreement = train("coin-flip")
    assert real_agreement == 1.0 and coin_agreement < 1.0  # the labels, not the loop, carry the judge's choice
    for key, value in module.state_dict().items():
        if key in frozen:
            assert torch.equal(value, frozen[key]), key


@pytest.mark.unit
def test_the_divergence_watch_keeps_running_means_and_speaks_once_per_crossing():
    watch = DivergenceWatch(DivergenceConfig(max_dpo_loss=1.0, max_reference_drift=0.3, window=2))
    assert watch.update(0, 0.7, 0.0) is None and watch.update(1, 0.7, 0.4) is None  # drift mean 0.2
    message = watch.update(2, 0.7, 0.8)  # 0.2 + (0.8 − 0.2) / 2 = 0.5
    assert "step 2" in message and "moved 50%" in message and "loss" not in message.split(":")[1]
    assert watch.update(3, 0.7, 0.9) is None  # still over: said already
    assert watch.update(4, 0.7, 0.0) is None and watch.update(5, 0.7, 0.0) is None and not watch.over
    message = watch.update(6, 1.5, 0.0)  # the loss: 0.7 + (1.5 − 0.7) / 2 = 1.1
    assert "loss averages 1.100" in message and "moved" not in message
    resumed = DivergenceWatch(watch.cfg)
    resumed.load_state_dict(watch.state_dict())
    assert resumed.update(7, 3.0, 1.0) is None and watch.update(7, 3.0, 1.0) is None  # over already, in both
    assert resumed.means == watch.means
    with pytest.raises(ValueError, match="divergence.action must be one of"):
        DivergenceConfig(action="halt")
    with pytest.raises(ValueError, match="max_dpo_loss above log 2"):
        DivergenceConfig(max_dpo_loss=0.5)


@pytest.mark.unit
def test_pairs_closer_than_8_bit_rounding_are_told_once():
    assert ROUNDING_PSNR_DB == pytest.approx(58.92, abs=0.01)  # 10·log10(12·255²)
    a = torch.zeros(2, 3, 4, 4)
    b = torch.stack([torch.full((3, 4, 4), 0.1), torch.zeros(3, 4, 4)])
    assert pair_psnr(a, b).tolist() == pytest.approx([20.0, 100.0])  # MSE 0.01; equal images
    watch = DivergenceWatch(DivergenceConfig())
    assert watch.check_pairs(0, 40.0) is None
    message = watch.check_pairs(1, 63.3)
    assert "step 1" in message and "63.3 dB apart" in message and "58.9 dB" in message
    assert watch.check_pairs(2, 70.0) is None  # once
    resumed = DivergenceWatch(watch.cfg)
    resumed.load_state_dict(watch.state_dict())
    assert resumed.check_pairs(3, 70.0) is None  # once, across a requeue too


@pytest.mark.stage
def test_a_decoder_whose_two_samples_are_one_image_is_told_that_dpo_has_nothing_to_learn(parent, pair_shards):
    learner = module_from(parent)
    batch = next(iter(CropStream(read_index(pair_shards), 64, 2, seed=0)))
    one = learner.decoder.generate(learner.decoder_inputs(batch), 0)
    learner.decoder.generate = lambda inputs, seed, steps=None: one  # every seed gives the same image
    terms, aux_loss = learner.losses(batch)
    assert terms["pair_psnr"].item() == 100.0 and terms["pairs_kept"].item() == 0.0  # ties are no votes
    with pytest.warns(UserWarning, match="nothing to choose between"):
        assert learner.training_problem(terms, aux_loss) is None


@pytest.mark.stage
def test_a_rank_with_a_non_finite_loss_joins_the_watchs_reduce_so_its_peers_do_not_hang(parent, pair_shards):
    """Every rank must make the same collectives: one whose loss is NaN still joins the watch's
    reduce (and stops); a healthy rank whose peer is sick leaves the watch alone and lets the base's
    check stop it with that peer."""
    learner = module_from(parent)
    batch = next(iter(CropStream(read_index(pair_shards), 64, 2, seed=0)))
    terms, aux_loss = learner.losses(batch)
    reduced = []

    def reduce_with_a_sick_peer(value, op):
        reduced.append((tuple(value.shape), op))
        return value + torch.tensor([1.0, 0, 0, 0, 0, 0], dtype=value.dtype)  # a peer is sick

    learner.reduce_over_ranks = reduce_with_a_sick_peer
    assert learner.training_problem(terms, aux_loss) is None and learner.watch.steps == 0
    sick = learner.training_problem({**terms, "loss": torch.tensor(float("nan"))}, aux_loss)
    assert isinstance(sick, FloatingPointError) and "non-finite loss" in str(sick)
    assert reduced == [((6,), "sum"), ((6,), "sum")] and learner.watch.steps == 0


@pytest.mark.stage
def test_dpo_at_a_runaway_learning_rate_is_caught_by_the_watch(parent, pair_shards):
    """Online DPO on the tiny prior's own samples: at a sound learning rate the watch stays quiet; at a
    runaway one it warns (and, told to, returns the problem, which training_step raises before the
    update)."""
    batch = next(iter(CropStream(read_index(pair_shards), 64, 6, seed=0)))

    def train(lr: float, steps: int = 10, action: str = "warn"):
        torch.manual_seed(0)
        learner = module_from(parent, divergence={"action": action})
        optimizer = torch.optim.Adam(learner.prior.trainable_parameters(), lr=lr)
        problems = []
        for step in range(steps):
            learner.pairs = pairs = learner.draw_pairs(batch, step, "judge")
            torch.manual_seed(step)
            terms = {**learner.dpo_terms(pairs), "pair_psnr": pair_psnr(pairs["a"], pairs["b"]).median()}
            problems.append(learner.training_problem(terms, torch.zeros(())))
            optimizer.zero_grad()
            terms["loss"].backward()
            optimizer.step()
        return learner, problems

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sound, problems = train(1e-4)
    assert not [w for w in caught if "Diffusion-DPO" in str(w.message)]
    assert problems == [None] * 10 and sound.watch.means["dpo"] < 0.8
    with pytest.warns(UserWarning, match="Diffusion-DPO is diverging at step .*loss averages"):
        runaway, problems = train(3e-1)
    assert problems == [None] * 10 and runaway.watch.means["dpo"] > 2.0  # warned: trained on
    stopped, problems = train(3e-1, action="stop")
    first = next(i for i, p in enumerate(problems) if p is not None)
    assert isinstance(problems[first], DPODiverged) and "action=stop" in str(problems[first])
    assert problems[:first] == [None] * first


@pytest.mark.chain
def test_a_stage3_final_decodes_its_parents_bitstreams_and_works_with_the_codec_commands(
        stage3_final, parent, eval_dir, tmp_path):
    cfg, final = stage3_final
    manifest, parent_manifest = read_manifest(final, expect_stage="stage3-vlic"), read_manifest(parent)
    assert manifest.weights["codec.safetensors"] == parent_manifest.weights["codec.safetensors"]  # frozen codec
    assert set(manifest.weights) == set(parent_manifest.weights) | {"unet_lora_vlic.safetensors"}
    assert manifest.params["decoder_stage"] == "stage2-llicm" and manifest.codec == parent_manifest.codec
    for key in ("val/win_rate", "val/win_rate_second", "val/psnr", "val/psnr_reference", "val/dpo/implicit_acc"):
        assert key in manifest.metrics, key
    assert 0 <= manifest.metrics["val/win_rate"] <= 1
    post, before = load_final(final), load_final(parent)
    assert post.decoder_id != before.decoder_id
    x = to_tensor(load_rgb(list_images(eval_dir)[0])).unsqueeze(0)[..., :64, :96]
    stream = encode_image(before.codec, x, "00" * 32)
    assert torch.equal(decode_image(post.codec, stream, "00" * 32), decode_image(before.codec, stream, "00" * 32))
    from train import main

    image = tmp_path / "crop.png"
    Image.fromarray(to_uint8(x)).save(image)
    # On the CPU like the recomputation below (a GPU's rounding would differ; finals.place).
    cpu = ["--device", "cpu"]
    assert main(["compress", str(image), "-m", str(final), "-o", str(tmp_path / "p.bin"), "--seed", "5", *cpu]) == 0
    assert main(["decompress", str(tmp_path / "p.bin"), "-o", str(tmp_path / "p.png"), "-m", str(final), *cpu]) == 0
    decoded = decode_image(post.codec, encode_image(post.codec, x, post.decoder_id), post.decoder_id)
    expected = to_uint8(post.model.restore(decoded, 5)[0])
    assert np.array_equal(np.asarray(Image.open(tmp_path / "p.png")), expected)
    results = evaluate(EvaluateConfig(images=str(eval_dir), classical=[], metrics=["psnr"], tasks=["denoise"],
                                      post_trained=[f"vlic={final}"], restorers=[f"vlic={final}"], max_images=2,
                                      restore_crop=64, win_seeds=2, fid_kid=False, out_dir=str(tmp_path / "eval")))
    rates = results["win_rates"]["vlic"]["judges"]
    assert set(rates) == {"psnr", "ms-ssim"} and rates["psnr"]["n_pairs"] == 4 and rates["psnr"]["n_images"] == 2
    assert rates["psnr"]["win_rate_ci_low"] <= rates["psnr"]["win_rate"] <= rates["psnr"]["win_rate_ci_high"]
    assert (tmp_path / "eval" / "win_rates.json").is_file() and "vlic-denoise" in results


@pytest.mark.fault
def test_stage3_resumes_to_the_adapter_of_an_uninterrupted_run(stage3_final, parent, pair_shards, eval_dir,
                                                               tmp_path):
    from stages import trainer as trainer_module
    from integration.test_stage1 import CrashAt

    cfg = load_config(Stage3VLICConfig, overrides=[*stage3_overrides(pair_shards, eval_dir, parent),
                                                   f"output_root={tmp_path}"])
    with trainer_module.extra_callbacks(CrashAt(4)), pytest.raises(RuntimeError, match="simulated crash"):
        stage3_vlic.run(cfg)
    resumed = stage3_vlic.run(cfg)
    digest = lambda folder: hashlib.sha256((folder / "unet_lora_vlic.safetensors").read_bytes()).hexdigest()  # noqa: E731
    assert digest(resumed) == digest(stage3_final[1])


@pytest.mark.fault
def test_a_diverging_stage3_run_told_to_stop_ends_with_the_reason_and_no_final(parent, pair_shards, eval_dir,
                                                                                tmp_path):
    cfg = load_config(Stage3VLICConfig, overrides=[*stage3_overrides(pair_shards, eval_dir, parent),
                                                   f"output_root={tmp_path}", "divergence.action=stop",
                                                   "divergence.max_reference_drift=1e-9"])  # any move is too far
    with pytest.raises(DPODiverged, match=r"diverging at step 1: .*denoising errors have moved"):
        stage3_vlic.run(cfg)
    assert not (cfg.stage_dir / "final").exists()


@pytest.mark.chain
def test_offline_mode_trains_on_pairs_a_vlm_judged_once_into_shards(parent, pair_shards, eval_dir, tmp_path,
                                                                     monkeypatch):
    import json

    from foundation.config import load_config as load
    from pl_modules.prior.tiny_models import save_tiny_vlm
    from stages import preference_data
    from stages.preference_data import PreferenceShardsConfig

    monkeypatch.setenv("DIFFCODEC_CACHE", str(tmp_path / "cache"))
    vlm = save_tiny_vlm(tmp_path / "vlm")
    out = tmp_path / "preferences"
    summary = preference_data.run(load(PreferenceShardsConfig, overrides=[
        f"decoder={parent}", f"pairs={pair_shards}", f"out_dir={out}", f"judging.judge=vlm:{vlm}", "samples=6",
        "batch_size=3", "samples_per_shard=4"]))
    assert summary.written == 6 and len(summary.shards) == 2
    index = json.loads((out / "index.json").read_text())
    assert index["judge"] == f"vlm:{vlm}" and index["decoder"] == load_final(parent).decoder_id
    batch = next(iter(CropStream(read_index(out), 64, 3, seed=0)))
    assert set(batch) >= {"clean", "decoded", "a", "b", "prefs"} and batch["a"].shape == (3, 3, 64, 64)
    assert ((batch["prefs"] > 0) & (batch["prefs"] < 1)).all()  # the tiny VLM's averaged probabilities
    cfg = load_config(Stage3VLICConfig, overrides=[*stage3_overrides(pair_shards, eval_dir, parent), "mode=offline",
                                                   f"data.train_shards={out}", f"output_root={tmp_path / 'runs'}",
                                                   "trainer.max_steps=3", "trainer.val_every=3"])
    final = stage3_vlic.run(cfg)
    assert read_manifest(final).params["mode"] == "offline"
    module = load_final(final).model
    adapter = [p for n, p in module.prior.unet.named_parameters() if "lora_B" in n and ".vlic." in n]
    assert any(p.abs().sum() > 0 for p in adapter)  # the adapter moved off its zero start


@pytest.mark.fault
def test_two_process_ddp_post_trains_the_adapter_alone(parent, pair_shards, eval_dir, tmp_path):
    """Under DDP only the adapter is trained (DDP fails on the second step if a trained weight gets
    no gradient); each rank draws its own pairs from (seed, step, rank); rank 0 hands over."""
    import os
    import subprocess
    import sys

    from conftest import ROOT
    from integration.test_distributed import free_port

    command = [sys.executable, str(ROOT / "train.py"), "stage3-vlic", *stage3_overrides(pair_shards, eval_dir, parent),
               f"output_root={tmp_path}", "trainer.max_steps=4", "trainer.val_every=4", "trainer.checkpoint_every=2",
               "trainer.strategy=ddp", "trainer.devices=2"]
    command.remove("trainer.devices=1")
    env = {**os.environ, "MASTER_PORT": str(free_port())}
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    stage_dir = tmp_path / "default" / "stage3-vlic"
    manifest = read_manifest(stage_dir / "final", expect_stage="stage3-vlic")
    assert 0 <= manifest.metrics["val/win_rate"] <= 1
    checkpoint = torch.load(stage_dir / "last.ckpt", weights_only=False)
    assert checkpoint["global_step"] == 4
    assert checkpoint["state_dict"] and all(".vlic." in key for key in checkpoint["state_dict"])


@pytest.fixture(scope="module")
def difficmh_parent(models, shard_dir, eval_dir, tmp_path_factory):
    """A tiny Diff-ICMH final (latent codec, ControlNet, LoRA, tags from tiny CLIP)."""
    from stages.stage2_difficmh import run as run_difficmh
    from integration.test_stage2_difficmh import config as difficmh_config

    return run_difficmh(difficmh_config(models, shard_dir, eval_dir, f"output_root={tmp_path_factory.mktemp('d2')}"))


@pytest.mark.chain
def test_stage3_post_trains_a_difficmh_decoder_whose_reference_decodes_the_parents_bitstreams(
        difficmh_parent, pair_shards, eval_dir, tmp_path):
    cfg = load_config(Stage3VLICConfig, overrides=[*stage3_overrides(pair_shards, eval_dir, difficmh_parent),
                                                   "data.val_tasks=[denoise]", f"output_root={tmp_path}",
                                                   "trainer.max_steps=3", "trainer.val_every=3"])
    final = stage3_vlic.run(cfg)
    manifest, parent_manifest = read_manifest(final), read_manifest(difficmh_parent)
    assert manifest.params["decoder_stage"] == "stage2-difficmh"
    assert set(manifest.weights) == set(parent_manifest.weights) | {"unet_lora_vlic.safetensors"}
    for name in parent_manifest.weights:  # the codec, the ControlNet and the stage-2 LoRA as they were
        assert manifest.weights[name] == parent_manifest.weights[name], name
    checkpoint = torch.load(final.parent / "last.ckpt", weights_only=False)
    assert checkpoint["state_dict"] and all(".vlic." in key for key in checkpoint["state_dict"])  # LoRA alone trains
    post, before = load_final(final).model, load_final(difficmh_parent).model
    adapter = [p for n, p in post.prior.unet.named_parameters() if "lora_B" in n and ".vlic." in n]
    assert any(p.abs().sum() > 0 for p in adapter)
    x = to_tensor(load_rgb(list_images(eval_dir)[0])).unsqueeze(0)[..., :64, :128]
    stream = before.encode(x, "00" * 32, seed=5)
    assert post.encode(x, "00" * 32, seed=5) == stream  # the same encoder, tags included
    with post.prior.adapters_disabled():
        reference, parent = post.decode(stream, "00" * 32), before.decode(stream, "00" * 32)
    # The reference holds the stage-2 LoRA folded into the base weights: equal to the parent's unfolded
    # LoRA in exact arithmetic, not bit for bit in float, so a rare 8-bit value may round the other way.
    assert (reference - parent).abs().max() <= 1 / 255 + 1e-6 and (reference == parent).float().mean() >= 0.999
    results = evaluate(EvaluateConfig(images=str(eval_dir), classical=[], metrics=["psnr"], tasks=["denoise", "dehaze"],
                                      post_trained=[f"vlic={final}"], max_images=2,
                                      restore_crop=64, win_seeds=2, fid_kid=False, out_dir=str(tmp_path / "eval")))
    rates = results["win_rates"]["vlic"]["judges"]["psnr"]
    assert rates["n_pairs"] == 4 and rates["n_images"] == 2  # one clean input per image: tasks do not apply
    assert 0 <= rates["win_rate"] <= 1
