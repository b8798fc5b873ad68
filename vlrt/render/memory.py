"""How much memory a render size needs with a model and backend, checked before the first frame.

Without this check a size too large for the machine runs until the kernel kills vlrt, with no
message. What grows fastest with the picture is self-attention: over N positions it holds N×N
scores per head and row, and their softmax. ONNX Runtime's CPU kernels materialise them (the
exported graph is MatMul, Softmax, MatMul); torch's scaled-dot-product attention and TensorRT's
fused attention work in blocks and do not. Next come the convolution activations at full
resolution in the VAE. The estimate is the weights plus the larger of those two peaks, for a call
of `max_batch` rows; it errs high rather than low.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

from vlrt.errors import VlrtError
from vlrt.model.loading import Model

MATERIALISED_ATTENTION = {"ort"}
ATTENTION_COPIES = 2  # the scores and their softmax
ACTIVATION_COPIES = 3  # a convolution's input, output and the residual kept beside them
# The demo model sizes a render it was not given to stay within this, so a phone clip just works.
DEMO_BUDGET = 2 * 1024**3
GIB = 1024**3


@dataclass(frozen=True)
class Attention:
    """One self-attention layer: how far below the picture it works, and its heads."""

    downscale: int
    heads: int


def attention_layers(model: Model) -> list[Attention]:
    """The self-attention layers of the model's VAE and UNet, from their configs."""
    scale = model.vae_scale_factor
    full_vae = not model.tiny_vae and model.vae.config.get("mid_block_add_attention", True)  # TAESD has no attention
    layers = [Attention(scale, 1)] if full_vae else []
    unet = model.unet.config
    levels = len(unet.block_out_channels)
    # diffusers' UNet2DConditionModel reads attention_head_dim as the number of heads when num_attention_heads is unset.
    heads = unet.num_attention_heads or unet.attention_head_dim
    heads = list(heads) if isinstance(heads, (list, tuple)) else [heads] * levels
    for level, kind in enumerate(unet.down_block_types):
        if "CrossAttn" in kind:
            layers.append(Attention(scale * 2**level, heads[level]))
    if unet.mid_block_type and "CrossAttn" in unet.mid_block_type:
        layers.append(Attention(scale * 2 ** (levels - 1), heads[-1]))
    return layers


def estimate_bytes(model: Model, width: int, height: int, rows: int, backend: str, bytes_per_value: int) -> int:
    """Peak memory of rendering `width`×`height` frames in engine calls of `rows` rows."""
    weights = sum(p.numel() for m in (model.unet, model.vae, *model.text_encoders) for p in m.parameters()) * bytes_per_value
    attention = 0
    if backend in MATERIALISED_ATTENTION:
        for layer in attention_layers(model):
            positions = (width // layer.downscale) * (height // layer.downscale)
            attention = max(attention, rows * layer.heads * positions**2 * bytes_per_value * ATTENTION_COPIES)
    channels = max(model.vae.config.block_out_channels)
    activations = rows * channels * width * height * bytes_per_value * ACTIVATION_COPIES
    return weights + max(attention, activations)


def _resident_bytes(model: Model, backend: str) -> int:
    """The model's weights already in memory that the torch backend runs in place (`estimate_bytes` counts them as
    needed, and the memory measured now no longer has them: SDXL's are 13 GB in fp32). Other backends load copies."""
    if backend != "torch":
        return 0
    return sum(p.numel() * p.element_size() for m in (model.unet, model.vae, *model.text_encoders) for p in m.parameters())


def available_bytes(device: torch.device) -> int:
    """Memory free for the render now: the GPU's free memory, or the system's available memory."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def largest_fitting(need: Callable[[int, int], int], width: int, height: int, multiple: int, budget: int) -> tuple[int, int] | None:
    """The largest size of the same aspect as `width`×`height`, in multiples of `multiple`, whose need fits `budget`."""
    low, high = 0.0, 1.0
    for _ in range(40):
        scale = (low + high) / 2
        w, h = (max(multiple, int(v * scale) // multiple * multiple) for v in (width, height))
        if need(w, h) <= budget:
            low = scale
        else:
            high = scale
    w, h = (int(v * low) // multiple * multiple for v in (width, height))
    return (w, h) if w >= multiple and h >= multiple and need(w, h) <= budget else None


def fit_render_size(
    model: Model, width: int, height: int, *, sized_by_user: bool, rows: int, backend: str, precision: str,
    device: torch.device, log: Callable[[str], None], available: int | None = None,
) -> tuple[int, int]:
    """The render size, checked against memory: the demo model shrinks a size it chose itself to its
    budget, saying so; any size that needs more than is available is refused with one that fits."""
    bytes_per_value = 2 if precision == "fp16" else 4
    multiple = model.vae_scale_factor

    def need(w: int, h: int) -> int:
        return estimate_bytes(model, w, h, rows, backend, bytes_per_value)

    if model.is_demo and not sized_by_user and need(width, height) > DEMO_BUDGET:
        fitted = largest_fitting(need, width, height, multiple, DEMO_BUDGET)
        if fitted is not None:
            log(f"vlrt: the demo model renders {width}×{height} input at {fitted[0]}×{fitted[1]} to stay within "
                f"{DEMO_BUDGET / GIB:g} GB (--width/--height choose a size)")
            width, height = fitted
    free = available if available is not None else available_bytes(device) + _resident_bytes(model, backend)
    needed = need(width, height)
    if needed > free:
        fitted = largest_fitting(need, width, height, multiple, free)
        hint = f"render at most {fitted[0]}×{fitted[1]} (--width {fitted[0]} --height {fitted[1]})" if fitted else \
            "free some memory"
        if rows > 1 and estimate_bytes(model, width, height, 1, backend, bytes_per_value) <= free:
            hint = "lower --max-batch (1 fits)"
        raise VlrtError(
            f"rendering {width}×{height} with this model on {backend} needs about {needed / GIB:.1f} GB "
            f"({rows} rows per engine call) but {free / GIB:.1f} GB are available: {hint}"
        )
    return width, height

