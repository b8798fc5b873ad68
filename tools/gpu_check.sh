#!/usr/bin/env bash
# The prepared GPU check (issue 14): SD 1.5's architecture at 512x512 through torch CUDA fp16,
# ONNX Runtime CUDA and TensorRT where installed, against diffusers' img2img pipeline in fp16 on
# the same GPU; non-finite checks; the `trt` and `gpu` test marks; a markdown table with the
# GPU's name. Meant to finish within 10 minutes on one data-centre GPU.
#
#   tools/gpu_check.sh                      # on a GPU machine: writes gpu_check.md
#   tools/gpu_check.sh --dry-run --out x.md # the same script on the CPU with tiny shapes (CI)
#   tools/gpu_check.sh --backends torch,trt # only some backends
#
# PYTHON selects the interpreter (default: the checkout's .venv, else python3).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
export HF_HUB_OFFLINE=1
exec "$PYTHON" -m vlrt.tools.gpu_check "$@"
