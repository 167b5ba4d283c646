"""Classical codecs as anchors: real files, bpp from their bytes. Pillow gives JPEG, WebP, AVIF
and JPEG 2000; imagecodecs gives JPEG XL; ffmpeg (when on the PATH) gives HEVC intra."""
from __future__ import annotations

import io
import shutil
import subprocess
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
from PIL import Image, features


@dataclass(frozen=True)
class ClassicalCodec:
    name: str
    ladder: tuple[float, ...]
    """Settings from low to high quality."""
    encode: Callable[[np.ndarray, float], bytes]
    decode: Callable[[bytes, tuple[int, int]], np.ndarray]
    unavailable: Callable[[], Optional[str]] = lambda: None
    """Why the codec cannot run here, or None."""


def _pil_encode(fmt: str, **options) -> Callable[[np.ndarray, float], bytes]:
    def encode(image: np.ndarray, setting: float) -> bytes:
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format=fmt, **{k: v(setting) for k, v in options.items()})
        return buffer.getvalue()
    return encode


def _pil_decode(data: bytes, shape: tuple[int, int]) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB"))


def _jxl_encode(image: np.ndarray, distance: float) -> bytes:
    import imagecodecs

    return bytes(imagecodecs.jpegxl_encode(image, distance=distance))


def _jxl_decode(data: bytes, shape: tuple[int, int]) -> np.ndarray:
    import imagecodecs

    return np.asarray(imagecodecs.jpegxl_decode(data))[..., :3]


def _jxl_unavailable() -> Optional[str]:
    try:
        import imagecodecs
    except ImportError:
        return "imagecodecs is not installed"
    return None if imagecodecs.JPEGXL.available else "imagecodecs was built without JPEG XL"


def _ffmpeg(args: list[str], data: bytes) -> bytes:
    result = subprocess.run(["ffmpeg", "-v", "error", *args], input=data, capture_output=True, check=True)
    return result.stdout


def _hevc_encode(image: np.ndarray, qp: float) -> bytes:
    height, width = image.shape[:2]
    # 4:4:4 intra, as the learned-compression literature's "HEVC (x265, 444)" anchor; the raw
    # elementary stream, so container bytes do not count against it.
    return _ffmpeg(["-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{width}x{height}", "-i", "-",
                    "-c:v", "libx265", "-preset", "medium", "-x265-params", f"keyint=1:qp={int(qp)}:log-level=error",
                    "-pix_fmt", "yuv444p", "-f", "hevc", "-"], image.tobytes())


def _hevc_decode(data: bytes, shape: tuple[int, int]) -> np.ndarray:
    raw = _ffmpeg(["-f", "hevc", "-i", "-", "-f", "rawvideo", "-pix_fmt", "rgb24", "-"], data)
    return np.frombuffer(raw, np.uint8).reshape(shape[0], shape[1], 3)


def _hevc_unavailable() -> Optional[str]:
    if shutil.which("ffmpeg") is None:
        return "ffmpeg is not on the PATH"
    encoders = subprocess.run(["ffmpeg", "-v", "error", "-encoders"], capture_output=True, text=True).stdout
    return None if "libx265" in encoders else "this ffmpeg has no libx265 encoder"


def _pil_feature(feature: str) -> Callable[[], Optional[str]]:
    return lambda: None if features.check(feature) else f"Pillow was built without {feature}"


CODECS: dict[str, ClassicalCodec] = {c.name: c for c in (
    ClassicalCodec("jpeg", (5, 10, 20, 30, 40, 50, 60, 70, 80, 90, 95),
                   _pil_encode("JPEG", quality=int), _pil_decode, _pil_feature("jpg")),
    ClassicalCodec("webp", (5, 10, 20, 30, 40, 50, 60, 70, 80, 90, 95),
                   _pil_encode("WEBP", quality=int), _pil_decode, _pil_feature("webp")),
    ClassicalCodec("avif", (10, 20, 30, 40, 50, 60, 70, 80, 90),
                   _pil_encode("AVIF", quality=int), _pil_decode, _pil_feature("avif")),
    # JPEG 2000's setting is the compression ratio (24 bpp / ratio), highest ratio first.
    ClassicalCodec("jpeg2000", (200, 120, 80, 50, 30, 20, 12, 8),
                   _pil_encode("JPEG2000", quality_mode=lambda r: "rates", quality_layers=lambda r: [r],
                               irreversible=lambda r: True, mct=lambda r: 1),
                   _pil_decode, _pil_feature("jpg_2000")),
    ClassicalCodec("jpegxl", (8.0, 5.0, 3.0, 2.0, 1.5, 1.0, 0.6, 0.3), _jxl_encode, _jxl_decode, _jxl_unavailable),
    ClassicalCodec("hevc", (45, 40, 36, 32, 28, 24, 20), _hevc_encode, _hevc_decode, _hevc_unavailable),
)}


def code(image: np.ndarray, codec: str, setting: float) -> tuple[bytes, np.ndarray]:
    """(file bytes, decoded image) of one image at one setting."""
    spec = CODECS[codec]
    data = spec.encode(image, setting)
    return data, spec.decode(data, image.shape[:2])


def psnr_uint8(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255**2 / mse)


def psnr_at_bpp(image: np.ndarray, target_bpp: float, codec: str = "jpeg") -> tuple[float, float]:
    """(bpp, PSNR) of JPEG/WebP at ``target_bpp``: PSNR interpolated linearly in bpp between the two
    coded qualities whose files bracket the target (the nearest quality where none does). Qualities
    are bisected, then the ones next to the bracket coded too: a file's size rises with quality but
    for a few bytes here and there (1 of 2,376 steps of JPEG on Kodak, 3 of 594 of WebP)."""
    pixels = image.shape[0] * image.shape[1]
    points: dict[int, tuple[float, float]] = {}

    def bpp_of(quality: int) -> float:
        if quality not in points:
            data, decoded = code(image, codec, quality)
            points[quality] = (8 * len(data) / pixels, psnr_uint8(decoded, image))
        return points[quality][0]

    low, high = 1, 100
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if bpp_of(middle) <= target_bpp else (low, middle)
    for quality in range(max(1, low - 2), min(100, high + 2) + 1):
        bpp_of(quality)
    curve = sorted(points.values())
    below = [p for p in curve if p[0] <= target_bpp]
    above = [p for p in curve if p[0] >= target_bpp]
    if not below or not above:
        return min(curve, key=lambda p: abs(p[0] - target_bpp))
    (b0, p0), (b1, p1) = below[-1], above[0]
    weight = 0.0 if b1 == b0 else (target_bpp - b0) / (b1 - b0)
    return target_bpp, p0 + weight * (p1 - p0)
