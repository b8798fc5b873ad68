"""Picks the backend and finds, builds or loads the engines a run needs.

`torch` runs diffusers' modules directly. `ort` and `trt` run files from the engine cache
(`--engines`, default `engines/`): an entry whose key (model hash, component, resolution, prompt
length, batch profile, precision, library versions, and TensorRT version and GPU for plans) does
not match is rebuilt, never loaded. An entry that differs only in weight values (a LoRA at
another scale) is re-weighted from one of the same graph instead of exported again, and on
TensorRT the UNet's refittable plan is refitted instead of rebuilt; the other plans are not
refittable (TensorRT folds their weights) and are rebuilt, as is a UNet whose refit fails or
whose ONNX had to be exported afresh. `auto` takes TensorRT where it and a CUDA GPU are present,
else ONNX Runtime, saying why in one line.

On a GPU: plan builds share a timing cache (per TensorRT version and GPU) in the engine folder
and start with torch's cached memory freed; every freshly built plan is compared with torch on
random inputs before it is used; once the engines are loaded, the torch modules they came from
leave the GPU.
"""

from __future__ import annotations

import os
import shutil
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
    SDXL_CONDITIONING,
    UNET,
    UNET_CONTROL,
    VAE_DECODER,
    VAE_ENCODER,
    Engine,
    EngineSet,
    control_names,
    residual_names,
    unet_names,
)
from vlrt.engines.modules import (
    ControlNetModule,
    TinyVaeEncoderModule,
    UNetControlModule,
    UNetModule,
    VaeDecoderModule,
    VaeEncoderModule,
)
from vlrt.engines.token_lengths import TokenLengthEngine
from vlrt.engines.torch_engine import TorchEngine
from vlrt.errors import VlrtError
from vlrt.model.conditioning import time_ids
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
    """The UNet and the VAE's two halves at this resolution; an SDXL UNet takes its added conditioning too,
    an inpainting UNet 9 channels (a tiny VAE's encoder gives its latents)."""
    h, w = height // model.vae_scale_factor, width // model.vae_scale_factor
    c = model.latent_channels
    tokens = CHUNK_LENGTH
    unet = {
        "sample": torch.randn(1, int(model.unet.config.in_channels), h, w),
        "timestep": torch.tensor([500.0]),
        "encoder_hidden_states": torch.randn(1, tokens, model.cross_attention_dim),
    }
    names = None
    if model.is_sdxl:
        pooled = int(model.text_encoder_2.config.projection_dim)
        unet |= {"text_embeds": torch.randn(1, pooled), "time_ids": time_ids(height, width)}
        names = unet_names(SDXL_CONDITIONING)
    encoder = TinyVaeEncoderModule if model.tiny_vae else VaeEncoderModule
    return [
        Network(UNET, UNetModule(model.unet), unet, names),
        Network(VAE_ENCODER, encoder(model.vae), {"image": torch.rand(1, 3, height, width) * 2 - 1}),
        Network(VAE_DECODER, VaeDecoderModule(model.vae), {"latent": torch.randn(1, c, h, w)}),
    ]


def control_networks(model: Model, controlnets: list[nn.Module], height: int, width: int) -> list[Network]:
    """The UNet that takes ControlNet residuals, then each ControlNet, at this resolution; on SDXL both
    take the UNet's added conditioning."""
    unet = sd_networks(model, height, width)[0].example
    added = SDXL_CONDITIONING if model.is_sdxl else ()
    shapes = residual_shapes(model, height, width)
    residuals = {name: torch.randn(1, *shape) for name, shape in zip(residual_names(len(shapes)), shapes)}
    control = {"controlnet_cond": torch.rand(1, 3, height, width), "conditioning_scale": torch.ones(1, len(shapes))}
    return [
        Network(
            UNET_CONTROL, UNetControlModule(model.unet, added), {**unet, **residuals},
            control_names(UNET_CONTROL, len(shapes), added),
        ),
        *(
            Network(CONTROLNET, ControlNetModule(c, added), {**unet, **control}, control_names(CONTROLNET, len(shapes), added))
            for c in controlnets
        ),
    ]


def fastdvdnet_networks(network: nn.Module, height: int, width: int) -> list[Network]:
    """FastDVDnet's two blocks at this resolution padded to a multiple of 4 (as the denoiser feeds them)."""
    ph, pw = -(-height // 4) * 4, -(-width // 4) * 4
    example = {"frames": torch.rand(1, 9, ph, pw), "noise_map": torch.full((1, 1, ph, pw), 0.1)}
    return [Network(FASTDVDNET_BLOCK1, network.temp1, example), Network(FASTDVDNET_BLOCK2, network.temp2, example)]


def resolve_backend(backend: str, device: torch.device, log: Callable[[str], None] | None = None) -> str:
    """`auto` made concrete (on a GPU without usable TensorRT, one `log` line says why it is ONNX
    Runtime); `trt` refused with how to get it when TensorRT or a GPU is missing."""
    from vlrt.engines.trt_engine import trt_available

    if backend == "auto":
        if device.type != "cuda":
            return "ort"
        ok, why = trt_available()
        if not ok and log is not None:
            log(f"vlrt: --backend auto runs ONNX Runtime, not TensorRT: {why}")
        return "trt" if ok else "ort"
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


VAE_FP32_MIN_MEMORY = 16 * 2**30  # bytes of GPU memory from which `auto` runs the VAE in fp32


def vae_precision_for(device: torch.device, asked: str, precision: str, overflows: bool = False) -> str:
    """The VAE's precision: `auto` is fp32 on a GPU with room for its fp32 activations (a NaN in
    fp16 decodes to a black frame that feeds the next loop pass), else the engines' `precision`;
    fp32 always for a VAE that `overflows` in fp16 (SDXL's, whose config says `force_upcast`; the
    fp16-fix VAE's does not)."""
    if asked != "auto":
        return asked
    if overflows:
        return "fp32"
    if device.type == "cuda" and torch.cuda.get_device_properties(device).total_memory >= VAE_FP32_MIN_MEMORY:
        return "fp32"
    return precision


def build_engines(
    networks: list[Network],
    backend: str,
    *,
    device: torch.device,
    max_batch: int,
    precision: str,
    engines_dir: Path,
    log: Callable[[str], None],
    vae_precision: str | None = None,
) -> dict[str, Engine]:
    """One engine per network on the resolved backend, exporting or building into the cache as needed.

    The VAE's two halves run in `vae_precision` (default: `precision`), the others in `precision`.
    On `ort` and `trt` the UNet is a `TokenLengthEngine`: the engine of the example's prompt
    length now, those of longer prompts when they first come.
    """
    vae = vae_precision or precision

    def precision_of(component: str) -> str:
        return vae if component in (VAE_ENCODER, VAE_DECODER) else precision

    if backend == "torch":
        dtypes = {"fp16": torch.float16, "fp32": torch.float32}
        return {
            n.component: TorchEngine(n.component, n.module, max_batch, device, dtypes[precision_of(n.component)], n.names)
            for n in networks
        }
    from vlrt.export.cache import EngineCache
    from vlrt.export.manifest import model_hash, structure_hash

    cache = EngineCache(engines_dir)
    engines: dict[str, Engine] = {}
    for net in networks:
        hashes = (model_hash(net.module), structure_hash(net.module))

        def engine(tokens: int | None, net: Network = net, hashes: tuple[str, str] = hashes) -> Engine:
            sized = net if tokens is None else with_tokens(net, tokens)
            return _cached_engine(cache, sized, hashes, backend, device, max_batch, precision_of(net.component), log)

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
    reweighted: list[bool] = []  # the ONNX builder's outcome: True when it re-weighted base's graph
    built: list[Path] = []  # the plans built or refitted in this call
    make_plan = None
    if backend == "trt":
        from vlrt.engines.trt_engine import refit_supported

        refit_from = None
        if (
            net.component in (UNET, UNET_CONTROL)  # the only plans built refittable
            and base is not None
            and refit_supported(key.trt.tensorrt)
            and plan_mismatch(read_manifest(base) or {}, key, base) is None
        ):
            refit_from = base / PLAN_FILE
        timing = cache.root / f".timing-trt{key.trt.tensorrt}-sm{key.trt.compute_capability}.cache"
        make_plan = _plan_maker(net.component, max_batch, timing, refit_from, reweighted, built, log)
    folder = cache.find_or_build(net.component, key, _onnx_builder(net, precision, base, reweighted), make_plan)
    engine = _load(backend, net.component, folder, max_batch, device, net.names)
    if built:
        try:
            check_engine(engine, net)
        except VlrtError:
            shutil.rmtree(folder, ignore_errors=True)  # never found and used by a later run
            raise
    return engine


def _onnx_builder(net: Network, precision: str, base: Path | None, reweighted: list[bool]) -> Callable[[Path], None]:
    """Writes model.onnx into a folder: re-weighted from `base` where its graph allows, else exported.
    Appends to `reweighted` whether it re-weighted."""
    from vlrt.export.manifest import ONNX_FILE
    from vlrt.export.onnx_export import export_onnx
    from vlrt.export.reweight import reweight_onnx

    def build(folder: Path) -> None:
        done = base is not None and reweight_onnx(base / ONNX_FILE, net.module, folder / ONNX_FILE, precision)
        if not done:
            export_onnx(net.component, net.module, net.example, folder / ONNX_FILE, precision=precision, names=net.names)
        reweighted.append(done)

    return build


def _plan_maker(
    component: str,
    max_batch: int,
    timing_cache: Path,
    refit_from: Path | None,
    reweighted: list[bool],
    built: list[Path],
    log: Callable[[str], None],
) -> Callable[[Path, Path], None]:
    """Writes a plan for an ONNX file: `refit_from` refitted when the ONNX was re-weighted from
    its graph (seconds), else, or when the refit fails, a build (minutes)."""
    from vlrt.engines.trt_engine import refit_unet
    from vlrt.export.trt_build import build_plan

    def make(onnx_path: Path, plan_path: Path) -> None:
        built.append(plan_path)
        if refit_from is not None and reweighted and reweighted[-1]:
            try:
                refit_unet(refit_from, onnx_path, plan_path)
                return
            except VlrtError as err:
                log(f"vlrt: cannot refit {refit_from} ({err}); building the plan instead")
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # the builder allocates outside torch's allocator
        build_plan(component, onnx_path, plan_path, max_batch=max_batch, timing_cache=timing_cache)

    return make


def check_engine(engine: Engine, net: Network, tolerance: float = 0.1) -> None:
    """Refuse an engine that computes something else than torch on random inputs (two rows): a
    freshly built fp16 plan can overflow or be miscompiled, and its frames would feed the next pass.

    The bound is loose (a fraction of the output's range) because fp16 plans round; it catches
    garbage, not rounding.
    """
    param = next(net.module.parameters())
    feed = {k: torch.cat([v, torch.randn_like(v) if k != "timestep" else v * 0.5]) for k, v in net.example.items()}
    with torch.inference_mode():
        want = net.module(**{k: v.to(param.device, torch.float32 if k == "timestep" else param.dtype) for k, v in feed.items()})
    outputs = engine(**{k: v.to(engine.device) for k, v in feed.items()}).values()
    wants = want if isinstance(want, (tuple, list)) else (want,)  # a ControlNet gives its 13 residuals
    for got, want in zip(outputs, wants, strict=True):
        want = want.float().to(got.device)
        diff = (got - want).abs().max().item()
        if not diff <= tolerance * max(want.abs().max().item(), 1e-6):
            path = getattr(engine, "path", engine.component)
            raise VlrtError(
                f"the freshly built {engine.component} engine {path} ({engine.backend}) differs from torch by {diff:.3g} "
                f"(outputs up to {want.abs().max().item():.3g}); run with --precision fp32 or --backend torch, and report it"
            )


def _pixel_size(net: Network) -> tuple[int, int]:
    """The resolution recorded in the cache key: the network's own input size."""
    first = next(iter(net.example.values()))
    return int(first.shape[-2]), int(first.shape[-1])


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
    vae_precision: str = "auto",
) -> EngineSet:
    """The engines of one run: SD's networks when there is a model, FastDVDnet's blocks when asked;
    with `controlnets`, a UNet that takes their residuals and one engine per ControlNet."""
    backend = resolve_backend(backend, device, log)
    networks = []
    if model is not None:
        networks += sd_networks(model, height, width)
    if denoiser is not None:
        networks += fastdvdnet_networks(denoiser, height, width)
    precision = precision_for(backend, device, precision)
    control = control_networks(model, controlnets, height, width) if model is not None and controlnets else []
    if control:
        networks = [control[0], *networks[1:]]
    overflows = model is not None and model.is_sdxl and bool(getattr(model.vae.config, "force_upcast", False))

    def build(nets: list[Network]) -> dict[str, Engine]:
        return build_engines(
            nets, backend, device=device, max_batch=max_batch, precision=precision, engines_dir=engines_dir, log=log,
            vae_precision=vae_precision_for(device, vae_precision, precision, overflows),
        )

    engines = build(networks)
    if control:
        engines[UNET] = engines.pop(UNET_CONTROL)
    controlnet_engines = tuple(build([net])[CONTROLNET] for net in control[1:])
    if backend != "torch" and device.type == "cuda":
        _leave_gpu([n.module for n in [*networks, *control[1:]]])
    return EngineSet(**engines, controlnets=controlnet_engines)


def _leave_gpu(modules: list[nn.Module]) -> None:
    """Move the torch modules that engines now stand for off the GPU: their weights would take
    the memory the engines' activations need (engines of longer prompts are exported from them on the CPU)."""
    for module in modules:
        module.to("cpu")
    torch.cuda.empty_cache()
