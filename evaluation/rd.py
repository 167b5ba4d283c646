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


DB_METRICS = ("psnr", "psnr-rgb", "ms-ssim-db")


def bd_results(reference: dict, tests: list[dict], metrics: list[str], method: str = "cubic",
               allow_unreliable: bool = False) -> list[dict]:
    """One entry per (test curve, metric): ``bd_rate`` (%) and ``bd_metric`` against the reference,
    or ``refused`` with the reasons (evaluation/bd.py::unreliable) unless ``allow_unreliable``, which
    still computes them and keeps the reasons under ``unreliable``; ``error`` when none can be had."""
    from evaluation.bd import bd_metric, bd_rate, unreliable

    entries = []
    for test in tests:
        for metric in metrics:
            entry: dict = {"reference": reference["name"], "test": test["name"], "metric": metric, "method": method}
            try:
                ref, other = curve(reference, metric), curve(test, metric)
                reasons = unreliable(*ref, *other, in_db=metric in DB_METRICS)
                if reasons and not allow_unreliable:
                    entry["refused"] = reasons
                else:
                    entry.update(bd_rate=bd_rate(*ref, *other, method), bd_metric=bd_metric(*ref, *other, method))
                    if reasons:
                        entry["unreliable"] = reasons
            except (KeyError, ValueError) as err:
                entry["error"] = str(err)
            entries.append(entry)
    return entries


def bd_table(entries: list[dict]) -> str:
    """bd_results as a table, a row per test curve; refused or flagged figures say why below it."""
    metrics = list(dict.fromkeys(e["metric"] for e in entries))
    header = f"{'vs ' + entries[0]['reference']:<32}" + "".join(f"{'BD-rate ' + m:>22}{'BD-' + m:>16}" for m in metrics)
    lines, notes = [header], []
    for test in dict.fromkeys(e["test"] for e in entries):
        cells = []
        for entry in (e for e in entries if e["test"] == test):
            if "bd_rate" in entry:
                flag = "!" if "unreliable" in entry else " "
                cells.append(f"{entry['bd_rate']:>20.2f}%{flag}{entry['bd_metric']:>15.4f}")
            else:
                cells.append(f"{'refused' if 'refused' in entry else 'n/a':>38}")
            why = entry.get("refused") or entry.get("unreliable") or ([entry["error"]] if "error" in entry else [])
            if why:
                verdict = "refused" if "refused" in entry else "unreliable (!)" if "unreliable" in entry else "n/a"
                notes.append(f"{test} {entry['metric']}: {verdict}: {'; '.join(why)}")
        lines.append(f"{test:<32}" + "".join(cells))
    return "\n".join(lines + notes)
