"""The built-in demo: a tiny model trained for a few minutes on generated pictures (not a real
Stable Diffusion model; `python -m vlrt.demo.train` remakes it) and a generated sample clip."""

from pathlib import Path

DEMO_MODEL_DIR: Path = Path(__file__).resolve().parent / "model"
