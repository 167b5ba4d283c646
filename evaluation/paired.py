"""Paired per-image differences between two methods at the same rate setting, from ``evaluate``'s
per_image.csv: the mean difference with a 95 % bootstrap interval that resamples images, and whether
the bitrates match closely enough for the difference to mean anything at that setting."""
from __future__ import annotations

import csv
from collections import defaultdict
from pathlib import Path

import numpy as np

MAX_RATE_RATIO = 1.1
"""A test point matches its reference when it spends at most this many times the reference's bpp."""


def bootstrap_mean(values: np.ndarray, resamples: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """(mean, 2.5 %, 97.5 %) of the mean of ``values`` (one per image) over bootstrap resamples."""
    values = np.asarray(values, float)
    picks = np.random.default_rng(seed).integers(0, len(values), size=(resamples, len(values)))
    means = values[picks].mean(axis=1)
    return float(values.mean()), float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def read_rows(path: str | Path) -> dict[tuple[str, str], dict[str, dict]]:
    """(method, setting) → image → row (numbers as floats) of a per_image.csv."""
    table: dict[tuple[str, str], dict[str, dict]] = defaultdict(dict)
    with open(path, newline="") as handle:
        for row in csv.DictReader(handle):
            numbers = {k: float(v) for k, v in row.items() if k not in ("method", "setting", "image") and v != ""}
            table[(row["method"], row["setting"])][row["image"]] = numbers
    return table


def paired_differences(table: dict[tuple[str, str], dict[str, dict]], reference: str, test: str, metric: str,
                       max_rate_ratio: float = MAX_RATE_RATIO) -> list[dict]:
    """Per setting both methods have: test − reference of ``metric`` over the images both scored."""
    out = []
    for (method, setting), ref_rows in sorted(table.items()):
        test_rows = table.get((test, setting))
        if method != reference or test_rows is None:
            continue
        images = sorted(set(ref_rows) & set(test_rows))
        if not images:
            continue
        if any(metric not in rows[i] for rows in (ref_rows, test_rows) for i in images):
            raise ValueError(f"metric '{metric}' is not in every row of {reference} and {test}; the columns are "
                             f"{sorted(next(iter(ref_rows.values())))}")
        ref_bpp = float(np.mean([ref_rows[i]["bpp"] for i in images]))
        test_bpp = float(np.mean([test_rows[i]["bpp"] for i in images]))
        delta, low, high = bootstrap_mean(np.array([test_rows[i][metric] - ref_rows[i][metric] for i in images]))
        out.append({"setting": setting, "reference": reference, "test": test, "metric": metric,
                    "n_images": len(images), "bpp_reference": ref_bpp, "bpp_test": test_bpp,
                    "rate_ratio": test_bpp / ref_bpp, "matched": test_bpp <= max_rate_ratio * ref_bpp,
                    "reference_mean": float(np.mean([ref_rows[i][metric] for i in images])),
                    "test_mean": float(np.mean([test_rows[i][metric] for i in images])),
                    "delta": delta, "ci_low": low, "ci_high": high})
    return out


def paired_table(entries: list[dict]) -> str:
    """Markdown: one row per (test, setting)."""
    lines = ["| setting | test | reference | bpp test / ref | matched | test | reference | Δ (95 % CI) | images |",
             "|---|---|---|---|---|---|---|---|---|"]
    for e in entries:
        lines.append(f"| {e['setting']} | {e['test']} | {e['reference']} | {e['bpp_test']:.3f} / {e['bpp_reference']:.3f} "
                     f"| {'yes' if e['matched'] else 'no'} | {e['test_mean']:.2f} | {e['reference_mean']:.2f} "
                     f"| {e['delta']:+.2f} [{e['ci_low']:+.2f}, {e['ci_high']:+.2f}] | {e['n_images']} |")
    return "\n".join(lines)
