"""The judge interface: P(a closer to the reference than b), batched, picked by name."""
import pytest
import torch

from pl_modules.scoring import judges, metrics
from pl_modules.scoring.metrics import Metric, Unavailable

pytestmark = pytest.mark.unit


def images(batch=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    reference = torch.rand(batch, 3, 48, 48, generator=g)
    light = (reference + 0.02 * torch.randn(reference.shape, generator=g)).clamp(0, 1)
    heavy = (reference + 0.2 * torch.randn(reference.shape, generator=g)).clamp(0, 1)
    return reference, light, heavy


@pytest.mark.parametrize("name", ["psnr", "gmsd", "haarpsi"])
def test_a_metric_judge_prefers_the_milder_distortion_per_item_and_ties_at_a_half(name):
    judge = judges.build_judge(name)
    reference, light, heavy = images()
    assert judge.prefer(reference, light, heavy).tolist() == [1.0, 1.0, 1.0]
    assert judge.prefer(reference, heavy, light).tolist() == [0.0, 0.0, 0.0]
    mixed_a, mixed_b = torch.stack([light[0], heavy[1]]), torch.stack([heavy[0], light[1]])
    assert judge.prefer(reference[:2], mixed_a, mixed_b).tolist() == [1.0, 0.0]
    assert judge.prefer(reference, light, light).tolist() == [0.5, 0.5, 0.5]


def test_judges_are_picked_by_name_and_unknown_ones_list_the_choices():
    assert {"psnr", "ms-ssim", "lpips", "clip:<arg>"} <= set(judges.choices())
    assert "brisque" not in judges.choices()  # no-reference metrics cannot judge closeness
    for bad in ("nope", "psnr:x", "clip"):
        with pytest.raises(ValueError, match="choose from"):
            judges.build_judge(bad)


def test_a_judge_without_its_weights_is_unavailable_with_the_reason(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    with pytest.raises(Unavailable, match="needs weights"):
        judges.build_judge("lpips")
    with pytest.raises(Unavailable, match="not available locally"):
        judges.build_judge(f"clip:{tmp_path / 'no-clip'}")


def test_registries_refuse_a_duplicate_name():
    with pytest.raises(KeyError, match="judge 'psnr' is already registered"):
        judges.register_judge("psnr", judges.JudgeKind(judges.MetricJudge))
    with pytest.raises(KeyError, match="metric 'psnr' is already registered"):
        metrics.register_metric(Metric("psnr", lambda a, b: 0.0))


def test_combined_judges_keep_agreed_pairs_or_average_and_drop_unsure_ones():
    class Fixed:
        def __init__(self, name, values):
            self.name, self.values = name, torch.tensor(values)

        def prefer(self, reference, a, b):
            return self.values

    first, second = Fixed("x", [1.0, 0.0, 1.0, 0.6]), Fixed("y", [1.0, 1.0, 0.5, 0.7])
    agree = judges.CombinedJudge([first, second], "agree")
    out = agree.prefer(None, None, None)
    assert out[0] == 1.0 and out[3] == pytest.approx(0.6) and out[1:3].isnan().all()
    assert agree.agreement == 0.5
    ensemble = judges.CombinedJudge([first, second], "ensemble", weights=[3.0, 1.0], margin=0.2)
    out = ensemble.prefer(None, None, None)
    assert out[0] == 1.0 and out[1] == 0.25 and out[2] == pytest.approx(0.875) and out[3].isnan()  # 0.625 is unsure
    assert judges.build_combined(judges.JudgingConfig(judge="psnr")).name == "psnr"
    with pytest.raises(ValueError, match="2 weights for 1 judges"):
        judges.CombinedJudge([first], "ensemble", weights=[1.0, 2.0])


def test_a_metric_undefined_at_this_size_gives_no_vote_not_a_side():
    reference, light, heavy = images()  # 48 px: below MS-SSIM's five scales
    assert judges.build_judge("ms-ssim").prefer(reference, light, heavy).isnan().all()


def test_the_control_replaces_every_vote_by_a_coin_flip_and_keeps_the_no_votes():
    from pl_modules.vlic.module import coin_flip_votes

    prefs = torch.tensor([0.9, float("nan"), 0.5, 0.2] * 8)
    flips = coin_flip_votes(prefs, seed=5)
    voted = torch.tensor([True, False, False, True] * 8)
    assert torch.isnan(flips[1::4]).all() and (flips[2::4] == 0.5).all()  # no-votes stay no-votes
    assert set(flips[voted].tolist()) == {0.0, 1.0}  # both sides drawn, whatever the judge said
    again, other = (coin_flip_votes(prefs, seed).nan_to_num(-1) for seed in (5, 6))
    assert torch.equal(flips.nan_to_num(-1), again) and not torch.equal(flips.nan_to_num(-1), other)
