"""Stage 1 end to end on tiny configs: training, manifest, resume, real bitstreams, the codec CLI."""

import os
import signal

import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from PIL import Image
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import SHARED, tiny_stage1
from datamodules.images import list_images, load_rgb, to_tensor, to_uint8
from foundation.manifest import ManifestError, read_manifest
from pl_modules.core.bitstream import decode_image, encode_image
from pl_modules.finals import load_final
from stages import stage1
from stages import trainer as trainer_module
from train import main


def scalars(stage_dir, tag):
    events = EventAccumulator(str(stage_dir / "tb"))
    events.Reload()
    return [e.value for e in events.Scalars(tag)]


@pytest.mark.stage
def test_training_lowers_the_loss_and_hands_over_a_valid_final(trained_run):
    cfg, final = trained_run
    losses = scalars(cfg.stage_dir, "train/loss")
    assert len(losses) == 8 and np.mean(losses[-2:]) < 0.8 * np.mean(losses[:2])
    manifest = read_manifest(final, expect_stage="stage1")
    assert manifest.codec == {"architecture": "bmshj2018-hyperprior", "N": 32, "M": 48}
    assert manifest.params["lmbda"] == cfg.lmbda and manifest.params["distortion"] == "mse"
    metrics = manifest.metrics
    assert 0.05 < metrics["val/bpp"] < 8 and 10 < metrics["val/psnr"] < 60
    # Real bytes against the likelihoods: equal but for the container header and coder overhead.
    assert metrics["val/bpp"] == pytest.approx(metrics["val/bpp_estimated"], rel=0.1)
    for name in ("config.yaml", "git.txt", "pip-freeze.txt", "last.ckpt"):
        assert (cfg.stage_dir / name).is_file(), name
    assert "lightning==" in (cfg.stage_dir / "pip-freeze.txt").read_text()
    assert (final / "config.yaml").read_text() == (cfg.stage_dir / "config.yaml").read_text()


# train/loss of the shared tiny run (BSDS500 photos) at steps 5, 10, …, 40, recorded before the shared
# training skeleton replaced stage 1's own loop; the weights were bit-identical too (sha256 5aeacc9e…).
GOLDEN_STAGE1 = [187.45854, 28.578423, 22.956186, 42.765713, 14.840533, 30.246275, 15.413257, 19.655584]


@pytest.mark.stage
@pytest.mark.skipif(not (SHARED / "bsds500").is_dir(), reason="the golden curve was recorded on ../shared's BSDS500")
def test_the_short_loss_curve_is_the_golden_one(trained_run):
    cfg, _ = trained_run
    assert scalars(cfg.stage_dir, "train/loss") == pytest.approx(GOLDEN_STAGE1, rel=1e-4)


@pytest.mark.stage
def test_a_tampered_final_is_refused(trained_run, tmp_path):
    _, final = trained_run
    copy = tmp_path / "final"
    copy.mkdir()
    for path in final.iterdir():
        copy.joinpath(path.name).write_bytes(path.read_bytes())
    data = bytearray((copy / "codec.safetensors").read_bytes())
    data[-1] ^= 1
    (copy / "codec.safetensors").write_bytes(bytes(data))
    with pytest.raises(ManifestError, match="sha256 of codec.safetensors does not match"):
        read_manifest(copy)


class CrashAt(Callback):
    def __init__(self, step):
        self.step = step

    def on_train_batch_start(self, trainer, *args):
        if trainer.global_step == self.step:
            raise RuntimeError("simulated crash")


@pytest.mark.fault
def test_resume_after_a_crash_ends_with_the_weights_of_an_uninterrupted_run(tmp_path, shard_dir, eval_dir):
    # Validation at step 4 sizes the entropy coder's tables before the checkpoint that resumes.
    overrides = ("trainer.max_steps=16", "trainer.checkpoint_every=4", "trainer.val_every=4",
                 "data.num_workers=2", "data.val_max_images=1")
    straight = stage1.run(tiny_stage1(tmp_path / "a", shard_dir, eval_dir, *overrides))

    cfg = tiny_stage1(tmp_path / "b", shard_dir, eval_dir, *overrides)
    with pytest.raises(RuntimeError, match="simulated crash"), trainer_module.extra_callbacks(CrashAt(10)):
        stage1.run(cfg)
    assert torch.load(cfg.stage_dir / "last.ckpt", weights_only=False)["global_step"] == 8
    resumed = stage1.run(cfg)

    a, b = load_file(straight / "codec.safetensors"), load_file(resumed / "codec.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    state = torch.load(cfg.stage_dir / "last.ckpt", weights_only=False)
    assert [o["state"][0]["step"].item() for o in state["optimizer_states"]] == [16.0, 16.0]


class SignalAt(Callback):
    """SLURM's pre-timeout SIGUSR1, delivered to this process at the end of a step."""

    def __init__(self, step):
        self.step = step

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGUSR1)


@pytest.mark.fault
def test_sigusr1_saves_at_the_step_boundary_stops_without_a_final_and_resumes_bit_identically(
        tmp_path, shard_dir, eval_dir, monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    overrides = ("trainer.max_steps=12", "trainer.checkpoint_every=100", "trainer.val_every=12",
                 "data.val_max_images=1")
    straight = stage1.run(tiny_stage1(tmp_path / "a", shard_dir, eval_dir, *overrides))
    cfg = tiny_stage1(tmp_path / "b", shard_dir, eval_dir, *overrides)
    with pytest.raises(trainer_module.Requeued, match=r"saved .*last.ckpt at step 5; the same command resumes"), \
            trainer_module.extra_callbacks(SignalAt(5)):
        stage1.run(cfg)
    assert torch.load(cfg.stage_dir / "last.ckpt", weights_only=False)["global_step"] == 5
    assert not (cfg.stage_dir / "final").exists()
    resumed = stage1.run(cfg)
    a, b = load_file(straight / "codec.safetensors"), load_file(resumed / "codec.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


class SignalWhileStarting(Callback):
    """The signal after the logger's first write and before the first step (a compile, the loaders)."""

    def on_fit_start(self, trainer, pl_module):
        os.kill(os.getpid(), signal.SIGUSR1)


@pytest.mark.fault
def test_a_sigusr1_while_the_run_starts_saves_after_the_first_step_instead_of_killing_the_job(
        tmp_path, shard_dir, eval_dir, monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    cfg = tiny_stage1(tmp_path, shard_dir, eval_dir, "trainer.max_steps=4", "trainer.checkpoint_every=100",
                      "trainer.val_every=4", "data.val_max_images=1")
    with pytest.raises(trainer_module.Requeued, match=r"saved .*last.ckpt at step 1; the same command resumes"), \
            trainer_module.extra_callbacks(SignalWhileStarting()):
        stage1.run(cfg)
    assert torch.load(cfg.stage_dir / "last.ckpt", weights_only=False)["global_step"] == 1


@pytest.mark.stage
def test_compress_decompress_cli_gives_the_validation_pixels_and_the_file_bpp(trained_run, eval_dir, tmp_path, capsys):
    _, final = trained_run
    image = list_images(eval_dir)[0]
    out = tmp_path / "x.bin"
    assert main(["compress", str(image), "-m", str(final), "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    height, width = load_rgb(image).shape[:2]
    file_bpp = 8 * out.stat().st_size / (height * width)
    assert f"{file_bpp:.4f} bpp" in printed and f"{out.stat().st_size} bytes" in printed

    rec = tmp_path / "rec.png"
    assert main(["decompress", str(out), "-o", str(rec), "-m", str(final)]) == 0
    codec, sha = load_final(final).codec, load_final(final).decoder_id
    x = to_tensor(load_rgb(image)).unsqueeze(0)
    expected = to_uint8(decode_image(codec, encode_image(codec, x, sha), sha))
    assert np.array_equal(np.asarray(Image.open(rec)), expected)


@pytest.mark.stage
def test_decompress_without_a_model_finds_it_by_the_hash_in_the_file(trained_run, eval_dir, tmp_path, monkeypatch):
    cfg, final = trained_run
    runs = tmp_path / "project"
    runs.mkdir()
    (runs / "checkpoints").symlink_to(cfg.output_root, target_is_directory=True)  # where users keep runs
    monkeypatch.chdir(runs)
    image = list_images(eval_dir)[1]
    assert main(["compress", str(image), "-m", str(final), "-o", "y.bin"]) == 0
    assert main(["decompress", "y.bin", "-o", "y.png"]) == 0
    codec, sha = load_final(final).codec, load_final(final).decoder_id
    x = to_tensor(load_rgb(image)).unsqueeze(0)
    assert np.array_equal(np.asarray(Image.open(runs / "y.png")), to_uint8(decode_image(codec, encode_image(codec, x, sha), sha)))


@pytest.mark.stage
@pytest.mark.skipif(torch.cuda.is_available(), reason="refusing an absent GPU needs a machine without one")
def test_a_device_that_is_not_here_is_refused_in_one_line_and_nothing_is_written(trained_run, eval_dir, tmp_path,
                                                                                  capsys):
    _, final = trained_run
    image, out = list_images(eval_dir)[0], tmp_path / "x.bin"
    assert main(["compress", str(image), "-m", str(final), "-o", str(out), "--device", "cuda"]) == 1
    assert main(["compress", str(image), "-m", str(final), "-o", str(out), "--device", "tpu9"]) == 1
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 2 and "no CUDA device here" in errors[0] and "device 'tpu9': Invalid" in errors[1]
    assert not out.exists()
    # evaluate refuses it before the anchors spend minutes.
    assert main(["evaluate", f"images={eval_dir}", f"models=[{final}]", "classical=[jpeg]", "device=cuda",
                 f"out_dir={tmp_path / 'eval'}"]) == 1
    assert "no CUDA device here" in capsys.readouterr().err and not (tmp_path / "eval").exists()
    assert main(["compress", str(image), "-m", str(final), "-o", str(out), "--device", "auto"]) == 0
    assert main(["decompress", str(out), "-o", str(tmp_path / "x.png"), "-m", str(final), "--device", "cpu"]) == 0
    # Outside training the entropy codec computes on the CPU whatever the device (finals.place).
    assert {p.device.type for p in load_final(final, device="auto").codec.parameters()} == {"cpu"}


@pytest.mark.parametrize("damage", ["truncate", "flip", "other-model"])
@pytest.mark.stage
def test_damaged_or_foreign_bitstreams_fail_with_one_line(damage, trained_run, eval_dir, tmp_path, capsys,
                                                         shard_dir):
    cfg, final = trained_run
    image = list_images(eval_dir)[0]
    out = tmp_path / "z.bin"
    assert main(["compress", str(image), "-m", str(final), "-o", str(out)]) == 0
    data = bytearray(out.read_bytes())
    model = final
    if damage == "truncate":
        data = data[: len(data) // 2]
    elif damage == "flip":
        data[len(data) // 2] ^= 0x04
    else:
        other = tiny_stage1(tmp_path, shard_dir, eval_dir, "trainer.max_steps=2", "trainer.val_every=2",
                            "data.val_max_images=1", "trainer.seed=5")
        model = stage1.run(other)
    out.write_bytes(bytes(data))
    capsys.readouterr()
    assert main(["decompress", str(out), "-o", str(tmp_path / "r.png"), "-m", str(model)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
    assert {"truncate": "truncated", "flip": "corrupt", "other-model": "not by this one"}[damage] in err
    assert not (tmp_path / "r.png").exists()


@pytest.mark.stage
def test_init_from_checks_the_architecture(trained_run, shard_dir, eval_dir, tmp_path):
    _, final = trained_run
    before = {path.name: path.read_bytes() for path in final.iterdir()}
    cfg = tiny_stage1(tmp_path, shard_dir, eval_dir, f"init_from={final}", "codec.M=64")
    with pytest.raises(ValueError, match="holds codec"):
        stage1.run(cfg)
    assert not cfg.stage_dir.exists()  # refused before anything was written
    assert {path.name: path.read_bytes() for path in final.iterdir()} == before  # the parent is untouched
