"""The reference backend: the modules of `modules.py` run eagerly in PyTorch."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from vlrt.engines.base import (
    FASTDVDNET_BLOCK1,
    FASTDVDNET_BLOCK2,
    UNET,
    VAE_DECODER,
    VAE_ENCODER,
    Engine,
    EngineSet,
)
from vlrt.engines.modules import UNetModule, VaeDecoderModule, VaeEncoderModule


class TorchEngine(Engine):
    """Runs a tensor-in, tensor-out module; casts to the module's dtype and back to float32."""

    backend = "torch"

    def __init__(
        self,
        component: str,
        module: nn.Module,
        max_batch: int,
        device: torch.device,
        dtype: torch.dtype,
        names: tuple[tuple[str, ...], tuple[str, ...]] | None = None,
    ) -> None:
        super().__init__(component, max_batch, device, names)
        self.module = module.to(device=device, dtype=dtype).eval()
        self.dtype = dtype

    @torch.inference_mode()
    def _run(self, feed: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        # Timesteps stay float32: fp16 cannot hold fractional timesteps near 1000 exactly.
        args = [
            feed[name].to(self.device, torch.float32 if name == "timestep" else self.dtype)
            for name in self.input_names
        ]
        out = self.module(*args)
        outs = out if isinstance(out, tuple) else (out,)
        return {name: o.float() for name, o in zip(self.output_names, outs, strict=True)}


def torch_engines(unet: nn.Module, vae: nn.Module, max_batch: int, device: torch.device, dtype: torch.dtype) -> EngineSet:
    """The reference engines straight from diffusers' modules."""
    return EngineSet(
        unet=TorchEngine(UNET, UNetModule(unet), max_batch, device, dtype),
        vae_encoder=TorchEngine(VAE_ENCODER, VaeEncoderModule(vae), max_batch, device, dtype),
        vae_decoder=TorchEngine(VAE_DECODER, VaeDecoderModule(vae), max_batch, device, dtype),
    )


def fastdvdnet_engines(network: nn.Module, max_batch: int, device: torch.device, dtype: torch.dtype) -> tuple[TorchEngine, TorchEngine]:
    """FastDVDnet's two blocks as separate engines, so stage-1 results can be reused."""
    return (
        TorchEngine(FASTDVDNET_BLOCK1, network.temp1, max_batch, device, dtype),
        TorchEngine(FASTDVDNET_BLOCK2, network.temp2, max_batch, device, dtype),
    )
