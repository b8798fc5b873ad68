"""Streaming really streams: output frames leave while the input is still arriving."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import numpy as np

W, H, FRAMES, PERIOD = 32, 32, 40, 0.4


def test_first_output_frame_leaves_before_the_producer_finishes():
    command = [
        sys.executable, "-m", "vlrt", "render", "-", "-o", "-",
        "--input-format", "rawvideo", "--input-size", f"{W}x{H}", "--input-fps", "10", "--output-format", "rawvideo",
        "--model", "demo", "--loop-n", "2", "--steps", "2", "--denoising-strength", "0.5",
        "--temporal-superimpose-alpha-list", "0.25,0.5,0.25", "--seed", "3", "--quiet",
    ]
    proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 256, (H, W, 3), dtype=np.uint8) for _ in range(FRAMES)]
    finished_writing = {}

    def produce():
        for frame in frames:
            proc.stdin.write(frame.tobytes())
            proc.stdin.flush()
            time.sleep(PERIOD)
        finished_writing["t"] = time.monotonic()
        proc.stdin.close()

    producer = threading.Thread(target=produce)
    producer.start()
    first = proc.stdout.read(W * H * 3)
    first_output_at = time.monotonic()
    rest = proc.stdout.read()
    producer.join()
    assert proc.wait(timeout=60) == 0, proc.stderr.read().decode()
    assert len(first) == W * H * 3
    assert first_output_at < finished_writing["t"] - 2 * PERIOD
    assert len(first) + len(rest) == FRAMES * W * H * 3
