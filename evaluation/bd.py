"""Bjøntegaard deltas between two RD curves: the classic cubic fit, and the piecewise-cubic
(PCHIP) interpolation that VCEG's later guidance prefers. Positive BD-rate: the test curve needs
more bits than the reference for the same quality."""
from __future__ import annotations

import numpy as np
from scipy.interpolate import PchipInterpolator

METHODS = ("cubic", "pchip")
MIN_OVERLAP_DB = 0.5
"""Quality overlap (dB metrics) below which a BD figure extrapolates more than it measures."""
MIN_OVERLAP_FRACTION = 0.5
"""For metrics not in dB: the overlap as a share of the narrower curve's quality range."""


def unreliable(ref_rate, ref_metric, test_rate, test_metric, in_db: bool,
               min_overlap_db: float = MIN_OVERLAP_DB) -> list[str]:
    """Why a BD figure between these two curves would mislead (empty: nothing found): quality ranges
    that barely overlap (the figure then rests on extrapolated fits, and cubic and PCHIP can disagree
    in sign), or a curve whose quality does not move one way with rate (a fit through it is no RD curve)."""
    reasons = []
    overlap = min(np.max(ref_metric), np.max(test_metric)) - max(np.min(ref_metric), np.min(test_metric))
    if in_db and overlap < min_overlap_db:
        reasons.append(f"quality ranges overlap by {overlap:.2f} dB (< {min_overlap_db} dB)")
    if not in_db:
        narrower = min(np.ptp(ref_metric), np.ptp(test_metric))
        if overlap < MIN_OVERLAP_FRACTION * narrower:
            reasons.append(f"quality ranges overlap by {overlap:.4g}, under {MIN_OVERLAP_FRACTION:.0%} of the "
                           f"narrower range {narrower:.4g}")
    for name, rate, metric in (("reference", ref_rate, ref_metric), ("test", test_rate, test_metric)):
        steps = np.diff(np.asarray(metric, float)[np.argsort(np.asarray(rate, float))])
        if not (np.all(steps >= 0) or np.all(steps <= 0)):
            reasons.append(f"the {name} curve is not monotone in rate")
    return reasons


def bd_rate(ref_rate, ref_metric, test_rate, test_metric, method: str = "cubic") -> float:
    """Average rate difference in % over the overlapping quality interval."""
    log_ref, log_test = np.log(np.asarray(ref_rate, float)), np.log(np.asarray(test_rate, float))
    low = max(np.min(ref_metric), np.min(test_metric))
    high = min(np.max(ref_metric), np.max(test_metric))
    diff = (_integral(test_metric, log_test, low, high, method)
            - _integral(ref_metric, log_ref, low, high, method)) / (high - low)
    return float((np.exp(diff) - 1) * 100)


def bd_metric(ref_rate, ref_metric, test_rate, test_metric, method: str = "cubic") -> float:
    """Average quality difference (test − reference) over the overlapping log-rate interval."""
    log_ref, log_test = np.log(np.asarray(ref_rate, float)), np.log(np.asarray(test_rate, float))
    low, high = max(log_ref.min(), log_test.min()), min(log_ref.max(), log_test.max())
    return float((_integral(log_test, test_metric, low, high, method)
                  - _integral(log_ref, ref_metric, low, high, method)) / (high - low))


def _integral(x, y, low: float, high: float, method: str) -> float:
    """∫ y(x) dx over [low, high] of the curve through the points (x, y)."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    if len(x) < 4 and method == "cubic":
        raise ValueError(f"a cubic Bjøntegaard fit needs at least 4 points, got {len(x)}")
    if high <= low:
        raise ValueError("the two curves do not overlap")
    if method == "cubic":
        antiderivative = np.polyint(np.polyfit(x, y, 3))
        return float(np.polyval(antiderivative, high) - np.polyval(antiderivative, low))
    if method == "pchip":
        order = np.argsort(x)
        return float(PchipInterpolator(x[order], y[order]).integrate(low, high))
    raise ValueError(f"unknown BD method '{method}'; choose one of {METHODS}")
