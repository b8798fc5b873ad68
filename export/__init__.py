"""Turns models into engines: ONNX export, TensorRT builds, the engine manifest and cache.

- `onnx_export`: `export_onnx` (legacy exporter, dynamic batch, fp32/fp16, external data over
  2 GB) and `check_onnx` (ONNX Runtime against torch).
- `manifest`: `EngineKey`, `TrtTarget`, `model_hash` and `manifest.json`.
- `cache`: `EngineCache.find_or_build`, crash-safe engine folders under `engines/`.
- `trt_build`: `build_plan`, a strongly typed TensorRT plan from the fp16 ONNX (needs TensorRT).

Progress of long steps is logged at INFO level on the `vlrt.export` loggers.
"""
