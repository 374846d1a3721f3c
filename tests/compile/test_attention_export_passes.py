"""``surgeon.export.to_onnx(..., passes=[LinearizeAttention(...)])``: the attention rewrite on the torch.export
program, converted to ONNX and checked in onnxruntime at batch sizes other than the export's."""
from __future__ import annotations

import torch

import surgeon.export
from surgeon.passes import LinearizeAttention

from attention_graphs import build

torch.set_num_threads(1)


def test_linear_attention_on_the_export_program_verifies_in_onnxruntime(tmp_path):
    model = build("sdpa_causal_gqa", dtype=torch.float32)
    x = torch.randn(2, 6, 32)
    result = surgeon.export.to_onnx(model, tmp_path, (x,), passes=[LinearizeAttention(feature_map="elu1", window=3, sinks=0,
                                                                            linear_weight_init=1.0)])
    assert [e.pass_name for e in result.surgery.recipe.entries] == ["LinearizeAttention"]
    assert [s.name for s in result.surgery.recipe.entries[0].sites] == ["blocks.0.sdpa", "blocks.1.sdpa"]
    with torch.no_grad():
        assert (result.surgery.model(x) - model(x)).abs().max().item() > 1e-3   # really linear attention
    report = surgeon.export.verify(tmp_path, result.surgery.model)
    assert report.passed, str(report)
