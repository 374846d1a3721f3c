"""Prefill/decode graphs with the recurrence as ONNX's LinearAttention node (opset 27) or our own ops (fallback):
both verify in onnxruntime against the model, and the manifest says which was used."""
from __future__ import annotations

import sys
from pathlib import Path

import onnx
import pytest

import surgeon
import surgeon.export
from surgeon.core.errors import ConfigError
from surgeon.export.linear_attention_op import count_nodes, resolve, runtime_runs
from surgeon.passes import LinearizeAttention

sys.path.insert(0, str(Path(__file__).parents[1] / "passes"))
from attention_models import tiny_llama  # noqa: E402

needs_op = pytest.mark.skipif(not runtime_runs("onnx"), reason="this onnx/onnxruntime has no LinearAttention")


@pytest.fixture(scope="module")
def model():
    return surgeon.apply(tiny_llama(num_hidden_layers=1), LinearizeAttention(window=6, sinks=2)).model


@needs_op
@pytest.mark.parametrize("linear_op", ["onnx", "ours"])
def test_both_ways_verify_and_the_manifest_names_the_op(model, linear_op, tmp_path):
    res = surgeon.export.export_causal_lm(model, tmp_path, linear_op=linear_op)
    entry = res.manifest.exporter["linear_attention_op"]
    assert entry["used"] == linear_op and entry["requested"] == linear_op
    for graph in ("prefill", "decode"):
        nodes = count_nodes(tmp_path / f"{graph}.onnx")
        assert nodes.get("LinearAttention", 0) == (1 if linear_op == "onnx" else 0), (graph, nodes)
        assert entry["nodes"][graph] == nodes.get("LinearAttention", 0)
        opset = res.manifest.graph(graph).opset
        assert (opset == 27) if linear_op == "onnx" else (opset < 27)
        onnx.checker.check_model(str(tmp_path / f"{graph}.onnx"))
    report = surgeon.export.verify(tmp_path, model)         # prompts of other lengths than the export's
    assert report.passed, report.first_failure
    assert report.max_abs <= 1e-4 and report.decode_vs_prefill_max_abs <= 1e-4
    assert report.greedy_agreement == 1.0


def test_a_low_opset_falls_back_and_bad_choices_are_refused():
    assert resolve("auto", 18) == "ours" and resolve("ours", None) == "ours"
    with pytest.raises(ConfigError, match="opset 27"):
        resolve("onnx", 18)
    with pytest.raises(ConfigError, match="linear_op='fast'"):
        resolve("fast", None)
    if runtime_runs("onnx"):
        assert resolve("auto", None) == "onnx" and resolve("auto", 27) == "onnx"
