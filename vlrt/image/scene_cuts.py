"""Scene cuts: where one shot of a video ends and the next begins.

At a cut every windowed step treats the shot's edge as an end of the video (the temporal blend
drops the other shot's frames and renormalises; `color_correction = first` anchors each shot to
its own first frame), so nothing of one shot ghosts into the next. Cuts are given as a list of
the first frame of each new shot, or detected as the frames stream by PySceneDetect's content
detector (HSV change between consecutive frames above `threshold`, shots at least 15 frames long:
its defaults), fed the frames at render size in order from frame 0.

Since nothing crosses a cut, the frames of one shot depend only on that shot's inputs: a render of
frames [start, stop) reads from the later of `start - reach` and its shot's first frame, and stops
reading at the next cut (`span_reads`), which is what lets segment borders on cuts drop their halo.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from vlrt.errors import VlrtError

AUTO, NONE = "auto", "none"


def parse_cut_list(spec: str) -> tuple[int, ...] | None:
    """The cut frames of `scene_cuts`: () for "none", None for "auto", else the sorted list given."""
    text = spec.strip().lower()
    if text == AUTO:
        return None
    if text in (NONE, ""):
        return ()
    try:
        cuts = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        raise VlrtError(
            f"scene_cuts {spec!r} is not 'auto', 'none' or a list of frame numbers: give e.g. 12,240,1031 "
            "(the first frame of each new shot, 0-based)"
        ) from None
    if cuts and cuts[0] < 1:
        raise VlrtError(f"scene_cuts {spec!r}: a cut is the first frame of a new shot, so 1 or more")
    return tuple(cuts)


def shot_start(cuts: Sequence[int], index: int) -> int:
    """The first frame of the shot that frame `index` belongs to."""
    return max((c for c in cuts if c <= index), default=0)


def span_reads(start: int, stop: int, reach: int, cuts: Sequence[int], total: int | None = None) -> tuple[int, int]:
    """The input frames [read_start, read_stop) that output frames [start, stop) depend on, when an
    output frame depends on the inputs within `reach` of it in its own shot."""
    read_start = max(0, start - reach, shot_start(cuts, start))
    read_stop = min([stop + reach, *(c for c in cuts if c >= stop), *([total] if total is not None else [])])
    return read_start, read_stop


class ShotTracker:
    """Frame by frame, in order from frame 0: the first frame of the shot each frame belongs to.

    `known` cuts (found earlier, e.g. by the scan before a segmented render) replace detection."""

    def __init__(self, spec: str, threshold: float, fps: float, known: Sequence[int] | None = None) -> None:
        given = parse_cut_list(spec) if known is None else tuple(known)
        self.cuts: list[int] = list(given or ())
        self._detector = None
        self._fps = float(fps or 24)
        if given is None:
            from scenedetect.detectors import ContentDetector

            self._detector = ContentDetector(threshold=threshold)
        self._seen = -1

    @property
    def active(self) -> bool:
        return self._detector is not None or bool(self.cuts)

    def shot_of(self, index: int, image: np.ndarray) -> int:
        """The shot start of frame `index` (RGB uint8), which must follow the previous call's frame."""
        if self._detector is not None:
            if index != self._seen + 1:
                raise VlrtError("scene_cuts auto needs the frames from the video's start, in order: give the cuts as a list")
            from scenedetect.common import FrameTimecode

            found = self._detector.process_frame(FrameTimecode(index, fps=self._fps), np.ascontiguousarray(image[..., ::-1]))
            self.cuts.extend(c.frame_num for c in found if c.frame_num not in self.cuts and c.frame_num > 0)
            self._seen = index
        return shot_start(self.cuts, index)
