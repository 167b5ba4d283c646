import numpy as np
import pytest
import torch

from evaluation import distribution
from evaluation.evaluate import EvaluateConfig, run

pytestmark = pytest.mark.unit


def test_patches_cover_the_aligned_and_the_half_shifted_grid():
    x = torch.rand(1, 3, 512, 768)
    crops = distribution.patches(x)
    assert crops.shape == (3 * 2 + 2 * 1, 3, 256, 256)
    assert torch.equal(crops[0], x[0, :, :256, :256]) and torch.equal(crops[6], x[0, :, 128:384, 128:384])
    assert distribution.patches(torch.rand(1, 3, 100, 100)).shape[0] == 0


def test_fid_is_zero_for_equal_sets_and_the_squared_shift_for_a_shifted_set():
    rng = np.random.default_rng(0)
    real = rng.normal(size=(400, 8))
    shift = np.array([3.0, 0, 0, 1.0, 0, 0, 0, 0])
    assert distribution.fid_kid(real, real)["fid"] == pytest.approx(0, abs=1e-3)  # piq: iterative sqrtm
    # Same covariance, means apart by `shift`: FID = |shift|² exactly.
    assert distribution.fid_kid(real, real + shift)["fid"] == pytest.approx(10.0, abs=1e-3)
    assert distribution.fid_kid(real, real + shift)["kid"] > distribution.fid_kid(real, real)["kid"]


def test_without_inception_weights_fid_and_kid_are_reported_unavailable(eval_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    curves = run(EvaluateConfig(images=str(eval_dir), classical=["jpeg"], metrics=["psnr"], workers=1,
                                max_images=1, out_dir=str(tmp_path / "out")))
    assert distribution.FID_WEIGHTS in curves["jpeg"]["unavailable"]["fid"]
    assert "fid" not in curves["jpeg"]["results"]
