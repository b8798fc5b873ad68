"""The panel's fields, generated from the settings' own definitions, and the command line they make.

Names, defaults, help texts, types and choices all come from `vlrt.settings.config.Settings`; this
module only sorts the fields into the extension's groups (SPEC.md §1.1–§1.3). A setting no group
names lands in the last group, so a new setting shows up in the page without any change here.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from vlrt.errors import VlrtError
from vlrt.settings.config import (
    ALIASES,
    RUN,
    SETTINGS_FIELDS,
    Settings,
    build_settings,
    dump_settings,
    field_default,
    load_config,
)
from vlrt.settings.params import SCHEDULES, ParamResolver

# The extension's main panel (SPEC.md §1.1), in its order; input and output are the page's own boxes.
MAIN_PANEL = (
    "use_mask", "mask_directory", "mask_threshold", "read_prompt_from_txt", "output_frame_rate", "max_frames",
    "extract_nth_frame", "is_continue", "loop_n", "superimpose_alpha", "fix_seed", "fix_subseed",
    "temporal_superimpose_method", "temporal_superimpose_alpha_list", "reference_frames_directory", "save_every_loop",
)
# The "Advanced Settings of Video Loopback" accordion (SPEC.md §1.2): the schedules and the video post-process.
ADVANCED = (*SCHEDULES, "video_post_process_method", "video_post_process_alpha", "fastdvdnet_noise_sigma", "fastdvdnet_weights")
# The img2img tab's own parameters the script inherits (SPEC.md §1.3), under the WebUI API's names.
WEBUI = (
    "prompt", "negative_prompt", "sampler_name", "scheduler", "steps", "cfg_scale", "denoising_strength", "seed", "subseed",
    "subseed_strength", "batch_size", "n_iter", "width", "height", "resize_mode", "mask_blur", "inpainting_mask_invert",
    "inpainting_fill", "inpaint_full_res", "inpaint_full_res_padding", "color_correction",
)
# The checkpoint, VAE, LoRA and CLIP skip boxes of the WebUI (the model path itself is a box at the top).
MODEL = ("model_config", "prediction_type", "vae", "lora", "lora_dir", "embeddings_dir", "clip_skip")
TOP = ("model",)

GROUPS = ("Video Loopback", "Advanced Settings of Video Loopback", "img2img (WebUI parameters)", "Model",
          "Output and engines", "vlrt's own")


def group_of(name: str) -> str:
    """The panel group a setting is shown in; a setting nobody placed goes to "vlrt's own"."""
    for group, names in zip(GROUPS, (MAIN_PANEL, ADVANCED, WEBUI, MODEL)):
        if name in names:
            return group
    return GROUPS[4] if SETTINGS_FIELDS[name].metadata["group"] == RUN else GROUPS[5]


@dataclass(frozen=True)
class Field:
    """One setting as the page shows it: the widget kind follows the field's type and choices."""

    name: str
    kind: str  # "checkbox", "dropdown", "number", "integer", "text", "lines" (one value a line)
    default: Any
    help: str
    choices: tuple | None
    group: str


def panel_fields() -> list[Field]:
    """Every setting of `vlrt render`, in the settings' order (the model's box first)."""
    out = []
    for f in fields(Settings):
        kind = f.type
        default = field_default(f.name)
        if f.metadata["choices"]:
            widget = "dropdown"
        elif kind.startswith("bool"):
            widget = "checkbox"
        elif kind.startswith("list"):
            widget = "lines"
        elif "None" in kind or kind.startswith("str"):
            widget = "text"  # an optional number is a text box: empty means "not given"
        else:
            widget = "integer" if kind.startswith("int") else "number"
        group = "top" if f.name in TOP else group_of(f.name)
        out.append(Field(f.name, widget, default, f.metadata["help"], f.metadata["choices"], group))
    return sorted(out, key=lambda fl: fl.name not in TOP)


FIELDS = panel_fields()
BY_NAME = {f.name: f for f in FIELDS}


def to_widget(field: Field, value: Any) -> Any:
    """A setting's value as its widget holds it (None → empty box, a list → one item a line)."""
    if field.kind == "lines":
        return "\n".join(value or [])
    if field.kind == "text":
        return "" if value is None else str(value)
    return value


def from_widget(field: Field, value: Any) -> Any:
    """A widget's content as the setting's value; `build_settings` checks its type afterwards."""
    if field.kind == "lines":
        return [line.strip() for line in str(value or "").splitlines() if line.strip()]
    if field.kind == "text":
        text, kind = str(value or ""), SETTINGS_FIELDS[field.name].type
        if kind == "str":
            return text
        if not text.strip():
            return None
        return _number(text.strip()) if kind.startswith(("int", "float")) else text
    if field.kind == "integer" and isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def _number(text: str) -> Any:
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text  # build_settings names the setting and the type it wants


def changed_values(values: dict[str, Any]) -> dict[str, Any]:
    """The settings (by name, as setting values) that differ from their defaults."""
    out = {}
    for name, raw in values.items():
        value = from_widget(BY_NAME[name], raw)
        if value != field_default(name):
            out[name] = value
    return out


def check(values: dict[str, Any]) -> Settings:
    """The settings a render would run with, checked as the command line checks them before the
    first frame (types, choices, the temporal list, every schedule through the safe evaluator)."""
    settings = build_settings(overrides=changed_values(values))
    ParamResolver(settings, seed=0, subseed=0)
    return settings


def settings_arguments(values: dict[str, Any]) -> list[str]:
    """The `vlrt render` options that give these settings (defaults left out)."""
    argv: list[str] = []
    for name, value in changed_values(values).items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            argv.append(flag if value else "--no-" + name.replace("_", "-"))
        elif isinstance(value, list):
            for item in value:
                argv += [flag, item]
        elif value is not None:
            argv += [flag, str(value)]
    return argv


def load_values(path: Path) -> dict[str, Any]:
    """A TOML config (or a settings file a render wrote) as widget values for every setting it holds."""
    config = load_config(path)
    settings = build_settings(config)
    names = {ALIASES.get(n, n) for n in config}
    return {name: to_widget(BY_NAME[name], getattr(settings, name)) for name in names}


def save_values(values: dict[str, Any], path: Path) -> None:
    """Write the panel's settings as a TOML config `--config` reads back (checked first, written atomically)."""
    if path.is_dir() or not path.name.endswith(".toml"):
        raise VlrtError(f"config path {path} is not a .toml file: type a file name ending in .toml")
    text = dump_settings(check(values))
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def presets_folder() -> Path:
    """The checkout's presets/ folder (example configs)."""
    return Path(__file__).resolve().parents[2] / "presets"


def presets() -> list[str]:
    folder = presets_folder()
    return sorted(p.name for p in folder.glob("*.toml")) if folder.is_dir() else []
