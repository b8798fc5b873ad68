"""Seeded noise: the same seed gives the same picture on every backend and in every batch.

Noise is always drawn on the CPU from a `torch.Generator` owned by one sample, so what a
sample gets never depends on which other samples share its engine call.
"""

from __future__ import annotations

import torch

_SEED_MASK = (1 << 64) - 1


def generator(seed: int) -> torch.Generator:
    """A CPU generator for a seed (any integer; reduced to the 64 bits torch accepts)."""
    return torch.Generator("cpu").manual_seed(seed & _SEED_MASK)


def slerp(t: float, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """Spherical interpolation from `low` (t=0) to `high` (t=1), treating each tensor as one vector.

    This is the WebUI's variation-seed mix: noise stays Gaussian-looking for every t, where a
    straight mix would shrink its norm. Nearly parallel inputs fall back to a straight mix.
    """
    a, b = low.flatten().double(), high.flatten().double()
    dot = torch.dot(a / a.norm(), b / b.norm()).clamp(-1.0, 1.0)
    if dot > 0.9995:
        return (1 - t) * low + t * high
    omega = torch.acos(dot)
    so = torch.sin(omega)
    w_low = float(torch.sin((1.0 - t) * omega) / so)
    w_high = float(torch.sin(t * omega) / so)
    return w_low * low + w_high * high


def variation_noise(shape: tuple[int, ...], gen: torch.Generator, subseed: int, strength: float) -> torch.Tensor:
    """The initial noise of one sample: its seed's noise, moved towards its subseed's by `strength`."""
    noise = torch.randn(shape, generator=gen, dtype=torch.float32)
    if strength > 0:
        noise = slerp(strength, noise, torch.randn(shape, generator=generator(subseed), dtype=torch.float32))
    return noise
