#!/usr/bin/env bash
# Set up .venv (when missing) and run the main job on the embedded default model:
# SmolLM2-135M-Instruct (real weights) → generate → LinearizeAttention on all 30 layers → report →
# generate → save. `--model efficientnet_lite0`: the ReLU pipeline to a verified ONNX graph.
# Extra arguments go to `surgeon demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh models
exec .venv/bin/surgeon demo "$@"
