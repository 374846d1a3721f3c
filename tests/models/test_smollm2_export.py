"""SmolLM2-135M linearized end to end to onnxruntime (slow: the export takes minutes on 2 cores)."""
from __future__ import annotations

import pytest

import surgeon
import surgeon.export
from surgeon.models.smollm2 import load_smollm2
from surgeon.passes import LinearizeAttention


@pytest.mark.slow
def test_smollm2_exports_verifies_and_generates_in_onnxruntime(tmp_path):
    model, tok = load_smollm2()
    lm = surgeon.apply(model, LinearizeAttention(feature_map="hedgehog", window=64)).model
    surgeon.export.to_onnx(lm, tmp_path / "onnx")
    report = surgeon.export.verify(tmp_path / "onnx", lm)
    # SmolLM2's massive activation makes float32 engines differ by ~1e-3 absolute: judged relative to the
    # logits (DEFAULT_CRITERION), with the tokens; tests/models/test_smollm2_verify.py injects faults
    assert report.passed, report.first_failure
    assert report.min_snr_db >= 80 and report.weight_mismatches == {}
    gen = surgeon.export.OnnxGenerator(tmp_path / "onnx")
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    text = tok.decode(gen.generate(ids, max_new_tokens=8)[0])
    assert text.startswith("The capital of France is") and len(text) > len("The capital of France is")
    assert gen.state_bytes() < 13 * 2**20  # 30 layers: fp32 recurrent state + 63-token window, ~11.3 MiB
