"""Taggers: CLIP zero-shot through the real from_pretrained path (tiny random CLIP), sidecar files
checked against the vocabulary, none."""
import pytest
import torch

from pl_modules.difficmh.tag_coding import TagError, Vocabulary
from pl_modules.difficmh.taggers import ClipZeroShotTags, TaggerConfig, build_tagger, vocabulary_file

pytestmark = pytest.mark.unit


def test_clip_zero_shot_keeps_the_top_k_most_probable_tags_above_the_threshold():
    tagger = build_tagger(TaggerConfig(kind="clip", model="tiny-clip", top_k=3, threshold=0.0))
    assert isinstance(tagger, ClipZeroShotTags) and len(tagger.vocabulary) == 80
    image = torch.rand(1, 3, 48, 64, generator=torch.Generator().manual_seed(0))
    probabilities = tagger.probabilities(image)
    assert probabilities.shape == (80,) and probabilities.sum().item() == pytest.approx(1.0, abs=1e-5)
    tags = tagger(image)
    expected = [tagger.vocabulary.names[i] for i in probabilities.argsort(descending=True)[:3].tolist()]
    assert tags == expected and tagger(image) == tags  # deterministic
    tagger.threshold = probabilities.max().item() + 1e-6
    assert tagger(image) == []  # nothing is probable enough


def test_sidecar_tags_are_read_beside_the_image_and_checked_against_the_vocabulary(tmp_path):
    tagger = build_tagger(TaggerConfig(kind="sidecar"))
    image = tmp_path / "kodim01.png"
    image.with_suffix(".tags").write_text("dog\n\nperson\n")
    assert tagger(torch.zeros(1, 3, 8, 8), image) == ["dog", "person"]
    (tmp_path / "b.tags").write_text("lighthouse\n")
    with pytest.raises(TagError, match=r"b.tags: tag 'lighthouse' is not in the vocabulary"):
        tagger(torch.zeros(1, 3, 8, 8), tmp_path / "b.png")
    with pytest.raises(TagError, match=r"no tag file .*c.tags beside"):
        tagger(torch.zeros(1, 3, 8, 8), tmp_path / "c.png")


def test_sidecar_tags_kept_apart_from_the_images_are_found_by_stem_in_one_label_folder(tmp_path):
    kodak, bsds = tmp_path / "kodak", tmp_path / "bsds"
    kodak.mkdir(), bsds.mkdir()
    (kodak / "kodim01.tags").write_text("boat\n")
    (bsds / "101085.tags").write_text("")
    tagger = build_tagger(TaggerConfig(kind="sidecar", sidecar_dirs=[str(kodak), str(bsds)]))
    image = torch.zeros(1, 3, 8, 8)
    assert tagger(image, tmp_path / "images" / "kodim01.png") == ["boat"]
    assert tagger(image, tmp_path / "elsewhere" / "101085.jpg") == []  # an empty file: no tags
    with pytest.raises(TagError, match=r"kodim02.tags \(for .*\) is in none of tagger.sidecar_dirs"):
        tagger(image, tmp_path / "kodim02.png")
    (bsds / "kodim01.tags").write_text("dog\n")
    with pytest.raises(TagError, match="kodim01.tags .* is in more than one of"):
        tagger(image, tmp_path / "kodim01.png")


def test_no_tags_and_bad_settings():
    assert build_tagger(TaggerConfig(kind="none"))(torch.zeros(1, 3, 8, 8)) == []
    with pytest.raises(ValueError, match="tagger.kind must be one of"):
        TaggerConfig(kind="ram")
    with pytest.raises(ValueError, match="tagger.template must contain"):
        TaggerConfig(template="a photo")
    assert Vocabulary.from_file(vocabulary_file("coco-80")).names[-1] == "toothbrush"
