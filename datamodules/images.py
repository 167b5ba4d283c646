"""Reading and writing images, and the photographs tests and the quickstart fall back on."""
from __future__ import annotations

import io
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".tif", ".tiff", ".bmp"}

# scikit-image's bundled photographs that load without a download. Two of the colour ones are a
# Hubble field and a retina, mostly black; the grey ones have the textures (grass, gravel, brick)
# and the face that Kodak is full of.
SKIMAGE_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field",
                  "immunohistochemistry", "retina", "stereo_motorcycle")
SKIMAGE_GREY_PHOTOS = ("camera", "brick", "grass", "gravel", "coins")


def list_images(folder: str | Path) -> list[Path]:
    """Image files under ``folder`` (recursively), in a deterministic order."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder not found: {folder}")
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def find_tag_file(image: Path, suffix: str = ".tags", folders: Sequence[str | Path] = ()) -> Path | None:
    """An image's tag file, ``<stem><suffix>``: beside it, or, given label ``folders`` (labels kept
    apart from the images, e.g. configs/tags/labels/), in exactly one of them; None where there is
    none. A stem in two folders is refused: which labels belong to the image would be a guess."""
    if not folders:
        sidecar = image.with_suffix(suffix)
        return sidecar if sidecar.is_file() else None
    name = image.stem + suffix
    found = [Path(folder) / name for folder in folders if (Path(folder) / name).is_file()]
    if len(found) > 1:
        raise ValueError(f"{name} (for {image}) is in more than one of {[str(f) for f in folders]}")
    return found[0] if found else None


def load_rgb(source: str | Path | bytes) -> np.ndarray:
    """An H×W×3 uint8 array; palettes, alpha, greyscale and 16-bit images are converted to RGB."""
    with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as image:
        image.load()
        if image.mode in ("I;16", "I;16B", "I;16L", "I"):
            image = Image.fromarray((np.asarray(image, dtype=np.float64) / 257).round().astype(np.uint8))
        return np.array(image.convert("RGB"))


def centre_crop(image: np.ndarray, max_side: int = 0, multiple: int = 64) -> np.ndarray:
    """The centre crop of at most ``max_side`` (0: no limit) whose sides are multiples of
    ``multiple``: the grid a codec and a VAE take without padding."""
    height, width = (min(max_side or side, side) // multiple * multiple for side in image.shape[:2])
    top, left = (image.shape[0] - height) // 2, (image.shape[1] - width) // 2
    return image[top: top + height, left: left + width]


def to_tensor(image: np.ndarray) -> torch.Tensor:
    """H×W×3 uint8 → 3×H×W float in [0, 1]."""
    if not image.flags.writeable:  # decoders may hand out read-only views of their buffers
        image = image.copy()
    return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float().div(255)


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """3×H×W (or 1×3×H×W) float in [0, 1] → H×W×3 uint8, rounding as the decoder does."""
    x = x.squeeze(0) if x.dim() == 4 else x
    return x.detach().clamp(0, 1).mul(255).round().byte().permute(1, 2, 0).cpu().numpy()


def save_png(x: torch.Tensor, path: str | Path) -> None:
    Image.fromarray(to_uint8(x)).save(path, format="PNG")


def write_skimage_photos(out_dir: str | Path) -> list[Path]:
    """Save scikit-image's bundled colour photographs as PNGs: data for machines without ../shared."""
    import skimage.data

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in SKIMAGE_PHOTOS:
        loaded = getattr(skimage.data, name)()
        # stereo_motorcycle is (left, right, disparity): keep the two photographs.
        images = [im for im in (loaded if isinstance(loaded, tuple) else (loaded,)) if im.ndim == 3]
        for i, image in enumerate(images):
            path = out_dir / (f"{name}_{i}.png" if len(images) > 1 else f"{name}.png")
            Image.fromarray(image[..., :3]).save(path)
            paths.append(path)
    return paths


def write_skimage_grey_photos(out_dir: str | Path) -> list[Path]:
    """Save scikit-image's bundled grey photographs as RGB PNGs (the three channels equal)."""
    import skimage.data

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / f"{name}.png" for name in SKIMAGE_GREY_PHOTOS]
    for name, path in zip(SKIMAGE_GREY_PHOTOS, paths):
        Image.fromarray(getattr(skimage.data, name)()).convert("RGB").save(path)
    return paths
