"""CompressAI architectures by the names CompressAI's zoo uses, and strict weight loading."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from compressai.models import (
    Cheng2020Anchor,
    Cheng2020Attention,
    CompressionModel,
    FactorizedPrior,
    JointAutoregressiveHierarchicalPriors,
    MeanScaleHyperprior,
    ScaleHyperprior,
)
from compressai.entropy_models import EntropyBottleneck
from safetensors.torch import load_file, save_file
from torch.utils.hooks import RemovableHandle

from pl_modules.core.bitstream import quantize_8bit
from pl_modules.core.latent_codec import LATENT_CHANNELS, LatentMeanScaleHyperprior

CODEC_FILE = "codec.safetensors"
CODER_TABLES = {"_quantized_cdf", "_offset", "_cdf_length", "scale_table"}


@dataclass(frozen=True)
class Architecture:
    build: Callable[[int, int], CompressionModel]
    pad_multiple: int = 64
    """Input sides are padded to this: the transforms' total downsampling (analysis × hyper-analysis)."""
    latent_stride: int = 64
    """Downsampling of the latent whose shape the bitstream carries (z for hyperpriors, y otherwise)."""
    in_channels: int = 3
    string_groups: int = 2
    """Entropy models whose strings a bitstream carries (y and z for hyperpriors, y alone otherwise)."""
    straight_through: bool = False
    """The synthesis reads the Gaussian conditional's output, so :func:`round_straight_through`
    can hand it the rounded latent (the autoregressive models quantise before their context model)."""


ARCHITECTURES: dict[str, Architecture] = {}


def register(name: str, pad_multiple: int = 64, latent_stride: int = 64, in_channels: int = 3,
             string_groups: int = 2, straight_through: bool = False):
    def add(builder: Callable[[int, int], CompressionModel]):
        if name in ARCHITECTURES:
            raise KeyError(f"codec architecture '{name}' is already registered")
        ARCHITECTURES[name] = Architecture(builder, pad_multiple, latent_stride, in_channels, string_groups,
                                           straight_through)
        return builder
    return add


register("bmshj2018-factorized", pad_multiple=16, latent_stride=16, string_groups=1)(lambda N, M: FactorizedPrior(N, M))
register("bmshj2018-hyperprior", straight_through=True)(lambda N, M: ScaleHyperprior(N, M))
register("mbt2018-mean", straight_through=True)(lambda N, M: MeanScaleHyperprior(N, M))
register("mbt2018")(lambda N, M: JointAutoregressiveHierarchicalPriors(N, M))
# Cheng et al. tie the latent width to N; M is ignored there, as in CompressAI's zoo.
register("cheng2020-anchor")(lambda N, M: Cheng2020Anchor(N))
register("cheng2020-attn")(lambda N, M: Cheng2020Attention(N))
# On a diffusion VAE's latent (Diff-ICMH): 2× analysis, 8× in all, in latent pixels.
register("latent-mean-hyperprior", pad_multiple=8, latent_stride=8, in_channels=LATENT_CHANNELS,
         straight_through=True)(lambda N, M: LatentMeanScaleHyperprior(N, M))


@dataclass
class CodecConfig:
    architecture: str = "bmshj2018-hyperprior"
    """CompressAI architecture: bmshj2018-factorized, bmshj2018-hyperprior, mbt2018-mean, mbt2018, cheng2020-anchor,
    cheng2020-attn; latent-mean-hyperprior codes a 4-channel diffusion latent (Diff-ICMH), not pixels."""
    N: int = 128
    """Channels of the transforms."""
    M: int = 192
    """Channels of the latent (ignored by cheng2020-*, whose latent has N channels)."""

    def __post_init__(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise ValueError(f"codec.architecture '{self.architecture}' is not one of {sorted(ARCHITECTURES)}")


def require_pixel_codec(architecture: str, who: str) -> None:
    """Stages that code images refuse a codec of latents, in one line naming the key."""
    if ARCHITECTURES[architecture].in_channels != 3:
        raise ValueError(f"codec.architecture: {architecture} codes {ARCHITECTURES[architecture].in_channels}-channel "
                         f"diffusion latents, not images; {who} needs a pixel codec")


def build_codec(architecture: str, N: int, M: int) -> CompressionModel:
    """The codec, carrying its geometry (``architecture``, ``pad_multiple``, ``latent_stride``,
    ``in_channels``), which the bitstream writes and checks."""
    if architecture not in ARCHITECTURES:
        raise KeyError(f"unknown codec architecture '{architecture}'; choose one of {sorted(ARCHITECTURES)}")
    spec = ARCHITECTURES[architecture]
    codec = spec.build(N, M)
    codec.architecture, codec.pad_multiple = architecture, spec.pad_multiple
    codec.latent_stride, codec.in_channels = spec.latent_stride, spec.in_channels
    codec.string_groups = spec.string_groups
    for module in codec.modules():
        if type(module) is EntropyBottleneck:
            module.__class__ = TraceableEntropyBottleneck
    return codec


class TraceableEntropyBottleneck(EntropyBottleneck):
    """CompressAI's EntropyBottleneck with the same forward pass, state and coder, but its channel
    permutation spelled in Python ints: CompressAI builds it as a tensor, which splits a compiled
    training step into seven graphs (one graph trains about 1.15× faster on a CPU)."""

    def forward(self, x: torch.Tensor, training: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        training = self.training if training is None else training
        # B×C×… to C×B×…: each channel's density sees all of its values; the permutation is its own inverse.
        perm = (1, 0, *range(2, x.ndim))
        x = x.permute(*perm).contiguous()
        shape = x.size()
        outputs = self.quantize(x.reshape(x.size(0), 1, -1), "noise" if training else "dequantize", self._get_medians())
        likelihood, _, _ = self._likelihood(outputs)
        if self.use_likelihood_bound:
            likelihood = self.likelihood_lower_bound(likelihood)
        return (outputs.reshape(shape).permute(*perm).contiguous(),
                likelihood.reshape(shape).permute(*perm).contiguous())


class HookHandles:
    """Hooks removed together, by ``remove()`` or at the end of a ``with`` block."""

    def __init__(self, *handles: RemovableHandle):
        self.handles = handles

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()

    def __enter__(self) -> "HookHandles":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def round_straight_through(codec: CompressionModel, hyper_latent: bool = True) -> HookHandles:
    """From now on (until ``remove()``), a training forward pass rounds both latents as the decoder
    does, ``round(z − median) + median`` and ``round(y − μ) + μ``, with gradients passed straight
    through, while each latent's own likelihood keeps its additive noise: the synthesis trains on
    exactly what it decodes at test time, and the rate term stays differentiable. (In eval mode the
    outputs are that rounding already.) ``hyper_latent=False`` leaves z noisy: the hyper-synthesis
    then trains on noise as in CompressAI, and a mean hyperprior's means differ from the decoder's
    by that noise's effect."""
    if not ARCHITECTURES[codec.architecture].straight_through:
        raise ValueError(f"straight-through rounding needs a hyperprior whose synthesis reads the Gaussian "
                         f"conditional (bmshj2018-hyperprior, mbt2018-mean), not {codec.architecture}")

    def rounded_y(module, args, kwargs, output):
        y, means = args[0], kwargs.get("means", args[2] if len(args) > 2 else None)
        hard = torch.round(y) if means is None else torch.round(y - means) + means
        return y + (hard - y).detach(), output[1]

    def rounded_z(module, args, output):
        z = args[0]
        medians = module.quantiles[:, 0, 1].detach().view(1, -1, *[1] * (z.dim() - 2))
        return z + (torch.round(z - medians) + medians - z).detach(), output[1]

    handles = [codec.gaussian_conditional.register_forward_hook(rounded_y, with_kwargs=True)]
    if hyper_latent:
        handles.append(codec.entropy_bottleneck.register_forward_hook(rounded_z))
    return HookHandles(*handles)


def as_decoded(x_hat: torch.Tensor, eight_bit: bool = True) -> torch.Tensor:
    """The synthesis output as a decoded file holds it (clamped to [0, 1], and rounded to 8 bits when
    ``eight_bit``), with gradients passed straight through, so a loss on it still reaches the codec."""
    hard = quantize_8bit(x_hat) if eight_bit else x_hat.clamp(0, 1)
    return x_hat + (hard - x_hat).detach()


def split_parameters(model: torch.nn.Module) -> tuple[list[torch.nn.Parameter], list[torch.nn.Parameter]]:
    """(network, auxiliary) parameters: the entropy bottleneck's quantiles learn only from the aux loss."""
    named = {name: p for name, p in model.named_parameters() if p.requires_grad}
    aux_names = {name for name in named if name.endswith(".quantiles")}
    net_names = set(named) - aux_names
    assert net_names.isdisjoint(aux_names) and net_names | aux_names == set(named), "parameter split is not a partition"
    assert aux_names, "a CompressAI model has at least one entropy bottleneck with quantiles"
    return [named[n] for n in sorted(net_names)], [named[n] for n in sorted(aux_names)]


def codec_state(model: CompressionModel) -> dict[str, torch.Tensor]:
    """Weights after ``update(force=True)``, so the CDF tables the entropy coder uses travel with them."""
    model.update(force=True)
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}


def save_codec(model: CompressionModel, path: str | Path) -> None:
    save_file(codec_state(model), str(path))


def load_codec_weights(model: CompressionModel, path: str | Path) -> CompressionModel:
    """Strict load: a checkpoint from another architecture, size or CompressAI layout fails, naming keys."""
    state = load_file(str(path))
    expected = model.state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    # The entropy coder's tables are sized by update(); CompressAI resizes them on load.
    resized = [k for k in set(state) & set(expected) if state[k].shape != expected[k].shape
               and k.rsplit(".", 1)[-1] not in CODER_TABLES]
    if missing or unexpected or resized:
        raise ValueError(f"{path} does not match the codec: missing keys {_few(missing)}, unexpected keys "
                         f"{_few(unexpected)}, shape mismatches {_few(sorted(resized))}")
    model.load_state_dict(state, strict=True)
    return model


def _few(keys: list[str], n: int = 5) -> str:
    return "[]" if not keys else "[" + ", ".join(keys[:n]) + (f", … {len(keys) - n} more" if len(keys) > n else "") + "]"
