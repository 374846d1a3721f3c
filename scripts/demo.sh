#!/usr/bin/env bash
# Set up .venv (when missing) and run the main job on the embedded default model:
# EfficientNet-Lite0 (real ImageNet weights) → linearize near-linear ReLU6 channels → finalize →
# ONNX export → onnxruntime verification → report. Extra arguments go to `surgeon demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh models
exec .venv/bin/surgeon demo "$@"
