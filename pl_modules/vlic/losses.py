"""VLIC's Diffusion-DPO objective."""
from __future__ import annotations

import torch


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
