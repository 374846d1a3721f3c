"""TFHE cost estimate of a quantized CNN (Concrete ML style): programmable bootstrappings (PBS) from the graph.

In a TFHE engine that runs a post-training-quantized network (Concrete ML), every value leaving an integer
accumulator is re-quantized by a table lookup, one PBS per element, and any elementwise function right after
it (ReLU, a masked ReLU, identity) is folded into the same lookup. So the PBS count follows the
*requantization points*, not the ReLU count: a ReLU turned into an identity still costs its lookup. Our
count, per example:

* conv / linear / average-pool outputs: one PBS per element (the network's final layer: none, its output
  is decrypted and dequantized in the clear);
* the sum of two computed tensors (a residual add): three per element (both inputs brought to a common
  scale, then the output); the engine keeps one input on the common scale where it can, so this is an
  upper bound (digits ResNet, width 8: 4,624 counted, 4,112 compiled by Concrete ML 1.9 at all ReLUs and
  3,600 at 20 %, ``benchmarks/results/private_inference.json``).

Estimated latency = PBS × seconds per PBS, the latter measured on a circuit of lone lookups at the same
precision (``benchmarks/private_fhe_engine.py --pbs-probe``).

Example:
    >>> import torch, torch.nn as nn
    >>> net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 10))
    >>> fhe_pbs_estimate(net, torch.randn(1, 1, 8, 8))["pbs"]
    256
"""
from __future__ import annotations

import math
import operator
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn

from surgeon.fx.tracing import node_shape, propagate_shapes, trace

_LINEAR = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear, nn.AvgPool2d, nn.AdaptiveAvgPool2d)
_ADDS = {operator.add, torch.add, operator.sub, torch.sub}


def _elements(node: fx.Node) -> int:
    shape = node_shape(node)
    return math.prod(shape[1:]) if shape else 0


def _output_producer(gm: fx.GraphModule) -> set[fx.Node]:
    """Nodes whose value reaches the output through shape-only ops (their requantization is skipped)."""
    out = next(n for n in gm.graph.nodes if n.op == "output")
    seen, todo = set(), [a for a in out.all_input_nodes]
    while todo:
        n = todo.pop()
        seen.add(n)
        if n.op == "call_method" and n.target in ("view", "reshape", "flatten") or \
                n.op == "call_function" and n.target in (torch.flatten,):
            todo.extend(n.all_input_nodes)
    return seen


def fhe_pbs_estimate(model: nn.Module, example_inputs: Any, seconds_per_pbs: float | None = None) -> dict[str, Any]:
    """PBS per example of ``model`` under a quantized TFHE engine (rules in the module docstring).

    Returns ``{"pbs", "per_node": {name: pbs}, "estimated_s"}`` (``estimated_s`` None without ``seconds_per_pbs``).
    """
    inputs = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
    gm = trace(model)
    propagate_shapes(gm, inputs)
    final = _output_producer(gm)
    per_node: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node in final:
            continue
        if node.op == "call_module" and isinstance(gm.get_submodule(str(node.target)), _LINEAR):
            per_node[node.name] = _elements(node)
        elif node.op == "call_method" and node.target == "mean" or \
                node.op == "call_function" and node.target in (torch.mean, torch.nn.functional.avg_pool2d,
                                                               torch.nn.functional.adaptive_avg_pool2d):
            per_node[node.name] = _elements(node)
        elif node.op in ("call_function", "call_method") and (node.target in _ADDS or node.target in ("add", "sub")) \
                and sum(isinstance(a, fx.Node) for a in node.args[:2]) == 2:
            per_node[node.name] = 3 * _elements(node)
    pbs = sum(per_node.values())
    return {"pbs": pbs, "per_node": per_node,
            "estimated_s": None if seconds_per_pbs is None else pbs * seconds_per_pbs}
