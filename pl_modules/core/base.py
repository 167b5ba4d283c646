"""What every trained stage shares, so that a method writes only its losses, its metrics and its
hand-over: one hand-stepped training step (the network's optimizer and, when entropy models train,
their auxiliary optimizer), per-step seeds, the cross-rank health check (finite losses and a
method's own watch), exact validation means, checkpoints without frozen weights, the entropy
coder's table reload, and the ``final/`` files a stage hands to the next.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import lightning as L
import torch
from torch.optim.lr_scheduler import LambdaLR

from foundation.config import section, to_dict
from pl_modules.core.bitstream import Bitstream, Sampler, decode_image, encode_image, round_trip
from pl_modules.core.image_means import ImageMeans
from pl_modules.core.schedules import lr_factor, step_seed

Tensors = dict[str, torch.Tensor]


class StageModule(L.LightningModule):
    """A stage's LightningModule. Subclasses set ``STAGE`` and ``VAL_METRICS`` and implement
    :meth:`losses`, :meth:`parameter_groups`, :meth:`final_states` and :meth:`load_final_states`;
    ``self.codec`` is the CompressAI codec when the model has one."""

    STAGE = ""
    """The ``stage`` its manifests carry; the final-folder loaders are chosen by it."""
    CONFIG: type = object
    """The module's own schema (a ModuleConfig): what a manifest's params hold."""
    VAL_METRICS: tuple[str, ...] = ()
    PROGRESS_KEY = "loss"
    """The training term the progress bar shows."""
    RATE_SETTING = "lmbda"
    """The config field that sets its codec's rate: the label of its RD points (an ancestor's when absent)."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.save_hyperparameters(to_dict(cfg))
        # Two optimizers (network, entropy-model quantiles) as in CompressAI's examples/train.py.
        self.automatic_optimization = False
        self.skipped_samples = 0
        self.validated_at_step = -1
        """The trainer validates the final weights unless the last validation was at the last step."""
        self.val_means = ImageMeans(self.VAL_METRICS)
        # Checkpoints leave out frozen pretrained weights; on_load_checkpoint checks the rest strictly.
        self.strict_loading = False

    # ---- what a method writes ----------------------------------------------------------------
    def losses(self, batch: dict) -> tuple[Tensors, torch.Tensor]:
        """(loss terms with the total under ``loss``, auxiliary entropy-model loss) of one batch."""
        raise NotImplementedError

    def parameter_groups(self) -> tuple[list[dict], list[torch.nn.Parameter]]:
        """(network parameter groups, auxiliary parameters): what trains; everything else is frozen."""
        raise NotImplementedError

    def manifest_params(self) -> dict:
        """What the manifest records this stage trained with: its schema's part of the config."""
        return section(self.cfg, self.CONFIG)

    def final_states(self) -> dict[str, Tensors]:
        """File name in ``final/`` → tensors: what this stage hands over (trained weights only)."""
        raise NotImplementedError

    def load_final_states(self, folder: Path) -> None:
        raise NotImplementedError

    def is_frozen_weight(self, key: str) -> bool:
        """Pretrained weights that never train and stay out of checkpoints."""
        return False

    def sampler_settings(self, seed: int) -> Optional[Sampler]:
        """What a bitstream must carry for this model to decode it deterministically (diffusion
        decoders: steps, seed, guidance); None for a plain codec."""
        return None

    def reconstruct(self, decoded: torch.Tensor, sampler: Optional[Sampler]) -> torch.Tensor:
        """The model's output image from the codec's decoded image (a restorer restores it)."""
        return decoded

    def encode(self, x: torch.Tensor, decoder_id: str, seed: int = 0, path: Optional[Path] = None) -> Bitstream:
        """One image (1×3×H×W in [0, 1]; ``path``: its file, for side information read beside it)
        into the bitstream this model decodes; ``seed``: a diffusion decoder's sampling seed."""
        return encode_image(self.codec, x, decoder_id, self.sampler_settings(seed))

    def decode(self, stream: Bitstream, decoder_id: str) -> torch.Tensor:
        """The model's output image from a bitstream it wrote."""
        return self.reconstruct(decode_image(self.codec, stream, decoder_id).to(self.device), stream.sampler)

    def round_trip(self, x: torch.Tensor, decoder_id: str, seed: int = 0) -> tuple[bytes, torch.Tensor]:
        """(the file's bytes, the image evaluate scores as this model's): the codec's decoded image
        (evaluate scores a restorer's output apart, with its own degradations and seeds)."""
        return round_trip(self.codec, x, decoder_id)

    # ---- shared ------------------------------------------------------------------------------
    @property
    def entropy_codec(self):
        """``self.codec`` when the model has one (a submodule: a class default would shadow it)."""
        return getattr(self, "codec", None)

    def configure_optimizers(self):
        optim = self.cfg.optim
        groups, aux = self.parameter_groups()
        # foreach: one kernel per step over all tensors, as CUDA does by default; CPU's default steps
        # each of a codec's many small tensors on its own (about 1.1–1.25× the whole step, stage 1 on 2 cores).
        net = torch.optim.Adam(groups, lr=optim.lr, foreach=True)
        schedule = LambdaLR(net, lambda step: lr_factor(step, self.cfg.trainer.max_steps, optim.warmup_steps,
                                                         optim.schedule, optim.final_lr_fraction))
        return [net, *([torch.optim.Adam(aux, lr=optim.aux_lr, foreach=True)] if aux else [])], [schedule]

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        # Quantisation and diffusion noise come from the global generator: reseeding it from
        # (seed, step, rank) makes a resumed run draw what the uninterrupted run drew.
        torch.manual_seed(step_seed(self.cfg.trainer.seed, self.global_step, self.global_rank))
        terms, aux_loss = self.losses(batch)
        self.check_health(terms, aux_loss)
        optimizers = self.optimizers()
        optimizers = optimizers if isinstance(optimizers, list) else [optimizers]
        for optimizer in optimizers:
            optimizer.zero_grad(set_to_none=True)
        # The losses share no parameters, so one backward pass gives both sets of gradients.
        self.manual_backward(terms["loss"] + aux_loss)
        if self.cfg.optim.clip_grad_norm > 0:
            self.clip_gradients(optimizers[0], gradient_clip_val=self.cfg.optim.clip_grad_norm,
                                gradient_clip_algorithm="norm")
        optimizers[0].step()
        # The raw step: Lightning counts every LightningOptimizer.step as a global step, and a step
        # here must be one batch so that max_steps, the LR schedule and resume agree.
        for optimizer in optimizers[1:]:
            optimizer.optimizer.step()
        self.lr_schedulers().step()
        self.skipped_samples += int(batch.get("skipped", 0))
        if self.global_step % self.cfg.trainer.log_every == 0:
            self.log_train(terms, aux_loss)
        return terms["loss"]

    def training_problem(self, terms: Tensors, aux_loss: torch.Tensor) -> Optional[Exception]:
        """What must stop training before this step's update (None: go on). A method adds its own
        watch (stage 3: Diffusion-DPO's divergence) and keeps this one."""
        loss = terms["loss"]
        if torch.isfinite(loss) and torch.isfinite(aux_loss):
            return None
        return FloatingPointError(f"non-finite loss at step {self.global_step} (rank {self.global_rank}: loss "
                                  f"{loss.item()}, aux {aux_loss.item()}); last.ckpt, if any, holds the last good state")

    def check_health(self, terms: Tensors, aux_loss: torch.Tensor) -> None:
        problem = self.training_problem(terms, aux_loss)
        # Every rank must stop together, or the others would wait on this one's gradients forever.
        if not self.trainer.strategy.reduce_boolean_decision(problem is None, all=True):
            raise problem or RuntimeError(f"training stopped at step {self.global_step}: another rank found a "
                                          f"problem (its log says which)")

    def reduce_over_ranks(self, value: torch.Tensor, op: str) -> torch.Tensor:
        """``value`` summed or averaged (``op``) over the ranks; as it is without a trainer (one process).
        A failing reduce fails: it must not leave the ranks apart."""
        try:
            strategy = self.trainer.strategy
        except RuntimeError:  # no trainer attached
            return value
        return strategy.reduce(value, reduce_op=op)

    def log_train(self, terms: Tensors, aux_loss: torch.Tensor) -> None:
        """Straight to the logger: Lightning's per-step metric bookkeeping costs ~5 % of a CPU step."""
        scalars = {f"train/{k}": v.item() for k, v in terms.items()}
        scalars["train/aux_loss"] = aux_loss.item()
        scalars["train/lr"] = self.lr_schedulers().get_last_lr()[0]
        scalars["train/skipped_samples"] = float(self.skipped_samples)
        if self.logger is not None:
            self.logger.log_metrics(scalars, step=self.global_step)
        self.log(self.PROGRESS_KEY, scalars[f"train/{self.PROGRESS_KEY}"], prog_bar=True, logger=False)

    def on_validation_epoch_start(self) -> None:
        if self.entropy_codec is not None:
            self.entropy_codec.update(force=True)
        self.val_means.reset()

    def on_validation_epoch_end(self) -> None:
        # Already reduced over ranks: every rank logs the same global means.
        self.log_dict(self.val_means.means(self.trainer.strategy), sync_dist=False)
        self.validated_at_step = self.global_step

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["skipped_samples"] = self.skipped_samples
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if not self.is_frozen_weight(k)}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.skipped_samples = checkpoint.get("skipped_samples", 0)
        state = checkpoint["state_dict"]
        expected = {k for k in self.state_dict() if not self.is_frozen_weight(k)}
        missing, unexpected = expected - set(state), set(state) - expected
        if missing or unexpected:
            raise ValueError(f"checkpoint does not match this {self.STAGE} model: missing {sorted(missing)[:5]}, "
                             f"unexpected {sorted(unexpected)[:5]}")
        prefix = "codec."
        codec_state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        if codec_state:  # a trained codec (a frozen one stays out of checkpoints)
            # The entropy coder's tables were sized by update() before the checkpoint; CompressAI's
            # own load_state_dict resizes ours to match, which Lightning's generic load would refuse.
            self.entropy_codec.load_state_dict(codec_state)

    def log_image(self, tag: str, image: torch.Tensor) -> None:
        experiment = getattr(self.logger, "experiment", None)
        if experiment is not None and hasattr(experiment, "add_image"):
            experiment.add_image(tag, image[0].cpu(), self.global_step)
