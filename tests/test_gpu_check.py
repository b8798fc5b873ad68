"""The prepared GPU check runs on the CPU in dry mode and writes its markdown table."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_gpu_check_dry_run_writes_a_table_of_every_runner(tmp_path):
    report = tmp_path / "gpu_check.md"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run(["bash", str(REPO / "tools" / "gpu_check.sh"), "--dry-run", "--out", str(report)],
                          capture_output=True, text=True, env=env, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    text = report.read_text()
    assert text.startswith("# vlrt GPU check\n") and "- Device: CPU (dry run: tiny shapes)" in text
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if line.startswith("| ") and len(cells) == 6 and cells[0] not in ("runner",):
            rows[cells[0]] = cells
    assert list(rows) == ["diffusers StableDiffusionImg2ImgPipeline", "vlrt --backend torch", "vlrt --backend ort",
                          "vlrt --backend trt"]
    for runner in ("diffusers StableDiffusionImg2ImgPipeline", "vlrt --backend torch", "vlrt --backend ort"):
        _, precision, fps, ratio, finite, _ = rows[runner]
        assert precision == "fp32" and float(fps) > 0 and finite == "yes"
        assert re.fullmatch(r"\d+\.\d\d×", ratio)
    assert rows["diffusers StableDiffusionImg2ImgPipeline"][3] == "1.00×"
    assert rows["vlrt --backend trt"][2] == "—" and "not run: " in rows["vlrt --backend trt"][5]
    assert "pip install tensorrt-cu" in rows["vlrt --backend trt"][5]
