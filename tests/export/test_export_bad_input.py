"""Deployment bad input: missing / mismatched files and NaN outputs give clear errors, nothing half-done."""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import surgeon
import surgeon.export
from surgeon.core.errors import ExportError
from surgeon.passes import LinearizeAttention

sys.path.insert(0, str(Path(__file__).parents[1] / "passes"))
from attention_models import VOCAB, tiny_llama  # noqa: E402


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    model = surgeon.apply(tiny_llama(), LinearizeAttention(window=4)).model
    out = tmp_path_factory.mktemp("lm")
    surgeon.export.to_onnx(model, out)
    return model, out


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_folder_without_a_manifest(export, tmp_path):
    model, _ = export
    with pytest.raises(ExportError, match="manifest"):
        surgeon.export.verify(tmp_path, model)


def test_missing_graph_is_named(export, tmp_path):
    model, out = export
    broken = _copy(out, tmp_path / "lm")
    (broken / "decode.onnx").unlink()
    with pytest.raises(ExportError, match=r"decode\.onnx is missing; re-export"):
        surgeon.export.verify(broken, model)
    with pytest.raises(ExportError, match=r"decode\.onnx is missing"):
        surgeon.export.OnnxGenerator(broken)


def test_missing_external_weights_are_named(export, tmp_path):
    model, out = export
    broken = _copy(out, tmp_path / "lm")
    data = sorted(broken.glob("prefill.onnx*.data")) or sorted(broken.glob("*.data"))
    assert data, sorted(p.name for p in broken.iterdir())
    data[0].unlink()
    with pytest.raises(ExportError, match=r"onnxruntime cannot load .*prefill\.onnx"):
        surgeon.export.OnnxGenerator(broken)


def test_nan_in_onnxruntime_outputs_fails_verification_and_generation(export, tmp_path):
    model, _ = export
    poisoned = surgeon.apply(tiny_llama(), LinearizeAttention(window=4)).model
    with torch.no_grad():
        poisoned.lm_head.weight[3, 0] = float("nan")          # every logit of token 3 becomes NaN
    surgeon.export.to_onnx(poisoned, tmp_path / "nan")
    report = surgeon.export.verify_causal_lm(tmp_path / "nan", poisoned, n_generate=4, raise_on_failure=False)
    assert not report.passed and "NaN/inf" in report.first_failure
    gen = surgeon.export.OnnxGenerator(tmp_path / "nan")
    with pytest.raises(ExportError, match="NaN/inf logits"):
        gen.generate(torch.randint(0, VOCAB, (1, 6)), max_new_tokens=3)
    logits, _ = gen.run_prefill(torch.randint(0, VOCAB, (1, 6)))
    assert np.isnan(logits[..., 3]).all() and np.isfinite(np.delete(logits, 3, axis=-1)).all()
