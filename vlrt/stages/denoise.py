"""FastDVDNet video post-process as a streaming stage (SPEC.md §2.12, done right).

The extension denoised a whole loop folder at once on the GPU, adding unseeded synthetic noise.
Here frames stream through a 5-frame ring buffer with stage-1 reuse (vlrt.fastdvdnet.streaming),
the network runs on the executor's engines, and the synthetic noise is a pure function of the
run's seed, the loop pass and the frame, so the result is deterministic and resumable. The
alpha channel passes through untouched, and a frame with an edit mask (`Frame.meta["mask"]`)
changes inside it only, unless `whole_frame` asks for the extension's whole-frame behaviour.
A scene cut (`Frame.meta["shot"]`) is an end of the video: the window is mirrored at the shot's
edges, by closing the denoiser at the cut and starting a fresh one for the next shot.
"""

from __future__ import annotations

from collections import deque

import numpy as np
import torch

from vlrt.engines.base import FASTDVDNET_BLOCK1, FASTDVDNET_BLOCK2
from vlrt.executor.executor import Executor
from vlrt.executor.noise import generator
from vlrt.fastdvdnet.streaming import StreamingDenoiser
from vlrt.frames import Frame
from vlrt.image import blend
from vlrt.image.masks import composite
from vlrt.stages.base import Stage


def noise_seed(seed: int, loop_index: int, frame_index: int) -> int:
    """The seed of the synthetic noise added to one frame before one pass's denoise."""
    return int(np.random.SeedSequence([seed & (2**64 - 1), loop_index, frame_index, 0xFD]).generate_state(1, np.uint64)[0])


class Denoise(Stage):
    """Denoise each frame from its ±2 neighbours, then mix: `original·(1−alpha) + denoised·alpha`."""

    reach = 2

    def __init__(
        self,
        executor: Executor,
        *,
        sigma: float,
        alpha: float,
        rounding: str,
        max_batch: int,
        noise_seed_of: tuple[int, int] | None = None,
        whole_frame: bool = False,
        first: int = 0,
    ) -> None:
        """`sigma` is on the 0–255 scale; `noise_seed_of` = (run seed, loop index) adds the extension's
        synthetic noise (render), None denoises the frames as given (`vlrt denoise`)."""
        super().__init__(first)
        self.name = "denoise" if noise_seed_of is None else f"denoise after loop pass {noise_seed_of[1] + 1}"
        self.sigma = sigma / 255.0
        self.alpha = alpha
        self.rounding = rounding
        self.noise_seed_of = noise_seed_of
        self.whole_frame = whole_frame
        self.originals: deque[Frame] = deque()
        self.ready: deque[torch.Tensor] = deque()
        self.max_batch = max_batch
        self.executor = executor
        self.shot: int | None = None
        self.denoiser = self._fresh_denoiser()

    def _fresh_denoiser(self) -> StreamingDenoiser:
        run = self.executor.run
        return StreamingDenoiser(
            lambda frames, noise_map: run(FASTDVDNET_BLOCK1, frames=frames, noise_map=noise_map)["frame"],
            lambda frames, noise_map: run(FASTDVDNET_BLOCK2, frames=frames, noise_map=noise_map)["frame"],
            self.sigma,
            self.max_batch,
        )

    @property
    def capacity(self) -> int:
        # The streaming denoiser waits for a full batch of rows plus its ±2 window (and the end's 3 frames).
        return 2 * self.max_batch + 6

    def _accept(self, frame: Frame) -> None:
        shot = frame.meta.get("shot")
        if shot != self.shot and self.shot is not None:  # a cut: the last shot's frames end there
            self.ready.extend(self.denoiser.close())
            self.denoiser = self._fresh_denoiser()
        self.shot = shot
        x = frame.image.permute(2, 0, 1).float() / 255.0
        if self.noise_seed_of is not None:
            seed, loop_index = self.noise_seed_of
            gen = generator(noise_seed(seed, loop_index, frame.index))
            x = x + self.sigma * torch.randn(x.shape, generator=gen).to(x.device)
        self.originals.append(frame)
        self.ready.extend(self.denoiser.push(x))

    def close(self) -> None:
        super().close()
        self.ready.extend(self.denoiser.close())

    def _advance(self) -> list[Frame]:
        out = []
        while self.ready:
            denoised = self.ready.popleft().permute(1, 2, 0) * 255.0
            original = self.originals.popleft()
            den8 = blend.quantise(denoised, self.rounding)
            mixed = blend.blend(original.image, den8, self.alpha, self.rounding)
            mask = original.meta.get("mask")
            if mask is not None and not self.whole_frame:
                mixed = composite(mixed, original.image, mask)
            out.append(original.with_image(mixed))
        return out
