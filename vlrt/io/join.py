"""Joining the parts of a video-file output (`vlrt.io.parts`) into the final file, without re-encoding.

The packets are copied onto one continuous timeline: a part's frames keep their display
order, shifted by the part's first index, and decode timestamps run one per packet, behind
by the largest reordering (B-frames) any part uses, so they rise strictly and never pass
the display time. Matroska stores milliseconds, so a display position is recovered as
time × fps rounded (exact below 500 fps).

One stream header serves every part because the parts come from encoder sessions with
identical settings. For x264 the header is SPS + PPS (every container here asks for a global
header, so it is in the extradata, and x264's version/options SEI travels in each part's
first packet instead); those depend on the settings and the size, never on the pictures, and
measured equal across sessions for H.264 yuv420p, libx264rgb qp 0, VP9 and FFV1. The join
still checks each part's header and picture format against the first part's and refuses a
mismatch, rather than write a file that decodes wrongly.

The source's sound (`vlrt.io.audio`) is muxed in the same pass, interleaved, and cut to the
video's length.
"""

from __future__ import annotations

from contextlib import suppress
from fractions import Fraction
from pathlib import Path

import av

from vlrt.errors import VlrtError
from vlrt.io.audio import Soundtracks, carry_audio
from vlrt.io.av_errors import reason
from vlrt.io.parts import Part


def _header(stream: av.video.stream.VideoStream) -> tuple:
    context = stream.codec_context
    return context.name, context.extradata, context.width, context.height, context.pix_fmt


def _display_order(part: Part, fps: Fraction, header: tuple, label: str) -> list[int]:
    """Each packet's display position within `part`, in decode order; checks the part fits."""
    with av.open(str(part.path)) as source:
        stream = source.streams.video[0]
        matches = _header(stream) == header
        order = [round(packet.pts * packet.time_base * fps) for packet in source.demux(stream) if packet.size]
    if not matches or sorted(order) != list(range(part.frames)):
        raise VlrtError(
            f"part '{part.path}' of output {label} does not fit the others (another codec, size, encoder "
            "header, or damaged): render again without --resume"
        )
    return order


def _timeline(fps: Fraction, times: list[Fraction] | None, count: int) -> tuple[Fraction, list[int]]:
    """The video's time base and the timestamp of each of `count` frames, plus the end's: one tick per
    frame at `fps`, or each frame at its time in `times` (a variable rate) in 1/90000 s ticks."""
    if times is None or len(times) < count:
        return 1 / Fraction(fps), list(range(count + 1))
    tick = Fraction(1, 90_000)
    stamps = [round(t / tick) for t in times[:count]]
    last = stamps[-1] - stamps[-2] if count > 1 else round(1 / Fraction(fps) / tick)
    return tick, [*stamps, stamps[-1] + last]


def join_parts(
    parts: list[Part],
    target: Path,
    *,
    muxer: str,
    fps: Fraction,
    audio_from: Path | None,
    options: dict[str, str],
    label: str,
    times: list[Fraction] | None = None,
) -> None:
    """Write `parts` (frames 0, 1, … in order) into `target` as one `muxer` file, with the sound of
    `audio_from`; frame k is shown at `times[k]` seconds when given (variable rate), else at k / fps."""
    with av.open(str(parts[0].path)) as first:
        header = _header(first.streams.video[0])
    orders = [_display_order(part, fps, header, label) for part in parts]
    delay = max(i - shown for order in orders for i, shown in enumerate(order))
    tick, stamps = _timeline(fps, times, sum(part.frames for part in parts))
    try:
        output = av.open(str(target), "w", format=muxer, container_options=options)
    except (av.error.FFmpegError, OSError) as exc:
        raise VlrtError(f"cannot write output {label} ({reason(exc)}): check the folder is writable") from exc
    audio: Soundtracks | None = None
    try:
        with av.open(str(parts[0].path)) as first:
            video = output.add_stream_from_template(first.streams.video[0])
        video.time_base = tick
        if audio_from is not None:
            audio = carry_audio(audio_from, output)
        decoded = 0
        for part, order in zip(parts, orders):
            with av.open(str(part.path)) as source:
                packets = (packet for packet in source.demux(source.streams.video[0]) if packet.size)
                for packet, shown in zip(packets, order):
                    index = part.first + shown
                    packet.stream, packet.time_base = video, tick
                    # Decode times trail the display times by the largest reordering, so they rise and never pass them.
                    behind = decoded - delay
                    packet.dts = stamps[behind] if behind >= 0 else stamps[0] + behind
                    packet.pts, packet.duration = stamps[index], stamps[index + 1] - stamps[index]
                    output.mux(packet)
                    decoded += 1
                    if audio is not None:
                        audio.feed_until(float(stamps[decoded] * tick))
        if audio is not None:
            audio.finish(float(stamps[decoded] * tick))
        output.close()
    except av.error.FFmpegError as exc:
        raise VlrtError(
            f"cannot join the finished parts into output {label} ({reason(exc)}): free some space and "
            "run again with --resume (the parts are kept)"
        ) from exc
    finally:  # after a failure; closing again after success does nothing
        for resource in (audio, output):
            if resource is not None:
                with suppress(Exception):
                    resource.close()
