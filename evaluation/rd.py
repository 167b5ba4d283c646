"""Rate–distortion results in CompressAI's JSON format, and RD plots."""
from __future__ import annotations

from pathlib import Path
from typing import Any

# Manifest metric → CompressAI results key.
RD_KEYS = {"val/psnr": "psnr-rgb", "val/ms_ssim": "ms-ssim"}


def rd_results(name: str, description: str, points: list[tuple[dict[str, Any], Any]]) -> dict:
    """One curve from (grid point, manifest) pairs, ordered by rate."""
    ordered = sorted(points, key=lambda pm: pm[1].metrics["val/bpp"])
    results = {"bpp": [m.metrics["val/bpp"] for _, m in ordered]}
    for metric, key in RD_KEYS.items():
        if all(metric in m.metrics for _, m in ordered):
            results[key] = [m.metrics[metric] for _, m in ordered]
    return {"name": name, "description": description, "results": results,
            "points": [{**point, "lmbda": m.lmbda} for point, m in ordered]}


def plot_rd(curves: list[dict], out: str | Path) -> Path:
    """Every metric against bpp, one panel per metric, every curve on each panel."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [k for k in curves[0]["results"] if k != "bpp"]
    fig, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 4), squeeze=False)
    for axis, metric in zip(axes[0], metrics):
        for curve in curves:
            if metric in curve["results"]:
                axis.plot(curve["results"]["bpp"], curve["results"][metric], "o-", label=curve["name"])
        axis.set_xlabel("bpp")
        axis.set_ylabel(metric)
        axis.grid(True, alpha=0.3)
        axis.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return Path(out)
