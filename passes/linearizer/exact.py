"""Exact sandwiches: a Linear/Conv whose only user is a bijective activation φ *is* ``L{id, Bias∘φ⁻¹, W}``.

Example:
    >>> import torch, torch.nn as nn
    >>> layer = nn.Linear(3, 2)
    >>> lin = exact_linearizer(layer, "tanh", {}, nn.Module())
    >>> x = torch.randn(4, 3); bool(torch.allclose(lin(x), torch.tanh(layer(x)), atol=1e-6))
    True
"""
from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from surgeon.core.errors import PlanError
from surgeon.core.modules import get_submodule
from surgeon.core.sites import Site
from surgeon.fx.tracing import trace
from surgeon.ops.invertible import Bias, InverseActivation, InvertibleSequential
from surgeon.ops.linearizer import Linearizer

_LINEAR_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_ACT_MODULES = {nn.LeakyReLU: "leaky_relu", nn.PReLU: "prelu", nn.ELU: "elu", nn.Tanh: "tanh",
                nn.Sigmoid: "sigmoid", nn.Softplus: "softplus"}
_ACT_FUNCTIONS = {F.leaky_relu: "leaky_relu", F.elu: "elu", torch.tanh: "tanh", F.tanh: "tanh",
                  torch.sigmoid: "sigmoid", F.sigmoid: "sigmoid", F.softplus: "softplus", F.prelu: "prelu"}
_ACT_METHODS = {"tanh": "tanh", "sigmoid": "sigmoid"}


def _arg(node: fx.Node, i: int, name: str, default: Any) -> Any:
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(name, default)


def activation_of(node: fx.Node, gm: fx.GraphModule) -> tuple[str, dict[str, Any]] | None:
    """``(kind, params)`` when ``node`` is a bijective activation call with constant parameters."""
    if node.op == "call_module":
        m = gm.get_submodule(str(node.target))
        kind = _ACT_MODULES.get(type(m))
        if kind is None:
            return None
        params = {"leaky_relu": lambda: {"slope": m.negative_slope}, "elu": lambda: {"alpha": m.alpha},
                  "softplus": lambda: {"beta": m.beta, "threshold": m.threshold},
                  "prelu": lambda: {"weight_of": str(node.target)}}.get(kind, dict)()
    elif node.op == "call_function" and node.target in _ACT_FUNCTIONS:
        kind = _ACT_FUNCTIONS[node.target]
        if kind == "leaky_relu":
            params = {"slope": _arg(node, 1, "negative_slope", 0.01)}
        elif kind == "elu":
            params = {"alpha": _arg(node, 1, "alpha", 1.0)}
        elif kind == "softplus":
            params = {"beta": _arg(node, 1, "beta", 1.0), "threshold": _arg(node, 2, "threshold", 20.0)}
        elif kind == "prelu":
            w = _arg(node, 1, "weight", None)
            if not (isinstance(w, fx.Node) and w.op == "get_attr"):
                return None
            params = {"weight_attr": str(w.target)}
        else:
            params = {}
    elif node.op == "call_method" and node.target in _ACT_METHODS:
        kind, params = _ACT_METHODS[str(node.target)], {}
    else:
        return None
    if any(isinstance(v, fx.Node) for v in params.values()):
        return None
    return kind, params


def _prelu_weight(root: nn.Module, params: dict[str, Any]) -> torch.Tensor | None:
    if "weight_of" in params:
        return get_submodule(root, params["weight_of"]).weight
    if "weight_attr" in params:
        owner, _, leaf = params["weight_attr"].rpartition(".")
        return getattr(get_submodule(root, owner), leaf)
    return None


def _bijective(kind: str, params: dict[str, Any], root: nn.Module) -> bool:
    if kind == "leaky_relu":
        return params["slope"] > 0
    if kind == "elu":
        return params["alpha"] > 0
    if kind == "softplus":
        return params["beta"] > 0
    if kind == "prelu":
        w = _prelu_weight(root, params)
        return w is not None and bool((w > 0).all())
    return True


def exact_linearizer(layer: nn.Module, kind: str, params: dict[str, Any], root: nn.Module) -> Linearizer:
    """The Linearizer that *is* ``φ(layer(x))``: ``L{id, Bias(b)∘φ⁻¹, W}`` (b absorbed into g_y)."""
    if not isinstance(layer, _LINEAR_TYPES):
        raise PlanError(f"{type(layer).__name__} is not a Linear/Conv layer")
    act_kw = {k: v for k, v in params.items() if k in ("slope", "alpha", "beta", "threshold")}
    weight = _prelu_weight(root, params) if kind == "prelu" else None
    dim = -1 if isinstance(layer, nn.Linear) else 1
    blocks: list[nn.Module] = [InverseActivation(kind, weight=weight, **act_kw)]
    if layer.bias is not None:
        blocks.append(Bias(layer.bias.detach(), dim=dim))
    g_y = InvertibleSequential(*blocks)
    if isinstance(layer, nn.Linear):
        return Linearizer(None, g_y, layer.weight.detach(), dim=dim)
    if layer.padding_mode != "zeros":
        raise PlanError(f"{type(layer).__name__} with padding_mode={layer.padding_mode!r} is not supported by exact "
                        f"sandwiches (only zero padding is a linear operator on g coordinates)")
    conv = {"stride": layer.stride, "padding": layer.padding, "dilation": layer.dilation, "groups": layer.groups}
    return Linearizer(None, g_y, layer.weight.detach(), dim=dim, conv=conv)


def exact_pairs(gm: fx.GraphModule) -> list[Site]:
    """Every ``Linear/Conv → bijective activation`` pair (the layer's only user is the activation)."""
    calls: dict[str, int] = {}
    for n in gm.graph.nodes:
        if n.op == "call_module":
            calls[str(n.target)] = calls.get(str(n.target), 0) + 1
    sites = []
    for n in gm.graph.nodes:
        if n.op != "call_module" or not isinstance(gm.get_submodule(str(n.target)), _LINEAR_TYPES):
            continue
        if calls[str(n.target)] != 1 or len(n.users) != 1:
            continue
        user = next(iter(n.users))
        act = activation_of(user, gm)
        if act is None or (user.args[:1] != (n,) and user.kwargs.get("input") is not n):
            continue
        kind, params = act
        if not _bijective(kind, params, gm):
            continue
        name = str(n.target)
        sites.append(Site(name=name, base=name, kind="fx", op=f"exact:{kind}",
                          scope=name.rpartition(".")[0], node=n.name,
                          data={"decision": "exact", "act": kind, "act_params": params, "act_node": user.name}))
    return sites


def module_exact_pattern(module: nn.Module) -> tuple[str, dict[str, Any], str] | None:
    """When a module's whole forward is ``act(layer(x))``: ``(kind, params, layer path)``."""
    try:
        gm = trace(module)
    except Exception:  # noqa: BLE001 - not traceable: not an exact pattern
        return None
    nodes = [n for n in gm.graph.nodes]
    if len(nodes) != 4 or [n.op for n in (nodes[0], nodes[3])] != ["placeholder", "output"]:
        return None
    lin, act_node = nodes[1], nodes[2]
    if lin.op != "call_module" or not isinstance(gm.get_submodule(str(lin.target)), _LINEAR_TYPES):
        return None
    act = activation_of(act_node, gm)
    if act is None or act_node.args[:1] != (lin,) or nodes[3].args[0] is not act_node:
        return None
    kind, params = act
    if not _bijective(kind, params, gm):
        return None
    return kind, params, str(lin.target)


# ----------------------------------------------------------------------------------------------
# calibration and closed-form fits
