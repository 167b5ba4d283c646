"""Diff-ICMH's semantic-consistency loss."""
from __future__ import annotations

import torch

SC_DISTANCES = ("cosine", "normalized_l2")


def semantic_consistency(target: dict[str, torch.Tensor], features: dict[str, torch.Tensor],
                         distance: str = "cosine") -> torch.Tensor:
    """Diff-ICMH's semantic-consistency loss: how far the UNet's features of the decoded latent ẑ
    (``features``) lie from those of the true latent z (``target``, held fixed), averaged over the
    named blocks, each B×C×H×W.

    ``cosine``: 1 − cosine similarity over channels at each position (direction only).
    ``normalized_l2``: ‖f(ẑ) − f(z)‖² / ‖f(z)‖² per sample (magnitude too, scale-free across blocks).
    (Normalising each position's channel vector before an L2 would only give 2·cosine again.)"""
    if distance not in SC_DISTANCES:
        raise ValueError(f"semantic-consistency distance must be one of {SC_DISTANCES}, got '{distance}'")
    if set(target) != set(features) or not target:
        raise ValueError(f"semantic consistency compares the same blocks, got {sorted(target)} and {sorted(features)}")
    terms = []
    for block, reference in target.items():
        reference, feature = reference.detach().float(), features[block].float()
        if distance == "cosine":
            terms.append((1 - torch.nn.functional.cosine_similarity(feature, reference, dim=1, eps=1e-8)).mean())
        else:
            error = (feature - reference).pow(2).flatten(1).sum(1)
            terms.append((error / reference.pow(2).flatten(1).sum(1).clamp_min(1e-12)).mean())
    return torch.stack(terms).mean()
