import math

import pytest
import torch
from pytorch_msssim import ms_ssim as reference_ms_ssim

from pl_modules.core.rate_distortion import bits_per_pixel, msssim_rd_loss, mse_rd_loss, psnr
from pl_modules.core.schedules import lr_factor, step_seed

pytestmark = pytest.mark.unit


def test_bits_per_pixel_counts_minus_log2_likelihood_per_input_pixel():
    likelihoods = {"y": torch.full((1, 2, 2, 2), 0.5), "z": torch.full((1, 1, 1, 1), 0.25)}
    # 8 symbols at 1 bit + 1 symbol at 2 bits = 10 bits over a 1×3×2×2 input of 4 pixels.
    assert bits_per_pixel(likelihoods, num_pixels=4).item() == pytest.approx(2.5)


def test_mse_rd_loss_is_lambda_255_squared_mse_plus_bpp():
    x = torch.zeros(1, 3, 4, 4)
    x_hat = torch.full_like(x, 0.1)
    out = mse_rd_loss(x_hat, x, torch.tensor(0.5), lmbda=0.01)
    assert out["mse"].item() == pytest.approx(0.01)
    assert out["loss"].item() == pytest.approx(0.01 * 255**2 * 0.01 + 0.5)


def test_msssim_rd_loss_is_lambda_one_minus_msssim_plus_bpp():
    torch.manual_seed(0)
    x = torch.rand(1, 3, 192, 192)
    assert msssim_rd_loss(x, x, torch.tensor(0.3), lmbda=5.0)["loss"].item() == pytest.approx(0.3, abs=1e-5)
    x_hat = (x + 0.1 * torch.randn_like(x)).clamp(0, 1)
    out = msssim_rd_loss(x_hat, x, torch.tensor(0.3), lmbda=5.0)
    expected = reference_ms_ssim(x_hat, x, data_range=1.0).item()  # an independent implementation
    assert out["ms_ssim"].item() == pytest.approx(expected, abs=2e-3)
    assert out["loss"].item() == pytest.approx(5.0 * (1 - out["ms_ssim"].item()) + 0.3, abs=1e-5)


def test_psnr_of_a_known_error():
    x = torch.zeros(1, 3, 8, 8)
    assert psnr(x + 0.1, x) == pytest.approx(20.0)
    assert psnr(x, x) == math.inf


def test_lr_schedule_warms_up_then_decays_to_the_final_fraction():
    assert lr_factor(0, 100, 10, "cosine", 0.01) == pytest.approx(0.1)
    assert lr_factor(10, 100, 10, "cosine", 0.01) == pytest.approx(1.0)
    assert lr_factor(55, 100, 10, "cosine", 0.01) == pytest.approx(0.505)
    assert lr_factor(100, 100, 10, "cosine", 0.01) == pytest.approx(0.01)
    assert lr_factor(70, 100, 0, "constant", 0.01) == 1.0
    with pytest.raises(ValueError, match="unknown LR schedule"):
        lr_factor(1, 10, 0, "linear", 0.0)


def test_step_seeds_differ_across_steps_and_ranks_and_repeat():
    seeds = {step_seed(0, s, r) for s in range(50) for r in range(4)}
    assert len(seeds) == 200
    assert step_seed(3, 7, 1) == step_seed(3, 7, 1) < 2**63


def test_llicm_loss_weighs_its_terms_as_written():
    from pl_modules.llicm.losses import llicm_loss

    x = torch.zeros(1, 3, 2, 2)
    logits = torch.tensor([[0.0, math.log(3.0)]])  # p = (0.25, 0.75)
    out = llicm_loss(x + 0.1, x, torch.tensor(0.5), torch.tensor(1.0), logits, torch.tensor([1]), alpha=2.0, beta=3.0, gamma=4.0, classification=5.0)
    assert out["distortion"].item() == pytest.approx(0.01)
    assert out["task"].item() == pytest.approx(1.0)
    assert out["classification"].item() == pytest.approx(-math.log(0.75))
    assert out["loss"].item() == pytest.approx(2 * 0.01 + 3 * 0.5 + 4 * 1.0 - 5 * math.log(0.75))
    assert out["accuracy"].item() == 1.0


def test_diffusion_dpo_loss_against_hand_computed_values():
    from pl_modules.vlic.losses import diffusion_dpo_loss

    same = torch.tensor([0.3, 0.7])
    equal = diffusion_dpo_loss(same, same, same, same, beta=5000.0)
    assert equal["loss"].item() == pytest.approx(math.log(2))  # equal margins: σ(0) = ½
    assert equal["implicit_acc"].item() == 0.0 and equal["reward_margin"].item() == 0.0
    # The model denoises the winner 0.001 better than the reference does: inside = β/2 · 0.001.
    w, l, rw, rl = torch.tensor([0.10]), torch.tensor([0.20]), torch.tensor([0.101]), torch.tensor([0.20])
    for beta in (1000.0, 4000.0):
        out = diffusion_dpo_loss(w, l, rw, rl, beta=beta)
        inside = beta / 2 * 0.001
        assert out["loss"].item() == pytest.approx(math.log(1 + math.exp(-inside)), rel=1e-4)
        assert out["reward_margin"].item() == pytest.approx(inside, rel=1e-4)
        assert out["implicit_acc"].item() == 1.0
    worse = diffusion_dpo_loss(rw, l, w, rl, beta=1000.0)  # the other sign: the winner got worse
    assert worse["implicit_acc"].item() == 0.0 and worse["loss"].item() > math.log(2)
    assert worse["model_ref_mse"].item() == pytest.approx(0.0005, rel=1e-3)
    # Drift: |0.101 − 0.10| + |0.20 − 0.20| over 0.10 + 0.20; none at all when model = reference.
    assert worse["reference_drift"].item() == pytest.approx(0.001 / 0.30, rel=1e-4)
    assert equal["reference_drift"].item() == 0.0
    # Moves that cancel in the mean error still count: |0.1 − 0.2| = |0.3 − 0.2| = 0.1 over 0.2 + 0.2.
    apart, ref = torch.tensor([0.1, 0.3]), torch.tensor([0.2, 0.2])
    cancelling = diffusion_dpo_loss(apart, ref, ref, ref, beta=1000.0)
    assert cancelling["model_ref_mse"].item() == pytest.approx(0.0, abs=1e-7)
    assert cancelling["reference_drift"].item() == pytest.approx(0.25, rel=1e-5)
    sft = diffusion_dpo_loss(w, l, rw, rl, beta=1000.0, sft_weight=2.0)
    assert sft["loss"].item() == pytest.approx(sft["dpo"].item() + 2.0 * 0.10, rel=1e-5)


def test_the_matched_rate_weight_counts_the_distortion_that_reaches_the_codec():
    from pl_modules.llicm.losses import matched_rate_weight

    # Residual pixel prior: α + 4γ = 1 + 4·0.25 = 2 over λ·255² = 0.0067·65025 = 435.6675.
    assert matched_rate_weight(0.0067, 1.0, 0.25, True) == pytest.approx(2 / 435.6675)
    assert matched_rate_weight(0.0067, 0.0, 0.25, True) == pytest.approx(1 / 435.6675)
    assert matched_rate_weight(0.0067, 1.0, 0.25, False) == pytest.approx(1 / 435.6675)
    with pytest.raises(ValueError, match="beta cannot be derived"):
        matched_rate_weight(0.0067, 0.0, 1.0, False)


def test_semantic_consistency_against_hand_computed_values():
    from pl_modules.difficmh.losses import semantic_consistency

    z = {"mid_block": torch.tensor([1.0, 0.0]).view(1, 2, 1, 1)}
    orthogonal = {"mid_block": torch.tensor([0.0, 1.0]).view(1, 2, 1, 1)}
    assert semantic_consistency(z, orthogonal, "cosine").item() == pytest.approx(1.0)
    assert semantic_consistency(z, orthogonal, "normalized_l2").item() == pytest.approx(2.0)  # ‖(-1, 1)‖² / ‖(1, 0)‖²
    doubled = {"mid_block": 2 * z["mid_block"]}
    assert semantic_consistency(z, doubled, "cosine").item() == pytest.approx(0.0)  # direction only
    assert semantic_consistency(z, doubled, "normalized_l2").item() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="distance must be one of"):
        semantic_consistency(z, z, "l1")


@pytest.mark.parametrize("distance", ["cosine", "normalized_l2"])
def test_semantic_consistency_is_zero_for_equal_features_and_grows_with_the_perturbation(distance):
    from pl_modules.difficmh.losses import semantic_consistency

    generator = torch.Generator().manual_seed(0)
    target = {b: torch.randn(2, 8, 4, 4, generator=generator) for b in ("mid_block", "down_blocks.1")}
    noise = {b: torch.randn(2, 8, 4, 4, generator=generator) for b in target}
    values = [semantic_consistency(target, {b: target[b] + s * noise[b] for b in target}, distance).item()
              for s in (0.0, 0.1, 0.5, 2.0)]
    assert values[0] == pytest.approx(0.0, abs=1e-6)
    assert values == sorted(values) and values[-1] > 10 * values[1]
    perturbed = {b: (target[b] + noise[b]).requires_grad_() for b in target}
    semantic_consistency({b: t.requires_grad_() for b, t in target.items()}, perturbed, distance).backward()
    assert all(perturbed[b].grad.abs().sum() > 0 and target[b].grad is None for b in target)  # z's side is fixed
