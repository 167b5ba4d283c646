"""Paired per-image differences at matched bpp, against hand-computed values."""
import json

import numpy as np
import pytest

from evaluation.paired import bootstrap_mean, paired_differences, read_rows

pytestmark = pytest.mark.unit

ROWS = """method,setting,image,bpp,psnr
base-dehaze,0.0067,a.png,0.20,14.0
base-dehaze,0.0067,b.png,0.30,15.0
base-dehaze,0.0067,c.png,0.40,16.0
joint-dehaze,0.0067,a.png,0.21,14.5
joint-dehaze,0.0067,b.png,0.31,15.5
joint-dehaze,0.0067,c.png,0.42,16.5
base-dehaze,0.025,a.png,0.40,17.0
base-dehaze,0.025,b.png,0.40,18.0
joint-dehaze,0.025,a.png,0.60,16.0
joint-dehaze,0.025,b.png,0.60,19.0
"""


def test_bootstrap_mean_of_a_constant_is_that_constant_and_its_interval_covers_the_mean():
    assert bootstrap_mean(np.full(5, 0.5)) == (0.5, 0.5, 0.5)
    mean, low, high = bootstrap_mean(np.arange(10.0))
    assert mean == 4.5 and low < 4.5 < high and 2 < low and high < 7


def test_paired_differences_per_setting_with_the_rate_match(tmp_path):
    (tmp_path / "rows.csv").write_text(ROWS)
    low, high = paired_differences(read_rows(tmp_path / "rows.csv"), "base-dehaze", "joint-dehaze", "psnr")
    assert low["setting"] == "0.0067" and low["n_images"] == 3
    assert low["delta"] == pytest.approx(0.5) and (low["ci_low"], low["ci_high"]) == pytest.approx((0.5, 0.5))
    assert low["rate_ratio"] == pytest.approx(0.94 / 0.90) and low["matched"]
    assert high["delta"] == pytest.approx(0.0) and high["ci_low"] == pytest.approx(-1.0)
    assert high["rate_ratio"] == pytest.approx(1.5) and not high["matched"]
    with pytest.raises(ValueError, match="metric 'lpips' is not in every row"):
        paired_differences(read_rows(tmp_path / "rows.csv"), "base-dehaze", "joint-dehaze", "lpips")


def test_the_paired_command_prints_a_row_per_setting_and_writes_json(tmp_path, capsys):
    from train import main

    (tmp_path / "rows.csv").write_text(ROWS)
    args = ["paired", str(tmp_path / "rows.csv"), "--reference", "base-dehaze", "--test", "joint-dehaze"]
    assert main([*args, "--json", str(tmp_path / "p.json")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[2].startswith("| 0.0067 | joint-dehaze") and "+0.50 [+0.50, +0.50]" in lines[2]
    assert "| no |" in lines[3]
    assert len(json.loads((tmp_path / "p.json").read_text())) == 2
    assert main(["paired", str(tmp_path / "rows.csv"), "--reference", "base-dehaze", "--test", "other"]) == 1
