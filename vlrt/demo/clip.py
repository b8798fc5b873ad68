"""A generated sample clip, so demos and tests need no downloaded footage.

The pictures are a pure function of (frame index, size), so a short clip is the start of a
long one: a fixed textured background, a slowly drifting colour wash and three coloured
discs on smooth paths that repeat every 48 frames.
Anything that flickers from frame to frame in a render of it is the renderer's doing, which
makes temporal coherence easy to judge by eye.
"""

from __future__ import annotations

import argparse
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

_DISCS = (  # (colour, orbit centre (fraction of W, H), orbit radius (fraction of min side), turns per clip, phase)
    ((230, 60, 50), (0.35, 0.45), 0.22, 1.0, 0.0),
    ((40, 170, 230), (0.65, 0.55), 0.18, -1.0, 2.1),
    ((250, 210, 40), (0.50, 0.50), 0.30, 0.5, 4.2),
)
_PERIOD_FRAMES = 48  # one cycle of the motion; small steps per frame even in tiny clips
_TONE_HZ = (440.0, 660.0)  # left, right
_SAMPLE_RATE = 48000


def _background(width: int, height: int) -> np.ndarray:
    """Texture that is fixed in time: checker-like sinusoids plus seeded grain."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    weave = 0.5 + 0.25 * np.sin(x * 0.45) * np.sin(y * 0.45) + 0.15 * np.sin((x + 2 * y) * 0.07)
    grain = np.random.default_rng(1234).random((height, width), dtype=np.float32) * 0.15
    base = np.clip(weave + grain, 0.0, 1.0)
    return np.stack([base * 90 + 40, base * 110 + 50, base * 80 + 60], axis=-1)


def sample_frames(frames: int, size: tuple[int, int]) -> list[np.ndarray]:
    """The clip's pictures as RGB uint8 arrays of shape (H, W, 3); `size` is (W, H)."""
    width, height = size
    background = _background(width, height)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    short = float(min(width, height))
    pictures = []
    for i in range(frames):
        t = i / _PERIOD_FRAMES
        wash = 0.5 + 0.5 * np.sin(2 * np.pi * (x / width + y / height * 0.5 + t))
        image = background * (0.75 + 0.25 * wash[..., None])
        for colour, (cx, cy), radius, turns, phase in _DISCS:
            angle = 2 * np.pi * turns * t + phase
            px = cx * width + radius * short * np.cos(angle)
            py = cy * height + radius * short * np.sin(angle)
            r = short * 0.16
            # Soft edge (1.5 px ramp) so the motion is smooth, not aliased.
            cover = np.clip((r - np.hypot(x - px, y - py)) / 1.5 + 0.5, 0.0, 1.0)[..., None]
            image = image * (1 - cover) + np.asarray(colour, np.float32) * cover
        pictures.append(np.clip(image + 0.5, 0, 255).astype(np.uint8))
    return pictures


def _tone(seconds: float) -> np.ndarray:
    """Stereo sine tone, float32 planar (2, samples), with 10 ms fades against clicks."""
    n = round(seconds * _SAMPLE_RATE)
    t = np.arange(n, dtype=np.float64) / _SAMPLE_RATE
    envelope = np.clip(np.minimum(t, seconds - t) / 0.01, 0.0, 1.0)
    return np.stack([0.3 * envelope * np.sin(2 * np.pi * hz * t) for hz in _TONE_HZ]).astype(np.float32)


def write_sample_clip(
    path: Path,
    *,
    frames: int = 48,
    fps: int = 24,
    size: tuple[int, int] = (128, 96),
    audio: bool = True,
) -> Path:
    """Write the sample clip as H.264 yuv420p MP4 (with an AAC sine tone when `audio`).

    `size` is (W, H) and must be even for yuv420p. The file plays in any player, which is
    the point: it is what `make demo` renders and what tests decode.
    """
    path = Path(path)
    width, height = size
    if width % 2 or height % 2:
        raise ValueError(f"sample clip size must be even for yuv420p, got {width}x{height}")
    path.parent.mkdir(parents=True, exist_ok=True)
    # faststart puts the index first, so the clip also streams through a pipe.
    with av.open(str(path), "w", format="mp4", options={"movflags": "+faststart"}) as out:
        video = out.add_stream("libx264", rate=Fraction(fps), options={"crf": "12", "preset": "fast"})
        video.width, video.height, video.pix_fmt = width, height, "yuv420p"
        sound = out.add_stream("aac", rate=_SAMPLE_RATE, layout="stereo") if audio else None
        for picture in sample_frames(frames, size):
            out.mux(video.encode(av.VideoFrame.from_ndarray(picture, format="rgb24")))
        out.mux(video.encode(None))
        if sound is not None:
            samples = _tone(frames / fps)
            chunk = 1024  # the AAC frame size
            for start in range(0, samples.shape[1], chunk):
                block = np.ascontiguousarray(samples[:, start : start + chunk])
                frame = av.AudioFrame.from_ndarray(block, format="fltp", layout="stereo")
                frame.sample_rate, frame.pts = _SAMPLE_RATE, start
                out.mux(sound.encode(frame))
            out.mux(sound.encode(None))
    return path


def main(argv: list[str] | None = None) -> int:
    """`python -m vlrt.demo.clip OUT.mp4`: write the sample clip (used by `make demo`)."""
    parser = argparse.ArgumentParser(prog="python -m vlrt.demo.clip", description=main.__doc__)
    parser.add_argument("output", type=Path)
    parser.add_argument("--frames", type=int, default=48)
    parser.add_argument("--fps", type=int, default=24)
    parser.add_argument("--size", default="128x96", help="WxH, both even")
    parser.add_argument("--no-audio", action="store_true")
    args = parser.parse_args(argv)
    width, height = (int(v) for v in args.size.lower().split("x"))
    path = write_sample_clip(
        args.output, frames=args.frames, fps=args.fps, size=(width, height), audio=not args.no_audio
    )
    print(f"wrote {path} ({args.frames} frames, {width}x{height}, {args.fps} fps)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
