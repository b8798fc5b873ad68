"""Per-frame prompts from a `.txt` beside each input frame, and which prompt wins (SPEC.md §2.9, §2.3 step 5).

The extension read the files with the platform's default encoding (non-ASCII prompts broke on
Windows) and kept trailing newlines in the prompt; here files are UTF-8 and each part is stripped.
"""

from __future__ import annotations

from pathlib import Path

from vlrt.errors import VlrtError

NEG_SEPARATOR = " --neg "


def read_prompt_file(frame_path: Path) -> tuple[str | None, str | None]:
    """(prompt, negative prompt) from `<frame stem>.txt` beside the frame; (None, None) without one.

    The text is split on the FIRST " --neg " (later ones belong to the negative prompt); each part
    is stripped and an empty part is None, so it falls back like a missing one. A UTF-8 byte-order
    mark (Windows Notepad) is ignored.
    """
    txt = frame_path.with_name(frame_path.stem + ".txt")
    if not txt.is_file():
        return None, None
    try:
        text = txt.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise VlrtError(f"prompt file '{txt}' is not UTF-8 text ({exc.reason}): save it as UTF-8") from exc
    prompt, _, negative = text.partition(NEG_SEPARATOR)
    return prompt.strip() or None, negative.strip() or None


def resolve_prompts(
    file_prompt: str | None,
    file_negative: str | None,
    scheduled_prompt: str | None,
    scheduled_negative: str | None,
    has_prompt_schedule: bool,
    has_negative_schedule: bool,
    default_prompt: str,
    default_negative: str,
) -> tuple[str, str]:
    """The (prompt, negative prompt) of a frame when prompts are read from txt files.

    Each of the two independently: the txt's part when it has one (it overrides the schedule);
    otherwise the schedule's value for this frame when that schedule is set; otherwise the default
    (the prompt given for the whole run).
    """
    return (
        _pick(file_prompt, scheduled_prompt, has_prompt_schedule, default_prompt),
        _pick(file_negative, scheduled_negative, has_negative_schedule, default_negative),
    )


def _pick(from_file: str | None, scheduled: str | None, has_schedule: bool, default: str) -> str:
    if from_file is not None:
        return from_file
    if has_schedule and scheduled is not None:
        return scheduled
    return default
