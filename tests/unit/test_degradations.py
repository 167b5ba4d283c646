"""Each degradation measurably degrades, as it claims, and repeats exactly under its seed."""
import numpy as np
import pytest
from scipy import ndimage

from datamodules.degradations import (TASKS, degrade, gaussian_noise, haze, inpainting_mask, low_light,
                                      rain_streaks, raindrops, shadow, shadow_mask)
from datamodules.images import list_images, load_rgb

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def photo(photo_dir):
    return load_rgb(list_images(photo_dir)[0])[:256, :256].astype(np.float32) / 255


@pytest.mark.parametrize("task", TASKS)
def test_every_task_repeats_under_its_seed_and_differs_across_seeds(task, photo):
    image = (photo * 255).astype(np.uint8)
    first, again, other = degrade(image, task, 3), degrade(image, task, 3), degrade(image, task, 4)
    assert first.dtype == np.uint8 and first.shape == image.shape
    assert np.array_equal(first, again)
    assert not np.array_equal(first, other)
    assert np.abs(first.astype(int) - image).mean() > 1.0


def test_gaussian_noise_has_the_requested_sigma():
    grey = np.full((256, 256, 3), 0.5, np.float32)
    noise = gaussian_noise(grey, np.random.default_rng(0), sigma=50) - grey
    assert noise.std() * 255 == pytest.approx(50, rel=0.03)  # clipping at 0 and 1 is rare at mid-grey
    assert abs(noise.mean()) < 0.005


def test_haze_follows_the_scattering_model_and_lowers_contrast(photo):
    depth = np.ones(photo.shape[:2])
    rng = np.random.default_rng(1)
    hazy = haze(photo, rng, depth=depth, beta=(1.0, 1.0), airlight=(0.9, 0.9))
    t = np.exp(-1.0)
    np.testing.assert_allclose(hazy, photo * t + 0.9 * (1 - t), atol=1e-6)
    assert hazy.std() == pytest.approx(photo.std() * t, rel=1e-5)
    synthetic = haze(photo, np.random.default_rng(2))
    assert local_contrast(synthetic) < 0.8 * local_contrast(photo) and synthetic.mean() > photo.mean()


def local_contrast(image):
    """RMS of the detail a 5-px blur removes: what haze washes out."""
    return np.std(image - ndimage.gaussian_filter(image, sigma=(5, 5, 0)))


def test_rain_streaks_only_brighten_and_are_oriented(photo):
    rainy = rain_streaks(np.zeros_like(photo), np.random.default_rng(0))
    assert (rainy >= 0).all() and 0.001 < (rainy[..., 0] > 0.05).mean() < 0.5
    gy, gx = np.gradient(rainy[..., 0])
    assert np.abs(gx).sum() > 1.5 * np.abs(gy).sum()  # near-vertical streaks: change across, not along
    assert (rain_streaks(photo, np.random.default_rng(0)) >= photo - 1e-6).all()


def test_raindrops_change_only_inside_drops(photo):
    dropped = raindrops(photo, np.random.default_rng(0))
    changed = np.abs(dropped - photo).max(axis=-1) > 1e-6
    assert 0.005 < changed.mean() < 0.4


def test_shadow_darkens_by_its_factor_inside_the_mask(photo):
    mask = shadow_mask(*photo.shape[:2], np.random.default_rng(5))
    dark = shadow(photo, np.random.default_rng(5), darkness=(0.4, 0.4))
    inside = mask > 0.999
    assert inside.mean() > 0.02
    np.testing.assert_allclose(dark[inside], photo[inside] * 0.4, atol=1e-3)  # mask ≥ 0.999 there
    np.testing.assert_allclose(dark[mask < 1e-6], photo[mask < 1e-6], atol=1e-6)


def test_inpainting_masks_cover_a_sensible_area():
    areas = [inpainting_mask(256, 256, np.random.default_rng(s)).mean() for s in range(10)]
    assert all(0.01 < a < 0.7 for a in areas) and len(set(areas)) == 10


def test_low_light_darkens(photo):
    assert low_light(photo, np.random.default_rng(0)).mean() < 0.3 * photo.mean()


def test_unknown_task_names_the_choices(photo):
    with pytest.raises(KeyError, match="dehaze"):
        degrade((photo * 255).astype(np.uint8), "desnow", 0)
