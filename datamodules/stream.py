"""A training stream over WebDataset shards that a resumed run rebuilds exactly.

Every batch is a pure function of (seed, rank, batch index): shards are split by node and by
worker into disjoint subsets, each subset is read pass after pass forever (so DDP ranks never run
out of data), with the shard order reshuffled every pass and the samples of a shard permuted. A
resumed run jumps to its batch with shard sample counts alone, without reading what it skips.

Batch ``b`` holds the raw samples ``[b·B, (b+1)·B)`` of its stream; a sample that fails to decode
is dropped from its batch and counted in ``batch["skipped"]``, so one bad sample neither stops
training nor shifts any later batch.
"""
from __future__ import annotations

import itertools
import json
import math
import logging
import tarfile
from collections import OrderedDict
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info

from datamodules.images import load_rgb
from webdataset.gopen import gopen

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
PREFERENCE_IMAGES = ("clean", "decoded", "a", "b")
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StreamPosition:
    """Which part of the data a loader worker produces."""

    stream: int
    num_streams: int
    first_batch: int


def worker_position(start_batch: int, rank: int, world_size: int, worker: int, num_workers: int) -> StreamPosition:
    """A DataLoader hands out worker batches round-robin, so the loader's j-th batch (global batch
    ``start + j``) comes from worker ``j mod W``. That worker therefore plays stream
    ``(start + j) mod W`` of this rank, which has already produced ``(start + worker) // W`` batches."""
    original = (start_batch + worker) % num_workers
    return StreamPosition(rank * num_workers + original, world_size * num_workers, (start_batch + worker) // num_workers)


def stream_shards(shards: list[tuple[str, int]], stream: int, num_streams: int) -> list[tuple[str, int]]:
    """Disjoint shard subsets per stream (split by node, then by worker); with fewer shards than
    streams every stream reads all shards, in its own order."""
    return shards[stream::num_streams] if len(shards) >= num_streams else list(shards)


def raw_samples(shards: list[tuple[str, int]], seed: int, stream: int, skip: int) -> Iterator[dict]:
    """The stream's infinite sequence of raw samples (dicts of bytes), starting ``skip`` samples in."""
    total = sum(count for _, count in shards)
    if total == 0:
        raise ValueError("the shard set holds no samples")
    for epoch in itertools.count(skip // total):
        skip_in_epoch = skip - epoch * total if epoch * total <= skip else 0
        order = np.random.default_rng([seed, stream, epoch]).permutation(len(shards))
        for position in order:
            url, count = shards[position]
            if skip_in_epoch >= count:
                skip_in_epoch -= count
                continue
            samples = read_shard(url)
            permutation = np.random.default_rng([seed, stream, epoch, int(position)]).permutation(len(samples))
            for index in permutation[skip_in_epoch:]:
                yield samples[index]
            skip_in_epoch = 0


def read_shard(url: str) -> list[dict]:
    """All samples of one shard (a few MB), grouped by key as WebDataset does."""
    samples: dict[str, dict] = {}
    with gopen(url, "rb") as stream, tarfile.open(fileobj=stream, mode="r|*") as tar:
        for member in tar:
            if not member.isreg() or "." not in member.name:
                continue
            key, ext = member.name.split(".", 1)
            samples.setdefault(key, {"__key__": key, "__url__": url})[ext.lower()] = tar.extractfile(member).read()
    return [samples[key] for key in sorted(samples)]


@dataclass
class Augmentation:
    """What a training crop varies besides its position and a horizontal flip; the defaults add
    nothing (a few photos stretch further with all three)."""

    min_scale: float = 1.0
    """Crops show the image downscaled by a random factor in [min_scale, 1] (log-uniform)."""
    rotate: bool = False
    """Random quarter turns: with the flip, the eight symmetries of the square."""
    permute_channels: bool = False
    """Random order of R, G and B, the same for every image stacked in a sample."""

    def __post_init__(self) -> None:
        if not 0 < self.min_scale <= 1:
            raise ValueError(f"min_scale must be in (0, 1], got {self.min_scale}")


def random_crop(image: np.ndarray, size: int, rng: np.random.Generator,
                augment: Augmentation | None = None) -> np.ndarray:
    """A ``size``² crop with a random horizontal flip and ``augment``'s variations; images smaller
    than the crop are upscaled. Stacked images (C a multiple of 3) are cut and varied alike."""
    augment = augment or Augmentation()
    height, width = image.shape[:2]
    # Random draws beyond position and flip happen only when asked for, so that the default
    # stream stays the one earlier runs (and their golden curves) were trained on.
    scale = math.exp(rng.uniform(math.log(augment.min_scale), 0.0)) if augment.min_scale < 1 else 1.0
    window = min(round(size / scale), height, width) if scale < 1 else size
    if min(height, width) < window:
        image = _resize(image, max(window / min(height, width), 1.0))
        height, width = image.shape[:2]
    top, left = rng.integers(0, height - window + 1), rng.integers(0, width - window + 1)
    crop = image[top: top + window, left: left + window]
    if window != size:
        crop = _resize(crop, size / window)
    crop = crop[:, ::-1] if rng.random() < 0.5 else crop
    if augment.rotate:
        crop = np.rot90(crop, k=int(rng.integers(0, 4)))
    if augment.permute_channels:
        order = rng.permutation(3)
        crop = crop[..., np.concatenate([order + c for c in range(0, crop.shape[-1], 3)])]
    return crop


def _resize(image: np.ndarray, factor: float) -> np.ndarray:
    """Bicubic resize by ``factor`` (sides at least the scaled short side), each RGB triple alike."""
    height, width = image.shape[:2]
    new_size = (max(1, round(width * factor)), max(1, round(height * factor)))
    return np.concatenate([np.asarray(Image.fromarray(np.ascontiguousarray(image[..., c: c + 3])).resize(
        new_size, Image.BICUBIC)) for c in range(0, image.shape[-1], 3)], axis=-1)


def decode_sample(sample: dict) -> tuple[np.ndarray, dict]:
    """(H×W×C uint8, metadata): C=3 for an image, C=6 for a (degraded, clean) pair with its task
    label, C=12 for a judged preference pair (clean, decoded, a, b) with its label and preference —
    stacked so that one crop cuts every image at the same place."""
    if "a.png" in sample:
        images = [load_rgb(sample[f"{name}.png"]) for name in PREFERENCE_IMAGES]
        return np.concatenate(images, axis=-1), json.loads(sample["json"])
    if "degraded.png" in sample:
        clean = next((sample[k] for k in sample if k.startswith("clean.")), None)
        if clean is None:
            raise KeyError(f"pair {sample.get('__key__')} has no clean image ({sorted(sample)})")
        pair = np.concatenate([load_rgb(sample["degraded.png"]), load_rgb(clean)], axis=-1)
        return pair, json.loads(sample["json"])
    key = next((k for k in IMAGE_KEYS if k in sample), None)
    if key is None:
        raise KeyError(f"sample {sample.get('__key__')} has no image ({sorted(sample)})")
    return load_rgb(sample[key]), json.loads(sample["json"]) if "json" in sample else {}


class DecodedCache:
    """Decoded images up to a byte budget, least recently used out first: a small data set (the
    quickstart's photos) is then decoded once per worker instead of once per crop."""

    def __init__(self, budget_bytes: int):
        self.budget, self.used, self.images = budget_bytes, 0, OrderedDict()

    def get(self, sample: dict) -> tuple[np.ndarray, dict]:
        key = (sample.get("__url__"), sample.get("__key__"))
        if key in self.images:
            self.images.move_to_end(key)
            return self.images[key]
        decoded = decode_sample(sample)
        if decoded[0].nbytes <= self.budget:
            self.images[key] = decoded
            self.used += decoded[0].nbytes
            while self.used > self.budget:
                self.used -= self.images.popitem(last=False)[1][0].nbytes
        return decoded


class CropStream(IterableDataset):
    """Batches of random crops, ``{"image": B×3×S×S, "keys", "skipped"}`` (and ``"tags"``, a list per
    image, when the shards carry tags); for pair shards
    ``{"degraded", "clean": B×3×S×S, "task": B labels, …}``; for preference shards ``{"clean",
    "decoded", "a", "b", "task", "prefs": P(a closer), …}``. Use with ``batch_size=None``."""

    def __init__(self, shards: list[tuple[str, int]], crop: int, batch_size: int, seed: int,
                 rank: int = 0, world_size: int = 1, start_batch: int = 0, cache_mb: int = 0,
                 augment: Augmentation | None = None):
        self.shards, self.crop, self.batch_size, self.seed = shards, crop, batch_size, seed
        self.rank, self.world_size, self.start_batch = rank, world_size, start_batch
        self.cache_mb, self.augment = cache_mb, augment

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info else (0, 1)
        position = worker_position(self.start_batch, self.rank, self.world_size, worker, num_workers)
        shards = stream_shards(self.shards, position.stream, position.num_streams)
        first_raw = position.first_batch * self.batch_size
        samples = raw_samples(shards, self.seed, position.stream, first_raw)
        cache = DecodedCache(self.cache_mb << 20)
        for batch_index in itertools.count(position.first_batch):
            window = list(itertools.islice(samples, self.batch_size))
            yield self._collate(window, position.stream, batch_index, cache)

    def _collate(self, window: list[dict], stream: int, batch_index: int, cache: DecodedCache) -> dict:
        crops, metas, keys, skipped = [], [], [], 0
        for offset, sample in enumerate(window):
            rng = np.random.default_rng([self.seed, stream, batch_index * self.batch_size + offset])
            try:
                pixels, meta = cache.get(sample)
                crops.append(random_crop(pixels, self.crop, rng, self.augment))
                metas.append(meta)
                keys.append(sample["__key__"])
            except Exception as err:  # noqa: BLE001 - counted and logged as train/skipped_samples
                log.warning("skipping sample %s of %s: %s", sample.get("__key__"), sample.get("__url__"), err)
                skipped += 1
        if not crops:
            raise RuntimeError(f"every sample of batch {batch_index} failed to decode (shard "
                               f"{window[0].get('__url__') if window else '?'} looks corrupt)")
        images = torch.from_numpy(np.ascontiguousarray(np.stack(crops))).permute(0, 3, 1, 2).float().div(255)
        common = {"keys": keys, "skipped": skipped}
        if images.shape[1] == 3 * len(PREFERENCE_IMAGES):
            parts = dict(zip(PREFERENCE_IMAGES, images.split(3, dim=1)))
            return {**parts, "task": torch.tensor([m["label"] for m in metas]),
                    "prefs": torch.tensor([m["pref"] for m in metas], dtype=torch.float32), **common}
        if images.shape[1] == 6:
            return {"degraded": images[:, :3], "clean": images[:, 3:], "task": torch.tensor([m["label"] for m in metas]),
                    **common}
        if any("tags" in m for m in metas):  # the image's tags (None where it came without)
            common["tags"] = [m.get("tags") for m in metas]
        return {"image": images, **common}
