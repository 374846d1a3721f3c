"""FX path of ``LinearizeAttention``: find hand-written attention in a traced graph and rewrite it.

``find_attention`` recognises, one match per *call site*:

* ``F.scaled_dot_product_attention(q, k, v, attn_mask=..., is_causal=..., scale=...)`` (positional or
  keyword arguments, any spelling that reaches ``torch._C._nn.scaled_dot_product_attention``);
* ``softmax(q @ kᵀ · s + mask) @ v`` written by hand: the products as ``@`` / ``torch.matmul`` /
  ``.matmul`` / ``torch.bmm`` / ``torch.einsum("bhqd,bhkd->bhqk", ...)``; kᵀ as ``.transpose(-2, -1)``,
  ``.transpose(2, 3)``, ``.mT`` or ``.permute(...)``; the scale as ``* s``, ``/ s``, ``/ math.sqrt(d)``,
  ``* d ** -0.5``, a pre-scaled q (or k), or none; masks as ``+ mask`` or ``masked_fill(mask, -inf /
  finfo.min)`` (nanoGPT's ``masked_fill(self.bias[:, :, :T, :T] == 0, float('-inf'))`` included); the
  softmax as ``F.softmax`` / ``torch.softmax`` / ``.softmax(-1)`` / an ``nn.Softmax(dim=-1)`` module;
  dtype casts anywhere in the chain and an optional dropout between the softmax and ``@ v``;
  q/k/v of shape (B, H, T, D) or (B·H, T, D).

The graph may come from ``symbolic_trace``, from dynamo (what a ``torch.compile`` backend receives:
torch-level calls, parameters as inputs) or from ``torch.export`` (ATen ops, before or after
``run_decompositions()``): ``passes.attention_graph`` reads their spellings alike (fused ATen SDPA
variants, decomposed matmuls and safe softmax, GQA ``repeat_kv``), and attention inlined from a Hugging
Face module is named by that module's path. ``surgeon.backend`` uses this path on every captured graph.

``plan_fx_attention`` / ``rewrite_fx_attention`` are what the ``LinearizeAttention`` handler calls for a
model without Hugging Face attention modules: every selected match is replaced by one
:class:`~surgeon.ops.fx_attention_unit.FxLinearAttention` call on the same q, k, v (and the masks
that still matter), and the nodes that computed the softmax attention are removed from the graph.

A mask made only of buffers, constants and sizes (nanoGPT's tril buffer, ``torch.ones(T, T).tril()``)
is evaluated on the example inputs: a causal pattern makes the site causal and is dropped, an
all-visible one is dropped, any other is kept. A mask computed from the inputs is kept and turned
into a key-padding mask at run time (a key is valid when any query may see it); when its example
value is causal the site is causal too.

Example:
    >>> import math, torch, torch.nn as nn
    >>> class Attn(nn.Module):
    ...     def forward(self, q, k, v):
    ...         return torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(8), dim=-1) @ v
    >>> gm = trace_for_attention(Attn())
    >>> [(m.kind, m.spelling, m.scale) for m in find_attention(gm)]
    [('softmax', 'matmul/transpose/softmax/matmul', 0.35355339059327373)]
"""
from __future__ import annotations

import operator
from typing import Any

import torch.fx as fx
import torch.nn as nn

from surgeon.core.errors import PlanError
from surgeon.fx.tracing import finish_graph
from surgeon.core.handler import PassContext
from surgeon.passes.attention import graph as ag
from surgeon.passes.attention.config import LinearizeAttention
from surgeon.core.report import Report
from surgeon.core.sites import Plan, Site
from surgeon.passes.attention.fx_scores import AttentionMatch, NEG_THRESHOLD, fx_is
from surgeon.passes.attention.fx_match import find_attention, impure
from surgeon.passes.attention.fx_trace import (
    allowed_keys,
    concrete_inputs,
    propagate,
    state_placeholders,
    trace_for_attention,
)
from surgeon.passes.attention.fx_plan import graph_inputs, plan_fx_attention

# ----------------------------------------------------------------------------------------------
# rewrite


def _scale_arg(gm: fx.GraphModule, match: AttentionMatch, before: fx.Node) -> Any:
    scale = match.scale
    if scale is None or isinstance(scale, (float, fx.Node)):
        return scale
    value: Any = 1.0
    with gm.graph.inserting_before(before):
        for factor, power in scale:
            op = operator.mul if power > 0 else operator.truediv
            value = gm.graph.call_function(op, (value, factor))
    return value




def _erase_dead(gm: fx.GraphModule, start: fx.Node) -> None:
    stack = [start]
    while stack:
        n = stack.pop()
        if n.graph is not gm.graph:
            continue
        for check in [u for u in n.users if fx_is(u, ag.ASSERTS)]:  # export's metadata checks of a dead value
            gm.graph.erase_node(check)
        if n.users or n.op in ("placeholder", "output") or impure(n):
            continue
        inputs = list(n.all_input_nodes)
        gm.graph.erase_node(n)
        stack.extend(i for i in inputs if i not in stack)


def rewrite_site(gm: fx.GraphModule, match: AttentionMatch, site: Site, unit: nn.Module) -> fx.Node:
    """Put ``unit`` at ``site.data['unit']`` and route the attention output through it."""
    if not gm.add_submodule(site.data["unit"], unit):
        raise PlanError(f"attention site {site.name!r}: cannot place its unit at {site.data['unit']!r}")
    masks = {n.name: n for n, _ in match.masks}
    out = match.output
    with gm.graph.inserting_before(out):
        k = match.k
        if match.k_perm is not None:
            k = gm.graph.call_method("permute", (k, *match.k_perm))
        scale = _scale_arg(gm, match, out)
        new = gm.graph.call_module(site.data["unit"], (match.q, k, match.v, *(masks[m] for m, _ in site.data["masks"])),
                                   {"scale": scale})
    new.meta = {key: value for key, value in out.meta.items() if key != "tensor_meta"}
    out.replace_all_uses_with(new)
    _erase_dead(gm, out)
    return new


def build_unit(site: Site, config: LinearizeAttention) -> nn.Module:
    from surgeon.ops.fx_attention_unit import FxLinearAttention

    d = site.data
    unit = FxLinearAttention(
        n_heads=d["heads"], n_kv_heads=d["kv_heads"], head_dim=d["head_dim"], ndim=d["ndim"],
        feature_map=config.feature_map, feature_dim=config.feature_dim, causal=d["causal"],
        window=config.window, window_weight_init=config.window_weight_init, local=config.local,
        image_grid=d.get("image_grid", False), n_prefix=d.get("n_prefix", 0), chunk_size=config.chunk_size,
        mask_kinds=[kind for _, kind in d["masks"]], replaced=d["spelling"], sinks=config.sinks,
        linear_weight_init=config.linear_weight_init,
    )
    unit.site_name = site.name
    return unit


def rewrite_fx_attention(model: nn.Module, config: LinearizeAttention, plan: Plan, ctx: PassContext) -> nn.Module:
    """Replace every planned site by an ``FxLinearAttention`` call; returns the rewritten GraphModule."""
    gm: fx.GraphModule = plan.state["gm"]
    matches: dict[str, AttentionMatch] = plan.state["matches"]
    units = [build_unit(site, config) for site in plan.sites]  # a failure here changes nothing
    for site, unit in zip(plan.sites, units):
        rewrite_site(gm, matches[site.name], site, unit)
    gm.graph.eliminate_dead_code(is_impure_node=impure)  # nothing of the replaced softmax attention is left
    finish_graph(gm)
    if ctx.example_inputs is not None:
        propagate(gm, concrete_inputs(ctx.example_inputs))
    return gm


def report_fx_attention(model: nn.Module, config: LinearizeAttention, plan: Plan, ctx: PassContext) -> Report:
    """One row per rewritten site: what it replaced, heads, features, window, causal, masks, parameters added."""
    rows = []
    for site in plan.sites:
        unit = model.get_submodule(site.data["unit"])
        d = site.data
        rows.append({
            "site": site.name, "replaced": d["spelling"], "heads": f"{d['heads']}/{d['kv_heads']}",
            "head_dim": d["head_dim"], "features": unit.feature_q.out_dim, "window": unit.window,
            "causal": d["causal"], "masks": ", ".join(d["mask_notes"]) or "-",
            "params_added": sum(p.numel() for p in unit.parameters()),
        })
    notes = []
    if plan.state.get("captured"):
        notes.append(plan.state["captured"])
    if plan.state.get("left"):
        notes.append("softmax / attention calls left as they are (LinearizeAttention(strict=True) makes this an "
                     "error):\n  " + "\n  ".join(plan.state["left"]))
    if any(site.data["dropout"] for site in plan.sites):
        notes.append("attention-weight dropout has no counterpart in linear attention and was dropped")
    return Report("LinearizeAttention", ["site", "replaced", "heads", "head_dim", "features", "window", "causal",
                                         "masks", "params_added"], rows,
                  totals={"params_added": sum(r["params_added"] for r in rows)}, notes=notes)

__all__ = ['find_attention', 'AttentionMatch', 'trace_for_attention', 'concrete_inputs', 'plan_fx_attention', 'allowed_keys', 'state_placeholders', 'graph_inputs', 'NEG_THRESHOLD', 'rewrite_fx_attention', 'report_fx_attention', 'rewrite_site', 'build_unit']
