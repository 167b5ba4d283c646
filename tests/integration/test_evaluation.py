"""Evaluation: classical anchors, metrics (and their absence), end-to-end evaluate, judge agreement."""
import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image

from datamodules.images import list_images, load_rgb, to_tensor
from evaluation import evaluate, judge
from evaluation.classical import CODECS, code, psnr_at_bpp, psnr_uint8
from evaluation.evaluate import EvaluateConfig
from evaluation.judge import JudgeConfig
from pl_modules.codec_io import compress_file
from pl_modules.scoring import metrics
from train import main


@pytest.fixture(scope="module")
def photo(eval_dir):
    return load_rgb(list_images(eval_dir)[0])[:256, :256].copy()


@pytest.mark.parametrize("codec", sorted(CODECS))
@pytest.mark.unit
def test_classical_bpp_and_quality_rise_along_the_ladder(codec, photo):
    if CODECS[codec].unavailable():
        pytest.skip(CODECS[codec].unavailable())
    points = []
    for setting in CODECS[codec].ladder:
        data, decoded = code(photo, codec, setting)
        assert decoded.shape == photo.shape
        points.append((8 * len(data) / (256 * 256), psnr_uint8(decoded, photo)))
    rates, quality = zip(*points)
    assert all(a < b for a, b in zip(rates, rates[1:])), rates
    assert quality[-1] > quality[0] + 5


@pytest.mark.parametrize("codec", ["jpeg", "webp"])
@pytest.mark.unit
def test_psnr_at_bpp_bisects_to_what_coding_every_quality_gives(codec, photo):
    curve = sorted((8 * len(data) / (256 * 256), psnr_uint8(decoded, photo))
                   for data, decoded in (code(photo, codec, q) for q in range(1, 101)))
    for target in (curve[0][0] / 2, 0.3, 0.9, 2.5, curve[-1][0] * 2):
        below, above = [p for p in curve if p[0] <= target], [p for p in curve if p[0] >= target]
        if not below or not above:
            expected = min(curve, key=lambda p: abs(p[0] - target))
        else:
            (b0, p0), (b1, p1) = below[-1], above[0]
            expected = (target, p0 + (target - b0) / (b1 - b0) * (p1 - p0))
        assert psnr_at_bpp(photo, target, codec) == pytest.approx(expected, abs=1e-12), target


@pytest.mark.unit
def test_metrics_without_their_weights_are_unavailable_with_the_reason(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    reasons = metrics.availability(["psnr", "lpips", "dists"])
    assert reasons["psnr"] is None
    assert "lpips_weights.pt" in reasons["lpips"] and str(tmp_path) in reasons["lpips"]
    assert "dists_weights.pt" in reasons["dists"]
    with pytest.raises(ValueError, match="unknown metrics"):
        metrics.availability(["psnr", "flip"])
    no_reference = metrics.availability(["liqe", "qalign"])
    assert all(why and ("pyiqa" in why or "needs" in why) for why in no_reference.values())


@pytest.mark.unit
def test_offline_metrics_rank_a_mild_distortion_above_a_strong_one(photo):
    x = to_tensor(photo).unsqueeze(0)
    rng = torch.Generator().manual_seed(0)
    mild = (x + 0.02 * torch.randn(x.shape, generator=rng)).clamp(0, 1)
    strong = (x + 0.15 * torch.randn(x.shape, generator=rng)).clamp(0, 1)
    names = ["psnr", "ms-ssim", "gmsd", "vif", "haarpsi", "brisque"]
    a, b = metrics.measure(names, mild, x), metrics.measure(names, strong, x)
    for name in names:
        better = (a[name] < b[name]) if metrics.METRICS[name].lower_is_better else (a[name] > b[name])
        assert better, (name, a[name], b[name])
    assert metrics.measure(["psnr"], x, x)["psnr"] == float("inf")


@pytest.mark.stage
def test_evaluate_end_to_end_on_two_images_with_a_learned_codec_and_jpeg(trained_run, eval_dir, tmp_path,
                                                                         monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "empty-hub"))
    _, final = trained_run
    cfg = EvaluateConfig(images=str(eval_dir), models=[str(final)], classical=["jpeg"],
                         metrics=["psnr", "ms-ssim", "lpips"], out_dir=str(tmp_path / "out"), workers=2)
    curves = evaluate.run(cfg)
    ours = json.loads((tmp_path / "out" / "ours.json").read_text())
    jpeg = json.loads((tmp_path / "out" / "jpeg.json").read_text())
    assert ours == curves["ours"] and set(ours) >= {"name", "description", "results"}
    assert set(ours["results"]) == {"bpp", "psnr-rgb", "ms-ssim"} and "needs weights" in ours["unavailable"]["lpips"]
    assert len(jpeg["results"]["bpp"]) == len(CODECS["jpeg"].ladder) == len(jpeg["results"]["psnr-rgb"])
    assert jpeg["results"]["bpp"] == sorted(jpeg["results"]["bpp"])
    with open(tmp_path / "out" / "per_image.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 2 * (1 + len(CODECS["jpeg"].ladder))
    # The learned codec's bpp is the size of the file `compress` writes, header included.
    image = list_images(eval_dir)[0]
    written = compress_file(image, final, tmp_path / "x.bin")
    ours_row = next(r for r in rows if r["method"] == "ours" and r["image"] == image.name)
    assert float(ours_row["bpp"]) == pytest.approx(written.bpp, rel=1e-12)
    assert (tmp_path / "out" / "rd.png").stat().st_size > 10_000


@pytest.mark.unit
def test_bd_rate_command_prints_a_row_per_test_curve(tmp_path, capsys):
    ref = {"name": "anchor", "results": {"bpp": [0.1, 0.2, 0.4, 0.8], "psnr": [27.0, 29.0, 31.0, 33.0]}}
    test = {"name": "half-rate", "results": {"bpp": [0.05, 0.1, 0.2, 0.4], "psnr-rgb": [27.0, 29.0, 31.0, 33.0]}}
    (tmp_path / "a.json").write_text(json.dumps(ref))
    (tmp_path / "b.json").write_text(json.dumps(test))
    assert main(["bd-rate", str(tmp_path / "a.json"), str(tmp_path / "b.json"), "--metric", "psnr"]) == 0
    row = capsys.readouterr().out.splitlines()[1]
    assert row.startswith("half-rate") and "-50.00%" in row


def make_bapps(folder, photo_dir, flip=False, count=12):
    """Pairs whose better side is known: p0 lightly, p1 heavily noised (or the reverse)."""
    for side in ("ref", "p0", "p1", "judge"):
        (folder / side).mkdir(parents=True)
    rng = np.random.default_rng(0)
    for index, path in enumerate(sorted(photo_dir.iterdir())[:count]):
        ref = load_rgb(path)[:64, :64].astype(np.float64)
        light, heavy = (np.clip(ref + rng.normal(0, s, ref.shape), 0, 255).astype(np.uint8) for s in (4, 30))
        stem = f"{index:04d}"
        Image.fromarray(ref.astype(np.uint8)).save(folder / "ref" / f"{stem}.png")
        Image.fromarray(heavy if flip else light).save(folder / "p0" / f"{stem}.png")
        Image.fromarray(light if flip else heavy).save(folder / "p1" / f"{stem}.png")
        np.save(folder / "judge" / f"{stem}.npy", np.array([0.9 if flip else 0.1]))


@pytest.mark.unit
def test_judge_agreement_matches_hand_computed_2afc_scores(tmp_path, photo_dir):
    make_bapps(tmp_path / "set", photo_dir)
    results = judge.run(JudgeConfig(dataset=str(tmp_path / "set"), judges=["psnr", "gmsd", "lpips"], bootstrap=200,
                                    out_dir=str(tmp_path / "out")))
    # Every pair: judge prefers p0 (p=0), people prefer p1 with h=0.1, so the credit is 0.9.
    assert results["psnr"]["agreement"] == pytest.approx(0.9)
    assert results["gmsd"]["agreement"] == pytest.approx(0.9)
    low, high = results["psnr"]["ci95"]
    assert low == pytest.approx(0.9) and high == pytest.approx(0.9)  # every pair scores the same
    lpips_here = metrics.availability(["lpips"])["lpips"] is None
    assert set(results["lpips"]) == ({"agreement", "ci95", "pairs"} if lpips_here else {"unavailable"})
    make_bapps(tmp_path / "flipped", photo_dir, flip=True)
    flipped = judge.run(JudgeConfig(dataset=str(tmp_path / "flipped"), judges=["psnr"], bootstrap=50,
                                    out_dir=str(tmp_path / "out")))
    assert flipped["psnr"]["agreement"] == pytest.approx(0.9)  # the judge now prefers p1, as do 90 % of people
    assert judge.agreement(np.array([1.0, 0.0, 0.5]), np.array([1.0, 1.0, 0.5])) == pytest.approx((1 + 0 + 0.5) / 3)


@pytest.mark.unit
def test_a_clip_judge_runs_through_from_pretrained_and_a_missing_one_is_unavailable(tmp_path, photo_dir):
    from pl_modules.prior.tiny_models import save_tiny_clip

    make_bapps(tmp_path / "set", photo_dir, count=4, flip=True)
    for ref in (tmp_path / "set" / "ref").iterdir():  # p1 is the reference itself: any CLIP must prefer it
        (tmp_path / "set" / "p1" / ref.name).write_bytes(ref.read_bytes())
    clip = save_tiny_clip(tmp_path / "clip")
    results = judge.run(JudgeConfig(dataset=str(tmp_path / "set"), judges=[f"clip:{clip}", "clip:/no/such/clip"], out_dir=str(tmp_path / "out"),
                                    bootstrap=20))
    assert results[f"clip:{clip}"]["agreement"] == pytest.approx(0.9)
    assert "not available locally" in results["clip:/no/such/clip"]["unavailable"]


@pytest.mark.unit
def test_judge_set_with_a_missing_side_is_refused(tmp_path, photo_dir):
    make_bapps(tmp_path / "set", photo_dir, count=2)
    (tmp_path / "set" / "judge" / "0001.npy").unlink()
    with pytest.raises(FileNotFoundError, match="0001"):
        judge.load_pairs(tmp_path / "set")


@pytest.mark.unit
def test_a_synthetic_2afc_set_has_known_answers_and_says_it_is_not_human(tmp_path, photo_dir):
    images = tmp_path / "images"
    images.mkdir()
    for path in sorted(photo_dir.iterdir())[:4]:
        (images / path.name).write_bytes(path.read_bytes())
    results = judge.run(JudgeConfig(synthetic_from=str(images), judges=["psnr", "gmsd"], bootstrap=50,
                                    out_dir=str(tmp_path / "out")))
    pairs = judge.load_pairs(tmp_path / "out" / "synthetic-2afc")
    assert len(pairs) == 4 * len(judge.SYNTHETIC_LEVELS)
    assert {p["human"] for p in pairs} == {0.0, 1.0}  # the mild version lands on both sides
    assert results["psnr"]["agreement"] == 1.0  # one distortion, two strengths: PSNR always picks the mild one
    assert "not human" in results["gmsd"]["labels"]
    assert json.loads((tmp_path / "out" / "judge_agreement.json").read_text())["psnr"]["pairs"] == len(pairs)
    with pytest.raises(ValueError, match="exactly one of dataset"):
        JudgeConfig(dataset="x", synthetic_from="y")
