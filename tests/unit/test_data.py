import hashlib
import itertools
import json

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from conftest import SHARED
from datamodules.shards import read_index, write_shards
from datamodules.stream import Augmentation, CropStream, random_crop, raw_samples, stream_shards, worker_position

pytestmark = pytest.mark.unit


def batches(shards, start, count, num_workers=0, rank=0, world_size=1, batch_size=3, crop=64):
    stream = CropStream(shards, crop, batch_size, seed=7, rank=rank, world_size=world_size, start_batch=start)
    loader = DataLoader(stream, batch_size=None, num_workers=num_workers)
    out = []
    for batch in loader:
        out.append(batch)
        if len(out) == count:
            return out


@pytest.fixture
def messy_folder(tmp_path, photo_dir):
    folder = tmp_path / "src"
    folder.mkdir()
    paths = sorted(photo_dir.iterdir())[:5]
    for path in paths:
        Image.open(path).convert("RGB").save(folder / (path.stem + ".png"))
    Image.open(paths[0]).convert("L").save(folder / "grey.tif")
    Image.open(paths[0]).convert("RGBA").save(folder / "sub_alpha.webp")
    Image.open(paths[0]).convert("RGB").resize((40, 30)).save(folder / "tiny.bmp")
    (folder / "broken.jpg").write_bytes(paths[0].read_bytes()[:200])
    (folder / "notes.txt").write_text("not an image")
    return folder


def test_shards_convert_to_rgb_skip_unreadable_and_small_and_are_deterministic(messy_folder, tmp_path):
    summary = write_shards(messy_folder, tmp_path / "a", samples_per_shard=3, min_size=64, progress=False)
    assert summary.written == 7 and summary.counts == [3, 3, 1]
    assert sorted(p for p, _ in summary.skipped) == ["broken.jpg", "tiny.bmp"]
    assert "smaller than min_size=64" in dict(summary.skipped)["tiny.bmp"]
    assert [c for _, c in read_index(tmp_path / "a")] == [3, 3, 1]
    again = write_shards(messy_folder, tmp_path / "b", samples_per_shard=3, min_size=64, progress=False)
    for first, second in zip(summary.shards, again.shards):
        digest = [hashlib.sha256((tmp_path / d / n).read_bytes()).hexdigest() for d, n in (("a", first), ("b", second))]
        assert digest[0] == digest[1]
    first = next(raw_samples(read_index(tmp_path / "a"), seed=0, stream=0, skip=0))
    meta = json.loads(first["json"])
    assert meta["source"] in {p.name for p in messy_folder.iterdir()} and min(meta["height"], meta["width"]) >= 64


def test_shards_take_tags_from_label_folders_and_refuse_a_stem_labelled_twice(tmp_path, photo_dir):
    images, labels, more = tmp_path / "images", tmp_path / "labels", tmp_path / "more"
    for folder in (images, labels, more):
        folder.mkdir()
    paths = sorted(photo_dir.iterdir())[:3]
    for path in paths:
        Image.open(path).convert("RGB").save(images / (path.stem + ".png"))
    (labels / f"{paths[0].stem}.tags").write_text("person\ndog\n")
    (more / f"{paths[1].stem}.tags").write_text("zebra\n")
    (images / f"{paths[2].stem}.tags").write_text("cat\n")  # beside the image: not read when folders are given
    write_shards(images, tmp_path / "shards", progress=False, tag_dirs=[labels, more])
    tags = {}
    for sample in itertools.islice(raw_samples(read_index(tmp_path / "shards"), seed=0, stream=0, skip=0), 3):
        meta = json.loads(sample["json"])
        tags[meta["source"]] = meta.get("tags")
    assert tags == {f"{paths[0].stem}.png": ["person", "dog"], f"{paths[1].stem}.png": ["zebra"],
                    f"{paths[2].stem}.png": None}
    (more / f"{paths[0].stem}.tags").write_text("cat\n")
    with pytest.raises(ValueError, match=f"{paths[0].stem}.tags .* is in more than one of"):
        write_shards(images, tmp_path / "ambiguous", progress=False, tag_dirs=[labels, more])
    assert not (tmp_path / "ambiguous").exists()  # refused before anything was written


def test_worker_position_replays_the_round_robin_of_an_uninterrupted_loader():
    # Uninterrupted, 3 workers: global batch g comes from stream g % 3 as its (g // 3)-th batch.
    for start in range(7):
        for worker in range(3):
            pos = worker_position(start, rank=0, world_size=1, worker=worker, num_workers=3)
            assert (pos.stream, pos.first_batch) == ((start + worker) % 3, (start + worker) // 3)


def test_resumed_stream_equals_the_uninterrupted_stream(shard_dir):
    shards = read_index(shard_dir)
    full = batches(shards, start=0, count=8, num_workers=2)
    resumed = batches(shards, start=5, count=3, num_workers=2)
    for a, b in zip(full[5:], resumed):
        assert torch.equal(a["image"], b["image"])
    assert not torch.equal(full[0]["image"], full[1]["image"])


def test_resume_past_several_passes_uses_counts_without_reading(shard_dir):
    shards = read_index(shard_dir)
    total = sum(c for _, c in shards)
    skip = 3 * total + 5
    direct = [s["__key__"] for s in _take(raw_samples(shards, 1, 0, skip), 4)]
    walked = [s["__key__"] for s in _take(raw_samples(shards, 1, 0, 0), skip + 4)][skip:]
    assert direct == walked


def test_ranks_read_disjoint_shards(shard_dir):
    shards = read_index(shard_dir)
    keys = []
    for rank in range(2):
        subset = stream_shards(shards, rank, 2)
        keys.append({s["__url__"] for s in _take(raw_samples(subset, 0, rank, 0), 8)})
    assert keys[0].isdisjoint(keys[1])


def test_a_sample_that_fails_to_decode_is_counted_not_fatal(tmp_path, photo_dir):
    write_shards(photo_dir, tmp_path / "s", samples_per_shard=50, progress=False)
    tar = next((tmp_path / "s").glob("*.tar"))
    data = bytearray(tar.read_bytes())
    start = data.find(b"\xff\xd8\xff")  # the first JPEG; PNG sources are caught by their signature
    start = start if start >= 0 else data.find(b"\x89PNG")
    data[start: start + 64] = bytes(64)
    tar.write_bytes(bytes(data))
    got = batches(read_index(tmp_path / "s"), start=0, count=6, batch_size=2)
    assert sum(b["skipped"] for b in got) == 1
    assert sum(b["image"].shape[0] for b in got) == 11


def _take(iterator, n):
    return [sample for sample, _ in zip(iterator, range(n))]


def test_pair_shards_hold_reproducible_synthetic_pairs_with_labels(tmp_path, photo_dir):
    from datamodules.degradations import TASKS, degrade
    from datamodules.images import load_rgb
    from datamodules.shards import write_pair_shards

    folder = tmp_path / "clean"
    folder.mkdir()
    for path in sorted(photo_dir.iterdir())[:2]:
        (folder / path.name).write_bytes(path.read_bytes())
    summary = write_pair_shards(folder, tmp_path / "pairs", ["dehaze", "denoise"], seed=4, progress=False)
    assert summary.written == 4
    sample = next(raw_samples(read_index(tmp_path / "pairs"), seed=0, stream=0, skip=0))
    meta = json.loads(sample["json"])
    clean = load_rgb(next(v for k, v in sample.items() if k.startswith("clean.")))
    assert meta["label"] == TASKS.index(meta["task"]) and meta["synthetic"]
    assert np.array_equal(load_rgb(sample["degraded.png"]), degrade(clean, meta["task"], meta["seed"]))


def test_pair_shards_from_real_pairs_match_by_suffix(tmp_path):
    from pathlib import Path

    from datamodules.shards import write_pair_shards

    polyu = SHARED / "polyu_real_noise" / "CroppedImages"
    if not polyu.is_dir():
        pytest.skip("../shared/data/polyu_real_noise is not here")
    subset = tmp_path / "polyu"
    subset.mkdir()
    for path in sorted(polyu.glob("*.JPG"))[:6]:
        (subset / path.name).write_bytes(path.read_bytes())
    summary = write_pair_shards(subset, tmp_path / "pairs", [], real_pairs=("_real", "_mean", "denoise"),
                                progress=False)
    assert summary.written == 3
    sample = next(raw_samples(read_index(tmp_path / "pairs"), seed=0, stream=0, skip=0))
    meta = json.loads(sample["json"])
    assert meta["task"] == "denoise" and not meta["synthetic"] and meta["source"].endswith("_mean.JPG")


def test_pair_batches_crop_degraded_and_clean_at_the_same_place(tmp_path, photo_dir):
    from datamodules.shards import write_pair_shards

    folder = tmp_path / "clean"
    folder.mkdir()
    for path in sorted(photo_dir.iterdir())[:3]:
        (folder / path.name).write_bytes(path.read_bytes())
    write_pair_shards(folder, tmp_path / "pairs", ["deshadow", "inpaint"], progress=False)
    (batch,) = batches(read_index(tmp_path / "pairs"), start=0, count=1, batch_size=4, crop=64)
    assert batch["degraded"].shape == batch["clean"].shape == (4, 3, 64, 64)
    from datamodules.degradations import TASKS

    assert set(batch["task"].tolist()) <= {TASKS.index("deshadow"), TASKS.index("inpaint")}
    assert batch["task"].shape == (4,)
    # Shadows only darken and inpainting only blanks: the degraded crop never exceeds the clean one
    # by more than rounding, which holds only if both were cut at the same place.
    assert (batch["degraded"] <= batch["clean"] + 1 / 255).float().mean() > 0.999


def test_validation_pairs_are_cut_on_the_64_px_grid_even_from_small_images(tmp_path, photo_dir):
    from datamodules.pair_data import DegradedFolder, PairDataConfig

    folder = tmp_path / "val"
    folder.mkdir()
    Image.open(sorted(photo_dir.iterdir())[0]).convert("RGB").resize((481, 321)).save(folder / "a.png")
    items = DegradedFolder(PairDataConfig(train_shards="unused", val_dir=str(folder), val_crop=512,
                                          val_tasks=["denoise", "dehaze"]))
    assert len(items) == 2
    item = items[0]
    assert item["clean"].shape == item["degraded"].shape == (1, 3, 320, 448)
    assert not torch.equal(item["clean"], item["degraded"])


def test_centre_crop_lands_on_the_64_px_grid_at_the_centre():
    import numpy as np

    from datamodules.images import centre_crop

    image = np.arange(200 * 330).reshape(200, 330)
    crop = centre_crop(image)
    assert crop.shape == (192, 320) and crop[0, 0] == image[4, 5]
    small = centre_crop(image, 128)
    assert small.shape == (128, 128) and small[0, 0] == image[36, 101]



def test_default_crop_is_position_and_flip_only():
    image = np.random.default_rng(0).integers(0, 256, (90, 120, 3), dtype=np.uint8)
    crop = random_crop(image, 64, np.random.default_rng(5))
    rng = np.random.default_rng(5)
    top, left = rng.integers(0, 90 - 64 + 1), rng.integers(0, 120 - 64 + 1)
    expected = image[top: top + 64, left: left + 64]
    expected = expected[:, ::-1] if rng.random() < 0.5 else expected
    np.testing.assert_array_equal(crop, expected)


def test_rescaled_crops_see_more_of_the_image():
    ramp = np.tile(np.arange(256, dtype=np.uint8), (256, 1))[..., None].repeat(3, axis=-1)
    spans = [np.ptp(random_crop(ramp, 64, np.random.default_rng(seed), Augmentation(min_scale=0.25)).astype(int))
             for seed in range(40)]
    assert min(spans) >= 60 and max(spans) > 200  # a quarter-scale crop spans about 4 × 64 columns
    with pytest.raises(ValueError, match="min_scale"):
        Augmentation(min_scale=0)


def test_turns_and_channel_order_cut_stacked_images_alike():
    image = np.random.default_rng(1).integers(0, 256, (128, 128, 3), dtype=np.uint8)
    image[..., 1] //= 2
    image[..., 2] //= 4  # channel means now tell the channels apart
    stacked = np.concatenate([image, image], axis=-1)  # a (degraded, clean) pair
    turns, orders = set(), set()
    for seed in range(30):
        plain = random_crop(stacked, 64, np.random.default_rng(seed))
        turned = random_crop(stacked, 64, np.random.default_rng(seed), Augmentation(rotate=True))
        turns.add(next(k for k in range(4) if np.array_equal(turned, np.rot90(plain, k))))
        recoloured = random_crop(stacked, 64, np.random.default_rng(seed), Augmentation(permute_channels=True))
        np.testing.assert_array_equal(recoloured[..., :3], recoloured[..., 3:])
        orders.add(tuple(np.argsort(recoloured[..., :3].reshape(-1, 3).mean(0))))
    assert turns == {0, 1, 2, 3} and len(orders) == 6


def test_small_images_are_upscaled_as_before_and_stacked_images_alike():
    image = np.random.default_rng(2).integers(0, 256, (50, 70, 3), dtype=np.uint8)
    stacked = np.concatenate([image, image], axis=-1)
    crop = random_crop(stacked, 64, np.random.default_rng(4))
    # What the code before augmentation did: the short side scaled to the crop, then position and flip.
    up = np.asarray(Image.fromarray(image).resize((max(64, round(70 * 64 / 50)), 64), Image.BICUBIC))
    rng = np.random.default_rng(4)
    top, left = rng.integers(0, up.shape[0] - 64 + 1), rng.integers(0, up.shape[1] - 64 + 1)
    expected = up[top: top + 64, left: left + 64]
    expected = expected[:, ::-1] if rng.random() < 0.5 else expected
    np.testing.assert_array_equal(crop[..., :3], expected)
    np.testing.assert_array_equal(crop[..., 3:], expected)
    varied = random_crop(stacked, 64, np.random.default_rng(4), Augmentation(min_scale=0.5, rotate=True,
                                                                           permute_channels=True))
    assert varied.shape == (64, 64, 6)
    np.testing.assert_array_equal(varied[..., :3], varied[..., 3:])
