"""ControlNet units as the WebUI ControlNet extension's API names them, from the config or `--controlnet`.

In a TOML config each unit is a `[[controlnet]]` table; on the command line `--controlnet SPEC`
(repeatable), where SPEC is a model path alone or `model=PATH,module=canny,weight=0.8,…` with the
same names. Unit i takes its control images from `image_dir` when given, else from the i-th
`!!!` part of `reference_frames_directory`, else from the original input frames.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

from vlrt.errors import VlrtError
from vlrt.image.control_maps import CANNY, CANNY_THRESHOLDS, check_module
from vlrt.image.resize import CROP_AND_RESIZE, JUST_RESIZE, RESIZE_AND_FILL

BALANCED = "Balanced"
PROMPT_MORE_IMPORTANT = "My prompt is more important"
CONTROL_MORE_IMPORTANT = "ControlNet is more important"
CONTROL_MODES = (BALANCED, PROMPT_MORE_IMPORTANT, CONTROL_MORE_IMPORTANT)
RESIZE_MODES = {"Just Resize": JUST_RESIZE, "Crop and Resize": CROP_AND_RESIZE, "Resize and Fill": RESIZE_AND_FILL}


@dataclass(frozen=True)
class ControlNetUnit:
    """One ControlNet unit; defaults are the WebUI ControlNet extension's."""

    model: str
    module: str = "none"
    weight: float = 1.0
    guidance_start: float = 0.0
    guidance_end: float = 1.0
    control_mode: str = BALANCED
    threshold_a: float = CANNY_THRESHOLDS[0]
    threshold_b: float = CANNY_THRESHOLDS[1]
    resize_mode: str = "Crop and Resize"
    image_dir: str = ""  # a folder of control images or a video file for this unit, in place of the positional reference part
    processor_res: int = 512  # the annotator modules' detection resolution (short side), the WebUI's "Preprocessor resolution"

    @property
    def resize(self) -> int:
        """The resize mode as vlrt's number (vlrt.image.resize)."""
        return RESIZE_MODES[self.resize_mode]


UNIT_FIELDS = {f.name: f for f in fields(ControlNetUnit)}


def unit_from_table(table: dict[str, Any], where: str) -> ControlNetUnit:
    """A unit from a TOML table (or a parsed spec), its values checked; `where` names it in errors."""
    unknown = sorted(set(table) - set(UNIT_FIELDS))
    if unknown:
        raise VlrtError(f"{where}: unknown key {unknown[0]!r}: the keys are {', '.join(UNIT_FIELDS)}")
    if not str(table.get("model", "")).strip():
        raise VlrtError(f"{where} has no model: give model = PATH (a diffusers ControlNet folder or a .safetensors/.pth file)")
    values: dict[str, Any] = {}
    for name, value in table.items():
        kind = UNIT_FIELDS[name].type
        try:
            if kind == "float":
                if isinstance(value, bool):
                    raise ValueError
                value = float(value)
                if not math.isfinite(value):
                    raise ValueError
            elif kind == "int":
                if isinstance(value, bool) or not float(value).is_integer():
                    raise ValueError
                value = int(float(value))
            elif not isinstance(value, str):
                raise ValueError
        except (TypeError, ValueError):
            wanted = {"float": "number", "int": "whole number"}.get(kind, "string")
            raise VlrtError(f"{where}: {name} = {value!r} should be a {wanted}") from None
        values[name] = value
    unit = ControlNetUnit(**values)
    check_module(unit.module)
    if not 0.0 <= unit.guidance_start <= unit.guidance_end <= 1.0:
        raise VlrtError(
            f"{where}: guidance_start {unit.guidance_start:g} and guidance_end {unit.guidance_end:g} must satisfy "
            "0 <= guidance_start <= guidance_end <= 1 (fractions of the sampling steps)"
        )
    if unit.control_mode not in CONTROL_MODES:
        raise VlrtError(f"{where}: control_mode {unit.control_mode!r} is not one of {', '.join(map(repr, CONTROL_MODES))}")
    if unit.resize_mode not in RESIZE_MODES:
        raise VlrtError(f"{where}: resize_mode {unit.resize_mode!r} is not one of {', '.join(map(repr, RESIZE_MODES))}")
    if unit.processor_res < 64:
        raise VlrtError(f"{where}: processor_res {unit.processor_res} is below 64 (the annotators' detection resolution, e.g. 512)")
    if unit.module == CANNY and not 0 <= unit.threshold_a <= unit.threshold_b:
        raise VlrtError(f"{where}: canny needs 0 <= threshold_a <= threshold_b (low and high thresholds), e.g. 100 and 200")
    return unit


def parse_unit_spec(spec: str) -> ControlNetUnit:
    """A unit from `--controlnet SPEC`: `PATH`, or comma-separated `name=value` pairs with `model`."""
    where = f"--controlnet {spec!r}"
    if "=" not in spec:
        return unit_from_table({"model": spec.strip()}, where)
    table: dict[str, Any] = {}
    for part in spec.split(","):
        name, eq, value = part.partition("=")
        name = name.strip()
        if not eq or not name:
            raise VlrtError(f"{where}: {part!r} is not name=value: write e.g. model=PATH,module=canny,weight=0.8")
        if name in table:
            raise VlrtError(f"{where}: {name} is given twice")
        table[name] = value.strip()
    return unit_from_table(table, where)


def with_unit_value(units: list[ControlNetUnit], key: str, value: Any) -> list[ControlNetUnit]:
    """`units` with `controlnet.I.NAME = value` applied (a preview sweep's key; I counts from 0), checked as a table is."""
    parts = key.split(".")
    if len(parts) != 3 or not parts[1].isdigit() or parts[2] not in UNIT_FIELDS:
        raise VlrtError(f"{key!r} is not controlnet.I.NAME with a unit number I and one of {', '.join(UNIT_FIELDS)}")
    i = int(parts[1])
    if i >= len(units):
        raise VlrtError(f"{key!r}: there are {len(units)} ControlNet unit(s), numbered from 0: add the unit first")
    return [*units[:i], unit_from_table({**asdict(units[i]), parts[2]: value}, key), *units[i + 1 :]]


def units_from_setting(value: Any) -> list[ControlNetUnit]:
    """The `controlnet` setting: a list of TOML tables, of spec strings, or of units."""
    items = value if isinstance(value, list) else [value]
    units = []
    for i, item in enumerate(items):
        if isinstance(item, ControlNetUnit):
            units.append(item)
        elif isinstance(item, str):
            units.append(parse_unit_spec(item))
        elif isinstance(item, dict):
            units.append(unit_from_table(item, f"[[controlnet]] table {i + 1}"))
        else:
            raise VlrtError(f"controlnet entry {i + 1} ({item!r}) is neither a [[controlnet]] table nor a spec string")
    return units
