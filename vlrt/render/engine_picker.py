"""Picks the backend and finds, builds or loads the engines a run needs.

`torch` runs diffusers' modules directly. `ort` and `trt` run files from the engine cache
(`--engines`, default `engines/`): an entry whose key (model hash, component, resolution, prompt
length, batch profile, precision, library versions, and TensorRT version and GPU for plans) does
not match is rebuilt, never loaded. An entry that differs only in weight values (a LoRA at
another scale) is re-weighted from one of the same graph instead of exported again, and on
TensorRT its refittable plan is refitted instead of rebuilt. `auto` takes TensorRT where it and a
CUDA GPU are present, else ONNX Runtime.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from vlrt.engines.base import (
    CONTROLNET,
    FASTDVDNET_BLOCK1,
    FASTDVDNET_BLOCK2,
    UNET,
    UNET_CONTROL,
    VAE_DECODER,
    VAE_ENCODER,
    Engine,
    EngineSet,
    control_names,
    residual_names,
)
from vlrt.engines.modules import ControlNetModule, UNetControlModule, UNetModule, VaeDecoderModule, VaeEncoderModule
from vlrt.engines.token_lengths import TokenLengthEngine
from vlrt.engines.torch_engine import TorchEngine
from vlrt.errors import VlrtError
from vlrt.model.controlnet import residual_shapes
from vlrt.model.loading import Model
from vlrt.model.prompt_embeddings import CHUNK_LENGTH

if TYPE_CHECKING:
    from vlrt.export.cache import EngineCache


TEXT = "encoder_hidden_states"  # networks with a prompt axis get one engine per prompt length


def default_engines_dir() -> Path:
    """$VLRT_ENGINES; else the checkout's engines/ folder when running from source; else the user cache."""
    if os.environ.get("VLRT_ENGINES"):
        return Path(os.environ["VLRT_ENGINES"])
    checkout = Path(__file__).resolve().parents[2] / "engines"
    if (checkout / "README.md").is_file():
        return checkout
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "vlrt" / "engines"


@dataclass
class Network:
    """One component to run: its module and an example input of the run's shapes (batch 1)."""

    component: str
    module: nn.Module
    example: dict[str, torch.Tensor]
    names: tuple[tuple[str, ...], tuple[str, ...]] | None = None  # (inputs, outputs) where not the component's own


def sd_networks(model: Model, height: int, width: int) -> list[Network]:
    """The UNet and the VAE's two halves at this resolution."""
    h, w = height // model.vae_scale_factor, width // model.vae_scale_factor
    c = model.latent_channels
    tokens = CHUNK_LENGTH
    return [
        Network(
            UNET,
            UNetModule(model.unet),
            {
                "sample": torch.randn(1, c, h, w),
                "timestep": torch.tensor([500.0]),
                "encoder_hidden_states": torch.randn(1, tokens, model.cross_attention_dim),
            },
        ),
        Network(VAE_ENCODER, VaeEncoderModule(model.vae), {"image": torch.rand(1, 3, height, width) * 2 - 1}),
        Network(VAE_DECODER, VaeDecoderModule(model.vae), {"latent": torch.randn(1, c, h, w)}),
    ]


def control_networks(model: Model, controlnets: list[nn.Module], height: int, width: int) -> list[Network]:
    """The UNet that takes ControlNet residuals, then each ControlNet, at this resolution."""
    unet = sd_networks(model, height, width)[0].example
    shapes = residual_shapes(model, height, width)
    residuals = {name: torch.randn(1, *shape) for name, shape in zip(residual_names(len(shapes)), shapes)}
    control = {"controlnet_cond": torch.rand(1, 3, height, width), "conditioning_scale": torch.ones(1, len(shapes))}
    return [
        Network(UNET_CONTROL, UNetControlModule(model.unet), {**unet, **residuals}, control_names(UNET_CONTROL, len(shapes))),
        *(
            Network(CONTROLNET, ControlNetModule(c), {**unet, **control}, control_names(CONTROLNET, len(shapes)))
            for c in controlnets
        ),
    ]


def fastdvdnet_networks(network: nn.Module, height: int, width: int) -> list[Network]:
    """FastDVDnet's two blocks at this resolution padded to a multiple of 4 (as the denoiser feeds them)."""
    ph, pw = -(-height // 4) * 4, -(-width // 4) * 4
    example = {"frames": torch.rand(1, 9, ph, pw), "noise_map": torch.full((1, 1, ph, pw), 0.1)}
    return [Network(FASTDVDNET_BLOCK1, network.temp1, example), Network(FASTDVDNET_BLOCK2, network.temp2, example)]


def resolve_backend(backend: str, device: torch.device) -> str:
    """`auto` made concrete; `trt` refused with how to get it when TensorRT or a GPU is missing."""
    from vlrt.engines.trt_engine import trt_available

    if backend == "auto":
        return "trt" if device.type == "cuda" and trt_available()[0] else "ort"
    if backend == "trt":
        ok, why = trt_available()
        if not ok:
            raise VlrtError(f"--backend trt is not available: {why}")
    return backend


def precision_for(backend: str, device: torch.device, asked: str) -> str:
    """fp16 where it is fast and supported (TensorRT, CUDA), fp32 on the CPU."""
    if asked != "auto":
        return asked
    return "fp16" if backend == "trt" or device.type == "cuda" else "fp32"


def build_engines(
    networks: list[Network],
    backend: str,
    *,
    device: torch.device,
    max_batch: int,
    precision: str,
    engines_dir: Path,
    log: Callable[[str], None],
) -> dict[str, Engine]:
    """One engine per network on the resolved backend, exporting or building into the cache as needed.

    On `ort` and `trt` the UNet is a `TokenLengthEngine`: the engine of the example's prompt
    length now, those of longer prompts when they first come.
    """
    if backend == "torch":
        dtype = torch.float16 if precision == "fp16" else torch.float32
        return {n.component: TorchEngine(n.component, n.module, max_batch, device, dtype, n.names) for n in networks}
    from vlrt.export.cache import EngineCache
    from vlrt.export.manifest import model_hash, structure_hash

    cache = EngineCache(engines_dir)
    engines: dict[str, Engine] = {}
    for net in networks:
        hashes = (model_hash(net.module), structure_hash(net.module))

        def engine(tokens: int | None, net: Network = net, hashes: tuple[str, str] = hashes) -> Engine:
            sized = net if tokens is None else with_tokens(net, tokens)
            return _cached_engine(cache, sized, hashes, backend, device, max_batch, precision, log)

        if TEXT in net.example:
            tokens = int(net.example[TEXT].shape[1])
            engines[net.component] = TokenLengthEngine({tokens: engine(tokens)}, engine)
        else:
            engines[net.component] = engine(None)
    return engines


def with_tokens(net: Network, tokens: int) -> Network:
    """The network (UNet or ControlNet) with an example prompt of `tokens` tokens."""
    states = net.example[TEXT]
    example = {**net.example, TEXT: torch.randn(states.shape[0], tokens, states.shape[2])}
    return Network(net.component, net.module, example, net.names)


def _cached_engine(
    cache: EngineCache,
    net: Network,
    hashes: tuple[str, str],
    backend: str,
    device: torch.device,
    max_batch: int,
    precision: str,
    log: Callable[[str], None],
) -> Engine:
    """The engine of one network from the cache: found, re-weighted from an entry of the same graph, or built."""
    from vlrt.export.manifest import PLAN_FILE, EngineKey, TrtTarget, plan_mismatch, read_manifest

    (height, width) = _pixel_size(net)
    key = EngineKey(
        model_hash=hashes[0],
        structure_hash=hashes[1],
        height=height,
        width=width,
        tokens=int(net.example[TEXT].shape[1]) if TEXT in net.example else None,
        max_batch=max_batch,
        precision=precision,
        trt=TrtTarget.current(device) if backend == "trt" else None,
    )
    base = None
    if cache.find(net.component, key) is None:
        base = cache.find_same_structure(net.component, key)
        how = f"re-weighting {base.name} into" if base is not None else "building"
        log(f"vlrt: {how} the {net.component} engine ({backend}, {precision}, {height}×{width}, batch ≤ {max_batch}) "
            f"{cache.folder(net.component, key)}")
    build_plan = None
    if backend == "trt":
        build_plan = _plan_builder(net.component, max_batch)
        if base is not None and plan_mismatch(read_manifest(base) or {}, key, base) is None:
            build_plan = _refitter(base / PLAN_FILE)
    folder = cache.find_or_build(net.component, key, _onnx_builder(net, precision, base), build_plan)
    return _load(backend, net.component, folder, max_batch, device, net.names)


def _onnx_builder(net: Network, precision: str, base: Path | None) -> Callable[[Path], None]:
    """Writes model.onnx into a folder: re-weighted from `base` where its graph allows, else exported."""
    from vlrt.export.manifest import ONNX_FILE
    from vlrt.export.onnx_export import export_onnx
    from vlrt.export.reweight import reweight_onnx

    def build(folder: Path) -> None:
        if base is None or not reweight_onnx(base / ONNX_FILE, net.module, folder / ONNX_FILE, precision):
            export_onnx(net.component, net.module, net.example, folder / ONNX_FILE, precision=precision, names=net.names)

    return build


def _pixel_size(net: Network) -> tuple[int, int]:
    """The resolution recorded in the cache key: the network's own input size."""
    first = next(iter(net.example.values()))
    return int(first.shape[-2]), int(first.shape[-1])


def _plan_builder(component: str, max_batch: int) -> Callable[[Path, Path], None]:
    from vlrt.export.trt_build import build_plan

    return lambda onnx_path, plan_path: build_plan(component, onnx_path, plan_path, max_batch=max_batch)


def _refitter(base_plan: Path) -> Callable[[Path, Path], None]:
    """A plan for a re-weighted ONNX: the refittable plan of the same graph, refitted (seconds, not minutes)."""
    from vlrt.engines.trt_engine import refit_unet

    return lambda onnx_path, plan_path: refit_unet(base_plan, onnx_path, plan_path)


def _load(
    backend: str, component: str, folder: Path, max_batch: int, device: torch.device,
    names: tuple[tuple[str, ...], tuple[str, ...]] | None = None,
) -> Engine:
    if backend == "trt":
        from vlrt.engines.trt_engine import TrtEngine

        return TrtEngine(component, folder / "model.plan", max_batch, device, names)
    from vlrt.engines.ort_engine import OrtEngine

    return OrtEngine(component, folder / "model.onnx", max_batch, device, names=names)


def open_engines(
    backend: str,
    *,
    model: Model | None,
    denoiser: nn.Module | None,
    device: torch.device,
    controlnets: list[nn.Module] | None = None,
    height: int,
    width: int,
    max_batch: int,
    precision: str,
    engines_dir: Path,
    log: Callable[[str], None],
) -> EngineSet:
    """The engines of one run: SD's networks when there is a model, FastDVDnet's blocks when asked;
    with `controlnets`, a UNet that takes their residuals and one engine per ControlNet."""
    backend = resolve_backend(backend, device)
    networks = []
    if model is not None:
        networks += sd_networks(model, height, width)
    if denoiser is not None:
        networks += fastdvdnet_networks(denoiser, height, width)
    control = control_networks(model, controlnets, height, width) if model is not None and controlnets else []
    if control:
        networks = [control[0], *networks[1:]]

    def build(nets: list[Network]) -> dict[str, Engine]:
        return build_engines(
            nets, backend, device=device, max_batch=max_batch, precision=precision_for(backend, device, precision),
            engines_dir=engines_dir, log=log,
        )

    engines = build(networks)
    if control:
        engines[UNET] = engines.pop(UNET_CONTROL)
    return EngineSet(**engines, controlnets=tuple(build([net])[CONTROLNET] for net in control[1:]))
