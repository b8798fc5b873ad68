"""The WebUI ControlNet extension's annotator modules (openpose, depth, lineart, softedge, …) through
`controlnet_aux`, offline: each detector loads its weights from one local folder (`--annotators DIR`,
setting `annotators_dir`) with `from_pretrained(DIR)`, which reads the files named below and asks no hub.

Only the detector's own subpackage of controlnet_aux is imported (its `__init__` imports every detector,
and with them timm and torchvision, which most detectors do not need): `pip install --no-deps
controlnet_aux einops` runs lineart, lineart_anime, hed, pidinet and mlsd beside a torch of one's own;
openpose also needs scipy, scikit-image and torchvision, depth (MiDaS) timm and torchvision, LeReS
torchvision. What is missing (the folder, the package, a package the detector imports, a weight file)
is one line naming it, before any work.

A map is made as controlnet_aux makes it: the detector resizes the picture so that its short side is
`processor_res` (the WebUI's "Preprocessor resolution", 512 by default; both sides then rounded to
multiples of 64), detects, and returns the map at that size; vlrt resizes it to the render size with
OpenCV (INTER_AREA when shrinking, INTER_CUBIC when enlarging, the WebUI's choice for control maps).
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from vlrt.errors import VlrtError

PACKAGE = "controlnet_aux"
INSTALL = "pip install 'vlrt[annotators]' (or: pip install --no-deps controlnet_aux einops)"
PRECOMPUTE = ("or precompute the control maps into a folder, give it as reference_frames_directory or the unit's "
              "image_dir, and set module = \"none\"")


@dataclass(frozen=True)
class Annotator:
    """How vlrt runs one WebUI module with controlnet_aux."""

    package: str  # controlnet_aux's subpackage
    detector: str  # its detector class
    files: tuple[str, ...]  # the weight files its from_pretrained(DIR) reads from DIR
    options: dict[str, Any] = field(default_factory=dict)  # keyword arguments of the detector's call
    needs: tuple[str, ...] = ()  # modules the detector's code imports beyond torch, OpenCV, Pillow and einops


LINEART = ("lineart", "LineartDetector", ("sk_model.pth", "sk_model2.pth"))  # from_pretrained loads both
HED = ("hed", "HEDdetector", ("ControlNetHED.pth",))
PIDI = ("pidi", "PidiNetDetector", ("table5_pidinet.pth",))
OPENPOSE = ("open_pose", "OpenposeDetector", ("body_pose_model.pth", "hand_pose_model.pth", "facenet.pth"))
OPENPOSE_NEEDS = ("scipy", "skimage", "torchvision")
MIDAS = ("midas", "MidasDetector", ("dpt_hybrid-midas-501f0c75.pt",))
LERES = ("leres", "LeresDetector", ("res101.pth", "latest_net_G.pth"))

# The WebUI's module names (its API's) that vlrt runs with controlnet_aux.
ANNOTATORS: dict[str, Annotator] = {
    "lineart": Annotator(*LINEART, {"coarse": False}),
    "lineart_realistic": Annotator(*LINEART, {"coarse": False}),
    "lineart_coarse": Annotator(*LINEART, {"coarse": True}),
    "lineart_anime": Annotator("lineart_anime", "LineartAnimeDetector", ("netG.pth",)),
    "lineart_standard": Annotator("lineart_standard", "LineartStandardDetector", ()),
    "softedge_hed": Annotator(*HED, {"safe": False}),
    "softedge_hedsafe": Annotator(*HED, {"safe": True}),
    "scribble_hed": Annotator(*HED, {"scribble": True}),
    "softedge_pidinet": Annotator(*PIDI, {"safe": False}),
    "softedge_pidisafe": Annotator(*PIDI, {"safe": True}),
    "scribble_pidinet": Annotator(*PIDI, {"scribble": True}),
    "mlsd": Annotator("mlsd", "MLSDdetector", ("mlsd_large_512_fp32.pth",)),
    "openpose": Annotator(*OPENPOSE, {"include_body": True}, OPENPOSE_NEEDS),
    "openpose_hand": Annotator(*OPENPOSE, {"include_body": True, "include_hand": True}, OPENPOSE_NEEDS),
    "openpose_face": Annotator(*OPENPOSE, {"include_body": True, "include_face": True}, OPENPOSE_NEEDS),
    "openpose_faceonly": Annotator(*OPENPOSE, {"include_body": False, "include_face": True}, OPENPOSE_NEEDS),
    "openpose_full": Annotator(*OPENPOSE, {"include_body": True, "include_hand": True, "include_face": True}, OPENPOSE_NEEDS),
    "depth": Annotator(*MIDAS, {}, ("timm", "torchvision")),
    "depth_midas": Annotator(*MIDAS, {}, ("timm", "torchvision")),
    "depth_leres": Annotator(*LERES, {}, ("torchvision",)),
    "depth_leres++": Annotator(*LERES, {"boost": True}, ("torchvision",)),
}


def aux_module(package: str):
    """controlnet_aux's subpackage `package`, importing no other detector: when controlnet_aux is not
    imported yet, its package stands in sys.modules without its `__init__` having run."""
    if PACKAGE not in sys.modules:
        spec = importlib.util.find_spec(PACKAGE)
        if spec is None:
            raise ModuleNotFoundError(f"No module named {PACKAGE!r}", name=PACKAGE)
        sys.modules[PACKAGE] = importlib.util.module_from_spec(spec)
    return importlib.import_module(f"{PACKAGE}.{package}")


class Annotators:
    """The detectors of the modules a render's units use, loaded once from `folder`."""

    def __init__(self, folder: str, device: Any = None) -> None:
        self.folder, self.device = folder, device
        self.detectors: dict[str, Any] = {}
        self.parameters: dict[str, set[str]] = {}  # each detector's call's keyword names

    def prepare(self, module: str) -> None:
        """Load `module`'s detector if it needs one; else one line naming what is missing."""
        spec = ANNOTATORS.get(module)
        if spec is None or module in self.detectors:
            return
        if spec.files and not self.folder:
            raise VlrtError(
                f"ControlNet module {module!r} runs an annotator network: give --annotators DIR, a folder with "
                f"{', '.join(spec.files)} (controlnet_aux's weights), {PRECOMPUTE}"
            )
        if importlib.util.find_spec(PACKAGE) is None:
            raise VlrtError(f"ControlNet module {module!r} needs the {PACKAGE} package, which is not installed: {INSTALL}, {PRECOMPUTE}")
        for name in spec.needs:
            if importlib.util.find_spec(name) is None:
                raise VlrtError(
                    f"ControlNet module {module!r} needs the {name} package for {PACKAGE}'s {spec.detector}, which is not "
                    f"installed: install it, {PRECOMPUTE}"
                )
        folder = Path(self.folder).expanduser() if spec.files else None
        if folder is not None:
            if not folder.is_dir():
                raise VlrtError(f"annotators folder {folder} does not exist: give --annotators the folder of the annotator weights")
            missing = [name for name in spec.files if not (folder / name).is_file()]
            if missing:
                raise VlrtError(
                    f"ControlNet module {module!r} needs the annotator weights {', '.join(missing)} in {folder} "
                    f"(lllyasviel/Annotators' files, as controlnet_aux loads them), {PRECOMPUTE}"
                )
        try:
            detector_class = getattr(aux_module(spec.package), spec.detector)
        except (ImportError, AttributeError) as exc:
            raise VlrtError(f"{PACKAGE}'s {spec.detector} cannot be imported ({_first_line(exc)}): {INSTALL}") from None
        if folder is None:
            detector = detector_class()
        else:
            try:
                detector = detector_class.from_pretrained(str(folder))
            except Exception as exc:  # torch.load and load_state_dict raise pickle, zip, key and shape errors alike
                raise VlrtError(
                    f"the annotator weights of {module!r} in {folder} cannot be loaded ({_first_line(exc)}): "
                    f"are {', '.join(spec.files)} {PACKAGE}'s files?"
                ) from None
        if self.device is not None and hasattr(detector, "to"):
            detector = detector.to(self.device) or detector
        self.detectors[module] = detector
        self.parameters[module] = set(inspect.signature(detector.__call__).parameters)

    def __call__(self, module: str, image: np.ndarray, processor_res: int) -> np.ndarray:
        """The (H, W, 3) uint8 map of an RGB picture, at the picture's size."""
        self.prepare(module)
        options = {"detect_resolution": processor_res, "output_type": "np", **ANNOTATORS[module].options}
        if "image_resolution" in self.parameters[module]:  # lineart_standard returns its map at the picture's size
            options["image_resolution"] = processor_res
        result = self.detectors[module](image, **options)
        return fit_map(np.asarray(result), image.shape[1], image.shape[0])


def fit_map(detected: np.ndarray, width: int, height: int) -> np.ndarray:
    """A detector's map as (height, width, 3) uint8: OpenCV's INTER_AREA when shrinking, INTER_CUBIC when enlarging."""
    if detected.ndim == 2:
        detected = detected[..., None]
    if detected.shape[2] == 1:
        detected = np.repeat(detected, 3, axis=2)
    detected = np.ascontiguousarray(detected[..., :3], dtype=np.uint8)
    h, w = detected.shape[:2]
    if (h, w) == (height, width):
        return detected
    shrink = h * w > height * width
    return cv2.resize(detected, (width, height), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_CUBIC)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
