"""Where a unit's control images come from: a video file as image_dir (streamed and seekable like the
input), and the annotator modules run by controlnet_aux from a local weights folder."""

from __future__ import annotations

import sys
from pathlib import Path

import av
import cv2
import numpy as np
import pytest
import torch
from conftest import read_frames, write_frames
from controlnet_fixtures import assert_killed_render_resumes, assert_three_segments_give_one_render, make_tiny_controlnet

from vlrt.demo.clip import sample_frames
from vlrt.errors import VlrtError
from vlrt.frames import Frame
from vlrt.render.control_images import ControlImages, VideoControl
from vlrt.render.pipeline import render
from vlrt.settings.config import build_settings


@pytest.fixture(scope="module")
def controlnet_dir(demo_model, tmp_path_factory):
    return make_tiny_controlnet(demo_model, tmp_path_factory.mktemp("controlnet") / "cn", seed=0)


def write_ffv1(path: Path, pictures: list[np.ndarray]) -> Path:
    """A lossless video (FFV1 in Matroska, RGB kept exactly) of the pictures."""
    height, width = pictures[0].shape[:2]
    with av.open(str(path), "w") as out:
        stream = out.add_stream("ffv1", rate=24)
        stream.width, stream.height, stream.pix_fmt = width, height, "bgr0"
        for i, picture in enumerate(pictures):
            frame = av.VideoFrame.from_ndarray(picture, format="rgb24").reformat(format="bgr0")
            frame.pts = i
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
    return path


def _settings(**overrides):
    base = dict(model="demo", backend="torch", loop_n=1, superimpose_alpha=1.0, sampler_name="Euler a", steps=4,
                denoising_strength=0.6, cfg_scale=6.0, seed=4321, prompt="a watercolour fox", negative_prompt="blurry")
    return build_settings(overrides={**base, **overrides})


# --- a video file as a unit's image_dir ---

def test_video_image_dir_renders_like_the_same_images_in_a_folder(demo_model, controlnet_dir, tmp_path, monkeypatch):
    """extract_nth_frame 2 and max_frames 5 taken from the video as from the folder and the input: the same frames (0/255),
    and every job's control image is the video's picture 2k, fitted to the render size."""
    from PIL import Image

    from vlrt.executor.executor import Executor

    clip = write_frames(tmp_path / "clip", sample_frames(11, (64, 48)))
    pictures = [np.ascontiguousarray(255 - f[::-1]) for f in sample_frames(13, (80, 60))]  # unlike the input; another size
    folder = write_frames(tmp_path / "control_frames", pictures)
    video = write_ffv1(tmp_path / "control.mkv", pictures)
    runs, seen = {}, []
    submit = Executor.submit
    monkeypatch.setattr(Executor, "submit", lambda self, job: (seen.append(job), submit(self, job))[1])
    for name, image_dir in (("folder", folder), ("video", video)):
        seen.clear()
        unit = {"model": str(controlnet_dir), "weight": 1.5, "resize_mode": "Just Resize", "image_dir": str(image_dir)}
        settings = _settings(controlnet=[unit], extract_nth_frame=2, max_frames=5)
        render(settings, str(clip), str(tmp_path / name) + "/", quiet=True, model=demo_model)
        runs[name] = read_frames(tmp_path / name)
    assert len(runs["video"]) == len(runs["folder"]) == 5
    for a, b in zip(runs["video"], runs["folder"]):
        np.testing.assert_array_equal(a, b)
    assert len(seen) == 5
    inputs = read_frames(clip)[::2]
    for k, job in enumerate(seen):
        control = (job.control[0].image.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
        expected = np.asarray(Image.fromarray(pictures[2 * k]).resize((64, 48), Image.Resampling.LANCZOS))
        np.testing.assert_array_equal(control, expected)
        assert np.abs(control.astype(int) - inputs[k].astype(int)).mean() > 20  # not the input frame


def test_video_control_seeks_to_any_frame(tmp_path):
    """Frames asked in order stream from one decoder; a frame out of order reopens the video there."""
    pictures = sample_frames(20, (32, 24))
    video = write_ffv1(tmp_path / "control.mkv", pictures)
    settings = _settings(extract_nth_frame=3)
    source = VideoControl(video, settings, n_frames=7)
    assert source.count == 7
    for index in (2, 3, 4, 0, 6, 5):
        np.testing.assert_array_equal(source.image(index), pictures[3 * index])
    with pytest.raises(VlrtError, match="has 7 frames"):
        source.image(7)
    source.close()
    with pytest.raises(VlrtError, match=r"ControlNet video '.*control.mkv' has 7 frames .* but the input has 8"):
        VideoControl(video, settings, n_frames=8)


@pytest.fixture(scope="module")
def video_run(controlnet_dir, tmp_path_factory):
    """12 frames and a unit whose image_dir is a video, and the PNG frames of one uninterrupted render."""
    from test_resume import RENDER, render_here

    folder = tmp_path_factory.mktemp("controlnet_video_run")
    source = write_frames(folder / "in", sample_frames(12, (32, 32)))
    video = write_ffv1(folder / "control.mkv", [255 - f for f in sample_frames(14, (32, 32))[2:]])
    args = [*RENDER, "--controlnet", f"model={controlnet_dir},weight=1.5,image_dir={video}"]
    render_here(["render", str(source), "-o", f"{folder}/out/", *args])
    return source, args, read_frames(folder / "out")


def test_killed_render_with_a_control_video_resumes_to_the_same_frames(video_run, tmp_path):
    """The resumed render starts the control video at the first frame still to render."""
    assert_killed_render_resumes(video_run, tmp_path)


def test_three_segments_with_a_control_video_give_the_frames_of_one_render(video_run, tmp_path):
    """Each segment seeks the control video to its own first frame."""
    assert_three_segments_give_one_render(video_run, tmp_path)


# --- annotator modules through controlnet_aux ---

def _aux_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("controlnet_aux") is not None and importlib.util.find_spec("einops") is not None


def _random_weights(module: str, folder: Path) -> Path:
    """controlnet_aux's network for `module` with random weights, saved under the file name its from_pretrained reads."""
    from vlrt.image.annotators import aux_module

    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(3)
    if module == "lineart":
        generator = aux_module("lineart").Generator
        torch.save(generator(3, 1, 3).state_dict(), folder / "sk_model.pth")
        torch.save(generator(3, 1, 3).state_dict(), folder / "sk_model2.pth")
    elif module == "softedge_hed":
        torch.save(aux_module("hed").ControlNetHED_Apache2().state_dict(), folder / "ControlNetHED.pth")
    elif module == "softedge_pidinet":
        network = aux_module("pidi.model").pidinet()
        with torch.no_grad():  # its initialisation gives a blank map (constant classifier weights)
            for parameter in network.parameters():
                parameter.normal_(0.0, 0.2)
        torch.save({"state_dict": {f"module.{k}": v for k, v in network.state_dict().items()}}, folder / "table5_pidinet.pth")
    return folder


def _direct(module: str, folder: Path, picture: np.ndarray, resolution: int) -> np.ndarray:
    """controlnet_aux called on the picture as its README does, then OpenCV to the picture's size."""
    from vlrt.image.annotators import aux_module

    package, name, options = {
        "lineart": ("lineart", "LineartDetector", {"coarse": False}),
        "softedge_hed": ("hed", "HEDdetector", {"safe": False}),
        "softedge_pidinet": ("pidi", "PidiNetDetector", {"safe": False}),
    }[module]
    detector = getattr(aux_module(package), name).from_pretrained(str(folder))
    detected = detector(picture, detect_resolution=resolution, image_resolution=resolution, output_type="pil", **options)
    detected = np.asarray(detected.convert("RGB"))
    height, width = picture.shape[:2]
    assert detected.shape[0] > height  # the detector worked at its own resolution; its map is shrunk
    return cv2.resize(detected, (width, height), interpolation=cv2.INTER_AREA)


@pytest.mark.skipif(not _aux_installed(), reason="controlnet_aux (and einops) not installed: make setup installs them")
@pytest.mark.parametrize("module", ["lineart", "softedge_hed", "softedge_pidinet"])
def test_annotator_module_maps_equal_controlnet_aux_on_the_same_frame(module, demo_model, controlnet_dir, clip_folder,
                                                                      tmp_path, monkeypatch):
    """A random-weight annotator in a local folder: the control map of every job is controlnet_aux's map of the frame."""
    from vlrt.executor.executor import Executor

    weights = _random_weights(module, tmp_path / "annotators")
    seen = []
    submit = Executor.submit
    monkeypatch.setattr(Executor, "submit", lambda self, job: (seen.append(job), submit(self, job))[1])
    settings = _settings(controlnet=[f"model={controlnet_dir},module={module},processor_res=128"], annotators_dir=str(weights),
                         steps=2)
    render(settings, str(clip_folder), str(tmp_path / "out") + "/", quiet=True, model=demo_model)
    frames = read_frames(clip_folder)
    assert len(seen) == len(frames) == 6
    for job, frame in zip(seen, frames):
        control = (job.control[0].image.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
        expected = _direct(module, weights, frame, 128)
        np.testing.assert_array_equal(control, expected)
        assert control.std() > 1  # a map, not a blank picture


def _unit(module: str) -> dict:
    return {"model": "unused", "module": module}


def _prepare(module: str, annotators_dir: str = "") -> None:
    settings = _settings(controlnet=[_unit(module)], annotators_dir=annotators_dir)
    ControlImages(settings, 1, 64, 48).close()


def test_annotator_module_without_a_folder_says_what_to_give():
    with pytest.raises(VlrtError, match=r"runs an annotator network: give --annotators DIR, a folder with sk_model.pth, "
                                        r"sk_model2.pth .* or precompute the control maps"):
        _prepare("lineart")


def test_annotator_module_without_controlnet_aux_names_the_package(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "controlnet_aux", None)  # as if not installed: find_spec and import both fail
    with pytest.raises(VlrtError, match="needs the controlnet_aux package, which is not installed: pip install"):
        _prepare("softedge_hed", str(tmp_path))


def test_annotator_module_without_a_package_its_detector_imports_names_it(tmp_path, monkeypatch):
    if not _aux_installed():
        pytest.skip("controlnet_aux not installed")
    for name in ("scipy", "skimage", "torchvision"):  # as if not installed
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(VlrtError, match="'openpose' needs the scipy package for controlnet_aux's OpenposeDetector"):
        _prepare("openpose", str(tmp_path))


def test_annotator_module_with_weights_absent_names_the_files(tmp_path):
    if not _aux_installed():
        pytest.skip("controlnet_aux not installed")
    (tmp_path / "sk_model.pth").write_bytes(b"")
    with pytest.raises(VlrtError, match=rf"'lineart_coarse' needs the annotator weights sk_model2.pth in {tmp_path}"):
        _prepare("lineart_coarse", str(tmp_path))
    (tmp_path / "sk_model2.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(VlrtError, match="annotator weights of 'lineart_coarse' .* cannot be loaded"):
        _prepare("lineart_coarse", str(tmp_path))


BAD = [
    ("short control video", lambda d, t: [f"model={d},image_dir={write_ffv1(t / 'c.mkv', sample_frames(2, (32, 32)))}"],
     "has 2 frames"),
    ("one picture as image_dir", lambda d, t: [f"model={d},image_dir={write_frames(t / 'p', sample_frames(1, (32, 32)))}/0001.png"],
     "is one picture"),
    ("annotator weights absent", lambda d, t: [f"model={d},module=softedge_hed", "--annotators", str(t)],
     "ControlNetHED.pth"),
    ("module vlrt does not run", lambda d, t: [f"model={d},module=normal_bae"], "does not run"),
    ("processor_res not whole", lambda d, t: [f"model={d},processor_res=51.5"], "should be a whole number"),
]


@pytest.mark.parametrize("name, unit, words", BAD, ids=[c[0] for c in BAD])
def test_bad_control_sources_are_one_clear_line(name, unit, words, controlnet_dir, tmp_path, capsys):
    from vlrt.cli import main

    if name == "annotator weights absent" and not _aux_installed():
        pytest.skip("controlnet_aux not installed")
    frames = write_frames(tmp_path / "in", sample_frames(3, (32, 32)))
    out = tmp_path / "result" / "out.mp4"
    code = main(["render", str(frames), "-o", str(out), "--model", "demo", "--loop-n", "1", "--steps", "2", "--quiet",
                 "--controlnet", *unit(controlnet_dir, tmp_path)])
    err = capsys.readouterr().err.strip()
    assert code != 0
    assert err.startswith("vlrt: error: ") and "\n" not in err, err
    assert words in err, err
    assert not out.parent.exists() or not any(out.parent.iterdir())


def test_frame_maps_of_lineart_standard_need_no_weights(tmp_path):
    """lineart_standard is OpenCV arithmetic in controlnet_aux: no folder, no weights."""
    if not _aux_installed():
        pytest.skip("controlnet_aux not installed")
    from vlrt.image.annotators import aux_module

    settings = _settings(controlnet=[{**_unit("lineart_standard"), "processor_res": 64}])
    control = ControlImages(settings, 1, 64, 48)
    picture = sample_frames(1, (64, 48))[0]
    got = control(Frame(0, picture, None, "0.png", {}))[0]
    expected = aux_module("lineart_standard").LineartStandardDetector()(picture, detect_resolution=64, output_type="np")
    np.testing.assert_array_equal(got, expected)
