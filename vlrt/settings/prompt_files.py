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


def frame_prompts(from_file: tuple[str | None, str | None], resolved: tuple[str, str]) -> tuple[str, str]:
    """A frame's (prompt, negative prompt) when prompts are read from txt files.

    Each of the two on its own: the txt's part when it has one (it overrides the schedule), else
    the frame's resolved value: the schedule's for this frame when that schedule is set, else the
    prompt given for the whole run (SPEC.md §2.3 step 5).
    """
    return from_file[0] or resolved[0], from_file[1] or resolved[1]
