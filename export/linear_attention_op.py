"""The linear branch through ONNX's standard ``LinearAttention`` operator (opset 27), or our own ops.

A causal linear-attention layer exports its recurrence as one ``LinearAttention`` node instead of
the chunked form's hundreds of nodes: the feature maps are computed before it, the normaliser rides
in a column of ones appended to ``v``, and window / sinks stay around it
(:mod:`surgeon.ops.linear_attention.standard_op`). Choices (``linear_op=`` of
:func:`surgeon.export.export_causal_lm`):

- ``"onnx"``: the standard ``LinearAttention`` (domain ``""``, opset 27); the graph's opset becomes 27.
- ``"contrib"``: the same node in onnxruntime's ``com.microsoft`` domain (a native CPU kernel;
  onnxruntime 1.32 runs the standard op as its function body, a ``Scan`` over tokens).
- ``"ours"``: the fallback, our chunked / recurrent forms in opset-18 ops (any runtime).
- ``"auto"``: ``"onnx"`` where the installed onnx and onnxruntime run it and no opset below 27 was
  requested, else ``"ours"``. The manifest names what was used (``exporter["linear_attention_op"]``).

Example:
    >>> resolve("auto", opset=18)
    'ours'
    >>> resolve("onnx", None) if runtime_runs("onnx") else "onnx"
    'onnx'
"""
from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from surgeon.core.errors import ConfigError, ExportError

CHOICES = ("auto", "onnx", "contrib", "ours")
OPSET = 27
CONTRIB_DOMAIN = "com.microsoft"
_ACTIVE: list[str | None] = [None]


def translate(fq: Any, fk: Any, vv: Any, state: Any, log_decay: Any = None, strict: bool = False) -> tuple[Any, Any]:
    """onnxscript translation of ``surgeon::linear_recurrence``: one ``LinearAttention`` node (+ packing).

    All inputs are at H heads ((B,H,T,·)); ``strict`` subtracts each step's own term (q_t·k_t)[v_t, 1],
    because the op's query reads the state after the step's fold.
    """
    from onnxscript.onnx_opset import opset18 as op, opset27

    heads = fq.shape[1]
    if not isinstance(heads, int):
        raise ExportError("surgeon::linear_recurrence: the number of heads must be static to export LinearAttention")

    def pack(x: Any) -> Any:   # (B,H,T,D) -> (B,T,H·D)
        return op.Reshape(op.Transpose(x, perm=[0, 2, 1, 3]), op.Constant(value_ints=[0, 0, -1]))

    args = [pack(fq), pack(fk), pack(vv), state]
    rule = "linear"
    if log_decay is not None:
        rule = "gated"
        args.append(op.Transpose(log_decay, perm=[0, 2, 1]) if len(log_decay.shape) == 3 else pack(log_decay))
    out, new_state = opset27.LinearAttention(*args, q_num_heads=heads, kv_num_heads=heads, scale=1.0, update_rule=rule)
    out = op.Transpose(op.Reshape(out, op.Constant(value_ints=[0, 0, heads, -1])), perm=[0, 2, 1, 3])
    if strict:
        own = op.ReduceSum(op.Mul(fq, fk), op.Constant(value_ints=[-1]), keepdims=1)
        out = op.Sub(out, op.Mul(own, vv))
    return out, new_state


@functools.lru_cache(maxsize=None)
def runtime_runs(choice: str) -> bool:
    """Whether the installed onnx + onnxruntime build and run a ``LinearAttention`` node of ``choice``."""
    if choice == "ours":
        return True
    try:
        import numpy as np
        import onnx
        import onnxruntime as ort
        from onnx import TensorProto, helper

        if onnx.defs.onnx_opset_version() < OPSET:
            return False
        shapes = {"q": ["B", "T", 2], "k": ["B", "T", 2], "v": ["B", "T", 2], "s": ["B", 1, 2, 2]}
        ins = [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in shapes.items()]
        outs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("o", "s2")]
        node = helper.make_node("LinearAttention", list(shapes), ["o", "s2"], q_num_heads=1, kv_num_heads=1,
                                scale=1.0, update_rule="linear", domain="" if choice == "onnx" else CONTRIB_DOMAIN)
        imports = [helper.make_opsetid("", OPSET)] + ([helper.make_opsetid(CONTRIB_DOMAIN, 1)]
                                                      if choice == "contrib" else [])
        model = helper.make_model(helper.make_graph([node], "probe", ins, outs), opset_imports=imports)
        model.ir_version = 10
        sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        one = np.ones((1, 1, 2), np.float32)
        got = sess.run(None, {"q": one, "k": one, "v": one, "s": np.zeros((1, 1, 2, 2), np.float32)})[0]
        return bool(np.allclose(got, 2.0))
    except Exception:
        return False


def resolve(choice: str, opset: int | None) -> str:
    """The op a graph will use for ``linear_op=choice`` at the requested ``opset`` (see the module docstring)."""
    if choice not in CHOICES:
        raise ConfigError(f"linear_op={choice!r} is not one of {CHOICES}: 'onnx' (the standard LinearAttention, "
                          "opset 27), 'contrib' (onnxruntime's com.microsoft kernel), 'ours' (opset-18 fallback) "
                          "or 'auto'")
    if choice == "ours":
        return "ours"
    low = opset is not None and opset < OPSET
    if choice == "auto":
        return "onnx" if not low and runtime_runs("onnx") else "ours"
    if low:
        raise ConfigError(f"linear_op={choice!r} needs opset {OPSET} (LinearAttention), but opset={opset} was "
                          "requested; pass opset=None or linear_op='ours'")
    if not runtime_runs(choice):
        raise ConfigError(f"linear_op={choice!r}: the installed onnx/onnxruntime cannot run LinearAttention "
                          f"({'onnx ≥ 1.23 and ' if choice == 'onnx' else ''}onnxruntime ≥ 1.32); "
                          "pass linear_op='ours' for the fallback graph")
    return choice


@contextlib.contextmanager
def linear_op_export(choice: str, opset: int | None = None) -> Iterator[str]:
    """Export block: the causal forms emit ``surgeon::linear_recurrence`` when the resolved op is not
    ``"ours"``; :func:`export_options` and :func:`finalize` read the choice. Yields the resolved op."""
    from surgeon.ops.linear_attention.standard_op import standard_recurrence

    used = resolve(choice, opset)
    before = _ACTIVE[0]
    _ACTIVE[0] = used
    try:
        with standard_recurrence(used != "ours"):
            yield used
    finally:
        _ACTIVE[0] = before


def export_options(opset: int | None) -> dict[str, Any]:
    """Keyword arguments for ``torch.onnx.export`` under the current choice (opset, translation table)."""
    if _ACTIVE[0] in (None, "ours"):
        return {"opset_version": opset}
    import torch

    # written at the exporter's own opset (18: no version conversion, which knows no LinearAttention); the
    # node is opset 27's and finalize() raises the import
    return {"opset_version": 18,
            "custom_translation_table": {torch.ops.surgeon.linear_recurrence.default: translate}}


def finalize(path: str | Path) -> int:
    """Raise the graph's opset to 27 (and move the nodes to ``com.microsoft`` for ``"contrib"``) when it holds
    ``LinearAttention`` nodes; returns their number. Weights in external data stay where they are."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    nodes = [n for n in proto.graph.node if n.op_type == "LinearAttention"]
    if not nodes:
        return 0
    for imp in proto.opset_import:
        if imp.domain in ("", "ai.onnx"):
            imp.version = max(imp.version, OPSET)
    if _ACTIVE[0] == "contrib":
        for n in nodes:
            n.domain = CONTRIB_DOMAIN
        if not any(i.domain == CONTRIB_DOMAIN for i in proto.opset_import):
            proto.opset_import.append(onnx.helper.make_opsetid(CONTRIB_DOMAIN, 1))
    onnx.save(proto, str(path))
    return len(nodes)


def describe(used: str, nodes: dict[str, int], requested: str) -> dict[str, Any]:
    """The manifest's ``exporter["linear_attention_op"]`` entry."""
    op = {"onnx": f"LinearAttention (ai.onnx opset {OPSET})", "contrib": f"LinearAttention ({CONTRIB_DOMAIN})",
          "ours": "surgeon chunked/recurrent forms (opset-18 ops)"}[used]
    return {"requested": requested, "used": used, "op": op, "nodes": nodes}


def count_nodes(path: str | Path) -> dict[str, int]:
    """Node count of a graph file by op type (LinearAttention, Scan, MatMul…) plus ``"total"``."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    counts: dict[str, int] = {"total": len(proto.graph.node)}
    for n in proto.graph.node:
        counts[n.op_type] = counts.get(n.op_type, 0) + 1
    return counts


__all__ = ["CHOICES", "translate", "runtime_runs", "resolve", "linear_op_export", "export_options", "finalize",
           "describe", "count_nodes"]
