"""Hand-written attention modules and the three graph sources the attention pattern tests run on.

``graph_of(source, model, x)`` returns ``(gm, example_inputs)``: the ``symbolic_trace`` graph, the graph
dynamo hands a ``torch.compile`` backend (captured with a recording backend, dynamic shapes), or the
``torch.export`` graph (``ep.module()``, optionally after ``run_decompositions()``).
"""
from __future__ import annotations

import math
from typing import Any, Callable

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from surgeon.passes.attention.fx import concrete_inputs

SOURCES = ("symbolic_trace", "dynamo", "export", "export_decomposed")
DIM, HEADS, KV_HEADS = 32, 4, 2
HEAD_DIM = DIM // HEADS


class _Projections(nn.Module):
    def __init__(self, kv_heads: int = HEADS) -> None:
        super().__init__()
        self.kv_heads = kv_heads
        self.q_lin = nn.Linear(DIM, DIM)
        self.k_lin = nn.Linear(DIM, kv_heads * HEAD_DIM)
        self.v_lin = nn.Linear(DIM, kv_heads * HEAD_DIM)
        self.out = nn.Linear(DIM, DIM)

    def qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b, t, _ = x.shape
        q = self.q_lin(x).view(b, t, HEADS, HEAD_DIM).transpose(1, 2)
        k = self.k_lin(x).view(b, t, self.kv_heads, HEAD_DIM).transpose(1, 2)
        v = self.v_lin(x).view(b, t, self.kv_heads, HEAD_DIM).transpose(1, 2)
        return q, k, v

    def merge(self, y: torch.Tensor) -> torch.Tensor:
        b, h, t, d = y.shape
        return self.out(y.transpose(1, 2).reshape(b, t, h * d))


def repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    """transformers' spelling: (B, Hkv, T, D) -> (B, Hkv·g, T, D)."""
    b, h, t, d = x.shape
    return x[:, :, None, :, :].expand(b, h, groups, t, d).reshape(b, h * groups, t, d)


class MatmulCausal(_Projections):
    """softmax(q @ kᵀ / √d + additive causal mask) @ v, GQA by repeat_kv."""

    def __init__(self) -> None:
        super().__init__(KV_HEADS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x)
        k, v = repeat_kv(k, HEADS // KV_HEADS), repeat_kv(v, HEADS // KV_HEADS)
        t = x.shape[1]
        mask = torch.full((t, t), float("-inf"), device=x.device).triu(1)
        scores = torch.matmul(q, k.transpose(2, 3)) / math.sqrt(HEAD_DIM) + mask
        return self.merge(torch.softmax(scores, dim=-1) @ v)


class EinsumBidirectional(_Projections):
    """einsum spelling, bidirectional, scale as a multiplication."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x)
        scores = torch.einsum("bhqd,bhkd->bhqk", q, k) * HEAD_DIM ** -0.5
        return self.merge(torch.einsum("bhqk,bhkd->bhqd", scores.softmax(-1), v))


class SdpaCausal(_Projections):
    """F.scaled_dot_product_attention(is_causal=True), GQA by repeat_kv, explicit scale."""

    def __init__(self) -> None:
        super().__init__(KV_HEADS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x)
        k, v = repeat_kv(k, HEADS // KV_HEADS), repeat_kv(v, HEADS // KV_HEADS)
        return self.merge(F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.3))


class SdpaMasked(_Projections):
    """SDPA with a boolean causal mask tensor built from sizes (structural), default scale."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x)
        t = x.shape[1]
        mask = x.new_ones(t, t, dtype=torch.bool).tril()
        return self.merge(F.scaled_dot_product_attention(q, k, v, attn_mask=mask))


class Blocks(nn.Module):
    """Two attention blocks (so site names carry module paths) with a residual MLP between."""

    def __init__(self, attn: Callable[[], nn.Module]) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([attn(), attn()])
        self.mlp = nn.Sequential(nn.Linear(DIM, DIM), nn.GELU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.blocks[0](x)
        x = x + self.mlp(x)
        return x + self.blocks[1](x)


class NoAttention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(DIM, DIM), nn.ReLU(), nn.Linear(DIM, DIM))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x).softmax(-1)


MODELS: dict[str, Callable[[], nn.Module]] = {
    "matmul_causal_gqa": MatmulCausal, "einsum_bidirectional": EinsumBidirectional,
    "sdpa_causal_gqa": SdpaCausal, "sdpa_bool_mask": SdpaMasked,
}
CAUSAL = {"matmul_causal_gqa": True, "einsum_bidirectional": False, "sdpa_causal_gqa": True, "sdpa_bool_mask": True}


def build(name: str, dtype: torch.dtype = torch.float64) -> nn.Module:
    torch.manual_seed(0)
    return Blocks(MODELS[name]).to(dtype).eval()


def dynamo_graph(model: nn.Module, *inputs: Any) -> tuple[fx.GraphModule, list[Any]]:
    """The graph (and example inputs) dynamo hands a backend, with dynamic sizes; one graph expected."""
    captured: list[tuple[fx.GraphModule, list[Any]]] = []

    def record(gm: fx.GraphModule, example_inputs: list[Any]) -> Callable:
        captured.append((gm, list(example_inputs)))
        return gm.forward

    torch._dynamo.reset()
    compiled = torch.compile(model, backend=record, dynamic=True, fullgraph=True)
    with torch.no_grad():
        compiled(*inputs)
    assert len(captured) == 1, f"expected one graph, dynamo made {len(captured)}"
    return captured[0]


def export_graph(model: nn.Module, *inputs: Any, decompose: bool = False) -> fx.GraphModule:
    """``torch.export`` graph with dynamic batch and token dimensions, optionally decomposed to core ATen."""
    batch, tokens = torch.export.Dim("batch", min=1, max=64), torch.export.Dim("tokens", min=2, max=256)
    ep = torch.export.export(model, inputs, dynamic_shapes=({0: batch, 1: tokens},))
    if decompose:
        ep = ep.run_decompositions()
    return ep.module()


def graph_of(source: str, model: nn.Module, x: torch.Tensor) -> tuple[nn.Module, tuple[Any, ...]]:
    """(graph module or model, example inputs to give surgeon.apply) for one graph source."""
    if source == "symbolic_trace":
        return model, (x,)
    if source == "dynamo":
        gm, inputs = dynamo_graph(model, x)
        return gm, concrete_inputs(inputs)
    if source in ("export", "export_decomposed"):
        return export_graph(model, x, decompose=source == "export_decomposed"), (x,)
    raise ValueError(source)


def inputs_for(source: str, model: nn.Module, x: torch.Tensor) -> tuple[Any, ...]:
    """The arguments a graph of ``source`` takes for input ``x`` (dynamo's lifted parameters and sizes
    come from capturing the same model again at this shape)."""
    return concrete_inputs(dynamo_graph(model, x)[1]) if source == "dynamo" else (x,)


def first(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out
