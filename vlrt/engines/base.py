"""The one interface every backend implements.

An engine is one compiled network with named inputs and outputs (DESIGN.md §4). Every backend
takes and returns torch tensors, so the executor and the samplers never care which one runs.

Components and their tensors (B is the dynamic batch, at most `max_batch`):

| component     | inputs                                                               | outputs                  |
|---------------|----------------------------------------------------------------------|--------------------------|
| unet          | sample [B,C,h,w] f32, timestep [B] f32, encoder_hidden_states [B,S,D] (SDXL also text_embeds [B,P], time_ids [B,6]) | noise_pred [B,C,h,w] |
| vae_encoder   | image [B,3,H,W] in [-1, 1]                                            | moments [B,2C,h,w]       |
| (tiny VAE)    | image [B,3,H,W] in [-1, 1]                                            | moments: latents [B,C,h,w] |
| vae_decoder   | latent [B,C,h,w] (already divided by the scaling factor)              | image [B,3,H,W] in [-1,1]|
| fastdvdnet_block1 / fastdvdnet_block2 | frames [B,9,H,W] in [0,1], noise_map [B,1,H,W] | frame [B,3,H,W]     |
| controlnet    | unet's inputs (SDXL's too), controlnet_cond [B,3,H,W] in [0,1], conditioning_scale [B,L] f32 | L residuals |
| unet_control  | unet's inputs (SDXL's too) and the L residuals (`residual_names`)     | noise_pred [B,C,h,w]     |

An inpainting UNet's `sample` has 2C+1 channels (9): the latents, then the mask and the masked image's
latents (`vlrt.executor.jobs`); its `noise_pred` has C.

The L residuals are the UNet's down-block residuals and its mid-block residual (13 for SD 1.x/2.x),
each scaled by its column of `conditioning_scale`; their count depends on the model, so these two
components take their names from `residual_names(L)`.

SDXL's UNet takes two more per-row inputs, its added conditioning (`SDXL_CONDITIONING`): the second
text encoder's pooled embedding and the six size numbers (`time_ids`); each row carries its own, like
its text embeddings, so rows of different prompts and sizes share a call. Such a UNet takes its names
from `unet_names`. An SDXL ControlNet takes the same added conditioning as the UNet it steers (it is a
copy of that UNet's encoder), so on SDXL both ControlNet components take it too, after the text embeddings.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from vlrt.errors import VlrtError

UNET = "unet"
VAE_ENCODER = "vae_encoder"
VAE_DECODER = "vae_decoder"
FASTDVDNET_BLOCK1 = "fastdvdnet_block1"
FASTDVDNET_BLOCK2 = "fastdvdnet_block2"
CONTROLNET = "controlnet"
UNET_CONTROL = "unet_control"

INPUT_NAMES: dict[str, tuple[str, ...]] = {
    UNET: ("sample", "timestep", "encoder_hidden_states"),
    VAE_ENCODER: ("image",),
    VAE_DECODER: ("latent",),
    FASTDVDNET_BLOCK1: ("frames", "noise_map"),
    FASTDVDNET_BLOCK2: ("frames", "noise_map"),
}
SDXL_CONDITIONING = ("text_embeds", "time_ids")  # SDXL's added_cond_kwargs, one row each
OUTPUT_NAMES: dict[str, tuple[str, ...]] = {
    UNET: ("noise_pred",),
    VAE_ENCODER: ("moments",),
    VAE_DECODER: ("image",),
    FASTDVDNET_BLOCK1: ("frame",),
    FASTDVDNET_BLOCK2: ("frame",),
}


def residual_names(count: int) -> tuple[str, ...]:
    """The names of a UNet's `count` ControlNet residuals: its down blocks' in order, then its mid block's."""
    return (*(f"down_block_res_{i}" for i in range(count - 1)), "mid_block_res")


def unet_names(added: tuple[str, ...]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(inputs, outputs) of a UNet taking the `added` conditioning (`SDXL_CONDITIONING` for SDXL) after its text embeddings."""
    return (*INPUT_NAMES[UNET], *added), OUTPUT_NAMES[UNET]


def control_names(component: str, residuals: int, added: tuple[str, ...] = ()) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(inputs, outputs) of the ControlNet engine or of the UNet that takes its residuals; `added` is the
    UNet's added conditioning (`SDXL_CONDITIONING` for SDXL), which both take after the text embeddings."""
    unet = unet_names(added)[0]
    if component == CONTROLNET:
        return (*unet, "controlnet_cond", "conditioning_scale"), residual_names(residuals)
    return (*unet, *residual_names(residuals)), OUTPUT_NAMES[UNET]


@dataclass(frozen=True)
class Mark:
    """A point in one engine's queued work: a CUDA event (None elsewhere) and how many output checks
    had been queued before it (counted from the engine's start)."""

    event: Any
    checks: int


class Engine(ABC):
    """One network behind a uniform call: a dict of named tensors in, a dict out."""

    backend: str = "?"

    def __init__(
        self, component: str, max_batch: int, device: torch.device, names: tuple[tuple[str, ...], tuple[str, ...]] | None = None
    ) -> None:
        """`names` (inputs, outputs) for components whose names depend on the model (`control_names`)."""
        self.component = component
        self.max_batch = max_batch
        self.device = device
        self.input_names, self.output_names = names or (INPUT_NAMES[component], OUTPUT_NAMES[component])
        self.calls = 0
        self._checks: list[tuple[torch.Tensor, str, int, int]] = []  # not yet read, oldest first
        self._checks_read = 0

    @abstractmethod
    def _run(self, feed: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Run one batch of at most `max_batch` rows."""

    def __call__(self, **feed: torch.Tensor) -> dict[str, torch.Tensor]:
        """Run any number of rows, split into calls of at most `max_batch`; refuse non-finite outputs."""
        rows = next(iter(feed.values())).shape[0]
        if rows <= self.max_batch:
            self.calls += 1
            return self._finite(self._run(feed), rows)
        parts: list[dict[str, torch.Tensor]] = []
        for start in range(0, rows, self.max_batch):
            self.calls += 1
            parts.append(self._run({k: v[start : start + self.max_batch] for k, v in feed.items()}))
        return self._finite({k: torch.cat([p[k] for p in parts]) for k in parts[0]}, rows)

    def _finite(self, outputs: dict[str, torch.Tensor], rows: int) -> dict[str, torch.Tensor]:
        """`outputs`, checked for NaN or infinite values: a NaN would decode to a black frame and feed
        the next loop pass. One reduction per output and call; on a GPU its result is read at the
        next `synchronize` (the end of the executor's round), so the check never stalls the queue."""
        for name, value in outputs.items():
            self._checks.append((torch.isfinite(value).all(), name, self.calls, rows))
        if self.device.type != "cuda":
            self._read_checks(self._checks_read + len(self._checks))
        return outputs

    def synchronize(self) -> None:
        """Wait for the work queued on the device, then raise on any non-finite output since the last time."""
        self.wait(self.mark())

    def mark(self) -> Mark:
        """A point in the work queued so far; `wait(mark)` returns once the device has done it. Torch's
        current stream waits for every call's own stream, so an event on it follows the calls."""
        event = None
        if self.device.type == "cuda":
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(self.device))
        return Mark(event, self._checks_read + len(self._checks))

    def wait(self, mark: Mark) -> None:
        """Wait until the device has done the work queued before `mark`, and raise on a non-finite
        output of that work."""
        if mark.event is not None:
            mark.event.synchronize()
        self._read_checks(mark.checks)

    def _read_checks(self, count: int) -> None:
        """Read the oldest `count` checks (fewer when some were read already)."""
        count -= self._checks_read
        checks, self._checks = self._checks[:count], self._checks[count:]
        self._checks_read += len(checks)
        for finite, name, call, rows in checks:
            if not bool(finite):
                raise VlrtError(
                    f"the {self.component} engine ({self.backend}) returned NaN or infinite values in {name!r} "
                    f"(call {call}, {rows} rows): an fp16 overflow or a broken engine; "
                    "run with --precision fp32 or --backend torch, and report it if it persists"
                )


@dataclass
class EngineSet:
    """The engines one render runs on."""

    unet: Engine | None = None
    vae_encoder: Engine | None = None
    vae_decoder: Engine | None = None
    fastdvdnet_block1: Engine | None = None
    fastdvdnet_block2: Engine | None = None
    controlnets: tuple[Engine, ...] = ()  # one per ControlNet unit, in unit order

    def __getitem__(self, component: str) -> Engine:
        engine = getattr(self, component)
        if engine is None:
            raise KeyError(f"no {component} engine in this render")
        return engine

    def synchronize(self) -> None:
        """Wait until every engine's queued work is done: results may then be read on the host."""
        self.wait(self.mark())

    def mark(self) -> list[tuple[Engine, Mark]]:
        """A point in every engine's queued work (`wait` for it later)."""
        return [(engine, engine.mark()) for engine in self._all()]

    def wait(self, marks: list[tuple[Engine, Mark]]) -> None:
        """Wait until the device has done every engine's work queued before `marks`."""
        for engine, mark in marks:
            engine.wait(mark)

    def _all(self) -> list[Engine]:
        return [*(e for e in vars(self).values() if isinstance(e, Engine)), *self.controlnets]

    @property
    def calls(self) -> dict[str, int]:
        calls = {name: e.calls for name, e in vars(self).items() if isinstance(e, Engine)}
        return calls | {f"{CONTROLNET}_{i}": e.calls for i, e in enumerate(self.controlnets)}
