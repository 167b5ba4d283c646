"""Notices what Diffusion-DPO's loss hides: pairs with nothing to choose between, and divergence.

Pairs: the quickstart's stage-2 decoder, after 120 steps, drew two reconstructions of a bitstream
63 dB apart (median PSNR between them), closer than 8-bit rounding; the judge then picks at random
and DPO learns noise (docs/results.md). The watch measures each draw and says so once.

Divergence, two ways, both measured here (docs/results.md): on the tiny pixel prior at too high a
learning rate the loss stayed between 0.69 and 0.86 while the decoder lost 1.4 dB and every held-out
pair to its reference, and what showed it was how far the model's denoising errors had moved from
the frozen reference's (``reference_drift``, 0 while the adapter is zero); on the tiny
SD-structured prior the loss itself rose to 2–12. The watch keeps a running mean of both and speaks
once either crosses its limit.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

ACTIONS = ("warn", "stop")
# The power of 8-bit rounding noise, (1/255)² / 12, as a PSNR: two reconstructions closer than this
# are, once written as 8-bit images, mostly the same pixels.
ROUNDING_PSNR_DB = 10 * math.log10(12 * 255**2)


def pair_psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """PSNR between the two reconstructions of each pair (B×C×H×W in [0, 1]), in dB, 100 when equal."""
    mse = (a.double() - b.double()).pow(2).flatten(1).mean(1)
    return (10 * torch.log10(1 / mse.clamp_min(1e-10))).float()


@dataclass
class DivergenceConfig:
    action: str = "warn"
    """warn: say so in the log and train on (a coin-flip control drifts by design); stop: end the run
    on every rank with an error, before that step's update."""
    max_dpo_loss: float = 1.0
    """Limit on the running mean of the DPO loss. It starts at log 2 (0.693); held above it, the model
    favours the judge's losers more than the reference does."""
    max_reference_drift: float = 0.3
    """Limit on the running mean of ``reference_drift``: the model's per-sample denoising errors'
    distance from the reference's, relative to the reference's."""
    window: int = 20
    """Steps the running means span: a plain mean over the first ``window`` steps, then each step
    weighs 1/``window`` (an exponential mean: no buffer of past steps to checkpoint)."""

    def __post_init__(self) -> None:
        if self.action not in ACTIONS:
            raise ValueError(f"divergence.action must be one of {ACTIONS}, got '{self.action}'")
        if self.window < 1 or self.max_dpo_loss <= math.log(2) or self.max_reference_drift <= 0:
            raise ValueError("divergence: window must be at least 1, max_dpo_loss above log 2 (0.693) and "
                             "max_reference_drift above 0")


class DivergenceWatch:
    """Running means of the DPO loss and the reference drift, and whether either is over its limit;
    and whether the pairs have been found too close to judge."""

    def __init__(self, cfg: DivergenceConfig):
        self.cfg = cfg
        self.means = {"dpo": 0.0, "reference_drift": 0.0}  # the first step replaces them
        self.steps = 0
        self.over = False
        self.told_indistinguishable = False

    def check_pairs(self, step: int, median_pair_psnr: float) -> Optional[str]:
        """What is wrong, the first time a draw's median pair lies closer than 8-bit rounding."""
        if median_pair_psnr <= ROUNDING_PSNR_DB or self.told_indistinguishable:
            return None
        self.told_indistinguishable = True
        return (f"step {step}: the decoder's two reconstructions of a bitstream are {median_pair_psnr:.1f} dB apart "
                f"(median PSNR between them; 8-bit rounding is {ROUNDING_PSNR_DB:.1f} dB): the judge has nothing to "
                f"choose between and DPO learns noise; post-train a decoder whose samples differ more")

    def update(self, step: int, dpo: float, reference_drift: float) -> Optional[str]:
        """Adds one step; returns what is wrong when a mean has just crossed its limit (once per
        crossing: a run that recovers and diverges again is told again)."""
        self.steps += 1
        span = min(self.steps, self.cfg.window)
        for key, value in (("dpo", dpo), ("reference_drift", reference_drift)):
            self.means[key] += (value - self.means[key]) / span
        loss, drift = self.means["dpo"], self.means["reference_drift"]
        reasons = []
        if loss > self.cfg.max_dpo_loss:
            reasons.append(f"its loss averages {loss:.3f} (divergence.max_dpo_loss={self.cfg.max_dpo_loss}; "
                           f"log 2 = 0.693 means no preference)")
        if drift > self.cfg.max_reference_drift:
            reasons.append(f"its denoising errors have moved {drift * 100:.3g}% from the reference's "
                           f"(divergence.max_reference_drift={self.cfg.max_reference_drift})")
        crossed = bool(reasons) and not self.over
        self.over = bool(reasons)
        if not crossed:
            return None
        return (f"Diffusion-DPO is diverging at step {step}: {' and '.join(reasons)}, running means over {span} steps; "
                f"lower optim.lr or beta")

    def state_dict(self) -> dict:
        return {"means": dict(self.means), "steps": self.steps, "over": self.over,
                "told_indistinguishable": self.told_indistinguishable}

    def load_state_dict(self, state: dict) -> None:
        self.means, self.steps, self.over = dict(state["means"]), state["steps"], state["over"]
        self.told_indistinguishable = state.get("told_indistinguishable", False)  # absent before 2026-12-03
