"""``train.py preference-shards``: judged pairs written once into WebDataset shards, for stage 3's
offline mode — an expensive judge (a large VLM) then runs once, and can run on another machine.
Each sample holds the clean crop, the decoded image (what the bits alone give: for Diff-ICMH the
VAE's picture of ẑ, which stage 3 recomputes from the clean crop), two reconstructions by the stage-2
decoder (two seeds) and the judge's P(a closer); a failed, unsure or disagreeing judgment is no sample."""
from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from datamodules.images import to_uint8
from datamodules.shards import ShardSink, ShardSummary, read_index
from datamodules.stream import CropStream
from foundation.config import ConfigError
from pl_modules.core.schedules import step_seed
from pl_modules.finals import load_final
from pl_modules.scoring.judges import JudgingConfig, build_combined
from pl_modules.vlic.module import DECODERS


@dataclass
class PreferenceShardsConfig:
    decoder: str = "???"
    """The stage-2 final/ whose decoder draws the pairs (the reference stage 3 trains against)."""
    pairs: str = "???"
    """Pair shards (degraded, clean) to draw from (`train.py shards --pairs`)."""
    out_dir: str = "???"
    """Where the preference shards go."""
    judging: JudgingConfig = field(default_factory=JudgingConfig)
    """The judge (pl_modules/scoring/judges.py: e.g. vlm:<folder>, served:<model>@<url>) and how several combine."""
    samples: int = 256
    """Judged pairs to write."""
    crop: int = 64
    """Side of the crops (a multiple of 64)."""
    batch_size: int = 8
    """Crops decoded and judged together."""
    samples_per_shard: int = 128
    """Samples per tar shard."""
    seed: int = 0
    """Seed of the crops and the sampling seeds."""

    def __post_init__(self) -> None:
        if self.crop < 64 or self.crop % 64:
            raise ConfigError(f"crop must be a multiple of 64, got {self.crop}")
        if self.samples <= 0:
            raise ConfigError(f"samples must be positive, got {self.samples}")


def png(image: torch.Tensor) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(to_uint8(image)).save(buffer, format="PNG")
    return buffer.getvalue()


def run(cfg: PreferenceShardsConfig) -> ShardSummary:
    final = load_final(cfg.decoder, need_codec=True)
    if final.manifest.stage not in DECODERS:
        raise ConfigError(f"decoder {cfg.decoder} was written by {final.manifest.stage}, not a stage-2 decoder")
    judge = build_combined(cfg.judging)
    model = final.model
    stream = iter(CropStream(read_index(cfg.pairs), cfg.crop, cfg.batch_size, cfg.seed))
    sink, no_vote = ShardSink(Path(cfg.out_dir), cfg.samples_per_shard), 0
    progress = tqdm(total=cfg.samples, desc="judged pairs", unit="pair")
    for batch_index in range(10 * cfg.samples):
        if sink.summary.written >= cfg.samples:
            break
        batch = next(stream)
        with torch.no_grad():
            inputs = model.decoder_inputs(batch)
            base = step_seed(cfg.seed, batch_index, 0)
            a, b = model.generate(inputs, base), model.generate(inputs, base + 1)
            prefs = judge.prefer(batch["clean"], a, b)
        decoded = inputs["decoded"]
        for i, pref in enumerate(prefs.tolist()):
            if not np.isfinite(pref) or pref == 0.5 or sink.summary.written >= cfg.samples:
                no_vote += int(not np.isfinite(pref) or pref == 0.5)
                continue
            sink.write({"clean.png": png(batch["clean"][i]), "decoded.png": png(decoded[i]), "a.png": png(a[i]),
                        "b.png": png(b[i]), "json": json.dumps({"label": int(batch["task"][i]), "pref": pref,
                                                                 "judge": judge.name}).encode()})
            progress.update(1)
    progress.close()
    print(f"pairs without a vote (tie, failure, disagreement, margin): {no_vote}")
    return sink.close(Path(cfg.pairs), judge=judge.name, decoder=final.decoder_id)
