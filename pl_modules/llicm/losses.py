"""LL-ICM's joint loss and the rate weight that keeps its parent's trade-off."""
from __future__ import annotations

import torch


def matched_rate_weight(parent_lmbda: float, alpha: float, gamma: float, task_reaches_pixels: bool) -> float:
    """LL-ICM's β that keeps the parent codec's rate–distortion trade-off.

    Stage 1 minimises ``λ·255²·MSE + R``, i.e. ``MSE + R / (λ·255²)``. In stage 2 the decoded image
    X̂ carries a squared-error weight ``w = α`` from ``α·MSE(X̂, X)`` plus, when ``task_reaches_pixels``,
    ``4γ`` from ``γ·L_task``: a residual pixel-space prior starts as the identity, so its x0
    prediction is X̂ in [-1, 1] and ``L_task ≈ 4·MSE(X̂, clean)``. (That assumption holds at the
    start and only for the residual pixel prior; through a VAE the task term is not a pixel MSE and
    counts 0.) Keeping the trade-off: ``β = w / (λ·255²)``."""
    weight = alpha + (4 * gamma if task_reaches_pixels else 0.0)
    if weight <= 0:
        raise ValueError("beta cannot be derived: no pixel-space distortion weight reaches the codec "
                         "(alpha=0 and a prior that is not the residual pixel prior); set beta")
    return weight / (parent_lmbda * 255**2)


def llicm_loss(x_hat: torch.Tensor, x: torch.Tensor, bpp: torch.Tensor, task: torch.Tensor, logits: torch.Tensor,
               labels: torch.Tensor, alpha: float, beta: float, gamma: float,
               classification: float) -> dict[str, torch.Tensor]:
    """LL-ICM's ``α·MSE(X̂, X) + β·R + γ·L_task`` plus the controller's degradation classification.

    ``L_task`` is the diffusion loss toward the ideal image (the prior's ``diffusion_loss`` of the
    clean image's latent); ``X`` is the degraded image the codec was given.
    """
    distortion = torch.mean((x_hat - x) ** 2)
    cls = torch.nn.functional.cross_entropy(logits, labels)
    loss = alpha * distortion + beta * bpp + gamma * task + classification * cls
    accuracy = (logits.argmax(-1) == labels).float().mean()
    return {"loss": loss, "distortion": distortion, "bpp": bpp, "task": task, "classification": cls,
            "accuracy": accuracy}
