"""Rate–distortion losses in CompressAI's convention (λ weighs distortion, not rate)."""
from __future__ import annotations

import math

import torch
from torchmetrics.functional.image import multiscale_structural_similarity_index_measure

# Five scales of an 11-px window need at least this many pixels on the short side.
MS_SSIM_MIN_SIDE = 161


def bits_per_pixel(likelihoods: dict[str, torch.Tensor], num_pixels: int) -> torch.Tensor:
    """Estimated rate: −Σ log2 p over every latent, divided by the pixels of the input (batch included)."""
    return sum(torch.log(lk).sum() for lk in likelihoods.values()) / (-math.log(2) * num_pixels)


def mse_rd_loss(x_hat: torch.Tensor, x: torch.Tensor, bpp: torch.Tensor, lmbda: float) -> dict[str, torch.Tensor]:
    """``λ·255²·MSE + bpp`` on images in [0, 1]."""
    mse = torch.mean((x_hat - x) ** 2)
    return {"loss": lmbda * 255**2 * mse + bpp, "bpp": bpp, "mse": mse}


def msssim_rd_loss(x_hat: torch.Tensor, x: torch.Tensor, bpp: torch.Tensor, lmbda: float) -> dict[str, torch.Tensor]:
    """``λ·(1 − MS-SSIM) + bpp`` on images in [0, 1] of at least 161 px."""
    ms_ssim = multiscale_structural_similarity_index_measure(x_hat.float(), x.float(), data_range=1.0)
    return {"loss": lmbda * (1 - ms_ssim) + bpp, "bpp": bpp, "ms_ssim": ms_ssim}


RD_LOSSES = {"mse": mse_rd_loss, "ms-ssim": msssim_rd_loss}


def psnr(x_hat: torch.Tensor, x: torch.Tensor, data_range: float = 1.0) -> float:
    mse = torch.mean((x_hat.double() - x.double()) ** 2).item()
    return float("inf") if mse == 0 else 10 * math.log10(data_range**2 / mse)


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


def diffusion_dpo_loss(model_w: torch.Tensor, model_l: torch.Tensor, ref_w: torch.Tensor, ref_l: torch.Tensor,
                       beta: float, sft_weight: float = 0.0) -> dict[str, torch.Tensor]:
    """Diffusion-DPO (Wallace et al., 2024) from per-sample denoising errors of the winner and the
    loser, noised with the same noise at the same timestep, under the trained model and the frozen
    reference: ``inside = −β/2 · ((mse_w − mse_l) − (ref_w − ref_l))``, loss ``−log σ(inside)``,
    plus ``sft_weight · mse_w`` (supervised fine-tuning on winners). β's scale depends on what the
    errors measure (the prediction type); see the stage-3 schema.

    ``implicit_acc`` (inside > 0: the model prefers the winner more than the reference does) is what
    to watch: the loss can fall towards 0 while the model drifts. ``reference_drift`` measures that drift:
    how far each sample's error under the model has moved from the reference's, relative to the
    reference's, 0 while the adapter is zero."""
    inside = -0.5 * beta * ((model_w - model_l) - (ref_w - ref_l))
    dpo = -torch.nn.functional.logsigmoid(inside).mean()
    return {"loss": dpo + sft_weight * model_w.mean(), "dpo": dpo, "implicit_acc": (inside > 0).float().mean(),
            "reward_margin": inside.mean(), "model_ref_mse": 0.5 * ((model_w - ref_w) + (model_l - ref_l)).mean(),
            "reference_drift": ((model_w - ref_w).abs() + (model_l - ref_l).abs()).mean()
            / (ref_w + ref_l).mean().clamp_min(1e-12)}


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
