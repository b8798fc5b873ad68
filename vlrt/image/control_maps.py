"""ControlNet preprocessors ("modules" in the WebUI ControlNet extension): a frame to a control map.

Built in: `none` (the reference already is a control map), `canny` (OpenCV's Canny edge detector
with `threshold_a`/`threshold_b` as its low/high thresholds, as the WebUI's annotator calls it),
`invert` (white-on-black line art from black-on-white drawings). The annotator modules of
`vlrt.image.annotators.ANNOTATORS` (openpose, depth, lineart, softedge, …) run controlnet_aux's
detectors with weights from a local folder (`--annotators DIR`); the WebUI's other annotator modules
are refused with what to do instead: precompute the maps into a reference folder.
"""

from __future__ import annotations

import cv2
import numpy as np

from vlrt.errors import VlrtError
from vlrt.image.annotators import ANNOTATORS, Annotators

NONE, CANNY, INVERT = "none", "canny", "invert"
MODULES = (NONE, CANNY, INVERT)
# The WebUI's modules that run an annotator network (their names as in its API).
ANNOTATOR_MODULES = (
    "openpose", "openpose_face", "openpose_faceonly", "openpose_full", "openpose_hand", "dw_openpose_full",
    "depth", "depth_midas", "depth_leres", "depth_leres++", "depth_zoe", "normal_bae", "normal_midas",
    "lineart", "lineart_realistic", "lineart_coarse", "lineart_anime", "lineart_anime_denoise", "lineart_standard",
    "softedge_hed", "softedge_hedsafe", "softedge_pidinet", "softedge_pidisafe", "mlsd", "scribble_hed",
    "scribble_pidinet", "seg_ofade20k", "seg_ofcoco", "seg_ufade20k", "shuffle", "mediapipe_face",
)
# The WebUI's defaults of threshold_a / threshold_b for canny.
CANNY_THRESHOLDS = (100.0, 200.0)


def check_module(name: str) -> str:
    """`name` if vlrt can run it; else one line saying what to do."""
    if name in MODULES:
        return name
    if name in ANNOTATORS:
        return name
    if name in ANNOTATOR_MODULES:
        raise VlrtError(
            f"ControlNet module {name!r} needs an annotator network that vlrt does not run: precompute the "
            "control maps into a folder (e.g. with the WebUI or controlnet_aux), give it as reference_frames_directory "
            "or the unit's image_dir, and set module = \"none\""
        )
    raise VlrtError(
        f"unknown ControlNet module {name!r}: use one of {', '.join(MODULES)}, or with --annotators DIR one of "
        f"{', '.join(ANNOTATORS)}"
    )


def control_map(
    image: np.ndarray, module: str, threshold_a: float, threshold_b: float, annotators: Annotators | None = None,
    processor_res: int = 512,
) -> np.ndarray:
    """The control map (H, W, 3) uint8 of an RGB frame; annotator modules run in `annotators`."""
    if module == NONE:
        return image
    if module == INVERT:
        return 255 - image
    if module == CANNY:
        edges = cv2.Canny(image, threshold_a, threshold_b)
        return np.repeat(edges[..., None], 3, axis=2)
    if module in ANNOTATORS and annotators is not None:
        return annotators(module, image, processor_res)
    raise ValueError(f"unknown module {module!r}")
