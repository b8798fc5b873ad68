"""One loopback pass over the video, streaming (SPEC.md §2.2–§2.5).

For frame f of pass L: the init image is the temporal blend of this pass's input frames
f−h … f+h (weights truncated at the ends of the video and renormalised); SD runs on it
`n_iter × batch_size` times; the samples are averaged (batch blend); the mean is superimposed on
this pass's unblended input frame f with weight α; the post-processing filter, if any, runs last.
The pass starts frame f as soon as its input f+h has arrived (or the stream has ended), so the
next pass can start while this one is still running.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from vlrt import blend
from vlrt.errors import VlrtError
from vlrt.executor import Executor
from vlrt.frames import Frame
from vlrt.jobs import Img2ImgJob
from vlrt.models import Model
from vlrt.params import FrameParams, ParamResolver
from vlrt.samplers import make_scheduler
from vlrt.stages.base import Stage


@dataclass
class _Request:
    params: FrameParams
    jobs: list[Img2ImgJob]

    @property
    def done(self) -> bool:
        return all(job.done for job in self.jobs)


class LoopPass(Stage):
    """Loop pass `loop_index` (0-based): its inputs are the previous pass's outputs."""

    def __init__(
        self,
        loop_index: int,
        *,
        model: Model,
        sampler_name: str,
        resolver: ParamResolver,
        executor: Executor,
        in_flight: int,
        rounding: str,
        first: int = 0,
    ) -> None:
        super().__init__(first)
        self.loop_index = loop_index
        self.name = f"loop pass {loop_index + 1}"
        self.model = model
        self.sampler_name = sampler_name
        self.resolver = resolver
        self.executor = executor
        self.radius = self.reach = len(resolver.base_weights) // 2
        self.in_flight = max(1, in_flight)
        self.rounding = rounding
        self.inputs: dict[int, Frame] = {}
        self.requests: dict[int, _Request] = {}
        self.next_start = first

    @property
    def capacity(self) -> int:
        return 2 * self.radius + self.in_flight + 1

    def _accept(self, frame: Frame) -> None:
        self.inputs[frame.index] = frame

    def _advance(self) -> list[Frame]:
        while self.next_start < self.received and len(self.requests) < self.in_flight and self._window_ready(self.next_start):
            self._start(self.next_start)
            self.next_start += 1
        out: list[Frame] = []
        while (request := self.requests.get(self.emitted + len(out))) is not None and request.done:
            index = self.emitted + len(out)
            out.append(self._finish(index, request))
            del self.requests[index]
        keep_from = min(self.next_start - self.radius, self.emitted + len(out))
        for index in [i for i in self.inputs if i < keep_from]:
            del self.inputs[index]
        return out

    def _window_ready(self, f: int) -> bool:
        return self.closed or f + self.radius < self.received

    def _start(self, f: int) -> None:
        params = self.resolver(f, self.loop_index)
        init = self._init_image(f, params.temporal_weights)
        jobs = self._jobs(init, params)
        for job in jobs:
            self.executor.submit(job)
        self.requests[f] = _Request(params, jobs)

    def _init_image(self, f: int, weights: tuple[float, ...]) -> np.ndarray:
        """The temporal blend of this pass's inputs around f, neighbours past either end dropped."""
        h = self.radius
        if h == 0:
            return self.inputs[f].image
        last = self.received - 1 if self.closed else f + h
        offsets = [d for d in range(-h, h + 1) if self.first <= f + d <= last]
        frames = [self.inputs[f + d].image for d in offsets]
        return blend.temporal_simple(frames, [weights[h + d] for d in offsets], offsets.index(0), self.rounding)

    def _jobs(self, init: np.ndarray, params: FrameParams) -> list[Img2ImgJob]:
        cond, uncond = self.model.encode_pair(params.prompt, params.negative_prompt)
        return [
            Img2ImgJob(
                init,
                cond,
                uncond,
                guidance=params.cfg_scale,
                scheduler=make_scheduler(self.sampler_name, self.model.scheduler_config, params.steps),
                strength=params.denoising_strength,
                seed=seed,
                subseed=subseed,
                subseed_strength=params.subseed_strength,
                scaling_factor=self.model.scaling_factor,
                shift_factor=self.model.shift_factor,
            )
            for seed, subseed in params.sample_seeds()
        ]

    def _finish(self, f: int, request: _Request) -> Frame:
        """Batch blend, superimpose on the unblended input, then the post-processing filter."""
        base = self.inputs[f]
        params = request.params
        sd = blend.mean([job.result for job in request.jobs], self.rounding)
        out = blend.blend(base.image, sd, params.superimpose_alpha, self.rounding)
        if params.post_process is not None:
            out = _post_process(out, params, f, self.loop_index)
        return base.with_image(out)


def _post_process(image: np.ndarray, params: FrameParams, f: int, loop_index: int) -> np.ndarray:
    processed = params.post_process(Image.fromarray(image))
    if processed.size != (image.shape[1], image.shape[0]):
        raise VlrtError(
            f"image_post_processing_schedule changed the frame size at image_i={f + 1}, loop_i={loop_index + 1}: "
            "filters must keep the size"
        )
    return np.asarray(processed.convert("RGB"))
