import json

import numpy as np
import pytest
from PIL import Image

from datamodules.shards import read_index
from foundation.config import ConfigError, load_config
from stages import quickstart
from stages.quickstart import PRESET, QuickstartConfig

LAUNCH = ["trainer.progress_bar=false", "trainer.accelerator=cpu", "trainer.devices=1"]


def shrunk(workdir) -> QuickstartConfig:
    """The quickstart's own preset with every stage cut to a few steps (the real code paths)."""
    steps = {"stage1": 12, "stage2": 4, "stage3": 2}
    overrides = [f"workdir={workdir}", f"kodak_dir={workdir}/no-kodak", "anchors=[jpeg]", "win_seeds=1",
                 "stage1.compile=false", "stage2.data.batch_size=2", "stage3.data.batch_size=2", "stage3.val_seeds=1"]
    for stage, count in steps.items():
        overrides += [f"{stage}.trainer.max_steps={count}", f"{stage}.trainer.val_every={count}",
                      f"{stage}.trainer.checkpoint_every={count}", *(f"{stage}.{o}" for o in LAUNCH)]
    return load_config(QuickstartConfig, [PRESET], overrides)


@pytest.mark.chain
def test_quickstart_runs_three_stages_reports_a_win_rate_and_skips_finished_stages(tmp_path, capsys):
    cfg = shrunk(tmp_path)
    results = quickstart.run(cfg)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["n_pairs"] == results["n_pairs"] == 2  # two held-out photos, one task, one seed
    assert 0.0 <= saved["win_rate_ci_low"] <= saved["win_rate"] <= saved["win_rate_ci_high"] <= 1.0
    assert saved["win_judge"] == "psnr" and set(saved["win_rates"]) == {"psnr", "haarpsi"}
    # The codec trains on the seven colour and five grey photos; stage 2's pairs are the colour ones.
    assert sum(n for _, n in read_index(tmp_path / "shards")) == 12
    assert sum(n for _, n in read_index(tmp_path / "pairs")) == 7
    grey = np.asarray(Image.open(tmp_path / "photos" / "train" / "grey" / "grass.png"))
    assert grey.shape[-1] == 3 and (grey[..., 0] == grey[..., 2]).all() and grey.std() > 10
    rows = saved["stage1"]["held-out photos"]
    # Twelve steps make no codec yet: real bytes and finite numbers are what can be asserted here.
    assert len(rows) == 2 and all(0 < row["bpp"] < 24 and 0 < row["psnr"] < 60 and row["jpeg_psnr_at_bpp"] > 0
                                  for row in rows)
    report = tmp_path / "report"
    for name in ("stage1.json", "jpeg.json", "per_image.csv", "rd.png", "win_rates.json"):
        assert (report / name).is_file(), name
    finals = sorted((tmp_path / "quickstart").glob("*/final/manifest.json"))
    assert [p.parent.parent.name for p in finals] == ["stage1", "stage2-llicm", "stage3-vlic"]
    stamps = [p.stat().st_mtime_ns for p in finals]
    capsys.readouterr()

    again = quickstart.run(cfg)
    assert capsys.readouterr().out.count("finished, skipped") == 3
    assert [p.stat().st_mtime_ns for p in finals] == stamps
    assert again["win_rate"] == results["win_rate"]  # the same bits, seeds and weights: the same judgments
    # A quickstart folder from another recipe is in the way: one line says what to do (there is no --force).
    changed = load_config(QuickstartConfig, [PRESET], [f"workdir={tmp_path}", "stage1.trainer.seed=5"])
    with pytest.raises(ConfigError, match="another config; remove that folder or pass workdir="):
        quickstart.run(changed)
