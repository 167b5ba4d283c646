import math

import numpy as np
import pytest

from evaluation.bd import bd_metric, bd_rate

pytestmark = pytest.mark.unit

RATES = [0.1, 0.25, 0.5, 1.0, 1.6]
PSNR = [26.0, 29.1, 31.8, 35.0, 37.2]


@pytest.mark.parametrize("method", ["cubic", "pchip"])
def test_identical_curves_differ_by_nothing(method):
    assert bd_rate(RATES, PSNR, RATES, PSNR, method) == pytest.approx(0, abs=1e-9)
    assert bd_metric(RATES, PSNR, RATES, PSNR, method) == pytest.approx(0, abs=1e-9)


@pytest.mark.parametrize("method", ["cubic", "pchip"])
@pytest.mark.parametrize("scale", [0.8, 1.25, 2.0])
def test_scaling_every_rate_by_r_gives_r_minus_one(method, scale):
    scaled = [r * scale for r in RATES]
    assert bd_rate(RATES, PSNR, scaled, PSNR, method) == pytest.approx((scale - 1) * 100, rel=1e-9)


@pytest.mark.parametrize("method", ["cubic", "pchip"])
def test_a_constant_quality_offset_is_the_bd_metric(method):
    assert bd_metric(RATES, PSNR, RATES, [p + 0.7 for p in PSNR], method) == pytest.approx(0.7, abs=1e-9)


def test_bd_rate_of_a_straight_line_in_log_rate_is_known_in_closed_form():
    # PSNR = 10·log10(rate) + 30 for the reference, + 31 for the test: 1 dB better everywhere,
    # i.e. the same quality at 10^(-1/10) of the rate: −20.57 %.
    rates = np.array(RATES)
    ref, test = 10 * np.log10(rates) + 30, 10 * np.log10(rates) + 31
    assert bd_rate(rates, ref, rates, test, "cubic") == pytest.approx((10 ** -0.1 - 1) * 100, abs=1e-6)
    assert bd_metric(rates, ref, rates, test, "pchip") == pytest.approx(1.0, abs=1e-9)


def test_errors_are_named():
    with pytest.raises(ValueError, match="at least 4 points"):
        bd_rate(RATES[:3], PSNR[:3], RATES[:3], PSNR[:3])
    with pytest.raises(ValueError, match="do not overlap"):
        bd_rate(RATES, PSNR, RATES, [p + 20 for p in PSNR])
    with pytest.raises(ValueError, match="unknown BD method"):
        bd_rate(RATES, PSNR, RATES, PSNR, "akima")
    assert math.isfinite(bd_rate(RATES, PSNR, RATES[::-1], PSNR[::-1]))


def test_rd_results_read_a_stages_own_metrics_and_order_points_by_rate():
    from evaluation.rd import rd_results

    def metrics(bpp, psnr):
        return {"val/all/bpp": bpp, "val/all/psnr": psnr, "val/denoise/bpp": 9.0}

    points = [({"lmbda": 0.01}, metrics(0.8, 30.0)), ({"lmbda": 0.001}, metrics(0.2, 25.0))]
    results = rd_results("s", "d", points, prefix="val/all/")
    assert results["results"] == {"bpp": [0.2, 0.8], "psnr-rgb": [25.0, 30.0]}
    assert [p["lmbda"] for p in results["points"]] == [0.001, 0.01]
    with pytest.raises(KeyError, match="val/bpp"):
        rd_results("s", "d", points)


# The recorded tiny LL-ICM dehaze curves: ranges overlapping by 0.27 dB, neither monotone.
BASELINE = ([0.167, 0.217, 0.363, 0.389], [12.13, 14.79, 14.37, 13.70])
JOINT = ([0.261, 0.404, 0.413, 0.651], [15.45, 14.52, 14.69, 15.84])


def test_curves_that_barely_overlap_or_fold_back_are_named_unreliable():
    from evaluation.bd import unreliable

    assert unreliable(RATES, PSNR, RATES, [p + 0.7 for p in PSNR], in_db=True) == []
    reasons = unreliable(*BASELINE, *JOINT, in_db=True)
    assert reasons == ["quality ranges overlap by 0.27 dB (< 0.5 dB)", "the reference curve is not monotone in rate",
                       "the test curve is not monotone in rate"]
    assert unreliable(RATES, PSNR, RATES, [p + 10.6 for p in PSNR], in_db=True) == []  # 0.6 dB overlap
    assert unreliable(RATES, PSNR, RATES, [p + 10.8 for p in PSNR], in_db=True) == [
        "quality ranges overlap by 0.40 dB (< 0.5 dB)"]
    lpips = [0.5, 0.4, 0.3, 0.2, 0.1]  # lower is better: decreasing is monotone too
    assert unreliable(RATES, lpips, RATES, [v - 0.01 for v in lpips], in_db=False) == []
    assert unreliable(RATES, lpips, RATES, [v - 0.35 for v in lpips], in_db=False)[0].startswith("quality ranges overlap")


def test_the_bd_rate_command_refuses_an_unreliable_figure_in_the_table_and_the_json(tmp_path, capsys):
    import json

    from train import main

    for name, (rates, psnrs) in (("baseline", BASELINE), ("joint", JOINT)):
        (tmp_path / f"{name}.json").write_text(json.dumps({"name": name, "results": {"bpp": rates, "psnr-rgb": psnrs}}))
    args = ["bd-rate", str(tmp_path / "baseline.json"), str(tmp_path / "joint.json"), "--metric", "psnr"]
    assert main([*args, "--json", str(tmp_path / "bd.json")]) == 0
    out = capsys.readouterr().out.splitlines()
    assert "refused" in out[1] and "%" not in out[1]
    assert out[2].startswith("joint psnr: refused: quality ranges overlap by 0.27 dB")
    entry = json.loads((tmp_path / "bd.json").read_text())[0]
    assert "bd_rate" not in entry and len(entry["refused"]) == 3
    assert main([*args, "--allow-unreliable", "--json", str(tmp_path / "bd.json")]) == 0
    assert "%!" in capsys.readouterr().out.splitlines()[1]
    entry = json.loads((tmp_path / "bd.json").read_text())[0]
    assert "bd_rate" in entry and len(entry["unreliable"]) == 3
