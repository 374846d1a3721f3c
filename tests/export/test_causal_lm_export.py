"""Linearized causal LMs export as prefill + decode ONNX graphs with constant-size state; ORT matches PyTorch."""
from __future__ import annotations

import copy
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

import surgeon
import surgeon.export
from surgeon.core.errors import ExportError
from surgeon.passes import LinearizeAttention

sys.path.insert(0, str(Path(__file__).parents[1] / "passes"))
from attention_models import VOCAB, tiny_gpt2, tiny_llama, tiny_qwen3  # noqa: E402

CASES = {
    "llama-hedgehog-w8": (tiny_llama, dict(feature_map="hedgehog", window=8)),
    "qwen3-elu1-liger-w0": (tiny_qwen3, dict(feature_map="elu1", gate="liger", window=0)),
    "gpt2-hedgehog-learned-w4": (tiny_gpt2, dict(feature_map="hedgehog", gate="learned", window=4)),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def exported(request, tmp_path_factory):
    build, kind = CASES[request.param]
    model = surgeon.apply(build(), LinearizeAttention(**kind)).model
    out = tmp_path_factory.mktemp(request.param)
    result = surgeon.export.to_onnx(model, out)
    return model, out, result


def test_graphs_have_symbolic_batch_and_sequence_and_fixed_state(exported):
    model, out, result = exported
    assert sorted(result.manifest.graphs) == ["decode", "prefill"]
    prefill = onnx.load(str(out / "prefill.onnx"), load_external_data=False)
    dims = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in prefill.graph.input}
    assert dims["input_ids"] == ["batch", "sequence"] and dims["attention_mask"] == ["batch", "sequence"]
    decode = onnx.load(str(out / "decode.onnx"), load_external_data=False)
    for v in decode.graph.input:
        shape = [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
        assert shape[0] == "batch" and all(isinstance(s, int) for s in shape[1:]), (v.name, shape)
    domains = {n.domain for g in (prefill, decode) for n in g.graph.node}
    assert domains <= {"", "ai.onnx"}  # standard ops only


def test_verify_parity_decode_and_greedy_agreement(exported, tmp_path):
    model, out, _ = exported
    report = surgeon.export.verify(out, model)
    assert report.passed, report.first_failure
    assert report.max_abs <= 1e-4 and report.decode_vs_prefill_max_abs <= 1e-4
    assert report.greedy_agreement == 1.0 and report.greedy_tokens == 64
    report.save(tmp_path / "verify.json")
    assert (tmp_path / "verify.md").read_text().startswith("# ONNX deployment check: PASSED")


def test_decode_state_is_independent_of_context(exported):
    model, out, _ = exported
    gen = surgeon.export.OnnxGenerator(out)
    sizes = []
    for length in (10, 300):
        _, state = gen.run_prefill(torch.randint(0, VOCAB, (1, length)))
        sizes.append([s.shape for s in state])
    assert sizes[0] == sizes[1]
    assert sum(np.prod(s) * 4 for s in sizes[0]) <= gen.state_bytes() * 1.01


def test_wrong_state_shape_and_refused_overwrite(exported, tmp_path):
    model, out, _ = exported
    gen = surgeon.export.OnnxGenerator(out)
    _, state = gen.run_prefill(torch.randint(0, VOCAB, (2, 20)))
    state[0] = state[0][:, :1]
    with pytest.raises(surgeon.SurgeonError, match="decode.onnx expects"):
        gen.run_decode(np.zeros((2, 1)), np.zeros((2, 1)), state)
    other = surgeon.apply(tiny_llama(hidden_size=32, num_attention_heads=4), LinearizeAttention(window=4)).model
    with pytest.raises(surgeon.SurgeonError, match="different model"):
        surgeon.export.to_onnx(other, out)
    assert (out / "prefill.onnx").is_file()  # the existing export is untouched


def test_verify_catches_a_mismatched_model(exported):
    model, out, _ = exported
    perturbed = copy.deepcopy(model)
    with torch.no_grad():  # random, not uniform: a uniform shift would vanish in the next LayerNorm
        weight = next(p for n, p in perturbed.named_parameters() if "proj" in n)
        weight.add_(0.2 * torch.randn(weight.shape, generator=torch.Generator().manual_seed(0)))
    with pytest.raises(surgeon.SurgeonError, match="first failure|ONNX deployment check failed"):
        surgeon.export.verify(out, perturbed)


def test_linearized_encoder_exports_one_forward_graph(tmp_path):
    from attention_models import tiny_bert

    model = surgeon.apply(tiny_bert(), LinearizeAttention(feature_map="hedgehog", window=0)).model
    ids = torch.randint(0, VOCAB, (2, 24))
    result = surgeon.export.to_onnx(model, tmp_path / "bert", (ids,),
                                    dynamic_axes={"input_ids": {0: "batch", 1: "sequence"}})
    assert list(result.manifest.graphs) == ["model"]
    report = surgeon.export.verify(tmp_path / "bert", model, atol=1e-4)
    assert report.passed and report.max_abs <= 1e-5
    assert all(row.input_shapes["input_ids"] != [2, 24] for row in report.rows)


@pytest.fixture(scope="module")
def hybrid(tmp_path_factory):
    """Layer 0 stays softmax attention (as ``layers=`` or distillation's ``keep_softmax`` leave it)."""
    model = surgeon.apply(tiny_llama(), LinearizeAttention(feature_map="hedgehog", window=8, layers=[1])).model
    out = tmp_path_factory.mktemp("hybrid")
    return model, out, surgeon.export.to_onnx(model, out)


def test_softmax_layers_export_with_a_kv_cache_of_their_own(hybrid):
    model, out, result = hybrid
    assert result.manifest.exporter["softmax_layers"] == [0]
    decode = onnx.load(str(out / "decode.onnx"), load_external_data=False)
    dims = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in decode.graph.input}
    assert dims["state_in.0.keys"] == ["batch", 2, "past", 8] and dims["state_in.0.valid"] == ["batch", "past"]
    assert all(isinstance(s, int) for s in dims["state_in.1.recurrent"][1:])
    report = surgeon.export.verify(out, model)
    assert report.passed and report.max_abs <= 1e-4 and report.decode_vs_prefill_max_abs <= 1e-4
    decoded = {c.output for c in report.comparisons if c.case.endswith("decode")}   # the KV cache is compared too
    assert {"state.0.keys", "state.0.values", "state.0.valid", "state.1.recurrent"} <= decoded
    assert report.greedy_agreement == 1.0 and report.kv_cache_bytes_per_token == 2 * 2 * 8 * 4 + 1


def test_softmax_kv_cache_grows_with_the_context_and_the_linear_state_does_not(hybrid):
    model, out, _ = hybrid
    gen = surgeon.export.OnnxGenerator(out)
    names = [s["name"] for s in gen.state_specs]
    for length in (10, 300):
        _, state = gen.run_prefill(torch.randint(0, VOCAB, (1, length)))
        by_name = dict(zip(names, state))
        past = 7 + length + (-length) % 64                       # window - 1 pad slots + the padded prompt
        assert by_name["state.0.keys"].shape == (1, 2, past, 8)
        assert by_name["state.1.recurrent"].shape == (1, 6, 16, 9)
        assert sum(s.nbytes for s in state) == gen.state_bytes(context=past)
        logits, state = gen.run_decode(np.array([[3]]), np.array([[length]]), state)
        assert dict(zip(names, state))["state.0.keys"].shape[2] == past + 1 and np.isfinite(logits).all()


def test_io_binding_decode_matches_the_numpy_path(exported):
    _check_io_binding(exported[1])


def test_io_binding_grows_the_softmax_kv_cache(hybrid):
    _check_io_binding(hybrid[1])


def _check_io_binding(out: Path) -> None:
    """State kept as OrtValues between steps (IOBinding) gives the same logits and tokens as numpy feeds,
    with a constant linear state and, for a hybrid, a KV cache that grows through the binding."""
    plain = surgeon.export.OnnxGenerator(out, io_binding=False)
    bound = surgeon.export.OnnxGenerator(out, io_binding=True)
    assert bound.io_binding and not plain.io_binding
    ids = torch.randint(0, VOCAB, (2, 21), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    _, state = plain.run_prefill(ids, mask)
    s_plain, s_bound = state, state
    position = mask.sum(-1, keepdim=True).numpy()
    for t in range(6):
        token = np.array([[t + 1], [t + 2]])
        a, s_plain = plain.run_decode(token, position + t, s_plain)
        b, s_bound = bound.run_decode_bound(token, position + t, s_bound)
        assert np.abs(a - b).max() <= 1e-6
    assert [v.shape() for v in s_bound] == [list(v.shape) for v in s_plain]
    assert torch.equal(bound.generate(ids, mask, max_new_tokens=10), plain.generate(ids, mask, max_new_tokens=10))
    with pytest.raises(ExportError, match="state tensors"):
        bound.run_decode_bound(np.array([[1]]), np.array([[3]]), s_bound[:-1])
