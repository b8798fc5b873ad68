"""The networks as plain tensor-in, tensor-out modules.

The torch backend runs these, and the ONNX export traces the very same modules, so both
backends compute the same function by construction.
"""

from __future__ import annotations

import torch
from torch import nn


class UNetModule(nn.Module):
    """diffusers' UNet with a per-sample float32 timestep, so rows at different steps share a call."""

    def __init__(self, unet: nn.Module) -> None:
        super().__init__()
        self.unet = unet

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        return self.unet(sample, timestep, encoder_hidden_states=encoder_hidden_states, return_dict=False)[0]


class VaeEncoderModule(nn.Module):
    """Image in [-1, 1] to the posterior's moments (mean and log-variance stacked on channels).

    Sampling from the posterior happens outside, with each job's own seeded generator.
    """

    def __init__(self, vae: nn.Module) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        moments = self.vae.encoder(image)
        if self.vae.quant_conv is not None:
            moments = self.vae.quant_conv(moments)
        return moments


class VaeDecoderModule(nn.Module):
    """Unscaled latent to an image in [-1, 1]."""

    def __init__(self, vae: nn.Module) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latent, return_dict=False)[0]
