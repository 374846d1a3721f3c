"""Sparse-ReLU ONNX export: a partially linearized site runs ReLU on its kept elements only.

Masked elementwise blends (``where(mask, relu(x), x)``) still evaluate the comparison on every
element, so an MPC runtime saves nothing (``secretflow/spu#701``). ``to_sparse_onnx`` replaces every
frozen site by a gather → Relu → scatter unit:

* a **channel** (or layer) mask keeps a channel subset: ``index_select`` on the channel dim, Relu,
  ``index_copy`` back into the linear part; any spatial size works;
* a **pixel** (or partial) mask gathers kept element indices of the flattened example; the
  per-example shape is fixed by the mask, so only the batch dim may be dynamic.

ReLU6 elements are written as ``Relu`` then ``min(·, 6)`` (the exporter may fuse that into
``Clip(0, 6)``, which the counter treats as a ReLU node), so every ReLU-family element of the
exported graph passes through exactly one ReLU node. :func:`count_relu_elements` reads the file
back, runs it in onnxruntime with every ``Relu`` input exposed, and returns the elements per example
that went through ``Relu`` nodes: it equals the budget.

Example:
    >>> import torch, torch.nn as nn, surgeon
    >>> from surgeon.passes import LinearizeReLU, FinalizeReLU
    >>> net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 2, 1))
    >>> x = torch.randn(2, 3, 5, 5)
    >>> s = surgeon.apply(net, LinearizeReLU(granularity="pixel"), example_inputs=x)
    >>> _ = s.model.get_submodule("1").mask.data[:, :2].zero_()    # keep 4·3·5 = 60 of 100
    >>> f = surgeon.apply(s, FinalizeReLU())
    >>> res = to_sparse_onnx(f.model, "/tmp/doc_sparse", x)
    >>> res.relu_elements, count_relu_elements("/tmp/doc_sparse")
    (60, 60)
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn

from surgeon.core.errors import ConfigError, ExportError
from surgeon.export.runtime import make_session
from surgeon.fx.tracing import SurgeonUnit
from surgeon.ops.activation import BinaryMaskedReLU, MaskedReLU, relu_kind
from surgeon.ops.poly_units import BinaryMaskedPoly, poly_eval


def _act(kind: str, x: torch.Tensor) -> torch.Tensor:
    r = torch.relu(x)
    return torch.clamp(r, max=6.0) if kind == "relu6" else r


class SparseReLU(SurgeonUnit):
    """ReLU on the kept elements only; the others go through the linear part (identity / polynomial)."""

    def __init__(self, kind: str, mask: torch.Tensor, coef: torch.Tensor | None = None, channel_dim: int = 1) -> None:
        super().__init__()
        self.kind = kind
        mask = mask.detach().to(torch.bool)
        self.coef = None if coef is None else nn.Parameter(coef.detach().clone(), requires_grad=False)
        nontrivial = [d for d, s in enumerate(mask.shape) if s != 1]
        # per-example dims (mask excludes batch); channel-type when only the channel dim varies
        cd = channel_dim - 1 if channel_dim > 0 else channel_dim
        cd = cd % max(mask.dim(), 1) if mask.dim() else 0
        self.channel_mode = mask.dim() > 0 and nontrivial in ([cd], [])
        self.mask_shape = list(mask.shape)
        if self.channel_mode:
            self.dim = cd + 1
            self.register_buffer("index", mask.reshape(-1).nonzero().reshape(-1) if nontrivial else torch.arange(1))
            self.kept_fraction = int(mask.sum()) / mask.numel()
        else:
            self.dim = None
            self.register_buffer("index", mask.reshape(-1).nonzero().reshape(-1))

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.coef is None else poly_eval(self.coef, x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = self.linear(x)
        if self.channel_mode:
            kept = _act(self.kind, x.index_select(self.dim, self.index))
            return base.index_copy(self.dim, self.index, kept)
        flat_x = x.reshape(x.shape[0], -1)
        kept = _act(self.kind, flat_x.index_select(1, self.index))
        return base.reshape(x.shape[0], -1).index_copy(1, self.index, kept).reshape(x.shape)


class _ReLU6AsRelu(SurgeonUnit):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _act("relu6", x)


@dataclass
class SparseExport:
    """``to_sparse_onnx`` result: the export plus the ReLU elements per example counted in the file."""

    export: Any
    relu_elements: int
    model: nn.Module

    @property
    def onnx_path(self) -> Path:
        return self.export.onnx_path


def sparse_model(model: nn.Module) -> fx.GraphModule:
    """A copy of a finalized model with frozen masked sites as :class:`SparseReLU` units."""
    if not isinstance(model, fx.GraphModule):
        raise ConfigError("to_sparse_onnx needs the GraphModule FinalizeReLU returned")
    gm = copy.deepcopy(model)
    for node in list(gm.graph.nodes):
        unit = gm.get_submodule(str(node.target)) if node.op == "call_module" else None
        if isinstance(unit, MaskedReLU):
            m = unit.mask.detach()
            if not bool(((m == 0) | (m == 1)).all()) or getattr(unit, "gate", None):
                raise ConfigError(f"site {getattr(unit, 'site_name', node.target)!r} has a non-binary mask: "
                                  "run a budget search / FinalizeReLU first")
            coef = getattr(unit, "coef", None)
            new = SparseReLU(unit.kind, m, coef, getattr(unit, "channel_dim", 1))
        elif isinstance(unit, BinaryMaskedReLU):
            coef = unit.coef if isinstance(unit, BinaryMaskedPoly) else None
            new = SparseReLU(unit.kind, unit.mask, coef, getattr(unit, "channel_dim", 1))
        elif unit is None or not isinstance(unit, SurgeonUnit):
            if relu_kind(node, gm) == "relu6":
                name = f"_relu6_as_relu_{node.name}"
                gm.add_submodule(name, _ReLU6AsRelu())
                with gm.graph.inserting_after(node):
                    new_node = gm.graph.call_module(name, (node.args[0],))
                node.replace_all_uses_with(new_node)
                gm.graph.erase_node(node)
            continue
        else:
            continue
        new.site_name = getattr(unit, "site_name", str(node.target))
        gm.add_submodule(str(node.target), new)
    gm.graph.lint()
    gm.recompile()
    return gm


def to_sparse_onnx(model: nn.Module, path: str | Path, example_inputs: Any,
                   dynamic_axes: dict[str, Any] | None = None, **kw: Any) -> SparseExport:
    """Export ``model`` (finalized) with gather → Relu → scatter sites; count its Relu elements.

    Raises ``ConfigError`` when a pixel-granularity (or partially kept) site would need a dynamic
    non-batch dimension: its kept indices fix the per-example shape.
    """
    sparse = sparse_model(model)
    pixel_sites = [u.site_name for u in sparse.modules() if isinstance(u, SparseReLU) and not u.channel_mode]
    if pixel_sites and dynamic_axes:
        for name, axes in dynamic_axes.items():
            dims = list(axes) if not isinstance(axes, dict) else list(axes)
            if any(d != 0 for d in dims):
                raise ConfigError(
                    f"pixel-granularity sites {pixel_sites[:5]} fix the per-example shape; input {name!r} "
                    f"cannot have dynamic dims {dims} (only the batch dim 0 may be dynamic). Use channel "
                    f"granularity for inputs of varying size.")
    import surgeon.export

    inputs = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
    res = surgeon.export.to_onnx(sparse, path, inputs, dynamic_axes=dynamic_axes, **kw)
    return SparseExport(res, count_relu_elements(res.onnx_path), sparse)


def _onnx_file(path: str | Path) -> Path:
    path = Path(path)
    if path.is_dir():
        path = path / "model.onnx"
    if not path.exists():
        raise ExportError(f"no ONNX file at {path}")
    return path


def _const_value(name: str, graph: Any) -> float | None:
    from onnx import numpy_helper

    for init in graph.initializer:
        if init.name == name:
            v = numpy_helper.to_array(init)
            return float(v.reshape(-1)[0]) if v.size == 1 else None
    for node in graph.node:
        if node.op_type == "Constant" and node.output[0] == name:
            for attr in node.attribute:
                if attr.name == "value":
                    v = numpy_helper.to_array(attr.t)
                    return float(v.reshape(-1)[0]) if v.size == 1 else None
                if attr.name in ("value_float", "value_int"):
                    return float(attr.f if attr.name == "value_float" else attr.i)
    return None


def _is_relu_clip(node: Any, graph: Any) -> bool:
    """``Clip(x, min=0, ...)``: the exporter's spelling of ReLU6 (a ReLU with an upper clip)."""
    if node.op_type != "Clip" or len(node.input) < 2 or not node.input[1]:
        return False
    return _const_value(node.input[1], graph) == 0.0


def count_relu_elements(path: str | Path, input_shapes: dict[str, list[int]] | None = None) -> int:
    """Elements per example that pass through ``Relu`` nodes of an ONNX file (summed over nodes).

    ``Clip`` nodes with a constant lower bound 0 (how the exporter writes ReLU6, even when fused
    from ``Relu`` + ``Min``) count as ReLU nodes too.

    Runs the graph in onnxruntime with each ``Relu`` input added as an output, on random inputs of
    ``input_shapes`` (default: the manifest's example shapes), and divides by the batch size.
    """
    import onnx

    file = _onnx_file(path)
    proto = onnx.load(str(file), load_external_data=True)
    relu_inputs = [n.input[0] for n in proto.graph.node if n.op_type == "Relu" or _is_relu_clip(n, proto.graph)]
    for sub in proto.graph.node:
        for attr in sub.attribute:
            if attr.g is not None and any(n.op_type == "Relu" for n in attr.g.node):
                raise ExportError("Relu nodes inside control-flow subgraphs are not counted")
    if not relu_inputs:
        return 0
    existing = {o.name for o in proto.graph.output}
    for name in dict.fromkeys(relu_inputs):
        if name not in existing:
            proto.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    if input_shapes is None:
        from surgeon.export.manifest import load_manifest

        try:
            spec = load_manifest(file).graph()
            input_shapes = {t.name: list(t.example_shape) for t in spec.inputs}
        except Exception as e:  # noqa: BLE001
            raise ExportError(f"no manifest next to {file}; pass input_shapes={{name: shape}} ({e})") from None
    session = make_session(proto)
    feeds = {}
    batch = None
    rng = np.random.default_rng(0)
    for inp in session.get_inputs():
        shape = input_shapes[inp.name]
        batch = batch or shape[0]
        feeds[inp.name] = rng.standard_normal(shape).astype(np.float32)
    names = list(dict.fromkeys(relu_inputs))
    outs = dict(zip(names, session.run(names, feeds)))
    total = sum(outs[n].size for n in relu_inputs)
    return int(total // max(batch or 1, 1))
