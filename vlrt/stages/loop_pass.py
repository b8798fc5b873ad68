"""One loopback pass over the video, streaming (SPEC.md §2.2–§2.5, §2.7).

For frame f of pass L: the init image is the temporal blend of this pass's input frames
f−h … f+h (weights truncated at the ends of the video and renormalised, or the difference-mask
method); SD runs on it `n_iter × batch_size` times; the samples are averaged (batch blend),
colour-corrected when asked, and superimposed on this pass's unblended input frame f with weight
α; the post-processing filter, if any, runs last.

With a mask (`Frame.meta["mask"]`, 255 = change) the frame is inpainted (vlrt.image.inpaint), and
outside the mask the frame stays this pass's input exactly: the temporal blend, the superimpose
and the post-processing filter act inside the mask only (the filter on the whole frame with
`post_process_outside_mask`, the extension's way). A frame whose mask is empty is not sent to SD.

The pass starts frame f as soon as its input f+h has arrived (or the stream has ended), so the
next pass can start while this one is still running, but at most one frame a round of the executor
(`Executor.rounds`): jobs started together would finish together, and the host's work on all their
frames (blends, the next pass's starts) would then leave the device idle; one frame a round
staggers the jobs, so there is always device work while the host finishes frames. Which frames
start in which round depends only on the order of calls, never on timing.

Frames arrive and leave as uint8 tensors on the render device; every blend, the colour match and
the mask compositing run there. Two steps go to the host and back, for Pillow: a masked frame's
inpainting plan (blur, crop, fill) and the post-processing filter.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch
from PIL import Image

from vlrt.errors import VlrtError
from vlrt.executor.control import control_inputs
from vlrt.executor.executor import Executor
from vlrt.executor.jobs import Img2ImgJob
from vlrt.frames import Frame, picture_tensor
from vlrt.image import blend
from vlrt.image.inpaint import InpaintOptions, InpaintPlan, plan_inpaint
from vlrt.image.masks import composite
from vlrt.image.temporal_diff import DIFFERENCE_METHOD, diff_mask_blend
from vlrt.model.loading import Model
from vlrt.model.samplers import prompt_steps, schedule_config
from vlrt.settings.config import Settings
from vlrt.settings.params import FrameParams, ParamResolver
from vlrt.settings.prompt_files import frame_prompts
from vlrt.stages.base import Stage


@dataclass
class _Request:
    params: FrameParams
    jobs: list[Img2ImgJob]  # none when the mask leaves nothing to change
    inpaint: InpaintPlan | None

    @property
    def done(self) -> bool:
        return all(job.done for job in self.jobs)


class LoopPass(Stage):
    """Loop pass `loop_index` (0-based): its inputs are the previous pass's outputs."""

    def __init__(
        self,
        loop_index: int,
        *,
        settings: Settings,
        model: Model,
        resolver: ParamResolver,
        executor: Executor,
        in_flight: int,
        first: int = 0,
    ) -> None:
        super().__init__(first)
        self.loop_index = loop_index
        self.name = f"loop pass {loop_index + 1}"
        self.settings = settings
        self.model = model
        self.resolver = resolver
        self.executor = executor
        self.radius = self.reach = len(resolver.base_weights) // 2
        self.in_flight = max(1, in_flight)
        self.rounding = settings.blend_rounding
        self.inpaint = InpaintOptions(
            settings.mask_blur, settings.inpainting_fill, settings.inpaint_full_res, settings.inpaint_full_res_padding
        )
        self.inputs: dict[int, Frame] = {}
        self.requests: dict[int, _Request] = {}
        self.next_start = first
        self.started_in_round = -1  # the executor round in which the last frame with work started

    @property
    def capacity(self) -> int:
        return 2 * self.radius + self.in_flight + 1

    def _accept(self, frame: Frame) -> None:
        self.inputs[frame.index] = frame

    def _advance(self) -> list[Frame]:
        while (
            self.next_start < self.received and len(self.requests) < self.in_flight
            and self._window_ready(self.next_start) and self.started_in_round != self.executor.rounds
        ):
            if self._start(self.next_start):
                self.started_in_round = self.executor.rounds
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

    def _start(self, f: int) -> bool:
        """Start frame f: submit its img2img jobs (none when its mask is empty); whether it has any."""
        frame = self.inputs[f]
        params = self.resolver(f, self.loop_index)
        if "prompts" in frame.meta:
            prompt, negative = frame_prompts(frame.meta["prompts"], (params.prompt, params.negative_prompt))
            params = replace(params, prompt=prompt, negative_prompt=negative)
        mask = frame.meta.get("mask")
        jobs, plan = [], None
        if mask is None or bool(mask.any()):
            init = self._init_image(f, params.temporal_weights)
            if mask is not None:
                init = composite(init, frame.image, mask)  # the temporal blend acts inside the mask only
                plan = plan_inpaint(init.cpu().numpy(), mask.cpu().numpy(), self.inpaint, self.model.vae_scale_factor)
                init = picture_tensor(plan.sd_image, frame.image.device)
            jobs = self._jobs(init, params, plan, frame.meta.get("control", ()))
        for job in jobs:
            self.executor.submit(job)
        self.requests[f] = _Request(params, jobs, plan)
        return not all(job.done for job in jobs)

    def _init_image(self, f: int, weights: tuple[float, ...]) -> torch.Tensor:
        """The temporal blend of this pass's inputs around f, neighbours past either end or in another shot dropped."""
        h = self.radius
        if h == 0:
            return self.inputs[f].image
        last = self.received - 1 if self.closed else f + h
        shot = self.inputs[f].meta.get("shot")  # a scene cut is an end of the video too
        offsets = [d for d in range(-h, h + 1) if self.first <= f + d <= last and self.inputs[f + d].meta.get("shot") == shot]
        frames = [self.inputs[f + d].image for d in offsets]
        slot_weights = [weights[h + d] for d in offsets]
        if self.settings.temporal_superimpose_method == DIFFERENCE_METHOD:
            refs = [self.inputs[f + d].meta["reference"] for d in offsets]
            return diff_mask_blend(frames, refs, slot_weights, offsets.index(0), self.rounding)
        return blend.temporal_simple(frames, slot_weights, offsets.index(0), self.rounding)

    def _jobs(
        self, init: torch.Tensor, params: FrameParams, plan: InpaintPlan | None, control_maps: tuple[np.ndarray, ...]
    ) -> list[Img2ImgJob]:
        cond, uncond = self.model.encode_pair(
            params.prompt, params.negative_prompt, prompt_steps(self.settings.sampler_name, params.steps),
            (init.shape[0], init.shape[1]),
        )
        control = control_inputs(
            self.settings.controlnet, [m if plan is None else plan.sd_view(m) for m in control_maps], init.device
        )
        return [
            Img2ImgJob(
                init,
                cond,
                uncond,
                guidance=params.cfg_scale,
                sampler_name=self.settings.sampler_name,
                scheduler_config=schedule_config(self.model.scheduler_config, self.settings.scheduler),
                steps=params.steps,
                strength=params.denoising_strength,
                seed=seed,
                subseed=subseed,
                subseed_strength=params.subseed_strength,
                scaling_factor=self.model.scaling_factor,
                shift_factor=self.model.shift_factor,
                latent_mask=None if plan is None else plan.latent_mask,
                fill=self.inpaint.inpainting_fill,
                control=control,
                rounding=self.rounding,
                posterior=not self.model.tiny_vae,
                inpainting_model=self.model.is_inpainting,
                pixel_mask=None if plan is None else plan.pixel_mask,
            )
            for seed, subseed in params.sample_seeds()
        ]

    def _finish(self, f: int, request: _Request) -> Frame:
        """Batch blend, colour correction, superimpose on the unblended input, then the post-processing filter."""
        base = self.inputs[f]
        params = request.params
        mask = base.meta.get("mask")
        out = base.image
        if request.jobs:
            results = [job.result for job in request.jobs]
            if request.inpaint is not None:
                results = [request.inpaint.paste_back(r) for r in results]
            sd = blend.mean(results, self.rounding)
            anchor = base.meta.get("color_anchor")
            if anchor is not None:
                sd = anchor.match(sd)
            out = blend.blend(base.image, sd, params.superimpose_alpha, self.rounding)
            if mask is not None:
                out = composite(out, base.image, mask)
        if params.post_process is not None:
            out = _post_process(out, params, f, self.loop_index)
            if mask is not None and not self.settings.post_process_outside_mask:
                out = composite(out, base.image, mask)
        return base.with_image(out)


def _post_process(image: torch.Tensor, params: FrameParams, f: int, loop_index: int) -> torch.Tensor:
    """The Pillow filter of `image_post_processing_schedule`: a round trip to the host and back."""
    processed = params.post_process(Image.fromarray(image.cpu().numpy()))
    if processed.size != (image.shape[1], image.shape[0]):
        raise VlrtError(
            f"image_post_processing_schedule changed the frame size at image_i={f + 1}, loop_i={loop_index + 1}: "
            "filters must keep the size"
        )
    return torch.from_numpy(np.array(processed.convert("RGB"))).to(image.device)
