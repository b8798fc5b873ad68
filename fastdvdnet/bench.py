"""Side-by-side speed of the streaming denoiser (stage-1 reuse) against the plain per-frame network.

Both run in one process on the CPU with the same random-weight network and the same clip, so
the ratio is meaningful even where absolute frames/s are not (DESIGN.md §6).
"""

from __future__ import annotations

import time

import torch

from .network import FastDVDnet, denoise_padded
from .streaming import StreamingDenoiser
from .window import window_indices

SIGMA = 20 / 255


def bench_reuse(frames: int, height: int, width: int, max_batch: int = 1, repeats: int = 3) -> dict:
    """Frames/s with stage-1 reuse (batches of `max_batch` rows) vs the plain per-frame network.

    Also returns the largest output difference between the two, which must stay within 1e-5.
    """
    torch.manual_seed(0)
    model = FastDVDnet().eval()
    clip = torch.rand(frames, 3, height, width)
    noise_map = torch.full((1, 1, height, width), SIGMA)

    def plain(f: int) -> torch.Tensor:
        window = clip[list(window_indices(f, frames))].reshape(1, 15, height, width)
        return denoise_padded(model, window, noise_map)[0]

    plain_s = reuse_s = float("inf")
    for _ in range(repeats):
        # Interleave the two frame by frame so background load hits both alike.
        den = StreamingDenoiser(model.temp1, model.temp2, SIGMA, max_batch=max_batch)
        want, got, t_plain, t_reuse = [], [], 0.0, 0.0
        for f in range(frames):
            t0 = time.perf_counter()
            want.append(plain(f))
            t1 = time.perf_counter()
            got += den.push(clip[f])
            t_plain, t_reuse = t_plain + t1 - t0, t_reuse + time.perf_counter() - t1
        t0 = time.perf_counter()
        got += den.close()
        t_reuse += time.perf_counter() - t0
        plain_s, reuse_s = min(plain_s, t_plain), min(reuse_s, t_reuse)
    return {
        "frames": frames,
        "height": height,
        "width": width,
        "max_batch": max_batch,
        "repeats": repeats,
        "threads": torch.get_num_threads(),
        "plain_fps": frames / plain_s,
        "reuse_fps": frames / reuse_s,
        "ratio": plain_s / reuse_s,
        "max_abs_diff": max((a - b).abs().max().item() for a, b in zip(want, got)),
    }
