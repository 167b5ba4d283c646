"""Rate–distortion results in CompressAI's JSON format, and RD plots."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

# Manifest metric (after the stage's validation prefix) → CompressAI results key.
RD_KEYS = {"psnr": "psnr-rgb", "ms_ssim": "ms-ssim", "lpips": "lpips"}


def rd_results(name: str, description: str, points: list[tuple[dict[str, Any], dict[str, float]]],
               prefix: str = "val/") -> dict:
    """One curve from (grid point, manifest metrics) pairs, ordered by rate; ``prefix`` picks the
    metrics (stage 1 logs val/bpp, stage 2 val/all/bpp over every task and val/<task>/bpp per task)."""
    ordered = sorted(points, key=lambda pm: pm[1][f"{prefix}bpp"])
    results = {"bpp": [m[f"{prefix}bpp"] for _, m in ordered]}
    for metric, key in RD_KEYS.items():
        if all(prefix + metric in m for _, m in ordered):
            results[key] = [m[prefix + metric] for _, m in ordered]
    return {"name": name, "description": description, "results": results, "points": [p for p, _ in ordered]}


def plot_rd(curves: list[dict], out: str | Path) -> Path:
    """Every metric against bpp, one panel per metric, every curve on each panel."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [k for k in curves[0]["results"] if k != "bpp"]
    columns = min(3, len(metrics))
    rows = math.ceil(len(metrics) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(5 * columns, 4 * rows), squeeze=False)
    for axis in axes.flat[len(metrics):]:
        axis.axis("off")
    for axis, metric in zip(axes.flat, metrics):
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


def curve(results: dict, metric: str) -> tuple[list[float], list[float]]:
    """(bpp, metric) of a CompressAI-format results dict; 'psnr' and 'psnr-rgb' are one metric, and
    'ms-ssim-db' is MS-SSIM as −10·log10(1 − MS-SSIM), the scale BD figures for it use."""
    values = results["results"]
    if metric == "ms-ssim-db":
        return values["bpp"], [-10 * math.log10(1 - v) for v in values["ms-ssim"]]
    for key in ((metric, "psnr-rgb", "psnr") if metric in ("psnr", "psnr-rgb") else (metric,)):
        if key in values:
            return values["bpp"], values[key]
    raise KeyError(f"{results.get('name', '?')} has no '{metric}' results")


def bd_table(reference: dict, tests: list[dict], metrics: list[str], method: str = "cubic") -> str:
    """BD-rate (%) and BD-metric of every test curve against the reference, one row per test."""
    from evaluation.bd import bd_metric, bd_rate

    header = f"{'vs ' + reference['name']:<32}" + "".join(f"{'BD-rate ' + m:>22}{'BD-' + m:>16}" for m in metrics)
    lines = [header]
    for test in tests:
        cells = []
        for metric in metrics:
            try:
                ref, other = curve(reference, metric), curve(test, metric)
                cells.append(f"{bd_rate(*ref, *other, method):>21.2f}%{bd_metric(*ref, *other, method):>16.4f}")
            except (KeyError, ValueError) as err:
                cells.append(f"{'n/a (' + str(err)[:30] + ')':>38}")
        lines.append(f"{test['name']:<32}" + "".join(cells))
    return "\n".join(lines)
