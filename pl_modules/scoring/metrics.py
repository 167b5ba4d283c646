"""Image-quality metrics by name. A metric whose weights are not on this machine is reported as
unavailable, with the reason, and skipped: never a number from an untrained backbone.

Full-reference metrics take (reconstruction, original) as 1×3×H×W floats in [0, 1]; no-reference
metrics take the reconstruction alone. Higher is better unless ``lower_is_better``.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Callable, Optional

import torch

from foundation.locations import cache_dir
from pl_modules.core.rate_distortion import MS_SSIM_MIN_SIDE, psnr


@dataclass(frozen=True)
class Metric:
    name: str
    compute: Callable[..., float]
    reference: bool = True
    """Full-reference (compares with the original) or no-reference."""
    lower_is_better: bool = False
    unavailable: Callable[[], Optional[str]] = lambda: None


class Unavailable(RuntimeError):
    """A metric that cannot run here; its message is the reason shown in results."""


def hub_weights(*files: str) -> Callable[[], Optional[str]]:
    """Missing weight files in torch hub's cache (where torchvision and piq look first)."""
    def check() -> Optional[str]:
        folder = cache_dir("metric-weights")
        missing = [f for f in files if not (folder / f).is_file()]
        return f"needs weights {', '.join(missing)} in {folder}" if missing else None
    return check


def _ms_ssim(x_hat: torch.Tensor, x: torch.Tensor) -> float:
    from torchmetrics.functional.image import multiscale_structural_similarity_index_measure

    if min(x.shape[-2:]) < MS_SSIM_MIN_SIDE:
        return float("nan")
    return multiscale_structural_similarity_index_measure(x_hat, x, data_range=1.0).item()


def _piq(name: str) -> Callable[[torch.Tensor, torch.Tensor], float]:
    def compute(x_hat: torch.Tensor, x: torch.Tensor) -> float:
        import piq

        return getattr(piq, name)(x_hat.clamp(0, 1), x, data_range=1.0).item()
    return compute


@cache
def _piq_model(name: str):
    import piq

    return getattr(piq, name)().eval()


def _piq_loss(name: str) -> Callable[[torch.Tensor, torch.Tensor], float]:
    def compute(x_hat: torch.Tensor, x: torch.Tensor) -> float:
        with torch.no_grad():
            return _piq_model(name)(x_hat.clamp(0, 1), x).item()
    return compute


@cache
def _brisque_model():
    from brisque import BRISQUE

    return BRISQUE(url=False)


def _brisque(x_hat: torch.Tensor) -> float:
    image = x_hat[0].clamp(0, 1).mul(255).round().byte().permute(1, 2, 0).numpy()
    return float(_brisque_model().score(image))


def _brisque_unavailable() -> Optional[str]:
    try:
        import brisque  # noqa: F401
    except ImportError as err:
        return f"brisque is not importable ({err})"
    return None


def _pyiqa(name: str) -> Callable[[torch.Tensor], float]:
    def compute(x_hat: torch.Tensor) -> float:
        return float(_pyiqa_model(name)(x_hat.clamp(0, 1)).item())
    return compute


@cache
def _pyiqa_model(name: str):
    import pyiqa

    return pyiqa.create_metric(name, device="cpu", as_loss=False)


def _pyiqa_unavailable(*needed: Callable[[], Optional[str]]) -> Callable[[], Optional[str]]:
    """pyiqa (the optional ``iqa`` extra) must be importable and every weight file already present."""
    def check() -> Optional[str]:
        try:
            import pyiqa  # noqa: F401
        except ImportError:
            return "needs pyiqa (pip install '.[iqa]') and its weights"
        reasons = [why for why in (check() for check in needed) if why]
        return "; ".join(reasons) or None
    return check


def local_file(path: Path) -> Callable[[], Optional[str]]:
    return lambda: None if path.is_file() else f"needs weights {path}"


def hf_cached(repo: str) -> Callable[[], Optional[str]]:
    def check() -> Optional[str]:
        from huggingface_hub import try_to_load_from_cache

        return None if isinstance(try_to_load_from_cache(repo, "config.json"), str) else f"needs {repo} in the HF cache"
    return check


VGG16 = "vgg16-397923af.pth"
# LIQE: pyiqa's KonIQ-trained weights plus OpenAI's CLIP ViT-B/32; Q-Align: the q-future/one-align model.
LIQE = _pyiqa_unavailable(lambda: local_file(Path(torch.hub.get_dir()) / "pyiqa" / "liqe_koniq.pt")(),
                          lambda: local_file(Path.home() / ".cache" / "clip" / "ViT-B-32.pt")())
QALIGN = _pyiqa_unavailable(lambda: hf_cached("q-future/one-align")())
METRICS: dict[str, Metric] = {}


def register_metric(metric: Metric) -> None:
    if metric.name in METRICS:
        raise KeyError(f"metric '{metric.name}' is already registered")
    METRICS[metric.name] = metric


for _metric in (
    Metric("psnr", psnr),
    Metric("ms-ssim", _ms_ssim),
    Metric("gmsd", _piq("gmsd"), lower_is_better=True),
    Metric("vif", _piq("vif_p")),
    Metric("haarpsi", _piq("haarpsi")),
    Metric("lpips", _piq_loss("LPIPS"), lower_is_better=True, unavailable=hub_weights(VGG16, "lpips_weights.pt")),
    Metric("dists", _piq_loss("DISTS"), lower_is_better=True, unavailable=hub_weights(VGG16, "dists_weights.pt")),
    Metric("brisque", _brisque, reference=False, lower_is_better=True, unavailable=_brisque_unavailable),
    Metric("liqe", _pyiqa("liqe"), reference=False, unavailable=LIQE),
    Metric("qalign", _pyiqa("qalign"), reference=False, unavailable=QALIGN),
):
    register_metric(_metric)


def availability(names: list[str]) -> dict[str, Optional[str]]:
    """name → None when it can run, else the reason it cannot; unknown names fail here."""
    unknown = [n for n in names if n not in METRICS]
    if unknown:
        raise ValueError(f"unknown metrics {unknown}; choose from {sorted(METRICS)}")
    return {name: METRICS[name].unavailable() for name in names}


def measure(names: list[str], x_hat: torch.Tensor, x: torch.Tensor) -> dict[str, float]:
    """Every available metric of one image pair (check :func:`availability` first)."""
    return {name: (METRICS[name].compute(x_hat, x) if METRICS[name].reference else METRICS[name].compute(x_hat))
            for name in names}
