"""Learning-rate schedules and per-step seeds: pure functions of the step, so resume replays them."""
from __future__ import annotations

import math
from dataclasses import dataclass

SCHEDULES = ("cosine", "constant")


def lr_factor(step: int, total_steps: int, warmup_steps: int, schedule: str, final_fraction: float) -> float:
    """Multiplier of the base LR: linear warm-up, then constant or cosine decay to ``final_fraction``.

    CompressAI's models are judged after the LR has decayed; a constant LR leaves a noisy snapshot.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    if schedule != "cosine":
        raise ValueError(f"unknown LR schedule '{schedule}'; choose one of {SCHEDULES}")
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return final_fraction + (1 - final_fraction) * 0.5 * (1 + math.cos(math.pi * progress))


def step_seed(seed: int, step: int, rank: int) -> int:
    """A distinct 63-bit seed for every (run seed, step, rank)."""
    import numpy as np

    return int(np.random.SeedSequence([seed, step, rank]).generate_state(1, dtype=np.uint64)[0]) >> 1


@dataclass
class OptimConfig:
    lr: float = 1e-4
    """Adam learning rate of the network."""
    aux_lr: float = 1e-3
    """Adam learning rate of the entropy bottleneck's quantiles (the auxiliary loss)."""
    clip_grad_norm: float = 1.0
    """Clip the network's gradient norm to this (0: off)."""
    schedule: str = "cosine"
    """LR schedule over trainer.max_steps: cosine (decays to final_lr_fraction) or constant."""
    warmup_steps: int = 0
    """Linear LR warm-up steps."""
    final_lr_fraction: float = 0.01
    """Cosine schedule's last LR as a fraction of lr."""

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise ValueError(f"optim.schedule must be one of {SCHEDULES}, got '{self.schedule}'")
