"""Stage 2, Diff-ICMH, on tiny random models loaded through from_pretrained: the loss, the
semantic-consistency term, the bitstream with its tag section, and resume."""
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT
from foundation.config import load_config
from pl_modules.core.bitstream import BitstreamError, unpack
from pl_modules.difficmh.module import DiffICMHModule
from pl_modules.difficmh.tag_coding import decode_tags
from pl_modules.prior.control_branch import CONTROLNET_FILE
from pl_modules.prior.diffusion_prior import LORA_FILE
from stages.stage2_difficmh import Stage2DiffICMHConfig

TINY = ROOT / "configs" / "stage2" / "difficmh-tiny.yaml"


def overrides(models, shard_dir, eval_dir, *more: str) -> list[str]:
    sd, clip = models
    return [f"prior.model={sd}", "prior.local_files_only=true", f"tagger.model={clip}",
            f"data.train_shards={shard_dir}", f"data.val_dir={eval_dir}", "trainer.progress_bar=false",
            "trainer.accelerator=cpu", "trainer.devices=1", *more]


def config(models, shard_dir, eval_dir, *more: str) -> Stage2DiffICMHConfig:
    return load_config(Stage2DiffICMHConfig, [TINY], overrides(models, shard_dir, eval_dir, *more))


@pytest.fixture(scope="module")
def small_photos(eval_dir, tmp_path_factory):
    """192×128 crops of the evaluation photos: full Kodak frames would make every decode here slow."""
    from PIL import Image

    out = tmp_path_factory.mktemp("small")
    for path in sorted(eval_dir.iterdir()):
        Image.open(path).convert("RGB").crop((64, 64, 256, 192)).save(out / f"{path.stem}.png")
    return out


@pytest.fixture(scope="module")
def trained(models, shard_dir, small_photos, tmp_path_factory):
    """A two-stage pipeline: the latent codec warms up alone (every step a warm-up step), then the
    joint stage continues from it. Returns (the joint stage's config, its final/, the warm-up's final/)."""
    import yaml

    from stages import pipeline
    from stages.pipeline import PipelineConfig

    root = tmp_path_factory.mktemp("difficmh")
    spec = root / "p.yaml"
    spec.write_text(yaml.safe_dump({"run": "dicmh", "output_root": str(root), "stages": [
        {"name": "warmup", "kind": "stage2-difficmh", "config": [str(TINY)],
         "overrides": overrides(models, shard_dir, small_photos, "codec_warmup_steps=6")},
        {"name": "joint", "kind": "stage2-difficmh", "init_from": "warmup", "config": [str(TINY)],
         "overrides": overrides(models, shard_dir, small_photos, "codec_warmup_steps=0")}]}))
    warmup, joint = pipeline.run(load_config(PipelineConfig, [spec]))
    cfg = config(models, shard_dir, small_photos, f"output_root={root}", "run=dicmh", "name=joint", "codec_warmup_steps=0",
                 f"init_from={warmup}")
    return cfg, joint, warmup


@pytest.mark.unit
def test_settings_that_cannot_work_are_refused_naming_the_key(models, shard_dir, eval_dir):
    with pytest.raises(ValueError, match="codec.architecture: Diff-ICMH codes the diffusion latent"):
        config(models, shard_dir, eval_dir, "codec.architecture=mbt2018-mean")
    with pytest.raises(ValueError, match="prior.text_encoder must be true"):
        config(models, shard_dir, eval_dir, "prior.text_encoder=false")
    with pytest.raises(ValueError, match=r"sc_blocks: the UNet has no blocks \['middle'\]"):
        DiffICMHModule(config(models, shard_dir, eval_dir, "sc_blocks=[middle]"))


@pytest.mark.unit
def test_sidecar_tags_travel_in_the_shards_to_the_prompt_and_bad_ones_are_refused(models, photo_dir, eval_dir,
                                                                                  tmp_path):
    import shutil

    from datamodules.shards import read_index, write_shards
    from datamodules.stream import CropStream
    from pl_modules.difficmh.tag_coding import TagError

    photos = tmp_path / "photos"
    photos.mkdir()
    for index, path in enumerate(sorted(photo_dir.iterdir())[:3]):
        shutil.copy(path, photos / path.name)
        if index < 2:  # the third comes without tags
            path_tags = photos / f"{path.stem}.tags"
            path_tags.write_text("person\ndog\n" if index == 0 else "zebra\n")
    write_shards(photos, tmp_path / "shards", progress=False)
    batch = next(iter(CropStream(read_index(tmp_path / "shards"), 64, 3, seed=0)))
    by_key = dict(zip(batch["keys"], batch["tags"]))
    assert sorted(map(str, by_key.values())) == ["None", "['person', 'dog']", "['zebra']"]
    module = DiffICMHModule(config(models, tmp_path / "shards", eval_dir, "tagger.kind=sidecar"))
    with pytest.raises(TagError, match="training sample .* carries no tags"):
        module.batch_tags(batch)
    tagged = [i for i, tags in enumerate(batch["tags"]) if tags]
    subset = {"image": batch["image"][tagged], "keys": [batch["keys"][i] for i in tagged],
              "tags": [batch["tags"][i] for i in tagged]}
    assert sorted(module.prompt(tags) for tags in module.batch_tags(subset)) == ["person, dog", "zebra"]
    assert torch.equal(module.tag_context(subset, drop=False),
                       module.prior.encode_text([module.prompt(tags) for tags in subset["tags"]]))
    subset["tags"][0] = ["lighthouse"]
    with pytest.raises(TagError, match="tag 'lighthouse' is not in the vocabulary"):
        module.batch_tags(subset)


@pytest.mark.stage
def test_the_loss_on_a_fixed_batch_falls_and_every_term_reaches_what_it_trains(models, shard_dir, eval_dir):
    module = DiffICMHModule(config(models, shard_dir, eval_dir, "codec_warmup_steps=0", "tag_dropout=0"))
    groups, aux = module.parameter_groups()
    optimizer = torch.optim.Adam([p for g in groups for p in g["params"]], lr=1e-3)
    batch = {"image": torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))}
    history = []
    for step in range(12):
        torch.manual_seed(0)  # the same noise, timesteps and quantisation noise every step
        terms, _ = module.losses(batch)
        optimizer.zero_grad()
        terms["loss"].backward()
        if step == 0:
            assert module.codec.g_a[0].weight.grad.abs().sum() > 0  # rate, guide, ε and SC reach the codec
            assert module.prior.controlnet.controlnet_mid_block.weight.grad.abs().sum() > 0
            assert all(t.item() > 0 for k, t in terms.items() if k != "loss"), terms
        optimizer.step()
        history.append(terms["loss"].item())
    assert history[-1] < 0.8 * history[0], history


@pytest.mark.unit
def test_semantic_consistency_is_zero_for_the_true_latent_grows_with_error_and_leaves_no_hooks(models, shard_dir,
                                                                                              eval_dir):
    module = DiffICMHModule(config(models, shard_dir, eval_dir, "sc_blocks=[mid_block,down_blocks.1]"))
    hooks = lambda: sum(len(m._forward_hooks) for m in module.prior.unet.modules())  # noqa: E731
    before = hooks()
    z = module.prior.encode(torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)))
    noise = torch.randn_like(z)
    for timestep in ("zero", "shared"):
        torch.manual_seed(1)
        assert module.sc_distance(z, z, ["mid_block", "down_blocks.1"], timestep).item() == pytest.approx(0, abs=1e-6)
        values = []
        for scale in (0.1, 0.5, 2.0):
            torch.manual_seed(1)  # the shared t and noise
            values.append(module.sc_distance(z, z + scale * noise, ["mid_block", "down_blocks.1"], timestep).item())
        assert values == sorted(values) and values[0] > 0, (timestep, values)
    assert hooks() == before


@pytest.mark.chain
def test_a_photo_round_trips_through_a_file_deterministically_with_its_tags(trained, small_photos, tmp_path):
    from datamodules.images import load_rgb, to_tensor
    from pl_modules.codec_io import compress_file, decompress_file
    from pl_modules.finals import load_final

    cfg, final_dir, _ = trained
    assert {LORA_FILE, CONTROLNET_FILE, "codec.safetensors"} <= {p.name for p in final_dir.iterdir()}
    photo = sorted(small_photos.iterdir())[0]
    result = compress_file(photo, final_dir, tmp_path / "a.bin", seed=7)
    stream = unpack((tmp_path / "a.bin").read_bytes())
    image = to_tensor(load_rgb(photo)).unsqueeze(0)
    final = load_final(final_dir)
    assert (stream.height, stream.width) == image.shape[-2:] and stream.sampler.seed == 7
    assert stream.sampler.guidance == cfg.guidance_scale and stream.sampler.steps == cfg.prior.sample_steps
    tags, vocabulary = final.model.tagger(image), final.model.tagger.vocabulary
    assert decode_tags(stream.tags, vocabulary) == sorted(tags, key=vocabulary.index.get)
    assert final.model.prompt(tags) == final.model.prompt(decode_tags(stream.tags, vocabulary))  # train = decode
    assert final.model.prompt(["dog", "person", "dog"]) == "person, dog"  # vocabulary order, once each
    assert result.bpp == pytest.approx(8 * (tmp_path / "a.bin").stat().st_size / image[0, 0].numel())
    first = decompress_file(tmp_path / "a.bin", tmp_path / "a.png", final_dir)
    second = decompress_file(tmp_path / "a.bin", tmp_path / "b.png", final_dir)
    assert first.read_bytes() == second.read_bytes()
    assert to_tensor(load_rgb(first)).shape == image[0].shape
    compress_file(photo, final_dir, tmp_path / "c.bin", seed=8)
    third = decompress_file(tmp_path / "c.bin", tmp_path / "c.png", final_dir)
    assert third.read_bytes() != first.read_bytes()  # the seed in the file decides the sample
    damaged = (tmp_path / "a.bin").read_bytes()
    with pytest.raises(BitstreamError, match="not by this one"):
        final.model.decode(unpack(damaged), "11" * 32)


@pytest.mark.stage
def test_a_model_with_its_frozen_weights_in_bf16_codes_a_photo_outside_training(models, shard_dir, small_photos):
    """SD-sized configs store the frozen VAE and UNet in bf16: the latent reaching the float32
    codec must be float32 without a training step's autocast around it (compress, evaluate)."""
    from datamodules.images import load_rgb, to_tensor
    from pl_modules.core.codec_module import IN_MEMORY_ID

    module = DiffICMHModule(config(models, shard_dir, small_photos, "prior.frozen_dtype=bfloat16")).eval()
    module.codec.update(force=True)
    assert next(module.prior.vae.parameters()).dtype == torch.bfloat16
    x = to_tensor(load_rgb(sorted(small_photos.iterdir())[0])).unsqueeze(0)
    data, image = module.round_trip(x, IN_MEMORY_ID)
    assert len(data) > 0 and image.dtype == torch.float32 and image.shape == x.shape


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_file_written_on_a_gpu_decodes_on_the_cpu_to_the_same_latent_and_nearly_the_same_image(trained, small_photos,
                                                                                                 tmp_path):
    from pl_modules.codec_io import compress_file
    from pl_modules.finals import load_final

    _, final_dir, _ = trained
    compress_file(sorted(small_photos.iterdir())[0], final_dir, tmp_path / "a.bin", seed=3, device="cuda")
    stream = unpack((tmp_path / "a.bin").read_bytes())
    cpu, gpu = load_final(final_dir, device="cpu"), load_final(final_dir, device="cuda")
    assert {p.device.type for p in gpu.codec.parameters()} == {"cpu"}
    assert {p.device.type for p in gpu.model.prior.unet.parameters()} == {"cuda"}
    assert torch.equal(cpu.model.decoded_latent(stream, cpu.decoder_id),
                       gpu.model.decoded_latent(stream, gpu.decoder_id).cpu())
    on_cpu, on_gpu = cpu.model.decode(stream, cpu.decoder_id), gpu.model.decode(stream, gpu.decoder_id).cpu()
    # The same start noise (drawn on the CPU from the file's seed); float rounding alone differs.
    assert (on_cpu - on_gpu).abs().mean() < 2 / 255


@pytest.mark.chain
def test_the_warm_up_stage_trains_the_codec_alone_and_the_joint_stage_continues_from_it(trained):
    from foundation.manifest import read_manifest

    _, joint, warmup = trained
    # LoRA's B and ControlNet's zero convolutions start at zero and move only with a diffusion term.
    lora, control = load_file(warmup / LORA_FILE), load_file(warmup / CONTROLNET_FILE)
    zero_started = [lora[k] for k in lora if "lora_B" in k] + [
        control[k] for k in control if k.startswith(("controlnet_down_blocks", "controlnet_mid_block",
                                                      "controlnet_cond_embedding.conv_out"))]
    assert zero_started and all(not t.any() for t in zero_started)
    joint_lora = load_file(joint / LORA_FILE)
    assert any(joint_lora[k].any() for k in joint_lora if "lora_B" in k)
    manifest = read_manifest(joint)
    assert manifest.parent_weights == read_manifest(warmup).weights
    assert not torch.equal(load_file(joint / LORA_FILE)[next(iter(lora))], lora[next(iter(lora))])
    for key in ("val/bpp", "val/tag_bpp", "val/psnr", "val/latent_mse", "val/sc"):
        assert key in manifest.metrics, key
    assert 0 < manifest.metrics["val/tag_bpp"] < manifest.metrics["val/bpp"]


@pytest.mark.chain
def test_evaluate_scores_a_diff_icmh_final_on_the_image_it_generates_from_the_file(trained, small_photos, tmp_path):
    import csv
    import shutil

    from datamodules.images import load_rgb, to_tensor
    from evaluation.evaluate import EvaluateConfig, run
    from pl_modules.core.bitstream import pad_to_multiple
    from pl_modules.core.rate_distortion import psnr
    from pl_modules.finals import load_final

    _, joint, warmup = trained
    # A bare path may hold '=' (a sweep's point folders do): it is a point of the unnamed curve.
    warm_copy = tmp_path / "rate_weight=4.0" / "final"
    shutil.copytree(warmup, warm_copy)
    run(EvaluateConfig(images=str(small_photos), max_images=1, models=[f"difficmh={joint}", str(warm_copy)],
                       models_name="warmup", classical=[], metrics=["psnr"], fid_kid=False,
                       latent_blocks=["mid_block", "down_blocks.0"], latent_timesteps=[0, 300], out_dir=str(tmp_path),
                       device="cpu"))  # on the CPU like the recomputation below
    rows = {r["method"]: r for r in csv.DictReader((tmp_path / "per_image.csv").open())}
    assert set(rows) == {"difficmh", "warmup"} and rows["difficmh"]["setting"] == "4.0"  # the rate weight
    row = rows["difficmh"]
    final = load_final(joint)
    model = final.model
    x = to_tensor(load_rgb(sorted(small_photos.iterdir())[0])).unsqueeze(0)
    data, image = model.round_trip(x, final.decoder_id, seed=0)
    assert float(row["bpp"]) == pytest.approx(8 * len(data) / x[0, 0].numel())
    assert float(row["psnr"]) == pytest.approx(psnr(image, x), abs=1e-4)
    # The feature distance between z and the file's ẑ, per block and timestep, as the SC loss measures it.
    z = model.prior.encode(pad_to_multiple(x, model.pad_multiple))
    z_hat = model.decoded_latent(unpack(data), final.decoder_id)
    t, noise = torch.zeros(1, dtype=torch.long), torch.randn(z.shape, generator=torch.Generator().manual_seed(0))
    expected = model.feature_distance(z, z_hat, ["mid_block"], t, noise, "cosine").item()
    assert float(row["feat_mid_block_t0"]) == pytest.approx(expected, rel=1e-3, abs=1e-5)
    assert {f"feat_{b}_t{s}" for b in ("mid_block", "down_blocks.0") for s in (0, 300)} <= set(row)
    assert all(float(row[k]) > 0 for k in row if k.startswith("feat_"))
    vae_only = model.prior.decode(z_hat)[..., : x.shape[-2], : x.shape[-1]].mul(255).round().div(255)
    assert float(row["vae_psnr"]) == pytest.approx(psnr(vae_only, x), abs=1e-3)
    assert model.feature_distance(z, z, ["mid_block"], t, torch.zeros_like(z), "cosine").item() == pytest.approx(0, abs=1e-6)


@pytest.mark.chain
def test_a_final_refuses_a_vocabulary_that_changed_since_training(trained, models, shard_dir, eval_dir, tmp_path):
    from foundation.manifest import read_manifest

    _, final_dir, _ = trained
    digest = read_manifest(final_dir).params["tagger"]["vocabulary_digest"]
    vocabulary = tmp_path / "edited.txt"
    vocabulary.write_text("cat\ndog\n")
    cfg = config(models, shard_dir, eval_dir, f"tagger.vocabulary={vocabulary}", f"tagger.vocabulary_digest={digest}")
    with pytest.raises(ValueError, match="is not the vocabulary this model was trained with"):
        DiffICMHModule(cfg)


@pytest.mark.fault
def test_resume_after_a_mid_stage_kill_ends_on_identical_trained_weights(models, shard_dir, small_photos, tmp_path):
    from integration.test_stage1 import CrashAt

    from stages import stage2_difficmh
    from stages import trainer as trainer_module

    straight = stage2_difficmh.run(config(models, shard_dir, small_photos, f"output_root={tmp_path / 'a'}"))
    cfg = config(models, shard_dir, small_photos, f"output_root={tmp_path / 'b'}", "trainer.checkpoint_every=2")
    with pytest.raises(RuntimeError, match="simulated crash"), trainer_module.extra_callbacks(CrashAt(3)):
        stage2_difficmh.run(cfg)
    ckpt = torch.load(cfg.stage_dir / "last.ckpt", weights_only=False)
    assert ckpt["global_step"] == 2 and not any(k.startswith(("prior.vae.", "prior.text_model.")) for k in ckpt["state_dict"])
    resumed = stage2_difficmh.run(cfg)
    for name in (LORA_FILE, CONTROLNET_FILE, "codec.safetensors"):
        a, b = load_file(straight / name), load_file(resumed / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


@pytest.mark.fault
def test_two_process_ddp_trains_across_the_warm_up_boundary(models, shard_dir, small_photos, tmp_path):
    """During the warm-up the prior's trained parameters rest; DDP still needs a gradient for each
    of them every step, or it fails on the second step."""
    import os
    import subprocess
    import sys

    from foundation.manifest import read_manifest
    from integration.test_distributed import free_port

    command = [sys.executable, str(ROOT / "train.py"), "stage2-difficmh", "-c", str(TINY),
               *overrides(models, shard_dir, small_photos, f"output_root={tmp_path}", "codec_warmup_steps=2",
                          "trainer.max_steps=4", "trainer.val_every=4", "trainer.checkpoint_every=2",
                          "data.val_max_images=2", "trainer.strategy=ddp", "trainer.devices=2")]
    env = {**os.environ, "MASTER_PORT": str(free_port())}
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    stage = tmp_path / "default" / "stage2-difficmh"
    assert torch.load(stage / "last.ckpt", weights_only=False)["global_step"] == 4
    manifest = read_manifest(stage / "final", expect_stage="stage2-difficmh")
    assert 0 < manifest.metrics["val/tag_bpp"] < manifest.metrics["val/bpp"]
    lora = load_file(stage / "final" / LORA_FILE)
    assert any(lora[k].any() for k in lora if "lora_B" in k)  # the joint steps after the warm-up trained it
