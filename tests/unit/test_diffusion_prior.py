"""The shared diffusion prior on a tiny random model loaded through diffusers' from_pretrained."""
import pytest
import torch

from pl_modules.prior.control_branch import expand_conv_in
from pl_modules.prior.diffusion_prior import CONV_IN_FILE, LORA_FILE, UNET_FILE, DiffusionPrior, DiffusionPriorConfig
from pl_modules.prior.presets import preset_folder
from pl_modules.prior.tiny_models import save_tiny_diffusion

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return save_tiny_diffusion(tmp_path_factory.mktemp("tiny-sd"))


def prior(folder, **overrides):
    torch.manual_seed(0)
    return DiffusionPrior(DiffusionPriorConfig(model=str(folder), local_files_only=True, **overrides))


def inputs(batch=2, size=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 4, size, size, generator=g), torch.tensor([10, 500]),
            torch.randn(batch, 4, size, size, generator=g), torch.randn(batch, 3, 32, generator=g))


def test_loads_through_from_pretrained_with_sd_structure(tiny_folder):
    model = prior(tiny_folder, vae_tile=0)
    assert model.vae_scale == 8 and model.unet.config.in_channels == 8
    x = torch.rand(1, 3, 64, 64)
    latents = model.encode(x)
    assert latents.shape == (1, 4, 8, 8) and model.decode(latents).shape == x.shape
    with pytest.raises(OSError):
        DiffusionPrior(DiffusionPriorConfig(model=str(tiny_folder / "missing"), local_files_only=True))


def test_the_condition_must_enter_in_the_unets_own_space(tiny_folder):
    with pytest.raises(ValueError, match="0 or the UNet's 4 input channels"):
        prior(tiny_folder, condition_channels=3)
    with pytest.raises(ValueError, match="set prior.lora_rank=0"):
        prior(tiny_folder, train_unet=True)
    with pytest.raises(ValueError, match="residual needs a scheduler with prediction_type 'sample'"):
        prior(tiny_folder, residual=True)  # the SD-structured preset predicts epsilon


def test_training_targets_follow_the_schedulers_prediction_type(tiny_folder):
    model = prior(tiny_folder)
    clean, noise, t = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8), torch.tensor([10, 900])
    assert torch.equal(model.training_target(clean, noise, t), noise)  # the preset predicts epsilon
    alpha_bar = model.scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    for kind, expected in (("sample", clean), ("v_prediction", alpha_bar.sqrt() * noise - (1 - alpha_bar).sqrt() * clean)):
        model.scheduler.register_to_config(prediction_type=kind)
        torch.testing.assert_close(model.training_target(clean, noise, t), expected)
    model.scheduler.register_to_config(prediction_type="flow")
    with pytest.raises(ValueError, match="unsupported scheduler prediction_type 'flow'"):
        model.training_target(clean, noise, t)


def test_the_pixel_preset_is_built_once_and_trains_whole_from_scratch(tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFCODEC_CACHE", str(tmp_path / "cache"))
    folder = preset_folder("tiny-pixel")
    assert {p.name for p in folder.iterdir()} == {"unet", "scheduler"}
    stamp = (folder / "unet" / "config.json").stat().st_mtime_ns
    assert preset_folder("tiny-pixel") == folder and (folder / "unet" / "config.json").stat().st_mtime_ns == stamp
    cfg = dict(vae=False, train_unet=True, lora_rank=0, condition_channels=3, residual=True,
               gradient_checkpointing=False)
    model = prior("tiny-pixel", **cfg)
    image = torch.rand(2, 3, 32, 32)
    assert model.vae_scale == 1 and torch.allclose(model.decode(model.encode(image)), image)
    # Untrained, the residual prior restores to exactly what it was given.
    restored = model.decode(model.sample(model.encode(image), torch.randn(2, 5, 32), torch.Generator().manual_seed(0)))
    torch.testing.assert_close(restored, image, rtol=0, atol=1e-5)
    params = model.trainable_parameters()
    assert len(params) == len(list(model.unet.parameters()))
    optimizer = torch.optim.Adam(params, lr=1e-3)
    context, t = torch.randn(2, 5, 32), torch.tensor([100, 600])
    noisy = model.scheduler.add_noise(model.encode(image), torch.randn_like(image), t)
    degraded = model.encode((image + 0.2 * torch.randn_like(image)).clamp(0, 1))
    losses = []
    for _ in range(12):
        loss = (model.denoise(noisy, t, degraded, context) - model.encode(image)).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert sum(losses[-3:]) < 0.75 * sum(losses[:3]), losses
    assert set(model.save_trained(tmp_path / "trained")) == {UNET_FILE}
    twin = prior("tiny-pixel", **cfg)
    twin.load_trained(tmp_path / "trained")
    assert all(torch.equal(a, b) for a, b in zip(twin.unet.state_dict().values(), model.unet.state_dict().values()))


def test_zero_initialised_condition_channels_leave_the_pretrained_output_unchanged(tiny_folder):
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(tiny_folder, subfolder="unet")
    noisy, t, condition, context = inputs()
    before = unet(noisy, t, encoder_hidden_states=context).sample
    expand_conv_in(unet, 4)
    after = unet(torch.cat([noisy, condition], 1), t, encoder_hidden_states=context).sample
    torch.testing.assert_close(after, before, rtol=0, atol=1e-6)
    assert unet.config.in_channels == 8


def test_only_lora_and_conv_in_train_and_adapters_off_is_neither_the_base_nor_the_trained_decoder(tiny_folder):
    model = prior(tiny_folder, gradient_checkpointing=False)
    frozen = {n: p.detach().clone() for n, p in model.unet.named_parameters() if "lora_" not in n and "conv_in" not in n}
    params = model.trainable_parameters()
    assert all(p.requires_grad for p in params)
    assert all(not p.requires_grad for n, p in model.named_parameters() if "lora_" not in n and "conv_in" not in n)
    noisy, t, condition, context = inputs()
    model.unet.disable_adapters()
    base = model.denoise(noisy, t, condition, context).detach()
    model.unet.enable_adapters()
    optimizer = torch.optim.Adam(params, lr=1e-2)
    losses = []
    for _ in range(15):
        loss = (model.denoise(noisy, t, condition, context) - noisy).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]
    for name, param in model.unet.named_parameters():
        if name in frozen:
            assert torch.equal(param, frozen[name]), name
    model.unet.disable_adapters()
    conv_in_changed = model.denoise(noisy, t, condition, context)
    model.unet.enable_adapters()
    assert not torch.allclose(conv_in_changed, base)  # conv_in trained; LoRA off is not the whole story
    assert not torch.allclose(model.denoise(noisy, t, condition, context), conv_in_changed)


def perturb(model, adapter=None):
    """Non-zero LoRA B matrices (peft starts them at zero), so that an adapter changes the output."""
    with torch.no_grad():
        for name, param in model.unet.named_parameters():
            if "lora_B" in name and (adapter is None or f".{adapter}." in name):
                param.normal_(0, 0.5)


@pytest.mark.parametrize("whole", [False, True], ids=["lora-and-conv-in", "whole-unet"])
def test_adapters_disabled_after_freeze_as_reference_is_exactly_the_stage2_decoder(tiny_folder, whole):
    settings = dict(train_unet=True, lora_rank=0) if whole else {}
    model = prior(tiny_folder, gradient_checkpointing=False, **settings)
    with torch.no_grad():
        model.unet.conv_in.weight.add_(0.1)  # stage 2 trained conv_in (or everything)
    perturb(model)
    noisy, t, condition, context = inputs()
    stage2 = model.denoise(noisy, t, condition, context).detach()
    model.freeze_as_reference("stage3", rank=4, alpha=4, targets=["to_q", "to_v"])
    trained = model.trainable_parameters()
    assert trained and all(".stage3." in n for n, p in model.unet.named_parameters() if p.requires_grad)
    assert torch.allclose(model.denoise(noisy, t, condition, context), stage2, atol=1e-5)  # B starts at 0
    perturb(model, "stage3")
    assert not torch.allclose(model.denoise(noisy, t, condition, context), stage2, atol=1e-3)
    with model.adapters_disabled():
        assert torch.allclose(model.denoise(noisy, t, condition, context), stage2, atol=1e-5)
    assert not torch.allclose(model.denoise(noisy, t, condition, context), stage2, atol=1e-3)  # re-enabled


def test_diffusion_loss_is_per_sample_and_shared_noise_gives_equal_losses(tiny_folder):
    model = prior(tiny_folder, gradient_checkpointing=False)
    x0, t, condition, context = inputs()
    noise = torch.randn_like(x0)
    first = model.diffusion_loss(x0, condition, context, noise=noise, timesteps=t)
    assert first.shape == (2,)
    assert torch.equal(first, model.diffusion_loss(x0, condition, context, noise=noise, timesteps=t))
    noisy = model.scheduler.add_noise(x0, noise, t)
    by_hand = (model.denoise(noisy, t, condition, context) - model.training_target(x0, noise, t)).pow(2)
    assert torch.allclose(first, by_hand.mean(dim=(1, 2, 3)))
    torch.manual_seed(3)
    drawn = model.diffusion_loss(x0, condition, context)
    assert not torch.allclose(drawn, first)


def test_feature_hooks_capture_named_blocks_and_are_always_removed(tiny_folder):
    model = prior(tiny_folder, gradient_checkpointing=False)
    noisy, t, condition, context = inputs()
    hooks = lambda: sum(len(m._forward_hooks) for m in model.unet.modules())  # noqa: E731
    before = hooks()
    with model.features(["mid_block", "down_blocks.0"]) as captured:
        model.denoise(noisy, t, condition, context)
        assert hooks() == before + 2
    assert set(captured) == {"mid_block", "down_blocks.0"} and captured["mid_block"].shape[0] == 2
    assert hooks() == before
    with pytest.raises(RuntimeError), model.features(["mid_block"]):
        raise RuntimeError("a failing pass")
    assert hooks() == before
    with pytest.raises(ValueError, match="no blocks"), model.features(["nope"]):
        pass


def test_trained_weights_round_trip_alone_and_strictly(tiny_folder, tmp_path):
    model = prior(tiny_folder)
    with torch.no_grad():
        for p in model.trainable_parameters():
            p.add_(0.01 * torch.randn_like(p))
    files = model.save_trained(tmp_path / "trained")
    assert set(files) == {LORA_FILE, CONV_IN_FILE}
    assert sum(f.stat().st_size for f in files.values()) < 0.2 * sum(
        p.numel() * 4 for p in model.unet.parameters())  # adapters alone, not the UNet
    twin = prior(tiny_folder)
    twin.load_trained(tmp_path / "trained")
    noisy, t, condition, context = inputs()
    with torch.no_grad():
        torch.testing.assert_close(twin.denoise(noisy, t, condition, context),
                                   model.denoise(noisy, t, condition, context))
    other = prior(tiny_folder, lora_rank=4)
    with pytest.raises(ValueError, match="does not match this LoRA configuration"):
        other.load_trained(tmp_path / "trained")


def test_ddim_sampling_is_seeded_and_takes_the_configured_steps(tiny_folder):
    model = prior(tiny_folder, sample_steps=3)
    _, _, condition, context = inputs(batch=1)
    a = model.sample(condition, context[:1], torch.Generator().manual_seed(5))
    b = model.sample(condition, context[:1], torch.Generator().manual_seed(5))
    assert torch.equal(a, b) and len(model.scheduler.timesteps) == 3
    assert not torch.equal(a, model.sample(condition, context[:1], torch.Generator().manual_seed(6)))


# The peak from /proc, reset once the model is loaded: ru_maxrss would carry the high-water mark of
# the parent that forked this process (pytest, after tests that trained something) across exec.
PEAK_RSS = """
import sys, torch
sys.path.insert(0, {root!r})
from pl_modules.prior.diffusion_prior import DiffusionPrior, DiffusionPriorConfig
def status_kib(field):
    line = next(l for l in open("/proc/self/status") if l.startswith(field + ":"))
    return int(line.split()[1])
model = DiffusionPrior(DiffusionPriorConfig(model={folder!r}, vae_tile={tile}, local_files_only=True))
open("/proc/self/clear_refs", "w").write("5")  # reset VmHWM to the current RSS
before = status_kib("VmRSS")
with torch.no_grad():
    image = model.decode(torch.randn(1, 4, 128, 128))
assert image.shape == (1, 3, 1024, 1024) and torch.isfinite(image).all()
print(status_kib("VmHWM") - before)
"""


def test_tiled_vae_decodes_a_1k_image_in_a_fraction_of_the_memory(tiny_folder):
    import subprocess
    import sys

    from conftest import ROOT

    def peak_kib(tile):
        script = PEAK_RSS.format(root=str(ROOT), folder=str(tiny_folder), tile=tile)
        result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-2000:]
        return int(result.stdout.split()[-1])

    whole, tiled = peak_kib(0), peak_kib(128)
    assert tiled < 0.4 * whole, (tiled, whole)


def test_frozen_weights_in_bfloat16_train_fp32_adapters_under_autocast(tiny_folder):
    model = prior(tiny_folder, frozen_dtype="bfloat16", gradient_checkpointing=False)
    params = model.trainable_parameters()
    assert params and all(p.dtype == torch.float32 for p in params)
    assert model.vae.encoder.conv_in.weight.dtype == torch.bfloat16
    assert all(p.dtype == torch.bfloat16 for n, p in model.unet.named_parameters()
               if "lora_" not in n and not n.startswith("conv_in."))
    noisy, t, condition, context = inputs()
    with torch.autocast("cpu", torch.bfloat16):
        loss = (model.denoise(noisy, t, condition, context).float() - noisy).pow(2).mean()
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in params)
    # Outside a trainer's autocast too (evaluate, restore): float32 in, float32 image out.
    with torch.no_grad():
        image = model.decode(model.sample(model.encode(torch.rand(1, 3, 64, 64)), context[:1]))
    assert image.dtype == torch.float32 and image.shape == (1, 3, 64, 64) and torch.isfinite(image).all()
    with pytest.raises(ValueError, match="float32 or bfloat16"):
        prior(tiny_folder, frozen_dtype="float16")


def test_the_frozen_text_encoder_gives_prompt_tokens_for_cross_attention(tiny_folder):
    model = prior(tiny_folder, text_encoder=True)
    tokens = model.encode_text(["a photo of rain", ""])
    assert tokens.shape == (2, 77, model.unet.config.cross_attention_dim)
    assert not torch.allclose(tokens[0], tokens[1])
    assert not any(p.requires_grad for p in model.text_model.parameters())
    _, t, condition, _ = inputs()
    noisy = torch.randn_like(condition)
    with torch.no_grad():
        assert model.denoise(noisy, t, condition, tokens).shape == noisy.shape


def test_freezing_a_bf16_prior_fuses_in_float32_and_trains_a_float32_adapter(tiny_folder):
    model = prior(tiny_folder, gradient_checkpointing=False, frozen_dtype="bfloat16")
    perturb(model)
    model.freeze_as_reference("stage3", rank=4, alpha=4, targets=["to_q", "to_v"])
    trained = model.trainable_parameters()
    assert trained and all(p.dtype == torch.float32 for p in trained)
    frozen = [p for n, p in model.unet.named_parameters() if not model.is_trained(n)]
    assert all(p.dtype == torch.bfloat16 for p in frozen)


def test_a_controlnet_branch_starts_as_the_base_unet_trains_whole_and_round_trips_strictly(tiny_folder, tmp_path):
    from pl_modules.prior.control_branch import CONTROLNET_FILE

    base = prior(tiny_folder, condition_channels=0, lora_rank=0, gradient_checkpointing=False)
    model = prior(tiny_folder, control="controlnet", gradient_checkpointing=False)
    noisy, t, condition, context = inputs()
    assert model.unet.config.in_channels == 4  # the condition does not enter conv_in
    with torch.no_grad():
        torch.testing.assert_close(model.denoise(noisy, t, condition, context),
                                   base.denoise(noisy, t, None, context), rtol=0, atol=1e-5)  # zero convolutions
    params = model.trainable_parameters()
    assert sum(p.numel() for p in model.controlnet.parameters()) <= sum(p.numel() for p in params)
    loss = model.diffusion_loss(noisy, condition, context, timesteps=t).mean()
    loss.backward()
    assert model.controlnet.controlnet_mid_block.weight.grad.abs().sum() > 0  # the zero conv learns first
    with torch.no_grad():
        for p in params:
            p.add_(0.01 * torch.randn_like(p))
        moved = model.denoise(noisy, t, condition, context)
    assert not torch.allclose(moved, base.denoise(noisy, t, None, context), atol=1e-4)
    assert set(model.save_trained(tmp_path / "trained")) == {LORA_FILE, CONTROLNET_FILE}
    twin = prior(tiny_folder, control="controlnet", gradient_checkpointing=False)
    twin.load_trained(tmp_path / "trained")
    with torch.no_grad():
        torch.testing.assert_close(twin.denoise(noisy, t, condition, context), moved)
    with pytest.raises(ValueError, match="prior.control must be one of"):
        prior(tiny_folder, control="adapter")


def test_tile_offsets_and_blend_weights_by_hand():
    from pl_modules.prior.latent_tiles import blend_ramp, tile_starts

    assert tile_starts(64, 32, 8) == [0, 24, 32] and tile_starts(32, 32, 8) == [0] and tile_starts(20, 32, 8) == [0]
    ramp = blend_ramp(6, 6, 2)[0, 0, 2]  # a middle row: the vertical ramp is 1 there
    torch.testing.assert_close(ramp, torch.tensor([1, 2, 3, 3, 2, 1]) / 3)


def test_tiled_sampling_blends_tiles_exactly_and_is_whole_when_one_tile_fits(tiny_folder, monkeypatch):
    model = prior(tiny_folder, latent_tile=16, gradient_checkpointing=False)
    noisy, t, condition, context = inputs(size=40)
    calls = []

    def pointwise(x, timesteps, cond, ctx):  # a position-wise "UNet": blending must give it back exactly
        calls.append(x.shape[-2:])
        return 2 * x - cond

    monkeypatch.setattr(model, "denoise", pointwise)
    torch.testing.assert_close(model.denoise_tiled(noisy, t, condition, context), 2 * noisy - condition)
    assert len(calls) == 9 and all(shape == (16, 16) for shape in calls)  # offsets 0, 12, 24 on each side
    monkeypatch.undo()
    small = inputs(size=16)
    with torch.no_grad():
        torch.testing.assert_close(model.denoise_tiled(*small), model.denoise(*small), rtol=0, atol=0)
    with pytest.raises(ValueError, match="latent_tile must be 0 or a positive multiple of 8"):
        prior(tiny_folder, latent_tile=12)
