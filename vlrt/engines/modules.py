"""The networks as plain tensor-in, tensor-out modules.

The torch backend runs these, and the ONNX export traces the very same modules, so both
backends compute the same function by construction.
"""

from __future__ import annotations

import torch
from torch import nn


class UNetModule(nn.Module):
    """diffusers' UNet with a per-sample float32 timestep, so rows at different steps share a call.
    An SDXL UNet also takes each row's `text_embeds` (pooled) and `time_ids` (sizes), as its own inputs."""

    def __init__(self, unet: nn.Module) -> None:
        super().__init__()
        self.unet = unet

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        text_embeds: torch.Tensor | None = None,
        time_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        added = None if text_embeds is None else {"text_embeds": text_embeds, "time_ids": time_ids}
        return self.unet(
            sample, timestep, encoder_hidden_states=encoder_hidden_states, added_cond_kwargs=added, return_dict=False
        )[0]


class UNetControlModule(nn.Module):
    """The UNet taking a ControlNet's residuals (down blocks' in order, then the mid block's) as inputs;
    an SDXL UNet takes its `added` conditioning (input names, `SDXL_CONDITIONING`) before them."""

    def __init__(self, unet: nn.Module, added: tuple[str, ...] = ()) -> None:
        super().__init__()
        self.unet = unet
        self.added = added

    def forward(
        self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor, *inputs: torch.Tensor
    ) -> torch.Tensor:
        residuals = inputs[len(self.added):]
        return self.unet(
            sample,
            timestep,
            encoder_hidden_states=encoder_hidden_states,
            added_cond_kwargs=_added(self.added, inputs),
            down_block_additional_residuals=list(residuals[:-1]),
            mid_block_additional_residual=residuals[-1],
            return_dict=False,
        )[0]


class ControlNetModule(nn.Module):
    """diffusers' ControlNet with a per-row, per-residual scale [B, L], so that rows of different units'
    weights, guidance ranges and control modes share a call (a scale of 0 switches a row off). An SDXL
    ControlNet takes the UNet's `added` conditioning (input names) after the text embeddings, each row its own."""

    def __init__(self, controlnet: nn.Module, added: tuple[str, ...] = ()) -> None:
        super().__init__()
        self.controlnet = controlnet
        self.added = added

    def forward(
        self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor, *inputs: torch.Tensor
    ) -> tuple[torch.Tensor, ...]:
        controlnet_cond, conditioning_scale = inputs[len(self.added):]
        down, mid = self.controlnet(
            sample,
            timestep,
            encoder_hidden_states=encoder_hidden_states,
            controlnet_cond=controlnet_cond,
            added_cond_kwargs=_added(self.added, inputs),
            return_dict=False,
        )
        scale = conditioning_scale.to(sample.dtype)
        return tuple(r * scale[:, i, None, None, None] for i, r in enumerate((*down, mid)))


def _added(names: tuple[str, ...], inputs: tuple[torch.Tensor, ...]) -> dict[str, torch.Tensor] | None:
    """diffusers' `added_cond_kwargs` from the first inputs after the text embeddings (None when there are none)."""
    return dict(zip(names, inputs)) if names else None


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


class TinyVaeEncoderModule(nn.Module):
    """Image in [-1, 1] to a tiny autoencoder's latents (TAESD: nothing to sample, as diffusers' pipelines
    take `AutoencoderTiny`'s `latents`); the vae_encoder engine's `moments` output carries them."""

    def __init__(self, vae: nn.Module) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.vae.encode(image, return_dict=False)[0]


class VaeDecoderModule(nn.Module):
    """Unscaled latent to an image in [-1, 1]."""

    def __init__(self, vae: nn.Module) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latent, return_dict=False)[0]
