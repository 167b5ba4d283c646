"""LL-ICM's controller: frozen CLIP image features of the decoded image become cross-attention
tokens for the diffusion UNet — one that names the degradation (a learned embedding per task,
mixed by the predicted task probabilities, trained to classify) and a few that describe content."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from pl_modules.prior.presets import resolve_pretrained

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class FrozenClipImageEncoder(nn.Module):
    """CLIP's vision tower with projection, from a hub id, a local folder or the tiny-clip preset;
    never trained."""

    def __init__(self, name_or_path: str, local_files_only: bool = False):
        super().__init__()
        from transformers import CLIPVisionModelWithProjection
        from transformers.utils import logging

        # A full CLIP checkpoint's text tower is left out on purpose; transformers would list every
        # one of its weights as unexpected.
        verbosity = logging.get_verbosity()
        logging.set_verbosity_error()
        try:
            self.model = CLIPVisionModelWithProjection.from_pretrained(resolve_pretrained(name_or_path),
                                                                      local_files_only=local_files_only)
        finally:
            logging.set_verbosity(verbosity)
        self.model.requires_grad_(False).eval()
        self.size = self.model.config.image_size
        self.register_buffer("mean", torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(CLIP_STD).view(1, 3, 1, 1), persistent=False)

    @property
    def dim(self) -> int:
        return self.model.config.projection_dim

    def train(self, mode: bool = True):
        return super().train(False)  # frozen: dropout and friends stay off

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        pixels = F.interpolate(images.clamp(0, 1), size=(self.size, self.size), mode="bicubic", align_corners=False)
        return self.model(pixel_values=(pixels - self.mean) / self.std).image_embeds


class DegradationController(nn.Module):
    def __init__(self, clip_dim: int, token_dim: int, num_tasks: int, content_tokens: int = 4, hidden: int = 512):
        super().__init__()
        self.classifier = nn.Sequential(nn.Linear(clip_dim, hidden), nn.GELU(), nn.Linear(hidden, num_tasks))
        self.task_tokens = nn.Parameter(torch.randn(num_tasks, token_dim) * token_dim**-0.5)
        self.content = nn.Sequential(nn.Linear(clip_dim, hidden), nn.GELU(), nn.Linear(hidden, content_tokens * token_dim))
        self.content_tokens, self.token_dim = content_tokens, token_dim

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(task logits B×T, tokens B×(1+K)×D)."""
        logits = self.classifier(features)
        degradation = (logits.softmax(-1) @ self.task_tokens).unsqueeze(1)
        content = self.content(features).view(len(features), self.content_tokens, self.token_dim)
        return logits, torch.cat([degradation, content], dim=1)
