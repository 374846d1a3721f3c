"""The real FHE engine (Concrete ML, in .venv-fhe): a graph it cannot compile is reported with the op, no traceback.

Needs ``bash scripts/setup_private_engine.sh``; skipped without it (slow: imports Concrete ML).
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

REPO = Path(__file__).resolve().parents[2]
FHE_PYTHON = REPO / ".venv-fhe" / "bin" / "python"
pytestmark = [pytest.mark.slow, pytest.mark.skipif(not FHE_PYTHON.is_file(), reason="no .venv-fhe (optional engine)")]


class MeanHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3, padding=1)
        self.fc = nn.Linear(2, 3)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).mean(dim=(2, 3)))   # ReduceMean: Concrete ML 1.9 lacks it


def test_unsupported_op_is_reported_not_raised(tmp_path):
    sys.path.insert(0, str(REPO / "benchmarks"))
    from private_inference import export_opset14

    torch.manual_seed(0)
    x = torch.rand(6, 1, 5, 5)
    export_opset14(MeanHead().eval(), x[:1], tmp_path / "bad.onnx", rewrite_mean=False)
    np.savez(tmp_path / "data.npz", x_calib=x.numpy(), x_test=x.numpy(), y_test=np.zeros(6, dtype=np.int64))
    (tmp_path / "manifest.json").write_text(json.dumps({"models": [{"name": "bad", "onnx": "bad.onnx"}]}))
    proc = subprocess.run([str(FHE_PYTHON), str(REPO / "benchmarks" / "private_fhe_engine.py"), str(tmp_path),
                           "--execute", "0", "--pbs-probe", "0"], capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr + proc.stdout
    row = json.loads((tmp_path / "engine.json").read_text())["models"][0]
    assert row["compiled"] is False and row["ops_named"] == ["ReduceMean"]
    assert "ReduceMean" in row["error"] and "not currently implemented" in row["error"]
    assert "the engine refused the graph" in proc.stdout
