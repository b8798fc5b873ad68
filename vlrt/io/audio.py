"""Carrying the input's sound into a video output while the video is being written.

Every audio track is carried, in the source's order, with its language, title and disposition
(the default flag): the source file is opened once more per track, and each is read just up to
the time of the last video frame written, so sound is interleaved with the picture and nothing
is buffered beyond what the muxer needs, however long the video. Subtitle and data tracks are
not carried; vlrt names those it leaves out. A track is
copied when the output container's players decode its codec widely (`PLAYED_WIDELY`), else
re-encoded (AAC for mp4/mov, Opus for WebM), saying so once: 24-bit PCM copied into mp4 becomes
`ipcm`, which FFmpeg 5.1 and common players decode as full-scale noise. Matroska plays anything
it accepts. It ends with the video: a copied track with the last packet
that starts before the video ends (so up to one packet, ~21 ms for AAC, longer), a
re-encoded one at the exact sample.
"""

from __future__ import annotations

import logging
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

from vlrt.errors import VlrtError
from vlrt.io.av_errors import reason

log = logging.getLogger(__name__)
# Per output muxer, the audio codecs copied as they are; others are re-encoded. A muxer not named
# here copies whatever it accepts.
PLAYED_WIDELY = {
    "mp4": frozenset({"aac", "mp3", "ac3", "eac3"}),
    "mov": frozenset({"aac", "mp3", "ac3", "eac3", "alac"}),
    "webm": frozenset({"opus", "vorbis"}),
}
_KEPT_TAGS = ("language", "title")
_REENCODE = {"webm": ("libopus", 128_000, 48_000)}
_DEFAULT_REENCODE = ("aac", 192_000, None)  # None: keep the source's sample rate


class AudioPassthrough:
    """Audio track `track` (0-based among the audio tracks) of `source`, fed into `output` in step with its video.

    Time 0 of the output is the start of the source's video stream, so picture and sound
    keep the alignment they had. Must be created before anything is muxed into `output`.
    """

    def __init__(self, source: av.container.InputContainer, output: av.container.OutputContainer, track: int = 0) -> None:
        self._input = source
        self._output = output
        self._in = source.streams.audio[track]
        self._offset = self._video_start()
        self._out = _copied(self._in, output)
        self._encoder = None
        if self._out is None:
            codec, bit_rate, rate = _REENCODE.get(output.format.name, _DEFAULT_REENCODE)
            log.info(f"the sound ({self._in.codec_context.name}) is re-encoded as {codec.removeprefix('lib')}: "
                     f"{output.format.name} players do not decode it widely")
            layout = "mono" if self._in.codec_context.channels == 1 else "stereo"
            self._out = output.add_stream(codec, rate=rate or self._in.codec_context.sample_rate, layout=layout)
            self._out.bit_rate = bit_rate
            self._encoder = self._out
        self._out.metadata.update({k: v for k, v in self._in.metadata.items() if k in _KEPT_TAGS})
        self._out.disposition = self._in.disposition
        self._packets = self._input.demux(self._in)
        self._pending: av.Packet | None = None
        self._exhausted = False
        self._cursor = 0  # re-encoding: output sample where the next decoded frame goes

    def _video_start(self) -> float:
        videos = self._input.streams.video
        if videos and videos[0].start_time is not None:
            return float(videos[0].start_time * videos[0].time_base)
        return 0.0

    def _next_packet(self) -> av.Packet | None:
        """The next audio packet (peeked, not consumed), None at the end of the track."""
        while self._pending is None and not self._exhausted:
            packet = next(self._packets, None)
            if packet is None:
                self._exhausted = True
            elif packet.pts is not None and packet.dts is not None:
                self._pending = packet
        return self._pending

    def feed_until(self, seconds: float, *, final: bool = False) -> None:
        """Mux the sound that starts before `seconds` (output time); `final` also cuts there."""
        cut = seconds if final else None
        while (packet := self._next_packet()) is not None:
            start = float(packet.pts * packet.time_base) - self._offset
            if start >= seconds:
                return
            self._pending = None
            if self._encoder is None:
                self._copy(packet, start)
            else:
                for frame in packet.decode():
                    self._encode(frame, cut)

    def _copy(self, packet: av.Packet, start: float) -> None:
        if start + float((packet.duration or 0) * packet.time_base) <= 0:
            return  # sound from before the first video frame
        shift = round(self._offset / packet.time_base)
        packet.pts -= shift
        packet.dts -= shift
        packet.stream = self._out
        self._output.mux(packet)

    def _encode(self, frame: av.AudioFrame, end: float | None) -> None:
        """Re-encode `frame`, without what lies before time 0 or after `end` (when given)."""
        rate = frame.sample_rate
        if frame.pts is None:  # some decoders leave it out: the frame follows the previous one
            first = self._cursor
        else:
            first = round((float(frame.pts * frame.time_base) - self._offset) * rate)
        self._cursor = first + frame.samples
        keep_from, keep_to = max(0, -first), frame.samples
        if end is not None:
            keep_to = min(keep_to, round(end * rate) - first)
        if keep_to <= keep_from:
            return
        if (keep_from, keep_to) != (0, frame.samples):
            frame = _slice(frame, keep_from, keep_to)
        frame.pts, frame.time_base = first + keep_from, Fraction(1, rate)
        self._output.mux(self._encoder.encode(frame))

    def finish(self, end: float) -> None:
        """Mux the rest of the sound up to `end` seconds, flush the encoder, release the input."""
        try:
            self.feed_until(end, final=True)
            if self._encoder is not None:
                for frame in self._in.decode(None):  # what the decoder still holds
                    self._encode(frame, end)
                self._output.mux(self._encoder.encode(None))
        finally:
            self.close()

    def close(self) -> None:
        self._input.close()


def _copied(track: av.audio.stream.AudioStream, output: av.container.OutputContainer) -> av.audio.stream.AudioStream | None:
    """A stream in `output` that copies `track` as it is, or None when it must be re-encoded."""
    widely = PLAYED_WIDELY.get(output.format.name)
    if widely is not None and track.codec_context.name not in widely:
        return None
    try:
        return output.add_stream_from_template(track)
    except ValueError:  # the container does not take this codec as it is
        return None


class Soundtracks:
    """Every audio track of a source, fed into one output together."""

    def __init__(self, tracks: list[AudioPassthrough]) -> None:
        self._tracks = tracks

    def feed_until(self, seconds: float) -> None:
        """Mux each track's sound that starts before `seconds` (output time)."""
        for track in self._tracks:
            track.feed_until(seconds)

    def finish(self, end: float) -> None:
        """Finish every track at `end` seconds and release the inputs."""
        try:
            for track in self._tracks:
                track.finish(end)
        finally:
            self.close()

    def close(self) -> None:
        for track in self._tracks:
            track.close()


def _open(source: Path) -> av.container.InputContainer:
    try:
        return av.open(str(source))
    except (av.error.FFmpegError, OSError) as exc:
        raise VlrtError(
            f"cannot read the audio of '{source}' ({reason(exc)}): check the file, or render without audio"
        ) from exc


def _describe(stream: av.stream.Stream) -> str:
    return " ".join(filter(None, [f"#{stream.index}", stream.type, stream.codec_context.name, stream.language]))


def carry_audio(source: Path, output: av.container.OutputContainer) -> Soundtracks | None:
    """Every audio track of `source` into `output`, or None when `source` has no sound; names the
    subtitle and data tracks that are left out."""
    with _open(source) as container:
        count = len(container.streams.audio)
        dropped = [_describe(s) for s in container.streams if s.type in ("subtitle", "data")]
    if dropped:
        log.warning(f"warning: tracks of '{source}' not carried into the output: {', '.join(dropped)}")
    if not count:
        return None
    tracks: list[AudioPassthrough] = []
    try:
        for track in range(count):
            tracks.append(AudioPassthrough(_open(source), output, track))
    except BaseException:
        for opened in tracks:
            opened.close()
        raise
    return Soundtracks(tracks)


def _slice(frame: av.AudioFrame, start: int, stop: int) -> av.AudioFrame:
    """Samples [start, stop) of `frame` as a new frame (planar or packed)."""
    samples = frame.to_ndarray()
    if frame.format.is_planar:
        part = samples[:, start:stop]
    else:
        channels = len(frame.layout.channels)
        part = samples[:, start * channels : stop * channels]
    cut = av.AudioFrame.from_ndarray(np.ascontiguousarray(part), format=frame.format.name, layout=frame.layout.name)
    cut.sample_rate = frame.sample_rate
    return cut
