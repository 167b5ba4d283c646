"""Feature-space fidelity: what a frozen vision model sees in a reconstruction.

- Machine-task fidelity (Diff-ICMH): for a classifier backbone (torchvision, timm or transformers),
  layer-wise cosine similarity of the features of original and reconstruction, and top-1
  agreement of their predictions.
- CLIP: image-embedding cosine similarity (full-reference) and CLIP-IQA (no-reference: softmax of
  the similarity to "Good photo." against "Bad photo.").

Backbones load through their libraries' real paths, from local weights only: torchvision weights
from torch hub's cache, timm weights from the HF cache or a file, transformers models from a local
folder or the HF cache. Absent weights
make the measure unavailable, with the reason.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from foundation.locations import cache_dir
from pl_modules.scoring.metrics import Unavailable

IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def task_fidelity(name: str, reconstruction, original, layer_prefix: str = "") -> dict[str, float]:
    """Per-layer cosine similarity and top-1 agreement from two (features, logits) pairs; features
    are a dict of named layers or a sequence (then named ``<prefix><index>``)."""
    (ours, logits_hat), (theirs, logits) = reconstruction, original
    if not isinstance(ours, dict):
        ours, theirs = ({f"{layer_prefix}{i}": f for i, f in enumerate(fs)} for fs in (ours, theirs))
    out = {f"task/{name}/cos/{layer}": F.cosine_similarity(ours[layer].flatten(1), theirs[layer].flatten(1)).item()
           for layer in ours}
    out[f"task/{name}/top1_agreement"] = float((logits_hat.argmax(1) == logits.argmax(1)).item())
    return out


class TorchvisionFidelity:
    """``torchvision:<model name>`` with its default weights, from torch hub's cache."""

    def __init__(self, spec: str):
        from torchvision.models import get_model, get_model_weights

        self.name = spec.split(":", 1)[1]
        weights = get_model_weights(self.name).DEFAULT
        cached = cache_dir("metric-weights") / Path(weights.url).name
        if not cached.is_file():
            raise Unavailable(f"needs weights {cached.name} in {cached.parent}")
        self.model = get_model(self.name, weights=weights).eval()
        self.features: dict[str, torch.Tensor] = {}
        for child, module in self.model.named_children():
            module.register_forward_hook(lambda _m, _i, out, child=child: self.features.__setitem__(child, out))

    @torch.no_grad()
    def _run(self, x: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        self.features = {}
        logits = self.model((x - IMAGENET_MEAN) / IMAGENET_STD)
        return {k: v for k, v in self.features.items() if v.dim() == 4}, logits

    def __call__(self, x_hat: torch.Tensor, x: torch.Tensor) -> dict[str, float]:
        return task_fidelity(self.name, self._run(x_hat), self._run(x))


class TimmFidelity:
    """``timm:<name>`` with weights from the HF cache, or ``timm:<name>=<weights file>``; images are
    resized to the model's input size, as it classifies them."""

    def __init__(self, spec: str):
        import timm

        self.name, _, weights = spec.split(":", 1)[1].partition("=")
        if weights and not Path(weights).is_file():
            raise Unavailable(f"weights file {weights} does not exist")
        if not weights:
            from huggingface_hub import try_to_load_from_cache

            hub_id = timm.models.get_pretrained_cfg(self.name).hf_hub_id
            cached = [try_to_load_from_cache(hub_id, f) for f in ("model.safetensors", "pytorch_model.bin")] if hub_id else []
            if not any(isinstance(c, str) for c in cached):
                raise Unavailable(f"needs timm weights {hub_id or self.name} in the HF cache (or timm:{self.name}=FILE)")
        overlay = {"file": weights} if weights else None
        self.model = timm.create_model(self.name, pretrained=True, pretrained_cfg_overlay=overlay).eval()
        config = self.model.pretrained_cfg
        self.size = tuple(config["input_size"][1:])
        self.mean = torch.tensor(config["mean"]).view(1, 3, 1, 1)
        self.std = torch.tensor(config["std"]).view(1, 3, 1, 1)

    @torch.no_grad()
    def _run(self, x: torch.Tensor):
        pixels = F.interpolate(x.clamp(0, 1), size=self.size, mode="bicubic", align_corners=False)
        final, intermediates = self.model.forward_intermediates((pixels - self.mean) / self.std)
        return intermediates, self.model.forward_head(final)

    def __call__(self, x_hat: torch.Tensor, x: torch.Tensor) -> dict[str, float]:
        return task_fidelity(self.name, self._run(x_hat), self._run(x), layer_prefix="stage")


class TransformersFidelity:
    """``hf:<hub id or folder>``: an image classifier through transformers, local files only."""

    def __init__(self, spec: str):
        from transformers import AutoImageProcessor, AutoModelForImageClassification

        source = spec.split(":", 1)[1]
        self.name = Path(source).name or source
        try:
            self.model = AutoModelForImageClassification.from_pretrained(source, local_files_only=True).eval()
            self.processor = AutoImageProcessor.from_pretrained(source, local_files_only=True)
        except OSError as err:
            raise Unavailable(f"'{source}' is not available locally ({str(err).splitlines()[0][:120]})")

    @torch.no_grad()
    def _run(self, x: torch.Tensor):
        pixels = self.processor(images=list(x.clamp(0, 1)), return_tensors="pt", do_rescale=False)["pixel_values"]
        out = self.model(pixel_values=pixels, output_hidden_states=True)
        return out.hidden_states, out.logits

    def __call__(self, x_hat: torch.Tensor, x: torch.Tensor) -> dict[str, float]:
        return task_fidelity(self.name, self._run(x_hat), self._run(x), layer_prefix="hidden")


class ClipFidelity:
    """A CLIP model (hub id or local folder) through transformers, local files only."""

    PROMPTS = ("Good photo.", "Bad photo.")

    def __init__(self, name_or_path: str):
        from transformers import CLIPModel, CLIPProcessor

        try:
            self.model = CLIPModel.from_pretrained(name_or_path, local_files_only=True).eval()
            self.processor = CLIPProcessor.from_pretrained(name_or_path, local_files_only=True)
        except OSError as err:
            raise Unavailable(f"CLIP '{name_or_path}' is not available locally ({str(err).splitlines()[0][:120]})")
        with torch.no_grad():
            tokens = self.processor.tokenizer(list(self.PROMPTS), padding=True, return_tensors="pt")
            self.text = F.normalize(self.pooled(self.model.get_text_features(**tokens)), dim=-1)

    @staticmethod
    def pooled(output) -> torch.Tensor:
        # transformers 5 returns a model output; earlier versions a tensor.
        return output if isinstance(output, torch.Tensor) else output.pooler_output

    @torch.no_grad()
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        pixels = self.processor.image_processor(images=list(x.clamp(0, 1)), return_tensors="pt",
                                                do_rescale=False)["pixel_values"]
        return F.normalize(self.pooled(self.model.get_image_features(pixel_values=pixels)), dim=-1)

    def __call__(self, x_hat: torch.Tensor, x: torch.Tensor) -> dict[str, float]:
        ours, theirs = self.embed(x_hat), self.embed(x)
        scale = self.model.logit_scale.exp()
        good = torch.softmax(scale * ours @ self.text.T, dim=-1)[0, 0]
        return {"clip_similarity": (ours * theirs).sum().item(), "clip_iqa": good.item()}


def build(task_backbones: list[str], clip_model: str) -> tuple[list[Callable], dict[str, str]]:
    """The feature measures that can run here, and the reasons of those that cannot."""
    measures, unavailable = [], {}
    kinds = {"torchvision": TorchvisionFidelity, "timm": TimmFidelity, "hf": TransformersFidelity}
    specs = []
    for spec in task_backbones:
        if spec.split(":", 1)[0] not in kinds or ":" not in spec:
            raise ValueError(f"task backbone '{spec}' must be 'torchvision:<model name>', 'timm:<model name>[=FILE]' "
                             "or 'hf:<hub id or folder>'")
        specs.append((spec, kinds[spec.split(":", 1)[0]]))
    specs += [(clip_model, ClipFidelity)] if clip_model else []
    for spec, kind in specs:
        try:
            measures.append(kind(spec))
        except Unavailable as err:
            unavailable[spec] = str(err)
    return measures, unavailable
