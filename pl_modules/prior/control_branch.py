"""How the image to restore (or the decoded latent ẑ) conditions the diffusion UNet.

- ``concat``: extra zero-initialised ``conv_in`` channels (InstructPix2Pix): one conv's worth of
  weights; the condition enters once, at the input.
- ``controlnet``: a trainable copy of the UNet's encoder and middle block (ControlNet, Zhang et al.
  2023, diffusers' ``ControlNetModel.from_unet``) whose outputs enter every skip connection through
  zero-initialised convolutions: the condition reaches every scale, at the price of a second encoder.
  The condition is already in the UNet's space (a latent), so its embedding keeps the resolution
  (one width, no downsampling) instead of ControlNet's 8× pixel-to-latent stack.

Both start as the pretrained UNet exactly. docs/results.md measures the two at tiny size.
"""
from __future__ import annotations

import torch
import torch.nn as nn

CONTROL_KINDS = ("concat", "controlnet")
CONTROLNET_FILE = "controlnet.safetensors"


def expand_conv_in(unet: nn.Module, extra: int) -> None:
    """Give the UNet's first conv ``extra`` more input channels with zero weights: at init the
    output is exactly the pretrained one, whatever the extra channels hold."""
    old = unet.conv_in
    new = nn.Conv2d(old.in_channels + extra, old.out_channels, old.kernel_size, old.stride, old.padding,
                    dtype=old.weight.dtype, device=old.weight.device)
    with torch.no_grad():
        new.weight.zero_()
        new.weight[:, : old.in_channels] = old.weight
        new.bias.copy_(old.bias)
    unet.conv_in = new
    unet.register_to_config(in_channels=old.in_channels + extra)


def build_controlnet(unet: nn.Module, condition_channels: int) -> nn.Module:
    """A ControlNet initialised from ``unet`` (before any LoRA or conv_in change), fed a condition
    of ``condition_channels`` at the UNet's own resolution."""
    from diffusers import ControlNetModel

    width = unet.config.block_out_channels[0] // 2
    return ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(width,),
                                     conditioning_channels=condition_channels)


def controlled_unet(unet: nn.Module, controlnet: nn.Module, noisy: torch.Tensor, timesteps: torch.Tensor,
                    condition: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
    """The UNet's prediction with the ControlNet's residuals added to its skips and middle block."""
    down, mid = controlnet(noisy, timesteps, encoder_hidden_states=context, controlnet_cond=condition,
                           return_dict=False)
    return unet(noisy, timesteps, encoder_hidden_states=context, down_block_additional_residuals=down,
                mid_block_additional_residual=mid).sample
