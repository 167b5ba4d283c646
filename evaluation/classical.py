"""Classical codecs as anchors, through Pillow: real files, bpp from their bytes."""
from __future__ import annotations

import io

import numpy as np
from PIL import Image

PIL_FORMATS = {"jpeg": "JPEG", "webp": "WEBP"}


def encode(image: np.ndarray, codec: str, quality: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format=PIL_FORMATS[codec], quality=quality)
    return buffer.getvalue()


def decode(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB"))


def psnr_uint8(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255**2 / mse)


def psnr_at_bpp(image: np.ndarray, target_bpp: float, codec: str = "jpeg") -> tuple[float, float]:
    """(bpp, PSNR) of ``codec`` at ``target_bpp``: PSNR interpolated linearly in bpp between the two
    qualities whose files bracket the target (the nearest quality where none does)."""
    pixels = image.shape[0] * image.shape[1]
    points = []
    for quality in range(1, 101):
        data = encode(image, codec, quality)
        points.append((8 * len(data) / pixels, psnr_uint8(decode(data), image)))
    points.sort()
    below = [p for p in points if p[0] <= target_bpp]
    above = [p for p in points if p[0] >= target_bpp]
    if not below or not above:
        return min(points, key=lambda p: abs(p[0] - target_bpp))
    (b0, p0), (b1, p1) = below[-1], above[0]
    weight = 0.0 if b1 == b0 else (target_bpp - b0) / (b1 - b0)
    return target_bpp, p0 + weight * (p1 - p0)
