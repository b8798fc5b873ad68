"""8-bit image mixing: superimpose, batch mean and temporal blending (SPEC.md §2.4, §2.5).

Two rounding policies. `floor` reproduces the extension bit for bit: Pillow's `Image.blend`
computes `a + t·(b − a)` in single precision and truncates, and the extension chains such blends
(running means), which darkens slightly with every step. `round` (vlrt's default) computes each
mean exactly in float and rounds once, so there is no drift.

Frames are torch uint8 tensors (H, W, 3) on the render device: between loop passes they never
leave it (DESIGN.md §2), and on the CPU this is the same code on CPU tensors.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

FLOOR = "floor"
ROUND = "round"


def quantise(x: torch.Tensor, rounding: str) -> torch.Tensor:
    """Float 0–255 values to uint8 under a rounding policy (round: half to even, as numpy's `rint`)."""
    if rounding == FLOOR:
        return x.clamp(0, 255).to(torch.uint8)  # truncation toward zero of non-negatives is floor
    return x.round().clamp_(0, 255).to(torch.uint8)


def blend(a: torch.Tensor, b: torch.Tensor, t: float, rounding: str = ROUND) -> torch.Tensor:
    """`a·(1−t) + b·t` per 8-bit channel (t=0 gives a, t=1 gives b); outside [0, 1] it extrapolates and clips."""
    if t in (0, 1):  # exactly a or b in either rounding: no float pass over the frame
        return b if t == 1 else a
    a32 = a.float()
    return quantise(b.float().sub_(a32).mul_(float(t)).add_(a32), rounding)  # in place: a 512² frame is MBs


def mean(images: Sequence[torch.Tensor], rounding: str = ROUND) -> torch.Tensor:
    """Equal-weight mean of a batch (the extension's "batch blend": a running mean in floor mode)."""
    if len(images) == 1:  # batch_size 1: the mean is the image, in either rounding
        return images[0]
    if rounding == FLOOR:
        acc = images[0]
        for k, image in enumerate(images[1:], start=2):
            acc = blend(acc, image, 1.0 / k, FLOOR)
        return acc
    return quantise(torch.stack([i.float() for i in images]).mean(dim=0), rounding)


def temporal_simple(frames: Sequence[torch.Tensor], weights: Sequence[float], current: int, rounding: str = ROUND) -> torch.Tensor:
    """The "simple" temporal blend: frames weighted and renormalised, `frames[current]` being the centre.

    In floor mode this is the extension's running normalised mean (a neighbour whose running
    weight sum is not positive is skipped). In both modes all-zero weights (or any whose sum is
    not positive) keep the current frame, where the extension returned the oldest neighbour.
    """
    total = float(sum(weights))
    if total <= 0:
        return frames[current]
    if rounding == FLOOR:
        acc, running = frames[0], 0.0
        for w, image in zip(weights, frames):
            running += w
            if running <= 0:
                continue
            acc = blend(acc, image, w / running, FLOOR)
        return acc
    acc32 = frames[0].float().mul_(float(weights[0]))
    for w, f in zip(weights[1:], frames[1:]):
        acc32.add_(f.float().mul_(float(w)))
    return quantise(acc32.div_(total), rounding)
