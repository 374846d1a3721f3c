"""ONNX's standard LinearAttention op (opset 27) in onnxruntime against our float64 recurrence, and the
causal forms computing their linear terms through ``surgeon::linear_recurrence`` (what export emits)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from surgeon.ops.linear_attention.standard_op import standard_recurrence

from test_linear_attention import make_case, max_err, run

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")


def _op_session(rule: str, H: int, Hkv: int, F: int, Dv: int, domain: str = "") -> "ort.InferenceSession":
    from onnx import TensorProto, helper

    shapes = {"q": ["B", "T", H * F], "k": ["B", "T", Hkv * F], "v": ["B", "T", Hkv * Dv], "s": ["B", Hkv, F, Dv]}
    if rule == "gated":
        shapes["g"] = ["B", "T", Hkv]
    ins = [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in shapes.items()]
    outs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("o", "s2")]
    names = list(shapes) if rule == "gated" else ["q", "k", "v", "s"]
    node = helper.make_node("LinearAttention", names, ["o", "s2"], q_num_heads=H, kv_num_heads=Hkv, scale=1.0,
                            update_rule=rule, domain=domain)
    imports = [helper.make_opsetid("", 27)] + ([helper.make_opsetid(domain, 1)] if domain else [])
    model = helper.make_model(helper.make_graph([node], "la", ins, outs), opset_imports=imports)
    model.ir_version = 10
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("domain", ["", "com.microsoft"])
@pytest.mark.parametrize("rule", ["linear", "gated"])
def test_onnxruntime_op_matches_float64_recurrence_across_two_calls_with_gqa(rule, domain):
    from surgeon.export.linear_attention_op import runtime_runs

    if not runtime_runs("onnx" if domain == "" else "contrib"):
        pytest.skip("this onnxruntime has no LinearAttention")
    B, T, H, Hkv, F, Dv = 2, 7, 6, 2, 5, 4
    rng = np.random.default_rng(0)
    q, k = rng.random((B, 2 * T, H, F)), rng.random((B, 2 * T, Hkv, F))   # positive features, as φ gives
    v, g = rng.standard_normal((B, 2 * T, Hkv, Dv)), -0.3 * rng.random((B, 2 * T, Hkv))
    S, ref = np.zeros((B, Hkv, F, Dv)), []
    for t in range(2 * T):                                   # the float64 recurrence, token by token
        if rule == "gated":
            S = np.exp(g[:, t])[..., None, None] * S
        S = S + k[:, t, :, :, None] * v[:, t, :, None, :]
        ref.append(np.einsum("bhf,bhfd->bhd", q[:, t], np.repeat(S, H // Hkv, axis=1)))
    ref = np.stack(ref, 1)
    sess, state, got = _op_session(rule, H, Hkv, F, Dv, domain), np.zeros((B, Hkv, F, Dv), np.float32), []
    for lo in (0, T):                                        # two calls: the state carries across them
        feed = {"q": q[:, lo:lo + T].reshape(B, T, -1), "k": k[:, lo:lo + T].reshape(B, T, -1),
                "v": v[:, lo:lo + T].reshape(B, T, -1), "s": state}
        if rule == "gated":
            feed["g"] = g[:, lo:lo + T]
        out, state = sess.run(None, {n: a.astype(np.float32) for n, a in feed.items()})
        got.append(out.reshape(B, T, H, Dv))
    scale = np.abs(ref).max()
    assert np.abs(np.concatenate(got, 1) - ref).max() <= 1e-6 * scale
    assert np.abs(state - S).max() <= 1e-6 * np.abs(S).max()


@pytest.mark.parametrize("gate", [None, "head", "channel"])
@pytest.mark.parametrize("window,sinks", [(0, 0), (1, 0), (5, 2)])
@pytest.mark.parametrize("form", ["chunked", "recurrent"])
def test_forms_through_the_op_agree_with_the_parallel_form_in_float64(gate, window, sinks, form):
    case = make_case(3, gate=gate, T=19)
    ref, s_ref = run(case, window=window, sinks=sinks, form="parallel")
    with standard_recurrence():
        out, s = run(case, window=window, sinks=sinks, form=form, chunk_size=8)
    assert max_err(out, ref) <= 1e-10 and max_err(s, s_ref) <= 1e-10


def test_op_continues_a_cached_sequence_like_one_call():
    case = make_case(5, gate="head", T=21, pad=0)
    full, s_full = run(case, window=4, form="parallel")
    first = {n: (t[:, :, :13] if n in ("q", "k", "v", "log_decay") else t) for n, t in case.items()}
    rest = {n: (t[:, :, 13:] if n in ("q", "k", "v", "log_decay") else t) for n, t in case.items()}
    with standard_recurrence():
        a, s = run(first, window=4)
        b, s = run(rest, window=4, past_k=case["k"][:, :, 10:13], past_v=case["v"][:, :, 10:13], state=s,
                   form="recurrent")
    assert max_err(torch.cat([a, b], 2), full) <= 1e-10 and max_err(s, s_full) <= 1e-10


def test_standard_recurrence_is_off_outside_the_block():
    from surgeon.ops.linear_attention.standard_op import active

    with standard_recurrence():
        assert active()
        with standard_recurrence(False):
            assert not active()
        assert active()
    assert not active()
