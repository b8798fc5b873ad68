"""The pure arithmetic of segments (halo, sizes, overhead) and a segment's share of a video output
(counted only once sealed whole; a duplicate attempt changes nothing)."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from vlrt.demo.clip import sample_frames
from vlrt.frames import Frame
from vlrt.io.parts import parts_folder
from vlrt.io.segment_parts import keep_only, segment_folder, segment_parts
from vlrt.io.sinks import join_video, open_sink
from vlrt.io.sources import open_source
from vlrt.scale.segments import halo_overhead, split

FPS = Fraction(24)


def test_thirty_frames_in_three_segments_with_reach_nine():
    plan = split(30, 3, 9)
    assert [(s.start, s.stop, s.read_start, s.read_stop) for s in plan] == [(0, 10, 0, 19), (10, 20, 1, 29), (20, 30, 11, 30)]
    assert [s.halo for s in plan] == [9, 18, 9]
    assert halo_overhead(plan) == pytest.approx(36 / 30)


def test_one_segment_has_no_halo_and_more_segments_than_frames_are_clamped():
    assert [(s.read_start, s.read_stop, s.halo) for s in split(7, 1, 5)] == [(0, 7, 0)]
    assert [(s.start, s.stop) for s in split(3, 8, 0)] == [(0, 1), (1, 2), (2, 3)]
    with pytest.raises(ValueError):
        split(10, 0, 2)


@given(total=st.integers(1, 500), count=st.integers(1, 40), reach=st.integers(0, 60))
def test_segments_tile_the_frames_and_read_exactly_their_reach(total, count, reach):
    plan = split(total, count, reach)
    assert len(plan) == min(count, total)
    assert plan[0].start == 0 and plan[-1].stop == total
    assert all(a.stop == b.start for a, b in zip(plan, plan[1:]))
    assert max(s.frames for s in plan) - min(s.frames for s in plan) <= 1
    for s in plan:
        assert s.frames >= 1
        assert s.read_start == max(0, s.start - reach) and s.read_stop == min(total, s.stop + reach)


def frames(start: int, stop: int, pictures: list[np.ndarray]) -> list[Frame]:
    return [Frame(i, pictures[i]) for i in range(start, stop)]


def write_segment(out, start: int, stop: int, pictures, finish: bool = True) -> None:
    sink = open_sink(str(out), fps=FPS, lossless=True, segment=(start, stop))
    for frame in frames(start, stop, pictures):
        sink.write(frame)
    if finish:
        sink.close()
    else:
        sink.abort()


def test_a_segment_counts_once_sealed_and_the_joined_segments_are_the_frames(tmp_path):
    pictures = sample_frames(40, (32, 24))
    out = tmp_path / "out.mkv"
    write_segment(out, 0, 35, pictures, finish=False)  # an attempt that failed after its first whole part
    assert segment_parts(out, 0, 35) is None
    write_segment(out, 0, 35, pictures)
    write_segment(out, 0, 35, pictures)  # a duplicate attempt (a late retry): the first stays
    write_segment(out, 35, 40, pictures)
    first = segment_parts(out, 0, 35)
    assert [(p.first, p.frames) for p in first] == [(0, 32), (32, 3)]
    assert [(p.first, p.frames) for p in segment_parts(out, 35, 40)] == [(35, 5)]
    keep_only(out, [(0, 35), (35, 40)])
    assert sorted(p.name for p in parts_folder(out).iterdir()) == ["segment-00000000-00000035", "segment-00000035-00000040"]
    join_video(first + segment_parts(out, 35, 40), out, FPS, None)
    assert not parts_folder(out).exists()
    got = [f.image for f in open_source(str(out))]
    assert len(got) == 40
    for image, picture in zip(got, pictures):
        np.testing.assert_array_equal(image, picture)


def test_a_damaged_segment_does_not_count_and_other_splits_are_dropped(tmp_path):
    pictures = sample_frames(10, (32, 24))
    out = tmp_path / "out.mp4"
    write_segment(out, 0, 5, pictures)
    write_segment(out, 5, 10, pictures)
    (segment_folder(out, 5, 10) / "00000000.mkv").write_bytes(b"not a video")
    assert segment_parts(out, 5, 10) is None and not segment_folder(out, 5, 10).exists()
    keep_only(out, [(0, 3), (3, 10)])  # resumed with another number of segments
    assert list(parts_folder(out).iterdir()) == []


def test_a_border_near_a_cut_moves_onto_it_and_needs_no_halo_there():
    plan = split(30, 3, 9, cuts=(21,))
    assert [(s.start, s.stop, s.read_start, s.read_stop) for s in plan] == [(0, 10, 0, 19), (10, 21, 1, 21), (21, 30, 21, 30)]
    assert halo_overhead(plan) == pytest.approx(18 / 30)
    far = split(30, 3, 9, cuts=(15,))  # too far from a border to move one; its shot still bounds the reads
    assert [(s.start, s.stop, s.read_start, s.read_stop) for s in far] == [(0, 10, 0, 15), (10, 20, 1, 29), (20, 30, 15, 30)]
