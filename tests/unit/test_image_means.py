import pytest
import torch

from pl_modules.core.image_means import ImageMeans

pytestmark = pytest.mark.unit


class TwoRanks:
    """A strategy whose reduce adds the other rank's tensor, as an all-reduce of two ranks would."""

    root_device = torch.device("cpu")

    def __init__(self, other: ImageMeans):
        self.other = other

    def reduce(self, tensor, reduce_op):
        assert reduce_op == "sum"
        return tensor + torch.stack([self.other.sums, self.other.counts])


def test_means_count_every_image_once_across_uneven_ranks():
    names = ("val/bpp", "val/ms_ssim")
    rank0, rank1 = ImageMeans(names), ImageMeans(names)
    rank0.add({"val/bpp": 0.2, "val/ms_ssim": 0.9})
    rank0.add({"val/bpp": 0.4})  # too small for MS-SSIM
    rank1.add({"val/bpp": 0.9, "val/ms_ssim": 0.7})
    means = rank0.means(TwoRanks(rank1))
    assert means["val/bpp"] == pytest.approx(0.5)  # (0.2 + 0.4 + 0.9) / 3, not mean of rank means 0.6
    assert means["val/ms_ssim"] == pytest.approx(0.8)


def test_a_metric_no_rank_saw_is_left_out():
    means = ImageMeans(("val/a", "val/b"))
    means.add({"val/a": 1.0})
    assert means.means(TwoRanks(ImageMeans(("val/a", "val/b")))) == {"val/a": 1.0}
