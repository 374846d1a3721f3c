#!/usr/bin/env bash
# Optional: a separate venv (.venv-fhe) with Zama's Concrete ML, the FHE engine that runs the
# ReLU-reduced digits CNN for real (benchmarks/private_inference.py --engine). Not part of the two
# README commands: Concrete ML 1.9.0 pins torch 2.3.1 / onnx 1.17, so it cannot share .venv
# (torch 2.13.0). The two venvs talk through ONNX files only.
# Usage: bash scripts/setup_private_engine.sh      (idempotent; a stamp skips a finished install)
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
VENV=.venv-fhe
if [ ! -x "$VENV/bin/python" ]; then
    echo "[fhe] creating $VENV with $("$PY" --version)"
    "$PY" -m venv "$VENV"
fi
STAMP="$VENV/.surgeon-fhe-installed"
WANT="$(sha256sum scripts/setup_private_engine.sh | cut -d' ' -f1)"
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ]; then
    exit 0
fi
PIP="$VENV/bin/python -m pip --disable-pip-version-check"
# torch 2.3.1 from the CPU index first (PyPI's Linux wheel pulls ~3 GB of CUDA libraries);
# PyPI is the fallback.
echo "[fhe] installing torch==2.3.1 (CPU wheel)"
$PIP install -q "torch==2.3.1" --index-url https://download.pytorch.org/whl/cpu --timeout 15 --retries 0 \
    || $PIP install -q "torch==2.3.1"
echo "[fhe] installing concrete-ml==1.9.0"
$PIP install -q "torch==2.3.1" "concrete-ml==1.9.0"
"$VENV/bin/python" -c "import concrete.ml, torch; print('[fhe] concrete-ml', concrete.ml.__version__, 'torch', torch.__version__)"
echo "$WANT" > "$STAMP"
echo "[fhe] done"
