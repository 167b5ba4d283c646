"""Synthetic degradations for the low-level tasks of LL-ICM, each a pure function of an image
(H×W×3 floats in [0, 1]) and a seeded generator, so a (degraded, clean) pair is reproducible
from (image, task, seed). Tasks are picked by name in configs."""
from __future__ import annotations

from typing import Callable

import numpy as np
from scipy import ndimage
from skimage.draw import disk, line_aa, polygon

Degradation = Callable[[np.ndarray, np.random.Generator], np.ndarray]


def gaussian_noise(image: np.ndarray, rng: np.random.Generator, sigma: float = 50.0) -> np.ndarray:
    """Additive white Gaussian noise of ``sigma`` on the 0–255 scale (the σ=50 denoising benchmark)."""
    return np.clip(image + rng.normal(0.0, sigma / 255.0, image.shape), 0, 1).astype(np.float32)


def haze(image: np.ndarray, rng: np.random.Generator, depth: np.ndarray | None = None,
         beta: tuple[float, float] = (0.8, 2.0), airlight: tuple[float, float] = (0.75, 1.0)) -> np.ndarray:
    """Atmospheric scattering ``I = J·t + A·(1 − t)``, ``t = exp(−β·d)``; without a depth map, a
    smooth synthetic one that grows towards the top of the frame (the horizon)."""
    height, width = image.shape[:2]
    if depth is None:
        ramp = np.linspace(1.0, 0.2, height)[:, None] * np.ones((1, width))
        bumps = ndimage.gaussian_filter(rng.random((height, width)), sigma=min(height, width) / 8)
        depth = np.clip(ramp + (bumps - bumps.mean()) * 4, 0, 1)
    transmission = np.exp(-rng.uniform(*beta) * depth)[..., None]
    return (image * transmission + rng.uniform(*airlight) * (1 - transmission)).astype(np.float32)


def rain_streaks(image: np.ndarray, rng: np.random.Generator, density: float = 0.004,
                 length: tuple[int, int] = (10, 30), intensity: tuple[float, float] = (0.6, 0.9)) -> np.ndarray:
    """Sparse drops smeared along one direction (a motion-blurred particle layer), added on top."""
    height, width = image.shape[:2]
    drops = (rng.random((height, width)) < density).astype(np.float64)
    size = int(rng.integers(*length))
    kernel = np.zeros((size, size))
    angle = rng.uniform(-0.35, 0.35)  # near vertical
    dy, dx = np.cos(angle) * (size - 1) / 2, np.sin(angle) * (size - 1) / 2
    rows, cols, values = line_aa(int(round(size / 2 - dy)), int(round(size / 2 - dx)),
                                 int(round(size / 2 + dy)), int(round(size / 2 + dx)))
    keep = (rows >= 0) & (rows < size) & (cols >= 0) & (cols < size)
    kernel[rows[keep], cols[keep]] = values[keep]
    streaks = ndimage.convolve(drops, kernel / kernel.sum() * size, mode="wrap")
    streaks = np.clip(streaks * rng.uniform(*intensity), 0, 1)[..., None]
    return np.clip(image + streaks * (1 - image), 0, 1).astype(np.float32)  # screen blend


def raindrops(image: np.ndarray, rng: np.random.Generator, count: tuple[int, int] = (8, 20),
              radius: tuple[float, float] = (0.02, 0.06)) -> np.ndarray:
    """Drops on the lens: discs showing a blurred, brightened, flipped view of their surroundings."""
    height, width = image.shape[:2]
    out = image.copy()
    blurred = ndimage.gaussian_filter(image, sigma=(3, 3, 0))
    for _ in range(int(rng.integers(*count))):
        r = max(2, int(rng.uniform(*radius) * min(height, width)))
        cy, cx = int(rng.integers(r, height - r)), int(rng.integers(r, width - r))
        rows, cols = disk((cy, cx), r, shape=(height, width))
        # A drop acts as a small lens: the scene inside it is upside down.
        src_rows = np.clip(2 * cy - rows, 0, height - 1)
        out[rows, cols] = np.clip(blurred[src_rows, cols] * 1.1 + 0.05, 0, 1)
    return out.astype(np.float32)


def shadow(image: np.ndarray, rng: np.random.Generator, darkness: tuple[float, float] = (0.3, 0.6)) -> np.ndarray:
    """A soft-edged polygonal shadow multiplying the image by ``k`` inside it."""
    height, width = image.shape[:2]
    mask = shadow_mask(height, width, rng)
    factor = rng.uniform(*darkness)
    return (image * (1 - (1 - factor) * mask)[..., None]).astype(np.float32)


def shadow_mask(height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    corners = int(rng.integers(4, 8))
    rows = rng.uniform(0.1, 0.9, corners) * height
    cols = rng.uniform(0.1, 0.9, corners) * width
    order = np.argsort(np.arctan2(rows - rows.mean(), cols - cols.mean()))
    mask = np.zeros((height, width))
    mask[polygon(rows[order], cols[order], shape=(height, width))] = 1.0
    return np.clip(ndimage.gaussian_filter(mask, sigma=min(height, width) / 100), 0, 1)


def inpainting(image: np.ndarray, rng: np.random.Generator, fill: float = 0.0) -> np.ndarray:
    """Free-form strokes and boxes removed (set to ``fill``), as in inpainting benchmarks."""
    mask = inpainting_mask(*image.shape[:2], rng)
    return np.where(mask[..., None], fill, image).astype(np.float32)


def inpainting_mask(height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    mask = np.zeros((height, width), bool)
    scale = min(height, width)
    for _ in range(int(rng.integers(2, 5))):  # strokes: random walks drawn thick
        y, x = rng.uniform(0, height), rng.uniform(0, width)
        thickness = int(rng.integers(max(2, scale // 40), max(3, scale // 15)))
        for _ in range(int(rng.integers(4, 10))):
            angle, step = rng.uniform(0, 2 * np.pi), rng.uniform(0.05, 0.2) * scale
            ny, nx = np.clip(y + step * np.sin(angle), 0, height - 1), np.clip(x + step * np.cos(angle), 0, width - 1)
            for t in np.linspace(0, 1, int(step) + 1):
                rows, cols = disk((y + t * (ny - y), x + t * (nx - x)), thickness / 2, shape=(height, width))
                mask[rows, cols] = True
            y, x = ny, nx
    for _ in range(int(rng.integers(0, 3))):  # boxes
        h, w = int(rng.uniform(0.1, 0.3) * height), int(rng.uniform(0.1, 0.3) * width)
        top, left = int(rng.integers(0, height - h)), int(rng.integers(0, width - w))
        mask[top: top + h, left: left + w] = True
    return mask


def low_light(image: np.ndarray, rng: np.random.Generator, gamma: tuple[float, float] = (1.5, 2.5),
              scale: tuple[float, float] = (0.1, 0.3), sigma: float = 5.0) -> np.ndarray:
    """Under-exposure: a gamma curve, a gain below one, and sensor noise."""
    dark = image ** rng.uniform(*gamma) * rng.uniform(*scale)
    return np.clip(dark + rng.normal(0, sigma / 255.0, image.shape), 0, 1).astype(np.float32)


DEGRADATIONS: dict[str, Degradation] = {
    "dehaze": haze,
    "denoise": gaussian_noise,
    "derain": rain_streaks,
    "deraindrop": raindrops,
    "deshadow": shadow,
    "inpaint": inpainting,
    "lowlight": low_light,
}
TASKS = tuple(DEGRADATIONS)
"""Task names; a task's label (what the degradation classifier predicts) is its index here."""


def degrade(image: np.ndarray, task: str, seed: int) -> np.ndarray:
    """uint8 H×W×3 → uint8 H×W×3 degraded by ``task``, reproducibly for ``seed``."""
    if task not in DEGRADATIONS:
        raise KeyError(f"unknown degradation task '{task}'; choose one of {list(TASKS)}")
    out = DEGRADATIONS[task](image.astype(np.float32) / 255.0, np.random.default_rng(seed))
    return np.round(out * 255).astype(np.uint8)
