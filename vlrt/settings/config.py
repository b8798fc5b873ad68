"""Every setting of a render, with the extension's and the WebUI API's names.

One dataclass is the single source of truth: the TOML config (snake_case), the command line
(`--kebab-case`, generated from the fields), the settings file written beside the output and
the resume check all come from it. Command-line values override the config file.
"""

from __future__ import annotations

import math
from dataclasses import MISSING, asdict, dataclass, field, fields
from fractions import Fraction
from pathlib import Path
from typing import Any

import tomli_w
import tomllib

from vlrt.errors import VlrtError
from vlrt.image.color import COLOR_MODES
from vlrt.image.inpaint import FILLS
from vlrt.image.masks import MISSING_POLICIES
from vlrt.image.temporal_diff import DIFFERENCE_METHOD
from vlrt.settings.controlnet import ControlNetUnit, units_from_setting

# Field groups: "frames" settings change the rendered pictures (and must match on --resume);
# "run" settings only change how the work is done or where it goes.
FRAMES = "frames"
RUN = "run"

TEMPORAL_METHODS = ("simple", DIFFERENCE_METHOD)
POST_PROCESS_METHODS = ("none", "fastdvdnet")
BLEND_ROUNDINGS = ("round", "floor")
PREDICTION_TYPES = ("auto", "epsilon", "v_prediction")
DEINTERLACE_MODES = ("auto", "off")
SCHEDULE_TYPES = ("Automatic", "SGM Uniform")  # the WebUI's "Schedule type" (its API's `scheduler`)


def _f(default: Any, help: str, group: str = FRAMES, choices: tuple | None = None, alias: str | None = None) -> Any:
    meta = {"help": help, "group": group, "choices": choices, "alias": alias}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class Settings:
    """A render's settings; defaults follow the extension unless a comment says why not."""

    # --- the extension's own parameters (SPEC.md §1.1, §1.2) ---
    loop_n: int = _f(10, "number of loop passes over the whole video")
    superimpose_alpha: float = _f(0.25, "weight of the new SD result over the loop's input frame (0 keeps the input, 1 takes SD)")
    fix_seed: bool = _f(True, "use the same seed for every frame and loop pass")
    fix_subseed: bool = _f(False, "use the same variation subseed for every frame and loop pass")
    temporal_superimpose_method: str = _f("simple", "how neighbouring frames are mixed into the init image", choices=TEMPORAL_METHODS)
    temporal_superimpose_alpha_list: str = _f("1", "odd-length comma-separated temporal weights centred on the current frame ('1' = off)")
    reference_frames_directory: str = _f("", "reference frame folder(s) for the difference-mask method, separated by '!!!'")
    use_mask: bool = _f(False, "inpaint only inside a mask")
    mask_directory: str = _f("", "mask folder (matched by frame name), one mask file, or empty for the input's alpha channel")
    mask_threshold: int = _f(127, "mask pixels above this grey level are inpainted")
    read_prompt_from_txt: bool = _f(False, "read a per-frame prompt from <frame>.txt beside each input frame")
    output_frame_rate: float | None = _f(None, "output fps (default: the source's fps divided by extract_nth_frame)")
    max_frames: int | None = _f(None, "use at most this many frames (required for a single-image input)")
    extract_nth_frame: int = _f(1, "keep every n-th input frame")
    is_continue: bool = _f(False, "do not subsample the input with extract_nth_frame (the extension's manual resume aid)")
    # Off by default, unlike the extension: on long videos a video per loop pass costs more than it shows.
    save_every_loop: bool = _f(False, "also write a video of every loop pass beside the output", group=RUN)
    subseed_strength_schedule: str = _f("", "schedule for subseed_strength (expression of image_i, loop_i)")
    denoising_schedule: str = _f("", "schedule for denoising_strength")
    step_schedule: str = _f("", "schedule for steps")
    seed_schedule: str = _f("", "schedule for seed")
    subseed_schedule: str = _f("", "schedule for subseed")
    cfg_schedule: str = _f("", "schedule for cfg_scale")
    superimpose_alpha_schedule: str = _f("", "schedule for superimpose_alpha")
    temporal_superimpose_schedule: str = _f("", "schedule for the temporal weights (a list as long as the initial one)")
    prompt_schedule: str = _f("", "schedule for prompt")
    negative_prompt_schedule: str = _f("", "schedule for negative_prompt")
    batch_count_schedule: str = _f("", "schedule for n_iter, or (n_iter, batch_size) when it returns a pair")
    image_post_processing_schedule: str = _f("", "'lambda img: img.filter(ImageFilter.X) if … else img' applied to each finished frame")
    video_post_process_method: str = _f("none", "video post-process after every loop pass", choices=POST_PROCESS_METHODS)
    video_post_process_alpha: float = _f(0.3, "weight of the denoised frame over the undenoised one")
    fastdvdnet_noise_sigma: float = _f(60.0, "FastDVDNet noise sigma on the 0-255 scale (trained for 5-55)")
    fastdvdnet_weights: str = _f("", "FastDVDnet weights (upstream model.pth or .safetensors); random ones only with --model demo")

    # --- inherited WebUI parameters, with the WebUI HTTP API's names (SPEC.md §1.3) ---
    prompt: str = _f("", "prompt")
    negative_prompt: str = _f("", "negative prompt")
    sampler_name: str = _f("Euler a", "sampler, by its WebUI name (see 'vlrt render --help')")
    scheduler: str = _f(
        "Automatic", "schedule type, by its WebUI name: 'Automatic' (the sampler's own) or 'SGM Uniform' (trailing "
        "timesteps, as Turbo, Lightning and Hyper-SD models need)", choices=SCHEDULE_TYPES,
    )
    steps: int = _f(20, "sampling steps (img2img runs int(steps * denoising_strength) of them)")
    cfg_scale: float = _f(7.0, "classifier-free guidance scale")
    denoising_strength: float = _f(0.4, "img2img denoising strength")
    seed: int = _f(-1, "seed (-1: a random one, recorded in the settings file)")
    subseed: int = _f(-1, "variation seed (-1: a random one)")
    subseed_strength: float = _f(0.0, "variation strength: slerp from the seed's noise to the subseed's")
    batch_size: int = _f(1, "samples per frame in one batch; the samples are averaged (batch blend)")
    n_iter: int = _f(1, "batches per frame; all samples are averaged", alias="batch_count")
    width: int | None = _f(None, "frame width (default: the source width rounded down to what the model takes)")
    height: int | None = _f(None, "frame height (default: the source height rounded down)")
    resize_mode: int = _f(0, "0 just resize, 1 crop and resize, 2 resize and fill", choices=(0, 1, 2))
    # The WebUI inpaint tab's defaults, where the extension's users ran it (the HTTP API's differ).
    mask_blur: int = _f(4, "inpainting: Gaussian blur radius of the mask's edge where the result is pasted back")
    inpainting_mask_invert: bool = _f(False, "inpainting: edit outside the mask instead of inside")
    inpainting_fill: str = _f("original", "inpainting: what SD starts from inside the mask", choices=FILLS)
    inpaint_full_res: bool = _f(False, "inpainting: run SD on the masked area only, scaled to width×height, and paste it back")
    inpaint_full_res_padding: int = _f(32, "inpainting: pixels around the masked area kept as context with inpaint_full_res")

    # --- vlrt's own ---
    missing_mask: str = _f("error", "a frame without a mask: 'error', or 'keep' the frame unchanged", choices=MISSING_POLICIES)
    post_process_outside_mask: bool = _f(
        False, "apply image post-processing and FastDVDNet to the whole frame, outside the mask too (the extension's way)"
    )
    color_correction: str = _f(
        "none", "match SD's colours to each frame's 'original' input, or to the 'first' input frame", choices=COLOR_MODES
    )
    blend_rounding: str = _f(
        "round",
        "8-bit rounding of blends: 'round' (exact means) or 'floor' (the extension's Pillow arithmetic, bit for bit)",
        choices=BLEND_ROUNDINGS,
    )
    scene_cuts: str = _f(
        "auto", "'auto' detects scene cuts (PySceneDetect's content detector), or the first frame of each new shot "
        "('12,240,1031'); nothing crosses a cut; 'none' blends across cuts as the extension does",
    )
    scene_cut_threshold: float = _f(27.0, "content change that makes a cut with scene_cuts auto (PySceneDetect's default)")
    deinterlace: str = _f(
        "auto", "interlaced video: 'auto' deinterlaces it (FFmpeg's bwdif, one frame per frame), 'off' keeps its fields",
        choices=DEINTERLACE_MODES,
    )
    model: str = _f("", "a diffusers Stable Diffusion folder, an SD 1.x/2.x .safetensors/.ckpt file, or 'demo' (the built-in tiny model)")
    model_config: str = _f("", "diffusers config folder for a single-file model of an architecture vlrt does not ship "
                               "(default: SD 1.x/2.x, told apart by the checkpoint's keys)")
    prediction_type: str = _f("auto", "what the UNet predicts: auto (the model's config; single-file SD 2.x: v_prediction), "
                                      "epsilon or v_prediction", choices=PREDICTION_TYPES)
    vae: str = _f("", "a VAE in place of the model's: a diffusers folder or a .safetensors/.ckpt file, or a tiny one "
                      "(TAESD: a diffusers AutoencoderTiny folder, or its ENCODER,DECODER .pth/.safetensors files)")
    lora: list[str] = _f([], "PATH[:SCALE] of a LoRA fused into the model (repeatable; a list in the config; scale 1 by default)")
    lora_dir: str = _f("", "folder where the prompt's <lora:NAME:SCALE> tags find NAME.safetensors (subfolders too, "
                           "as the WebUI's models/Lora)")
    embeddings_dir: str = _f("", "the WebUI's embeddings/ folder: a prompt word naming a textual-inversion file in it "
                                 "(subfolders too) is replaced by its vectors")
    controlnet: list[ControlNetUnit] = _f(
        [], "ControlNet unit: a model PATH, or model=PATH,module=canny,weight=0.8,guidance_end=0.6,... with the WebUI "
            "ControlNet API's names (repeatable; [[controlnet]] tables in the config)"
    )
    annotators_dir: str = _f("", "folder of controlnet_aux's annotator weights (ControlNetHED.pth, sk_model.pth, "
                                 "body_pose_model.pth, ...) for the units' annotator modules (openpose, depth, lineart, "
                                 "softedge, ...); read offline", alias="annotators")
    clip_skip: int = _f(1, "CLIP skip as in the WebUI: 1 uses the text encoder's last layer, 2 the penultimate, ...")
    draft: bool = _f(False, "render a fast draft of these settings: half the size, a quarter of the steps (at least 1), "
                            "the --draft-vae; loop_n unchanged; it never replaces a full render's output")
    draft_vae: str = _f("", "the VAE a draft renders with, typically a tiny one (TAESD), in any form --vae takes")
    backend: str = _f(
        "auto", "engine backend: auto (TensorRT with a GPU, else ONNX Runtime), torch, ort, trt", group=RUN,
        choices=("auto", "torch", "ort", "trt"),
    )
    precision: str = _f("auto", "engine precision: auto (fp16 on GPUs, fp32 on the CPU), fp16, fp32", group=RUN,
                        choices=("auto", "fp16", "fp32"))
    vae_precision: str = _f("auto", "VAE precision: auto (fp32 on GPUs of 16 GiB or more, else as --precision), fp16, fp32",
                            group=RUN, choices=("auto", "fp16", "fp32"))
    device: str = _f("auto", "torch device: auto, cpu or cuda", group=RUN)
    max_batch: int = _f(8, "most UNet rows per engine call; 1 turns batching off", group=RUN)
    engines: str = _f("", "engine cache folder (default: $VLRT_ENGINES, the checkout's engines/, or ~/.cache/vlrt/engines)", group=RUN)
    crf: float = _f(17.0, "H.264/VP9 quality of video outputs (lower is better)", group=RUN)
    lossless: bool = _f(False, "bit-exact lossless video output", group=RUN)
    codec: str | None = _f(None, "video codec of the output (default by extension)", group=RUN)
    output_format: str = _f("nut", "container for '-' output", group=RUN, choices=("nut", "matroska", "mpegts", "y4m", "rawvideo"))
    input_format: str | None = _f(None, "container of '-' input; 'rawvideo' needs --input-size and --input-fps", group=RUN)
    input_size: str | None = _f(None, "WxH of rawvideo input", group=RUN)
    input_fps: float | None = _f(None, "fps of rawvideo input", group=RUN)

    def frame_settings(self) -> dict[str, Any]:
        """The settings that change the rendered frames (what --resume compares)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.metadata["group"] == FRAMES}

    def temporal_weights(self) -> list[float]:
        """The initial temporal weight list, checked: odd length, numbers only."""
        return parse_temporal_weights(self.temporal_superimpose_alpha_list)

    def output_fps(self, source_fps: Fraction | None) -> Fraction:
        """The output frame rate: explicit, else the source's divided by the subsampling step."""
        if self.output_frame_rate is not None:
            return Fraction(self.output_frame_rate).limit_denominator(1001)
        if source_fps is None:
            return Fraction(30)
        step = 1 if self.is_continue else self.extract_nth_frame
        return source_fps / step


def parse_temporal_weights(text: str) -> list[float]:
    """Comma-separated weights; empty means [1] (off). The length must be odd so one is centred."""
    parts = [p.strip() for p in str(text).split(",") if p.strip()]
    try:
        weights = [float(p) for p in parts] or [1.0]
    except ValueError:
        raise VlrtError(
            f"temporal_superimpose_alpha_list {text!r} is not a comma-separated list of numbers: use e.g. '0.1,0.8,0.1'"
        ) from None
    if len(weights) % 2 == 0:
        raise VlrtError(
            f"temporal_superimpose_alpha_list has {len(weights)} weights; it needs an odd number "
            "(the middle one is the current frame), e.g. '0.1,0.8,0.1'"
        )
    if not all(math.isfinite(w) for w in weights):
        raise VlrtError(f"temporal_superimpose_alpha_list {text!r} holds a non-finite weight: use finite numbers")
    return weights


SETTINGS_FIELDS = {f.name: f for f in fields(Settings)}
ALIASES = {f.metadata["alias"]: f.name for f in fields(Settings) if f.metadata["alias"]}


def _coerce(name: str, value: Any) -> Any:
    """Check a config value against the field's type, converting where the meaning is unambiguous."""
    f = SETTINGS_FIELDS[name]
    kind = f.type if isinstance(f.type, str) else f.type.__name__
    if value is None and "None" in kind:
        return None
    if name == "controlnet":
        return units_from_setting(value)
    try:
        if kind.startswith("bool"):
            if not isinstance(value, bool):
                raise TypeError
        elif kind.startswith("int"):
            if isinstance(value, bool) or not float(value).is_integer():
                raise TypeError
            value = int(value)
        elif kind.startswith("float"):
            if isinstance(value, bool):
                raise TypeError
            value = float(value)
        elif kind.startswith("list"):
            value = [value] if isinstance(value, str) else value
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise TypeError
        elif kind.startswith("str"):
            if isinstance(value, list) and name == "temporal_superimpose_alpha_list":
                value = ",".join(str(v) for v in value)
            if not isinstance(value, str):
                raise TypeError
    except (TypeError, ValueError):
        raise VlrtError(f"setting {name} = {value!r} should be of type {kind}: fix it in the config or on the command line") from None
    choices = f.metadata["choices"]
    if choices and value not in choices:
        raise VlrtError(f"setting {name} = {value!r} is not one of {', '.join(map(repr, choices))}")
    return value


def build_settings(config: dict[str, Any] | None = None, overrides: dict[str, Any] | None = None) -> Settings:
    """Settings from a config mapping, then command-line overrides; unknown names are errors."""
    values: dict[str, Any] = {}
    for source in (config or {}, overrides or {}):
        for key, value in source.items():
            name = ALIASES.get(key, key)
            if name not in SETTINGS_FIELDS:
                close = [n for n in SETTINGS_FIELDS if n.split("_")[0] == name.split("_")[0]][:3]
                hint = f" (did you mean {', '.join(close)}?)" if close else ""
                raise VlrtError(f"unknown setting {key!r}{hint}: see 'vlrt render --help' for the names")
            values[name] = _coerce(name, value)
    settings = Settings(**values)
    settings.temporal_weights()
    for name in ("loop_n", "steps", "batch_size", "n_iter", "extract_nth_frame", "max_batch", "mask_blur",
                 "inpaint_full_res_padding", "clip_skip"):
        minimum = 0 if name in ("loop_n", "mask_blur", "inpaint_full_res_padding") else 1
        if getattr(settings, name) < minimum:
            raise VlrtError(f"setting {name} = {getattr(settings, name)} must be at least {minimum}")
    if not 0 <= settings.mask_threshold <= 255:
        raise VlrtError(f"setting mask_threshold = {settings.mask_threshold} must be a grey level from 0 to 255")
    if settings.max_frames is not None and settings.max_frames < 1:
        raise VlrtError(f"setting max_frames = {settings.max_frames} must be at least 1")
    return settings


def load_config(path: Path) -> dict[str, Any]:
    """A TOML config file's settings (a [render] table or top-level keys)."""
    try:
        data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise VlrtError(f"config file {path} does not exist: check the --config path") from None
    except tomllib.TOMLDecodeError as exc:
        raise VlrtError(f"config file {path} is not valid TOML: {exc}") from None
    settings = data.get("render", data)
    if "render" in data and "controlnet" in data:  # [[controlnet]] tables beside a [render] table
        settings = {**settings, "controlnet": [*settings.get("controlnet", []), *data["controlnet"]]}
    return settings


def dump_settings(settings: Settings, extra: dict[str, Any] | None = None) -> str:
    """The settings as a TOML document that `--config` reads back to repeat the run."""
    values = {k: v for k, v in asdict(settings).items() if v is not None}
    doc: dict[str, Any] = {"render": values}
    if extra:
        doc["vlrt"] = extra
    return tomli_w.dumps(doc)


def field_default(name: str) -> Any:
    """The default of one setting (for help texts and docs)."""
    f = SETTINGS_FIELDS[name]
    return f.default_factory() if f.default is MISSING else f.default  # type: ignore[misc]
