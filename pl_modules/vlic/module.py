"""Stage 3, VLIC: post-training of a stage-2 diffusion decoder on 2AFC judgments. For one bitstream
the decoder draws two reconstructions (two seeds); a frozen judge says which is closer to the clean
original; Diffusion-DPO trains a LoRA adapter on (winner, loser) against the frozen reference, which
is the stage-2 decoder itself (its trained weights folded into the base: ``adapters_disabled()``).
The codec is frozen, so a stage-3 decoder reads exactly the bitstreams its parent's codec writes.

A stage-2 decoder offers ``decoder_inputs(batch)`` (what it has of each image once the bits are
decoded: the UNet's ``condition`` and ``context``, the ``decoded`` image) and ``generate(inputs,
seed)``; LL-ICM and Diff-ICMH both do, and nothing here knows which of them it post-trains.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from lightning.pytorch.utilities import rank_zero_warn

from foundation.config import ModuleConfig, load_config
from pl_modules.core.base import StageModule
from pl_modules.core.bitstream import Bitstream
from pl_modules.core.rate_distortion import psnr
from pl_modules.core.schedules import OptimConfig, step_seed
from pl_modules.difficmh import module as difficmh_module
from pl_modules.difficmh.module import DiffICMHModule
from pl_modules.llicm import module as llicm_module
from pl_modules.llicm.module import LLICMModule
from pl_modules.scoring.judges import JudgingConfig, build_combined, build_judge
from pl_modules.vlic.dpo_watch import DivergenceConfig, DivergenceWatch, pair_psnr
from pl_modules.vlic.losses import diffusion_dpo_loss

STAGE = "stage3-vlic"
ADAPTER = "vlic"
# Stage-2 methods whose decoder stage 3 post-trains: their module, by the stage their manifests carry.
DECODERS: dict[str, type[StageModule]] = {llicm_module.STAGE: LLICMModule, difficmh_module.STAGE: DiffICMHModule}
LABELS = ("judge", "coin-flip")
MODES = ("online", "offline")
# Held-out pairs draw their seeds from (seed, item, this): a "rank" no training rank has.
HELD_OUT_STREAM = 2**31
# Diffusion-DPO's β by what the per-sample errors measure: 5000 is the published value for
# ε-prediction (SD 1.5, SDXL, in the ½ form); 2000 was calibrated here for the tiny pixel prior's
# x0 ('sample') prediction. Other types must be given explicitly.
BETA_BY_PREDICTION = {"epsilon": 5000.0, "sample": 2000.0}


@dataclass
class AdapterConfig:
    rank: int = 8
    """LoRA rank."""
    alpha: int = 8
    """LoRA scale numerator (scale = alpha / rank)."""
    targets: list[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2"])
    """UNet module names that get the adapter; the resnets' convs too, since a tiny prior's attention
    alone leaves a few thousand weights to train."""


@dataclass
class VLICConfig(ModuleConfig):
    decoder_stage: str = ""
    """The stage-2 method whose decoder is post-trained (filled from init_from's manifest)."""
    decoder_params: dict[str, Any] = field(default_factory=dict)
    """That decoder's own params (filled from init_from's manifest)."""
    judging: JudgingConfig = field(default_factory=JudgingConfig)
    """Whose 2AFC choices train the decoder, and how several judges combine."""
    second_judge: str = "ms-ssim"
    """An independent judge that also scores held-out win rates (the training judge alone proves little)."""
    labels: str = "judge"
    """judge, or coin-flip: the control run (same everything, labels drawn at random)."""
    sft_weight: float = 0.0
    """Weight of the supervised term on winners (their denoising error)."""
    mode: str = "online"
    """online: pairs drawn from the current decoder and judged during training; offline: judged pairs
    read from data.train_shards (written once by `train.py preference-shards`)."""
    beta: float = 0.0
    """Diffusion-DPO β; 0: by the scheduler's prediction type (epsilon 5000, sample 2000)."""
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    """The LoRA adapter trained on the frozen stage-2 decoder."""
    divergence: DivergenceConfig = field(default_factory=DivergenceConfig)
    """What notices Diffusion-DPO diverging, which its loss hides, and what it does then."""
    regenerate_every: int = 1
    """Online pairs: draw and judge a new pair per batch item every this many steps (kept in checkpoints)."""
    val_seeds: int = 2
    """Sampling seeds per held-out image when validation measures the win rate over the reference."""
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-5))
    """Adam for the adapter (the published and the code's learning rates disagree by orders of magnitude:
    watch held-out implicit accuracy)."""

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got '{self.mode}'")
        if self.labels not in LABELS:
            raise ValueError(f"labels must be one of {LABELS}, got '{self.labels}'")
        if self.decoder_stage and self.decoder_stage not in DECODERS:
            raise ValueError(f"decoder_stage '{self.decoder_stage}' is not a stage-2 decoder ({sorted(DECODERS)})")
        if self.regenerate_every < 1 or self.val_seeds < 1 or self.adapter.rank < 1:
            raise ValueError("regenerate_every, val_seeds and adapter.rank must be at least 1")


class VLICModule(StageModule):
    STAGE = STAGE
    CONFIG = VLICConfig
    VAL_METRICS = ("val/win_rate", "val/win_rate_second", "val/psnr", "val/psnr_reference", "val/bpp",
                   "val/dpo/implicit_acc", "val/dpo/reference_drift", "val/dpo/pair_psnr")
    PROGRESS_KEY = "implicit_acc"

    def __init__(self, cfg: VLICConfig):
        super().__init__(cfg)
        if cfg.decoder_stage not in DECODERS:
            raise ValueError(f"stage 3 needs a stage-2 decoder ({sorted(DECODERS)}), got '{cfg.decoder_stage}'")
        module = DECODERS[cfg.decoder_stage]
        self.decoder = module(load_config(module.CONFIG, [cfg.decoder_params]))
        self.decoder.requires_grad_(False)
        prediction = self.decoder.prior.scheduler.config.prediction_type
        self.beta = cfg.beta or BETA_BY_PREDICTION.get(prediction, 0.0)
        if not self.beta:
            raise ValueError(f"beta: no default for prediction type '{prediction}'; set it")
        self.pairs: dict[str, torch.Tensor] = {}
        self.watch = DivergenceWatch(cfg.divergence)

    @functools.cached_property
    def judge(self):
        """Built when first judged: loading a final/ to decode never loads a VLM."""
        return build_combined(self.cfg.judging)

    @functools.cached_property
    def second_judge(self):
        return build_judge(self.cfg.second_judge)

    @property
    def codec(self):
        return self.decoder.codec

    @property
    def prior(self):
        return self.decoder.prior

    def attach_decoder(self, folder: Path) -> None:
        """Load the stage-2 decoder's files (from its final/, or from a stage-3 final/, which carries
        them), fold them into the frozen reference, and add the adapter that trains."""
        self.decoder.load_final_states(folder)
        self.parent_states = {name: {k: v.clone() for k, v in state.items()}
                              for name, state in self.decoder.final_states().items()}
        adapter = self.cfg.adapter
        self.prior.freeze_as_reference(ADAPTER, adapter.rank, adapter.alpha, list(adapter.targets))
        self.codec.update(force=True)

    def is_frozen_weight(self, key: str) -> bool:
        return not (key.startswith("decoder.prior.unet.") and self.prior.is_trained(key[len("decoder.prior.unet."):]))

    def parameter_groups(self):
        return [{"params": self.prior.trainable_parameters()}], []

    @torch.no_grad()
    def draw_pairs(self, batch: dict, base: int, labels: str) -> dict[str, torch.Tensor]:
        """Two reconstructions per item from the current decoder, labelled by the judge against the
        clean image (or by coin flips); sampling seeds follow from ``base``."""
        clean, inputs = batch["clean"], self.decoder.decoder_inputs(batch)
        # base + 1 and + 2: the global generator, reseeded with base itself, draws the DPO noise,
        # which must not be the noise a reconstruction started from.
        a, b = self.decoder.generate(inputs, base + 1), self.decoder.generate(inputs, base + 2)
        prefs = self.judge.prefer(clean, a, b).float()
        if labels == "coin-flip":
            prefs = coin_flip_votes(prefs, base)
        return {"condition": inputs["condition"], "context": inputs["context"], "a": a, "b": b,
                "prefs": prefs.to(clean.device)}

    def dpo_terms(self, pairs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        prefs = pairs["prefs"]
        keep = is_vote(prefs)
        a_wins = (prefs > 0.5).view(-1, 1, 1, 1)
        winner = torch.where(a_wins, pairs["a"], pairs["b"])[keep]
        loser = torch.where(a_wins, pairs["b"], pairs["a"])[keep]
        condition, context = pairs["condition"][keep], pairs["context"][keep]
        if not len(winner):
            zero = sum(p.sum() for p in self.prior.trainable_parameters()) * 0.0
            return {"loss": zero, "dpo": zero.detach(), "implicit_acc": zero.detach(), "reward_margin": zero.detach(),
                    "model_ref_mse": zero.detach(), "reference_drift": zero.detach(), "pairs_kept": zero.detach()}
        with torch.no_grad():
            x_w, x_l = self.prior.encode(winner), self.prior.encode(loser)
        noise = torch.randn_like(x_w)  # one noise and one timestep for winner, loser, model and reference
        timesteps = torch.randint(0, self.prior.scheduler.config.num_train_timesteps, (len(x_w),), device=x_w.device)
        with torch.no_grad(), self.prior.adapters_disabled():
            ref_w = self.prior.diffusion_loss(x_w, condition, context, noise, timesteps)
            ref_l = self.prior.diffusion_loss(x_l, condition, context, noise, timesteps)
        model_w = self.prior.diffusion_loss(x_w, condition, context, noise, timesteps)
        model_l = self.prior.diffusion_loss(x_l, condition, context, noise, timesteps)
        terms = diffusion_dpo_loss(model_w, model_l, ref_w, ref_l, self.beta, self.cfg.sft_weight)
        terms["pairs_kept"] = keep.float().mean()
        return terms

    def offline_pairs(self, batch: dict) -> dict[str, torch.Tensor]:
        if "prefs" not in batch:
            raise ValueError("mode=offline reads judged pairs: point data.train_shards at `train.py preference-shards` output")
        prefs = batch["prefs"]
        if self.cfg.labels == "coin-flip":
            prefs = coin_flip_votes(prefs, step_seed(self.cfg.trainer.seed, self.global_step, self.global_rank))
        inputs = self.decoder.decoder_inputs(batch)
        return {"condition": inputs["condition"], "context": inputs["context"], "a": batch["a"], "b": batch["b"],
                "prefs": prefs.to(batch["a"].device)}

    def losses(self, batch: dict):
        if self.cfg.mode == "offline":
            self.pairs = self.offline_pairs(batch)
        elif not self.pairs or self.global_step % self.cfg.regenerate_every == 0:
            # A function of (seed, step, rank): a resumed run draws and judges the same pairs.
            self.pairs = self.draw_pairs(batch, step_seed(self.cfg.trainer.seed, self.global_step, self.global_rank),
                                         self.cfg.labels)
        terms = self.dpo_terms({k: v.to(self.device) for k, v in self.pairs.items()})
        terms["pair_psnr"] = pair_psnr(self.pairs["a"], self.pairs["b"]).median()
        # Unsure, failed or disagreeing judgments are no votes: how many, and how often judges agreed.
        prefs = self.pairs["prefs"]
        terms["judge_no_vote"] = (~is_vote(prefs)).float().sum()
        terms["judge_failures"] = torch.tensor(float(getattr(self.judge, "failures", 0)))
        terms["judge_agreement"] = torch.tensor(getattr(self.judge, "agreement", 1.0))
        return terms, torch.zeros((), device=terms["loss"].device)

    def training_problem(self, terms, aux_loss):
        problem = super().training_problem(terms, aux_loss)
        # One reduce on every rank, a rank with a non-finite loss too: a collective that one rank
        # skips hangs the others. The watch follows all ranks' pairs, weighted by how many each
        # kept, so every rank reaches the same verdict and rank 0's checkpointed watch is every rank's.
        values = [1.0, 0.0, 0.0, 0.0, 0.0, 0.0]
        if problem is None:
            kept = terms["pairs_kept"].item() * len(self.pairs["prefs"])
            values = [0.0, 1.0, kept, terms["dpo"].item() * kept, terms["reference_drift"].item() * kept,
                      terms["pair_psnr"].item()]
        totals = torch.tensor(values, dtype=torch.float64, device=self.device)
        sick, ranks, kept, dpo, drift, pair_db = self.reduce_over_ranks(totals, "sum").tolist()
        if sick:
            return problem  # None on the healthy ranks: check_health stops them with the sick one
        too_close = self.watch.check_pairs(self.global_step, pair_db / ranks)
        if too_close:
            rank_zero_warn(too_close)
        if kept == 0:  # no rank kept a pair: nothing moved
            return None
        diverging = self.watch.update(self.global_step, dpo / kept, drift / kept)
        if diverging and self.cfg.divergence.action == "stop":
            return DPODiverged(f"{diverging}; stopped (divergence.action=stop): last.ckpt, if any, holds the last "
                               f"checkpoint")
        if diverging:
            rank_zero_warn(f"{diverging} (divergence.action=warn: training goes on)")
        return None

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        """Held-out: the win rate of the post-trained decoder over the reference (the stage-2
        decoder) on the same bits and seeds, by both judges; ties count ½."""
        clean, item = batch["clean"], int(batch["seed"])
        inputs = self.decoder.decoder_inputs(batch)
        for k in range(self.cfg.val_seeds):
            seed = item * self.cfg.val_seeds + k
            post, reference = self.decoder.generate(inputs, seed), self.generate_reference(inputs, seed)
            values = {"val/win_rate": self.judge.prefer(clean, post, reference).item(),
                      "val/win_rate_second": self.second_judge.prefer(clean, post, reference).item(),
                      "val/psnr": psnr(post, clean), "val/psnr_reference": psnr(reference, clean),
                      "val/bpp": inputs["bpp"].item()}
            self.val_means.add({k: v for k, v in values.items() if math.isfinite(v)})  # no vote is no count
        torch.manual_seed(item)  # the held-out pair, its noise and timestep: the same at every validation
        # Judged by the judge in every arm (the control too): held-out accuracy measures agreement with it.
        pairs = self.draw_pairs(batch, step_seed(self.cfg.trainer.seed, item, HELD_OUT_STREAM), "judge")
        with torch.no_grad():
            terms = self.dpo_terms(pairs)
        if terms["pairs_kept"] > 0:
            self.val_means.add({"val/dpo/implicit_acc": terms["implicit_acc"].item(),
                                "val/dpo/reference_drift": terms["reference_drift"].item()})
        self.val_means.add({"val/dpo/pair_psnr": pair_psnr(pairs["a"], pairs["b"]).median().item()})

    # ---- the post-trained decoder, and its reference --------------------------------------------
    def decoder_inputs(self, batch: dict) -> dict[str, torch.Tensor]:
        return self.decoder.decoder_inputs(batch)

    def generate(self, inputs: dict[str, torch.Tensor], seed: int, steps: int | None = None) -> torch.Tensor:
        """The post-trained decoder's images (the adapter on)."""
        return self.decoder.generate(inputs, seed, steps)

    @torch.no_grad()
    def generate_reference(self, inputs: dict[str, torch.Tensor], seed: int) -> torch.Tensor:
        """The stage-2 decoder's images of the same bits with the same seed."""
        with self.prior.adapters_disabled():
            return self.decoder.generate(inputs, seed)

    @property
    def restores(self) -> bool:
        """Whether the decoder restores a degraded input (LL-ICM) rather than codes the image itself."""
        return hasattr(self.decoder, "restore")

    def restore(self, decoded: torch.Tensor, seed: int, steps: int | None = None):
        """The post-trained restorer's output from a decoded image (LL-ICM decoders)."""
        if not self.restores:
            raise ValueError(f"a stage-3 model of {self.cfg.decoder_stage} restores nothing; score it with models=")
        return self.decoder.restore(decoded, seed, steps)

    def encode(self, x: torch.Tensor, decoder_id: str, seed: int = 0, path: Optional[Path] = None) -> Bitstream:
        return self.decoder.encode(x, decoder_id, seed, path)

    def decode(self, stream: Bitstream, decoder_id: str) -> torch.Tensor:
        """The stage-2 decoder's decoding, through the post-trained UNet (the adapter on)."""
        return self.decoder.decode(stream, decoder_id)

    def round_trip(self, x: torch.Tensor, decoder_id: str, seed: int = 0) -> tuple[bytes, torch.Tensor]:
        return self.decoder.round_trip(x, decoder_id, seed)

    def final_states(self):
        """Self-contained: the stage-2 decoder's files as they were, and the adapter."""
        return {**self.parent_states, **self.prior.trained_state()}

    def load_final_states(self, folder: Path) -> None:
        self.attach_decoder(folder)
        self.prior.load_trained(folder)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["vlic_pairs"] = {k: v.cpu() for k, v in self.pairs.items()}
        checkpoint["dpo_watch"] = self.watch.state_dict()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        self.pairs = dict(checkpoint.get("vlic_pairs", {}))  # moved to the model's device when used
        if "dpo_watch" in checkpoint:
            self.watch.load_state_dict(checkpoint["dpo_watch"])


class DPODiverged(RuntimeError):
    """Diffusion-DPO moved the decoder too far from its reference (divergence.action=stop)."""


def is_vote(prefs: torch.Tensor) -> torch.Tensor:
    """Which judgments pick a side: a tie (½), a failure or a disagreement (NaN) is no vote."""
    return torch.isfinite(prefs) & (prefs != 0.5)


def coin_flip_votes(prefs: torch.Tensor, seed: int) -> torch.Tensor:
    """The control run's labels: every vote the judge cast replaced by 1 or 0 (a or b wins) at random,
    reproducibly from ``seed``. Its no-votes (ties, failures, judges disagreeing) stay no-votes, so the
    control trains on the very pairs the judged run keeps."""
    flips = torch.randint(0, 2, prefs.shape, generator=torch.Generator().manual_seed(seed)).float()
    return torch.where(is_vote(prefs), flips, prefs.float())
