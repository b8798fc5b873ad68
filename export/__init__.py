"""Turns models into engines: ONNX export, TensorRT builds, the engine manifest and cache."""
