"""FX attention matcher, second half: softmax / SDPA call sites, one :class:`AttentionMatch` per call.

See :mod:`surgeon.passes.attention.fx` for what the FX path recognises.
"""
from __future__ import annotations

from typing import Any

import torch.fx as fx
import torch.nn as nn

from surgeon.fx import patterns as graph_patterns
from surgeon.fx.tracing import node_shape
from surgeon.passes.attention import graph as ag
from surgeon.passes.attention.fx_scores import (
    AttentionMatch,
    CAST_METHODS,
    Reject,
    arg,
    fx_is,
    fx_ndim,
    fx_number,
    is_einsum,
    is_matmul,
    output_einsum,
    parse_scores,
    peel_prescale,
)

# -- softmax / sdpa --------------------------------------------------------------------------------


def _softmax_input(node: fx.Node, gm: fx.GraphModule) -> tuple[Any, Any, str] | None:
    """(input, dim, spelling) if ``node`` is a softmax call (torch, method, ATen or ``nn.Softmax``)."""
    if node.op in ("call_function", "call_method") and graph_patterns.is_op(node, "softmax"):
        return (node.args[0] if node.args else node.kwargs.get("input")), arg(node, 1, "dim"), "softmax"
    if node.op == "call_module":
        try:
            mod = gm.get_submodule(str(node.target))
        except AttributeError:
            return None
        if isinstance(mod, nn.Softmax):
            return node.args[0] if node.args else node.kwargs.get("input"), mod.dim, "nn.Softmax"
    return None


def _last_dim(dim: Any, ndim: int | None) -> bool:
    if not isinstance(dim, int):
        return False
    if dim == -1:
        return True
    return ndim is not None and dim == ndim - 1


def _plain_flattening(operand: fx.Node, weights: list[fx.Node]) -> bool:
    """``operand`` (read by a bmm) is the attention weights ``weights[0]`` (or a cast of them, later in
    ``weights``) reshaped to (B·H, Tq, Tk) with no reordering of their dims."""
    found = ag.batch_operand(operand)
    if found is None or found[1] or found[0] not in weights:
        return False
    before = weights[:weights.index(found[0]) + 1]
    return all(not fx_is(n, ag.LAYOUT) or (fx_is(n, ag.VIEWS) and node_shape(n) == node_shape(weights[0]))
               for n in before[1:])


def _match_softmax(node: fx.Node, gm: fx.GraphModule) -> AttentionMatch | None:
    found = _softmax_input(node, gm)
    if found is None:
        return None
    inp, dim, spelling = found
    ndim = fx_ndim(node) or fx_ndim(inp)
    if not isinstance(inp, fx.Node):
        return None
    if not _last_dim(dim, ndim):
        if isinstance(dim, int) and ndim is None and dim in (2, 3):
            ndim = dim + 1
        else:
            return None
    safe = ag.safe_softmax_tail(node, inp)  # aten._safe_softmax, decomposed
    scores = parse_scores(inp, ndim, ignore=safe[1] if safe else frozenset())
    if scores is None:
        return None
    # forward: softmax → (casts, dropout, views) → @ v
    chain: list[fx.Node] = []
    cur, dropout = (safe[0] if safe else node), False
    while True:
        users = ag.real_users(cur)
        if len(users) != 1:
            raise Reject(f"the attention weights ({cur.name}) are also used elsewhere (returned or read): "
                          "linear attention does not form them")
        nxt = users[0]
        is_drop = graph_patterns.is_op(nxt, "dropout", gm) and graph_patterns.target_name(nxt) != "native_dropout"
        if is_drop or fx_is(nxt, CAST_METHODS) or fx_is(nxt, ag.LAYOUT):
            dropout = dropout or is_drop
            chain.append(nxt)
            cur = nxt
            continue
        break
    out = nxt
    if is_matmul(nxt) and len(nxt.args) >= 2 and nxt.args[0] is cur and nxt.args[1] is not cur:
        v, out_spelling = nxt.args[1], ("bmm" if fx_is(nxt, ag.BMM) else "matmul")
        reordering = [n for n in chain if fx_is(n, ag.LAYOUT) and not fx_is(n, ag.VIEWS)]  # permute, unsqueeze...
        if ndim == 4 and fx_ndim(nxt) == 3:  # a decomposed 4-D matmul: bmm on (B·H, T, ·) views
            if reordering and not _plain_flattening(cur, [node] + chain):
                return None
            found_v = ag.batch_operand(v)
            v = ag.unflatten_batch(v) or (found_v[0] if found_v and not found_v[1] else None)
            v_shape, p_shape = node_shape(v) if v is not None else None, node_shape(node)
            shape = p_shape[:-1] + v_shape[-1:] if v_shape and p_shape else None
            out = (ag.reshaped_from(nxt, shape) or ag.batch_result(nxt, shape)) if shape else None
            if out is None:
                return None
        elif reordering or (fx_ndim(nxt) is not None and ndim is not None and fx_ndim(nxt) != ndim):
            return None
    elif is_einsum(nxt) and output_einsum(nxt) is not None and output_einsum(nxt)[0] is cur:
        v, out_spelling = output_einsum(nxt)[1], "einsum"
    else:
        return None
    if not isinstance(v, fx.Node):
        return None
    q, q_factors, q_removed = peel_prescale(scores.q, scores.q_user)
    k, k_factors, k_removed = peel_prescale(scores.k, scores.k_user)
    parts = [scores.spelling]
    if scores.masks:
        parts.append("+".join(kind if kind != "fill" else "masked_fill" for _, kind in scores.masks))
    parts.append(spelling)
    if dropout:
        parts.append("dropout")
    parts.append(out_spelling)
    return AttentionMatch(
        kind="softmax", anchor=node, output=out, q=q, k=k, v=v, k_perm=scores.k_perm,
        scale_terms=q_factors + k_factors + scores.factors, masks=scores.masks, dropout=dropout,
        spelling="/".join(parts),
        nodes=q_removed + k_removed + scores.chain + [scores.core, node] + chain + [nxt],
    )


def _match_sdpa(node: fx.Node) -> AttentionMatch | None:
    if not (node.op == "call_function" and ag.is_sdpa(node)):
        return None
    args, output = ag.sdpa_arguments(node)
    if output is None:
        raise Reject(f"{node.name}: more than the attention output of {graph_patterns.target_name(node)} is used "
                      "(its log-sum-exp?); linear attention does not compute it")
    q, k, v = args["query"], args["key"], args["value"]
    if not all(isinstance(x, fx.Node) for x in (q, k, v)):
        return None
    is_causal = args["is_causal"] or False
    if not isinstance(is_causal, bool):
        raise Reject(f"{node.name}: is_causal is computed in the graph ({is_causal}); it must be a constant")
    scale = args["scale"]
    masks = [(args["attn_mask"], "sdpa")] if isinstance(args["attn_mask"], fx.Node) else []
    return AttentionMatch(
        kind="sdpa", anchor=node, output=output, q=q, k=k, v=v,
        scale_terms=[] if scale is None else [(scale, 1)], default_scale=scale is None,
        masks=masks, is_causal=is_causal, dropout=fx_number(args["dropout_p"]) not in (None, 0.0),
        spelling="sdpa" + ("/mask" if masks else "") + ("/is_causal" if is_causal else ""), nodes=[node],
    )


def _module(gm: fx.GraphModule, node: fx.Node) -> nn.Module | None:
    try:
        return gm.get_submodule(str(node.target))
    except AttributeError:
        return None


def _dead_nodes(gm: fx.GraphModule, match: AttentionMatch) -> list[fx.Node]:
    """Nodes left without a use once ``match.output`` is replaced (graph order)."""
    keep = {match.q, match.k, match.v, *(m for m, _ in match.masks)}
    keep |= {value for value, _ in match.scale_terms if isinstance(value, fx.Node)}
    dead: set[fx.Node] = {match.output}
    stack = list(match.output.all_input_nodes)
    candidates: set[fx.Node] = set()
    while stack:
        n = stack.pop()
        if n in candidates or n in keep or n.op in ("placeholder", "output"):
            continue
        candidates.add(n)
        stack.extend(n.all_input_nodes)
    for n in reversed(gm.graph.nodes):
        if n in candidates and all(u in dead or fx_is(u, ag.ASSERTS) for u in n.users) and not impure(n):
            dead.add(n)
    return [n for n in gm.graph.nodes if n in dead]


def _unrepeat(match: AttentionMatch) -> None:
    """Read GQA keys/values before their ``repeat_kv``: the unit then keeps one feature map per key head."""
    if match.k_perm is not None:
        return
    rk, rv = ag.unrepeat_kv(match.k), ag.unrepeat_kv(match.v)
    if rk is not None and rv is not None and rk[1] == rv[1]:
        match.k, match.v, match.repeat_kv = rk[0], rv[0], rk[1]


def find_attention(gm: fx.GraphModule, skipped: list[str] | None = None) -> list[AttentionMatch]:
    """Every attention call site of a traced graph, in graph order (see the module docstring).

    The graph may come from ``symbolic_trace``, from dynamo (a ``torch.compile`` backend's graph) or
    from ``torch.export`` (ATen, before or after ``run_decompositions()``): the same patterns are
    read through ``passes.attention_graph``. Softmaxes that look like attention but cannot be
    rewritten (their weights are used elsewhere) are left out; ``skipped`` (a list) receives the
    reason for each.
    """
    matches: list[AttentionMatch] = []
    for node in gm.graph.nodes:
        try:
            match = _match_sdpa(node) or _match_softmax(node, gm)
        except Reject as e:
            if skipped is not None:
                skipped.append(f"{node.name}: {e}")
            continue
        if match is not None:
            _unrepeat(match)
            match.dead = _dead_nodes(gm, match)
            matches.append(match)
    return matches




def impure(n: fx.Node) -> bool:
    """Side effects that keep an unused node (ATen SDPA and dropout count as impure: random when training)."""
    return n.is_impure() and not (ag.is_sdpa(n) or graph_patterns.is_op(n, "dropout"))


def attention_like_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    """Every softmax and scaled-dot-product-attention call of the graph (matched or not), in graph order."""
    return [n for n in gm.graph.nodes if _softmax_input(n, gm) is not None
            or (n.op == "call_function" and ag.is_sdpa(n))]
