"""``train.py tag-bits``: what an image's tags cost in the bitstream, over real image folders, as
coded here (a k-subset of the vocabulary, padded to bytes as the file holds it) against
fixed-length ⌈log2 V⌉-bit indices at the same vocabulary size and the paper's 13 bits per tag.
The bare fixed-length figures leave out how k is sent, ours include it; "stored" gives the
fixed-length indices the same count code and byte padding, the like-for-like comparison."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from datamodules.images import list_images, load_rgb, to_tensor
from pl_modules.difficmh.tag_coding import encode_tags, fixed_length_bits, fixed_length_stored_bits, tag_set_bits
from pl_modules.difficmh.taggers import TaggerConfig, build_tagger

KEYS = ("subset_bits", "unpadded_bits", "fixed_bits", "fixed_stored_bits", "paper_bits")
PAPER_BITS_PER_TAG = 13
"""RAM++'s 4,585-tag vocabulary as fixed-length indices (the authors' code)."""


@dataclass
class TagBitsConfig:
    images: list[str] = field(default_factory=lambda: ["../shared/data/kodak", "../shared/data/bsds500/val"])
    """Image folders whose tag sets are counted."""
    tagger: TaggerConfig = field(default_factory=TaggerConfig)
    max_images: int = 0
    """Per folder; 0: all."""
    out_json: Optional[str] = None
    """Also write per-image tags and bits here."""


def tag_costs(tags: list[str], payload: bytes, vocabulary_size: int) -> dict:
    k = len(tags)
    return {"tags": tags, "k": k, "subset_bits": 8 * len(payload), "unpadded_bits": tag_set_bits(vocabulary_size, k),
            "fixed_bits": fixed_length_bits(vocabulary_size, k),
            "fixed_stored_bits": fixed_length_stored_bits(vocabulary_size, k), "paper_bits": PAPER_BITS_PER_TAG * k}


def summary_row(name: str, rows: list[dict]) -> dict:
    tags = sum(r["k"] for r in rows)
    mean = lambda key: sum(r[key] for r in rows) / len(rows)  # noqa: E731
    per_tag = lambda key: sum(r[key] for r in rows) / tags if tags else math.nan  # noqa: E731
    return {"name": name, "images": len(rows), "tags_per_image": tags / len(rows),
            **{f"{key}_per_image": mean(key) for key in KEYS},
            **{f"{key}_per_tag": per_tag(key) for key in KEYS}}


def table(summaries: list[dict], vocabulary_size: int) -> str:
    """Bits per image, then per tag: ours as the file holds them (padded to bytes) and unpadded,
    fixed-length indices at this vocabulary's size, and 13-bit indices. The tag section's framing
    (name, flags, length: 7 bytes) is the same whichever code fills it and is left out."""
    width = (vocabulary_size - 1).bit_length()
    names = ("subset", "unpadded", f"{width}-bit idx", f"{width}-bit stored", "13-bit idx")
    head = " ".join(f"{n:>12}" for n in names)
    lines = [f"{'folder':<14} {'images':>6} {'tags/img':>8} | per image: {head} | per tag: {head}"]
    for s in summaries:
        image = " ".join(f"{s[k + '_per_image']:>12.1f}" for k in KEYS)
        tag = " ".join(f"{s[k + '_per_tag']:>12.2f}" for k in KEYS)
        lines.append(f"{s['name']:<14} {s['images']:>6} {s['tags_per_image']:>8.2f} | {'':>10} {image} | {'':>8} {tag}")
    return "\n".join(lines)


def run(cfg: TagBitsConfig) -> list[dict]:
    folders = {folder: list_images(folder)[: cfg.max_images or None] for folder in cfg.images}
    for folder, files in folders.items():
        if not files:
            raise FileNotFoundError(f"no images in {folder}")
    tagger = build_tagger(cfg.tagger)
    size = len(tagger.vocabulary)
    summaries, per_image = [], {}
    for folder, files in folders.items():
        rows = []
        for i, path in enumerate(files):
            tags = tagger(to_tensor(load_rgb(path)).unsqueeze(0), path)
            rows.append(tag_costs(tags, encode_tags(tags, tagger.vocabulary), size))
            per_image[str(path)] = rows[-1]
            print(f"\r{folder}: {i + 1}/{len(files)} images tagged", end="", flush=True)
        print()
        summaries.append(summary_row(Path(folder).name, rows))
    print(f"vocabulary {cfg.tagger.vocabulary} ({size} tags), tagger {cfg.tagger.kind}")
    print(table(summaries, size))
    if cfg.out_json:
        Path(cfg.out_json).write_text(json.dumps({"summary": summaries, "images": per_image}, indent=2) + "\n")
    return summaries
