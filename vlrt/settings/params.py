"""Per-frame, per-loop-pass parameters: the settings with the schedules applied.

Every value is a pure function of (frame index, loop index) and the settings, never of
processing order, which is what makes streaming, batching, resume and segments exact
(DESIGN.md §3). Schedules are compiled once, before the first frame, so a bad one fails early.

The seed rule (vlrt's own, documented in the README): with `fix_seed` every sample of every
frame and loop pass uses `seed + k` (k = the sample's position in the frame's batch, as in the
WebUI). Without it, frame f of loop pass L uses `seed + (f * loop_n + L) * samples + k`, where
`samples = n_iter * batch_size` of that frame: every (frame, loop pass, sample) gets its own
seed, as in the extension, but without depending on the video's length, which a stream does
not know. A seed schedule replaces the rule. Subseeds follow the same rule.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable
from dataclasses import dataclass

from PIL import Image

from vlrt.errors import VlrtError
from vlrt.settings.config import Settings
from vlrt.settings.draft import draft_steps
from vlrt.settings.schedule import Expression, compile_expression, compile_post_processing

SCHEDULES = (
    "subseed_strength_schedule",
    "denoising_schedule",
    "step_schedule",
    "seed_schedule",
    "subseed_schedule",
    "cfg_schedule",
    "superimpose_alpha_schedule",
    "temporal_superimpose_schedule",
    "prompt_schedule",
    "negative_prompt_schedule",
    "batch_count_schedule",
    "image_post_processing_schedule",
)

PostProcess = Callable[[Image.Image], Image.Image]


@dataclass(frozen=True)
class FrameParams:
    """What one loop pass does to one frame."""

    prompt: str
    negative_prompt: str
    steps: int
    cfg_scale: float
    denoising_strength: float
    seed: int
    subseed: int
    subseed_strength: float
    n_iter: int
    batch_size: int
    superimpose_alpha: float
    temporal_weights: tuple[float, ...]
    post_process: PostProcess | None

    @property
    def samples(self) -> int:
        return self.n_iter * self.batch_size

    def sample_seeds(self) -> list[tuple[int, int]]:
        """(seed, subseed) of each sample: the WebUI gives sample k `seed + k` and `subseed + k`."""
        return [(self.seed + k, self.subseed + k) for k in range(self.samples)]


class ParamResolver:
    """Evaluates the settings and schedules for any (frame, loop pass)."""

    def __init__(self, settings: Settings, seed: int, subseed: int) -> None:
        self.settings = settings
        self.seed = seed
        self.subseed = subseed
        self.base_weights = tuple(settings.temporal_weights())
        self.schedules: dict[str, Expression] = {}
        for name in SCHEDULES:
            text = getattr(settings, name)
            if text and text.strip():
                compile_fn = compile_post_processing if name == "image_post_processing_schedule" else compile_expression
                self.schedules[name] = compile_fn(name, text)

    def __call__(self, frame_index: int, loop_index: int) -> FrameParams:
        s = self.settings
        image_i, loop_i = frame_index + 1, loop_index + 1

        def value(name: str, default: object, check: Callable[[str, object], object]) -> object:
            expr = self.schedules.get(name)
            if expr is None:
                return default
            return check(name, expr(image_i, loop_i))

        def bad(name: str, got: object, want: str) -> VlrtError:
            return VlrtError(
                f"{name} returned {got!r} at image_i={image_i}, loop_i={loop_i}; it must return {want}"
            )

        def real(lo: float | None = None, hi: float | None = None) -> Callable[[str, object], float]:
            def check(name: str, got: object) -> float:
                if isinstance(got, bool) or not isinstance(got, numbers.Real):
                    raise bad(name, got, "a number")
                if (lo is not None and got < lo) or (hi is not None and got > hi):
                    raise bad(name, got, f"a number from {lo} to {hi}")
                return float(got)

            return check

        def integer(lo: int | None = None) -> Callable[[str, object], int]:
            def check(name: str, got: object) -> int:
                if isinstance(got, bool) or not isinstance(got, numbers.Real) or not float(got).is_integer():
                    raise bad(name, got, "a whole number")
                if lo is not None and got < lo:
                    raise bad(name, got, f"a whole number of at least {lo}")
                return int(got)

            return check

        def text(name: str, got: object) -> str:
            if not isinstance(got, str):
                raise bad(name, got, "a string")
            return got

        def weights(name: str, got: object) -> tuple[float, ...]:
            if not isinstance(got, (list, tuple)) or not all(
                isinstance(w, numbers.Real) and not isinstance(w, bool) for w in got
            ):
                raise bad(name, got, "a list of numbers")
            if len(got) != len(self.base_weights):
                raise bad(name, got, f"a list of {len(self.base_weights)} numbers (as long as temporal_superimpose_alpha_list)")
            return tuple(float(w) for w in got)

        def batch(name: str, got: object) -> tuple[int, int]:
            if isinstance(got, (tuple, list)):
                if len(got) != 2:
                    raise bad(name, got, "n_iter or a pair (n_iter, batch_size)")
                return integer(1)(name, got[0]), integer(1)(name, got[1])
            return integer(1)(name, got), s.batch_size

        def callable_(name: str, got: object) -> PostProcess:
            if not callable(got):
                raise bad(name, got, "a function 'lambda img: …'")
            return got  # type: ignore[return-value]

        n_iter, batch_size = value("batch_count_schedule", (s.n_iter, s.batch_size), batch)  # type: ignore[misc]
        samples = n_iter * batch_size
        stride = (frame_index * max(s.loop_n, 1) + loop_index) * samples
        seed = self.seed if s.fix_seed else self.seed + stride
        subseed = self.subseed if s.fix_subseed else self.subseed + stride
        return FrameParams(
            subseed_strength=value("subseed_strength_schedule", s.subseed_strength, real(0.0, 1.0)),  # type: ignore[arg-type]
            denoising_strength=value("denoising_schedule", s.denoising_strength, real(0.0, 1.0)),  # type: ignore[arg-type]
            steps=self._steps(value("step_schedule", s.steps, integer(1))),  # type: ignore[arg-type]
            seed=value("seed_schedule", seed, integer()),  # type: ignore[arg-type]
            subseed=value("subseed_schedule", subseed, integer()),  # type: ignore[arg-type]
            cfg_scale=value("cfg_schedule", s.cfg_scale, real()),  # type: ignore[arg-type]
            superimpose_alpha=value("superimpose_alpha_schedule", s.superimpose_alpha, real()),  # type: ignore[arg-type]
            temporal_weights=value("temporal_superimpose_schedule", self.base_weights, weights),  # type: ignore[arg-type]
            prompt=value("prompt_schedule", s.prompt, text),  # type: ignore[arg-type]
            negative_prompt=value("negative_prompt_schedule", s.negative_prompt, text),  # type: ignore[arg-type]
            n_iter=n_iter,
            batch_size=batch_size,
            post_process=value("image_post_processing_schedule", None, callable_),  # type: ignore[arg-type]
        )

    def _steps(self, steps: int) -> int:
        """A frame's sampling steps: a draft runs a quarter of them (vlrt.settings.draft)."""
        return draft_steps(steps) if self.settings.draft else steps

    def check_all_first(self) -> None:
        """Evaluate every schedule at the first frame of the first pass, so type errors surface before work starts."""
        self(0, 0)
