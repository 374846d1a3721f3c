"""Model costs per example: parameters, MACs of linear ops, ReLU count (see ``surgeon.ops.activation``).

MACs count multiply-accumulates of convolutions, linear layers and matrix products per input
example (batch excluded), read off shape-propagated FX graphs.

Example:
    >>> import torch, torch.nn as nn
    >>> c = measure(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU()), (torch.randn(2, 3, 8, 8),))
    >>> c.macs, c.relu_count, c.relu_sites
    (13824, 512, 1)
"""
from __future__ import annotations

import math
import operator
from dataclasses import asdict, dataclass
from typing import Any, Iterator, Sequence

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from surgeon.core.errors import TraceError
from surgeon.fx.tracing import node_shape, propagate_shapes, trace
from surgeon.ops.activation import BinaryMaskedReLU, MaskedReLU, relu_kind

_MATMULS = {torch.matmul, torch.bmm, torch.mm, operator.matmul}


@dataclass
class ModelCosts:
    """Per-example costs; ``None`` where the model could not be traced or shapes were unknown."""

    params: int
    macs: int | None = None
    relu_count: int | None = None
    relu_sites: int | None = None
    masked_sites: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _per_example(total: int, batch: int) -> int:
    return total // max(batch, 1)


def node_macs(node: fx.Node, gm: fx.GraphModule) -> int:
    """MACs of one node for the whole batch (0 for anything that is not a linear op)."""
    out = node_shape(node)
    if out is None:
        return 0
    out_numel = math.prod(out)
    if node.op == "call_module":
        m = gm.get_submodule(str(node.target))
        if isinstance(m, nn.modules.conv._ConvNd):
            return out_numel * (m.in_channels // m.groups) * math.prod(m.kernel_size)
        if isinstance(m, nn.Linear):
            return out_numel * m.in_features
        return 0
    if node.op == "call_function":
        if node.target is F.linear:
            w = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
            ws = node_shape(w) if isinstance(w, fx.Node) else None
            return out_numel * ws[-1] if ws else 0
        if node.target in (F.conv1d, F.conv2d, F.conv3d):
            w = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
            ws = node_shape(w) if isinstance(w, fx.Node) else None
            return out_numel * math.prod(ws[1:]) if ws else 0
        if node.target in _MATMULS:
            a = node_shape(node.args[0]) if isinstance(node.args[0], fx.Node) else None
            return out_numel * a[-1] if a else 0
    return 0


def activation_sites(gm: fx.GraphModule) -> Iterator[tuple[fx.Node, list[int], nn.Module | None]]:
    """``(node, shape, unit)`` for every shape-propagated activation site: a surgeon unit (masked ReLU,
    polynomial) or a plain ReLU-family call (``unit`` None)."""
    for node in gm.graph.nodes:
        shape = node_shape(node)
        if shape is None:
            continue
        unit = gm.get_submodule(str(node.target)) if node.op == "call_module" else None
        if isinstance(unit, (MaskedReLU, BinaryMaskedReLU)) or hasattr(unit, "poly_count"):
            yield node, shape, unit
        elif relu_kind(node, gm) is not None:
            yield node, shape, None


def graph_macs(gm: fx.GraphModule) -> int:
    """Multiply-accumulates of a shape-propagated graph (whole batch)."""
    return sum(node_macs(node, gm) for node in gm.graph.nodes)


def graph_costs(gm: fx.GraphModule, batch: int) -> ModelCosts:
    """Costs of a shape-propagated graph, per example."""
    relus = sites = masked = 0
    for _, shape, unit in activation_sites(gm):
        if unit is None:
            sites += 1
            relus += math.prod(shape[1:])
        elif isinstance(unit, (MaskedReLU, BinaryMaskedReLU)):
            sites += 1
            masked += 1
            relus += unit.relu_count(shape)
    return ModelCosts(count_params(gm), _per_example(graph_macs(gm), batch), relus, sites, masked)


def measure(model: nn.Module, example_inputs: Sequence[Any] | None) -> ModelCosts:
    """Costs of ``model``; graph costs need ``example_inputs`` and a traceable model."""
    if example_inputs is None:
        return ModelCosts(count_params(model))
    try:
        gm = trace(model)
    except TraceError:
        return ModelCosts(count_params(model))
    propagate_shapes(gm, example_inputs)
    first = example_inputs[0]
    batch = first.shape[0] if isinstance(first, torch.Tensor) and first.dim() > 0 else 1
    costs = graph_costs(gm, batch)
    costs.params = count_params(model)
    return costs
