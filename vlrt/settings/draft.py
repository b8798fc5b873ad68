"""`--draft`: a fast preview of the same settings, for tuning a long video before its full render.

A draft renders with the tiny VAE of `--draft-vae` (when given), at half the render size, with a
quarter of each frame's sampling steps (at least 1), and every other setting as given: `loop_n`,
the schedules, the seeds. The rules are applied where each value is used (the model's VAE, the
render size, each frame's steps), so the settings file of a draft holds the settings as they were
given plus `draft = true`: read back with `--config` it renders the same draft, and without
`draft` the full render it previews.
"""

from __future__ import annotations

from vlrt.settings.config import Settings

STEPS_DIVISOR = 4
SIZE_DIVISOR = 2


def draft_steps(steps: int) -> int:
    """A draft's sampling steps for a frame that asks for `steps`."""
    return max(1, steps // STEPS_DIVISOR)


def draft_size(width: int, height: int, multiple: int) -> tuple[int, int]:
    """Half the render size, rounded down to a multiple of the VAE scale factor (at least one)."""
    return tuple(max(multiple, side // SIZE_DIVISOR // multiple * multiple) for side in (width, height))  # type: ignore[return-value]


def model_vae(settings: Settings) -> str:
    """The VAE the model is loaded with: a draft's own (`draft_vae`) where one is given."""
    return settings.draft_vae if settings.draft and settings.draft_vae else settings.vae


def describe(settings: Settings, size: tuple[int, int], full: tuple[int, int] | None = None) -> str:
    """One line saying what a draft changes (for the log, with the full render's size, and the settings file)."""
    vae = f"VAE {settings.draft_vae}" if settings.draft_vae else "the model's VAE (no --draft-vae)"
    of = f" (the full render: {full[0]}×{full[1]})" if full else ""
    return (
        f"DRAFT, not the final render: {size[0]}×{size[1]}{of}, a quarter of the steps "
        f"({settings.steps} → {draft_steps(settings.steps)}), {vae}, loop_n {settings.loop_n}"
    )
