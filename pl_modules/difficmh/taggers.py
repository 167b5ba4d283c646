"""Where an image's tags come from at the encoder (Diff-ICMH's tag guidance); the decoder reads them
from the bitstream. Users pick one by ``kind`` in YAML:

- ``clip``: CLIP zero-shot over the vocabulary, "a photo of a {tag}." against the image, keeping the
  top-k tags whose probability reaches the threshold (RAM++, the paper's tagger, has no
  transformers port; any CLIP checkpoint does, from a hub id or folder).
- ``sidecar``: tags shipped with the dataset, one file per image (``<stem>.tags``, one tag per line),
  beside it or in label folders of their own, for datasets that come with labels.
- ``none``: no tags; the decoder gets the empty prompt.

Every tag must be in the vocabulary: the bitstream codes tags as indices into it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from datamodules.images import find_tag_file
from pl_modules.difficmh.tag_coding import TagError, Vocabulary
from pl_modules.prior.presets import resolve_pretrained

# Package data of ``configs``, so a wheel installed outside the repository has them too.
SHIPPED_VOCABULARIES = Path(str(resources.files("configs") / "tags"))
TAGGER_KINDS = ("clip", "sidecar", "none")


@dataclass
class TaggerConfig:
    kind: str = "clip"
    """clip (zero-shot over the vocabulary), sidecar (a <stem>.tags file per image) or none."""
    vocabulary: str = "coco-80"
    """A vocabulary shipped in configs/tags/ by name (coco-80), or a file: one tag per line. Its order
    is part of the bitstream format."""
    model: str = "openai/clip-vit-base-patch32"
    """CLIP for kind=clip: hub id, local folder, or the tiny-clip preset (tests)."""
    top_k: int = 3
    """At most this many tags per image (kind=clip)."""
    threshold: float = 0.1
    """Keep a tag only when its zero-shot probability over the vocabulary reaches this (kind=clip)."""
    template: str = "a photo of a {}."
    """The prompt each tag is put in (kind=clip)."""
    sidecar_suffix: str = ".tags"
    """File suffix of the tag file beside each image (kind=sidecar): kodim01.png → kodim01.tags."""
    sidecar_dirs: list[str] = field(default_factory=list)
    """Folders holding the tag files as <stem><suffix> (kind=sidecar), for labels kept apart from the
    images (configs/tags/labels/); empty: beside each image. A stem found in two of them is refused."""
    vocabulary_digest: str = ""
    """sha256 of the vocabulary, recorded when a model trains; loading it with a vocabulary file that
    no longer matches fails instead of decoding tags into other words."""

    def __post_init__(self) -> None:
        if self.kind not in TAGGER_KINDS:
            raise ValueError(f"tagger.kind must be one of {TAGGER_KINDS}, got '{self.kind}'")
        if self.top_k < 0 or not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"tagger.top_k must be ≥ 0 and tagger.threshold in [0, 1], got {self.top_k}, {self.threshold}")
        if "{}" not in self.template:
            raise ValueError(f"tagger.template must contain {{}} where the tag goes, got '{self.template}'")


class Tagger:
    """Tags of one image (1×3×H×W in [0, 1]; ``path``: the file it came from, for sidecar tags)."""

    def __init__(self, vocabulary: Vocabulary):
        self.vocabulary = vocabulary

    def __call__(self, image: torch.Tensor, path: Optional[Path] = None) -> list[str]:
        raise NotImplementedError


class NoTags(Tagger):
    def __call__(self, image: torch.Tensor, path: Optional[Path] = None) -> list[str]:
        return []


class SidecarTags(Tagger):
    def __init__(self, vocabulary: Vocabulary, suffix: str = ".tags", folders: Sequence[str | Path] = ()):
        super().__init__(vocabulary)
        self.suffix, self.folders = suffix, [Path(f) for f in folders]

    def tag_file(self, path: Path) -> Path:
        try:
            found = find_tag_file(path, self.suffix, self.folders)
        except ValueError as err:
            raise TagError(f"{err} (tagger.sidecar_dirs)") from None
        if found is None:
            raise TagError(f"{path.stem + self.suffix} (for {path}) is in none of tagger.sidecar_dirs="
                           f"{[str(f) for f in self.folders]}" if self.folders
                           else f"no tag file {path.with_suffix(self.suffix)} beside {path} (tagger.kind=sidecar)")
        return found

    def __call__(self, image: torch.Tensor, path: Optional[Path] = None) -> list[str]:
        if path is None:
            raise TagError("sidecar tags need the image's file path")
        sidecar = self.tag_file(Path(path))
        tags = [line.strip() for line in sidecar.read_text(encoding="utf-8").splitlines() if line.strip()]
        try:
            self.vocabulary.indices(tags)
        except TagError as err:
            raise TagError(f"{sidecar}: {err}") from None
        return tags


class ClipZeroShotTags(Tagger):
    def __init__(self, vocabulary: Vocabulary, model: str, top_k: int, threshold: float, template: str):
        from pl_modules.scoring.features import ClipFidelity
        from pl_modules.scoring.metrics import Unavailable

        super().__init__(vocabulary)
        try:
            self.clip = ClipFidelity(resolve_pretrained(model))
        except Unavailable as err:
            raise ValueError(f"tagger.model: {err}") from None
        self.top_k, self.threshold = top_k, threshold
        tokenizer = self.clip.processor.tokenizer
        with torch.no_grad():
            tokens = tokenizer([template.format(t) for t in vocabulary.names], padding=True, truncation=True,
                               return_tensors="pt")
            self.text = F.normalize(self.clip.pooled(self.clip.model.get_text_features(**tokens)), dim=-1)

    @torch.no_grad()
    def probabilities(self, image: torch.Tensor) -> torch.Tensor:
        """Zero-shot probability of each vocabulary tag (softmax over the vocabulary, CLIP's scale)."""
        logits = self.clip.model.logit_scale.exp() * self.clip.embed(image.cpu().float()) @ self.text.T
        return logits.softmax(-1)[0]

    def __call__(self, image: torch.Tensor, path: Optional[Path] = None) -> list[str]:
        probabilities = self.probabilities(image)
        best = probabilities.topk(min(self.top_k, len(probabilities)))
        return [self.vocabulary.names[i] for p, i in zip(best.values.tolist(), best.indices.tolist())
                if p >= self.threshold]


def vocabulary_file(name_or_path: str) -> Path:
    """A shipped vocabulary's file by its name, or the path given; by name, a model's manifest stays
    valid wherever the repository is checked out."""
    shipped = SHIPPED_VOCABULARIES / f"{name_or_path}.txt"
    return shipped if shipped.is_file() else Path(name_or_path)


def build_tagger(cfg: TaggerConfig) -> Tagger:
    vocabulary = Vocabulary.from_file(vocabulary_file(cfg.vocabulary))
    if cfg.kind == "clip":
        return ClipZeroShotTags(vocabulary, cfg.model, cfg.top_k, cfg.threshold, cfg.template)
    if cfg.kind == "sidecar":
        return SidecarTags(vocabulary, cfg.sidecar_suffix, cfg.sidecar_dirs)
    return NoTags(vocabulary)
