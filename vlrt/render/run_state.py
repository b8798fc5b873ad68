"""What a render leaves beside its output, and how an interrupted one is picked up again.

The settings file (`out.mp4.settings.toml`, or `settings.toml` inside an output folder) is
written when a render starts, marked `complete = false`, and rewritten when it finishes. It
holds the concrete seeds, so `--resume` repeats exactly the same render, and it is what `--resume`
compares: a setting that changes the frames and differs is refused by name.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vlrt import __version__
from vlrt.errors import VlrtError
from vlrt.image.temporal_diff import REFERENCE_SEPARATOR
from vlrt.io.output_guard import refuse_existing, refuse_overwriting_sources
from vlrt.io.sinks import check_output_spec
from vlrt.settings.config import FRAMES, SETTINGS_FIELDS, Settings, build_settings, dump_settings, load_config


def is_folder_output(output: str) -> bool:
    return output.endswith(("/", "\\")) or Path(output).is_dir()


def settings_path(output: str) -> Path | None:
    """Where the settings of a run are written: beside a file output, inside a folder output."""
    if output == "-":
        return None
    path = Path(output)
    if is_folder_output(output):
        return path / "settings.toml"
    return path.with_name(path.name + ".settings.toml")


def loop_output(output: str, loop_number: int) -> str:
    """The per-pass output beside the main one: out.mp4 → out-loop_1.mp4, out/ → out-loop_1/."""
    path = Path(output)
    if is_folder_output(output):
        return str(path.with_name(f"{path.name}-loop_{loop_number}")) + "/"
    return str(path.with_name(f"{path.stem}-loop_{loop_number}{path.suffix}"))


def check_outputs(
    settings: Settings, input_spec: str, output_spec: str, *, preview: str | None = None,
    no_overwrite: bool = False, resume: bool = False,
) -> None:
    """Before anything is loaded or written: the output must be writable as asked (extension, format,
    codec), must not be the input, a mask or a reference folder, and with `no_overwrite` must not exist.

    Covers every file the run writes: the output, the per-pass outputs of save_every_loop, the
    preview sheet and the settings file."""
    check_output_spec(output_spec, codec=settings.codec, crf=settings.crf, lossless=settings.lossless,
                      output_format=settings.output_format)
    folder = is_folder_output(output_spec)
    outputs = [(output_spec, folder)]
    if settings.save_every_loop:
        outputs += [(loop_output(output_spec, n), folder) for n in range(1, settings.loop_n)]
    if preview:
        outputs.append((preview, False))
    sources = [("input", input_spec), ("mask", settings.mask_directory)]
    sources += [("reference folder", part.strip()) for part in settings.reference_frames_directory.split(REFERENCE_SEPARATOR)]
    refuse_overwriting_sources(outputs, sources)
    if settings.draft:
        _refuse_replacing_a_full_render(output_spec)
    if no_overwrite:
        # --resume continues the frames and settings file an interrupted run left: only finished files count then.
        taken = [(spec, f) for spec, f in outputs if not (resume and f)]
        settings_file = settings_path(output_spec)
        if settings_file is not None and not folder and not resume:
            taken.append((str(settings_file), False))
        refuse_existing(taken)


def _refuse_replacing_a_full_render(output: str) -> None:
    """A draft may replace an earlier draft, never a full render (or anything else that is no draft)."""
    if output == "-":
        return
    path = Path(output)
    exists = any(path.iterdir()) if path.is_dir() else path.exists()
    saved = settings_path(output)
    if saved is not None and saved.is_file():
        exists = True
        import tomllib

        try:
            if tomllib.loads(saved.read_text(encoding="utf-8")).get("render", {}).get("draft") is True:
                return
        except (tomllib.TOMLDecodeError, UnicodeDecodeError):
            pass
    if exists:
        beside = f"{path.with_name(path.name + '-draft')}/" if is_folder_output(output) else path.with_name(f"{path.stem}.draft{path.suffix}")
        raise VlrtError(
            f"--draft: {output} holds a full render (or something that is no draft) and a draft never replaces it: "
            f"write the draft beside it, e.g. -o {beside}"
        )


def write_settings(
    settings: Settings,
    input_spec: str,
    output_spec: str,
    frames: int | None,
    loras: list[dict[str, Any]] | None = None,
    *,
    controlnets: list[dict[str, Any]] | None = None,
    cuts: list[int] | None = None,
    embeddings: list[dict[str, Any]] | None = None,
    draft: str | None = None,
) -> None:
    """Record the run (atomically); `frames` None means the render is still under way. `loras`
    (path, scale, sha256 of each file), `controlnets` (model, sha256 of each unit's) and `embeddings`
    (name, path, sha256 of each textual-inversion file prompts may name) say which files exactly the
    frames were made with; `cuts` the scene cuts the render used (the first frame of each new shot);
    `draft` what a draft changed (vlrt.settings.draft)."""
    path = settings_path(output_spec)
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    extra: dict[str, Any] = {"version": __version__, "input": input_spec, "output": output_spec, "complete": frames is not None}
    if frames is not None:
        extra["frames"] = frames
    if loras:
        extra["lora"] = loras
    if cuts:
        extra["scene_cuts"] = sorted(cuts)
    if controlnets:
        extra["controlnet"] = controlnets
    if embeddings:
        extra["embedding"] = embeddings
    if draft:
        extra["draft"] = draft
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(dump_settings(settings, extra), encoding="utf-8")
    tmp.replace(path)


def saved_settings(output: str) -> tuple[Settings, bool] | None:
    """The settings an earlier render of this output recorded, and whether it completed."""
    path = settings_path(output)
    if path is None or not path.is_file():
        return None
    import tomllib

    data = tomllib.loads(path.read_text(encoding="utf-8"))
    return build_settings(load_config(path)), bool(data.get("vlrt", {}).get("complete", False))


def recorded_cuts(output: str) -> tuple[int, ...]:
    """The scene cuts a render of `output` recorded in its settings file (none when there is no file)."""
    path = settings_path(output)
    if path is None or not path.is_file():
        return ()
    import tomllib

    return tuple(tomllib.loads(path.read_text(encoding="utf-8")).get("vlrt", {}).get("scene_cuts", ()))


def check_same_loras(output: str, loras: list[dict[str, Any]]) -> None:
    """--resume: the LoRA files must be the very files the interrupted render used (same contents)."""
    _check_same_files(output, "lora", loras, "LoRA files")


def check_same_controlnets(output: str, controlnets: list[dict[str, Any]]) -> None:
    """--resume: each ControlNet unit's model must be the very one the interrupted render used (same contents)."""
    _check_same_files(output, "controlnet", controlnets, "ControlNet models")


def check_same_embeddings(output: str, embeddings: list[dict[str, Any]]) -> None:
    """--resume: the embeddings folder must hold the very files the interrupted render had (same contents)."""
    _check_same_files(output, "embedding", embeddings, "textual-inversion files in embeddings_dir")


def _check_same_files(output: str, key: str, records: list[dict[str, Any]], what: str) -> None:
    path = settings_path(output)
    if path is None or not path.is_file():
        return
    import tomllib

    saved = tomllib.loads(path.read_text(encoding="utf-8")).get("vlrt", {}).get(key, [])
    if [entry.get("sha256") for entry in saved] != [entry["sha256"] for entry in records]:
        raise VlrtError(
            f"--resume: the {what} are not those the interrupted render used (their contents differ): "
            "resume with the same files, or render again without --resume"
        )


def resumable_settings(settings: Settings, saved: Settings) -> Settings:
    """The settings to resume with: the saved seeds and size where this run left them open; any
    other setting that changes the frames must be the same."""
    fill = {name: getattr(saved, name) for name in ("seed", "subseed") if getattr(settings, name) == -1}
    fill.update({name: getattr(saved, name) for name in ("width", "height") if getattr(settings, name) is None})
    settings = settings.__class__(**{**vars(settings), **fill})
    for name, field in SETTINGS_FIELDS.items():
        if field.metadata["group"] == FRAMES and getattr(settings, name) != getattr(saved, name):
            raise VlrtError(
                f"--resume: setting {name} is {getattr(settings, name)!r} but the interrupted render used "
                f"{getattr(saved, name)!r}: resume with the same settings, or render again without --resume"
            )
    return settings


def resume_settings(settings: Settings, output: str) -> tuple[Settings, bool]:
    """The settings to continue an interrupted render of `output` with, and whether one was recorded.

    Refuses a pipe, a finished output, and a setting that changes the frames and differs."""
    if output == "-":
        raise VlrtError("--resume needs a file or folder output; a pipe cannot be resumed")
    saved = saved_settings(output)
    if saved is None:
        return settings, False
    previous, complete = saved
    settings = resumable_settings(settings, previous)
    if complete:
        raise VlrtError(f"{output} is already complete: nothing to resume (render again without --resume to redo it)")
    return settings, True


def finished_folder_frames(output: str) -> int:
    """How many frames, from the first on, an output folder already holds (PNG writes are atomic)."""
    folder = Path(output)
    count = 0
    while (folder / f"{count:06d}.png").is_file():
        count += 1
    return count


def finished_video_frames(output: str) -> int:
    """How many frames, from the first on, an interrupted video output already holds."""
    from vlrt.io.sinks import finished_frames

    return finished_frames(Path(output))
