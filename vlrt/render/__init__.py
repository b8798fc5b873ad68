"""The render driver: wires source, prepare, loop passes and sink (pipeline), picks engines, keeps run state for --resume, progress and previews."""
