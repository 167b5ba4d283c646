"""Write WebDataset tar shards from an image folder.

Each sample is ``<key>.{jpg,png,webp}`` (the original bytes when already RGB in one of those
formats, else a lossless PNG of the RGB conversion) plus ``<key>.json`` (source path and size).
``index.json`` lists the shards with their sample counts; it is written last, so its presence
marks a complete shard set, and the training stream uses the counts to resume without reading.
"""
from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import webdataset as wds
from PIL import Image
from tqdm import tqdm

from datamodules.images import find_tag_file, list_images, load_rgb
from foundation.files import atomic_write_text

INDEX = "index.json"
_KEEP_AS_IS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}


@dataclass
class ShardSummary:
    out_dir: Path
    shards: list[str] = field(default_factory=list)
    counts: list[int] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)

    @property
    def written(self) -> int:
        return sum(self.counts)

    def report(self) -> str:
        lines = [f"wrote {self.written} samples into {len(self.shards)} shards in {self.out_dir}"]
        if self.skipped:
            lines.append(f"skipped {len(self.skipped)} files:")
            lines += [f"  {path}: {reason}" for path, reason in self.skipped]
        return "\n".join(lines)


class ShardSink:
    """Samples into numbered tar shards of ``samples_per_shard`` each; ``close`` writes index.json
    last, so that only a complete set is ever taken for one."""

    def __init__(self, out_dir: Path, samples_per_shard: int):
        if samples_per_shard <= 0:
            raise ValueError(f"samples_per_shard must be positive, got {samples_per_shard}")
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / INDEX).unlink(missing_ok=True)
        self.summary, self.per_shard, self.writer = ShardSummary(out_dir), samples_per_shard, None

    def write(self, fields: dict[str, bytes]) -> None:
        summary = self.summary
        if self.writer is None or summary.counts[-1] == self.per_shard:
            if self.writer is not None:
                self.writer.close()
            summary.shards.append(f"shard-{len(summary.shards):06d}.tar")
            summary.counts.append(0)
            self.writer = wds.TarWriter(str(summary.out_dir / summary.shards[-1]), mtime=0)
        self.writer.write({"__key__": f"{summary.written:08d}", **fields})
        summary.counts[-1] += 1

    def close(self, src_dir: Path, **index_extra) -> ShardSummary:
        if self.writer is not None:
            self.writer.close()
        summary = self.summary
        if not summary.shards:
            raise ValueError(f"no usable images in {src_dir} ({len(summary.skipped)} skipped)")
        index = {"shards": [{"name": n, "samples": c} for n, c in zip(summary.shards, summary.counts)], **index_extra}
        atomic_write_text(summary.out_dir / INDEX, json.dumps(index, indent=1) + "\n")
        return summary


def encode_sample(path: Path) -> tuple[str, bytes, tuple[int, int]]:
    """(extension, bytes, (height, width)) of one image, converted to RGB only where needed."""
    raw = path.read_bytes()
    with Image.open(io.BytesIO(raw)) as image:
        fmt, mode = image.format, image.mode
    rgb = load_rgb(raw)  # decodes fully, so a truncated file fails here and not in training
    if fmt in _KEEP_AS_IS and mode == "RGB":
        return _KEEP_AS_IS[fmt], raw, rgb.shape[:2]
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="PNG")
    return "png", buffer.getvalue(), rgb.shape[:2]


def write_shards(src_dir: str | Path, out_dir: str | Path, samples_per_shard: int = 100,
                 min_size: int = 0, progress: bool = True, tag_suffix: str = ".tags",
                 tag_dirs: Sequence[str | Path] = ()) -> ShardSummary:
    """Every readable image of at least ``min_size`` px on its short side, in sorted path order;
    an image's tags travel with it when it has a tag file (``<stem><tag_suffix>``, one tag per line)
    beside it or, given ``tag_dirs``, in one of those label folders (Diff-ICMH trains on them with
    tagger.kind=sidecar)."""
    src_dir = Path(src_dir)
    files = list_images(src_dir)
    # Looked up before anything is written: an ambiguous label refuses the whole set, not half of it.
    tag_files = {path: find_tag_file(path, tag_suffix, tag_dirs) for path in files}
    sink = ShardSink(Path(out_dir), samples_per_shard)
    for path in tqdm(files, desc="shards", unit="img", disable=not progress):
        rel = path.relative_to(src_dir).as_posix()
        try:
            ext, data, (height, width) = encode_sample(path)
        except Exception as err:  # noqa: BLE001 - any unreadable file is reported, never fatal
            sink.summary.skipped.append((rel, f"{type(err).__name__}: {err}"))
            continue
        if min(height, width) < min_size:
            sink.summary.skipped.append((rel, f"{width}x{height} is smaller than min_size={min_size}"))
            continue
        meta = {"source": rel, "height": height, "width": width}
        if tag_files[path] is not None:
            meta["tags"] = [line.strip() for line in tag_files[path].read_text().splitlines() if line.strip()]
        sink.write({ext: data, "json": json.dumps(meta).encode()})
    return sink.close(src_dir)


def read_index(shard_dir: str | Path) -> list[tuple[str, int]]:
    """(shard path, sample count) of a complete shard set."""
    shard_dir = Path(shard_dir)
    index = shard_dir / INDEX
    if not index.is_file():
        raise FileNotFoundError(f"{shard_dir} has no {INDEX}: not a complete shard set (run `train.py shards`)")
    entries = json.loads(index.read_text())["shards"]
    return [(str(shard_dir / e["name"]), int(e["samples"])) for e in entries]


def write_pair_shards(src_dir: str | Path, out_dir: str | Path, tasks: list[str], seed: int = 0,
                      samples_per_shard: int = 100, min_size: int = 0, progress: bool = True,
                      real_pairs: tuple[str, str, str] | None = None) -> ShardSummary:
    """(degraded, clean, task) shards: every clean image degraded by every task in ``tasks``
    (reproducible from ``seed``), or real pairs found by file-name suffixes ``(degraded, clean,
    task)``, e.g. ``("_real", "_mean", "denoise")`` for PolyU. Degraded images are stored as PNG so
    that no compression adds to the degradation."""
    from datamodules.degradations import TASKS, degrade

    src_dir, out_dir = Path(src_dir), Path(out_dir)
    unknown = [t for t in ([real_pairs[2]] if real_pairs else tasks) if t not in TASKS]
    if unknown:
        raise ValueError(f"unknown degradation tasks {unknown}; choose from {list(TASKS)}")
    jobs = list(_pair_jobs(src_dir, tasks, real_pairs))
    sink = ShardSink(out_dir, samples_per_shard)
    for clean_path, degraded_path, task in tqdm(jobs, desc="pair shards", unit="pair", disable=not progress):
        rel = clean_path.relative_to(src_dir).as_posix()
        try:
            clean_ext, clean_bytes, (height, width) = encode_sample(clean_path)
            clean = load_rgb(clean_bytes)
            sample_seed = int(np.random.SeedSequence([seed, sink.summary.written]).generate_state(1)[0])
            degraded = load_rgb(degraded_path) if degraded_path else degrade(clean, task, sample_seed)
            if degraded.shape != clean.shape:
                raise ValueError(f"degraded {degraded.shape} and clean {clean.shape} differ in size")
        except Exception as err:  # noqa: BLE001 - reported in the summary, never fatal
            sink.summary.skipped.append((rel, f"{type(err).__name__}: {err}"))
            continue
        if min(height, width) < min_size:
            sink.summary.skipped.append((rel, f"{width}x{height} is smaller than min_size={min_size}"))
            continue
        buffer = io.BytesIO()
        Image.fromarray(degraded).save(buffer, format="PNG")
        meta = {"source": rel, "task": task, "label": TASKS.index(task), "height": height, "width": width,
                "synthetic": degraded_path is None, "seed": None if degraded_path else sample_seed}
        sink.write({f"clean.{clean_ext}": clean_bytes, "degraded.png": buffer.getvalue(),
                    "json": json.dumps(meta).encode()})
    return sink.close(src_dir, tasks=list(TASKS))


def _pair_jobs(src_dir: Path, tasks: list[str], real_pairs: tuple[str, str, str] | None):
    """(clean path, degraded path or None, task) in a deterministic order."""
    if real_pairs is None:
        for path in list_images(src_dir):
            for task in tasks:
                yield path, None, task
        return
    degraded_suffix, clean_suffix, task = real_pairs
    for path in list_images(src_dir):
        if path.stem.endswith(clean_suffix):
            partner = next(path.parent.glob(path.stem[: -len(clean_suffix)] + degraded_suffix + ".*"), None)
            if partner is not None:
                yield path, partner, task
