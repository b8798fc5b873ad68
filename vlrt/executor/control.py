"""ControlNet residuals for the rows of a UNet round.

Each img2img job carries, per unit, its control image and (weight, guidance range, control mode);
`ControlRunner.residuals` gives the residuals of every row of a round: per unit, one batched call
of that unit's engine on the rows it acts on, and their residuals summed over the units (diffusers'
`MultiControlNetModel`). Rows no unit acts on get zeros, which leave the UNet unchanged. On SDXL each
unit's engine also takes its rows' pooled embedding and sizes, as the UNet does.

Per row and step, a unit acts with scale `weight` on every residual while the step lies in its
guidance range, with diffusers' rule for `control_guidance_start/end`: step i of n acts unless
i/n < guidance_start or (i+1)/n > guidance_end. The control modes are the WebUI ControlNet
extension's (its wiki, "Control Mode"):
- "Balanced": the unit acts on both CFG rows (diffusers' pipelines);
- "My prompt is more important": both rows, residual k of L scaled by weight·0.825^(L−1−k)
  (0.825^(12−k) for SD 1.x/2.x's 13, 0.825^(9−k) for SDXL's 10), so the deep residuals keep most of
  the weight, the shallow ones little;
- "ControlNet is more important": the conditional row only (the unconditional row gets none), so
  CFG multiplies the unit's effect by the guidance scale.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from vlrt.engines.base import Engine, residual_names
from vlrt.settings.controlnet import CONTROL_MORE_IMPORTANT, PROMPT_MORE_IMPORTANT, ControlNetUnit

if TYPE_CHECKING:
    from vlrt.executor.jobs import Img2ImgJob

SOFT_INJECTION_BASE = 0.825


@dataclass(frozen=True)
class ControlInput:
    """One unit's control for one job: its image [3, H, W] in [0, 1] at render size, and how it acts."""

    image: torch.Tensor
    weight: float
    guidance_start: float
    guidance_end: float
    control_mode: str


def control_inputs(
    units: Sequence[ControlNetUnit], maps: Sequence[np.ndarray], device: torch.device
) -> tuple[ControlInput, ...]:
    """The jobs' control of one frame: each unit's (H, W, 3) uint8 map as diffusers feeds it ([0, 1], no
    normalising), moved once to the render device, where it stays for every step of the job."""
    return tuple(
        ControlInput(
            torch.tensor(m).to(device).permute(2, 0, 1).float().div(255.0),
            unit.weight, unit.guidance_start, unit.guidance_end, unit.control_mode,
        )
        for unit, m in zip(units, maps, strict=True)
    )


def acts(control: ControlInput, step: int, steps: int) -> bool:
    """Whether the unit acts at step `step` of the job's `steps` (diffusers' controlnet_keep)."""
    return not (step / steps < control.guidance_start or (step + 1) / steps > control.guidance_end)


def row_scales(control: ControlInput, step: int, steps: int, cfg: bool, layers: int) -> torch.Tensor:
    """[rows, layers] scales of one job's rows (unconditional row first with CFG) at this step."""
    rows = 2 if cfg else 1
    if not acts(control, step, steps):
        return torch.zeros(rows, layers)
    scale = torch.full((rows, layers), float(control.weight))
    if control.control_mode == PROMPT_MORE_IMPORTANT:
        scale = scale * SOFT_INJECTION_BASE ** torch.arange(layers - 1, -1, -1, dtype=torch.float64).float()
    if control.control_mode == CONTROL_MORE_IMPORTANT and cfg:
        scale[0] = 0.0
    return scale


class ControlRunner:
    """The units' engines, in unit order, and the residual shapes (C, h, w) of the model's UNet."""

    def __init__(self, engines: Sequence[Engine], shapes: Sequence[tuple[int, int, int]]) -> None:
        self.engines = list(engines)
        self.shapes = list(shapes)
        self.names = residual_names(len(shapes))

    def residuals(
        self, jobs: Sequence[Img2ImgJob], sample: torch.Tensor, timestep: torch.Tensor, **conditioning: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """The summed residuals of every row of `jobs` (their UNet rows, in order, are `sample` …); each
        unit's engine takes the rows' `conditioning` as the UNet does (text embeddings; SDXL's pooled and sizes too)."""
        rows = sample.shape[0]
        total = {name: torch.zeros(rows, *shape, device=sample.device) for name, shape in zip(self.names, self.shapes)}
        for unit, engine in enumerate(self.engines):
            images, scales = [], []
            for job in jobs:
                control = job.control[unit]
                scale = row_scales(control, job.index, len(job.timesteps), job.cfg, len(self.shapes))
                scales.append(scale)
                images.append(control.image.expand(scale.shape[0], *control.image.shape))
            scale = torch.cat(scales).to(sample.device)
            on = scale.abs().sum(dim=1).nonzero().flatten()
            if not len(on):
                continue
            out = engine(
                sample=sample[on],
                timestep=timestep[on],
                **{name: value[on] for name, value in conditioning.items()},
                controlnet_cond=torch.cat(images)[on],
                conditioning_scale=scale[on],
            )
            for name in self.names:
                total[name][on.to(sample.device)] += out[name].to(sample.device)
        return total
