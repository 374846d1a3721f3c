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

import contextlib
import math
import operator
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from surgeon.fx import patterns as graph_patterns
from surgeon.core.errors import ConfigError, PlanError
from surgeon.fx.tracing import (
    SurgeonTracer,
    finish_graph,
    free_attr_name,
    node_shape,
    trace,
)
from surgeon.core.handler import PassContext, match_recorded
from surgeon.passes.attention import graph as ag
from surgeon.passes.attention.config import LinearizeAttention
from surgeon.core.report import Report
from surgeon.core.selectors import select_sites
from surgeon.core.sites import Plan, Site

# ----------------------------------------------------------------------------------------------
# what the matcher recognises

# one table per piece, with torch-level, method and ATen spellings (passes.attention_graph)
_MATMUL = {operator.matmul, torch.matmul, torch.Tensor.matmul, "matmul", "__matmul__"} | ag.BMM | ag._packets("matmul")
_CAST_METHODS = ag.CASTS
_MUL, _DIV, _ADD, _MASKED_FILL = ag.MUL, ag.DIV, ag.ADD, ag.MASKED_FILL
_TRANSPOSE, _PERMUTE = ag.TRANSPOSE, ag.PERMUTE
NEG_THRESHOLD = -1e4  # an additive mask value at or below this hides the key (-inf, finfo.min, -1e9, -1e4)


def _is(node: Any, targets: set) -> bool:
    return ag.is_call(node, targets)


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _arg(node: fx.Node, i: int, name: str, default: Any = None) -> Any:
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(name, default)


def _ndim(node: Any) -> int | None:
    shape = node_shape(node) if isinstance(node, fx.Node) else None
    return len(shape) if shape is not None else None


@dataclass
class AttentionMatch:
    """One attention call site in a traced graph.

    ``scale`` is a float, a node (a scale computed in the graph), ``None`` (SDPA's default
    1/√head_dim) or, for products of several computed factors, the list ``scale_terms`` of
    ``(factor, ±1)``. ``masks`` holds ``(node, kind)`` with kind ``fill`` (True hides the key),
    ``additive`` (≤ -1e4 hides it) or ``sdpa`` (bool: True keeps it; float: additive).
    ``k_perm``: when the graph only holds kᵀ, the permutation that turns ``k`` into (…, T, D).
    ``dead``: the nodes that have no use left once ``output`` is replaced (q, k, v, masks and scale
    nodes kept).
    """

    kind: str  # "sdpa" | "softmax"
    anchor: fx.Node  # the sdpa / softmax call (names the site)
    output: fx.Node  # the node whose value is the attention output
    q: fx.Node
    k: fx.Node
    v: fx.Node
    k_perm: tuple[int, ...] | None = None
    scale_terms: list[tuple[Any, int]] = field(default_factory=list)
    default_scale: bool = False
    masks: list[tuple[fx.Node, str]] = field(default_factory=list)
    is_causal: bool = False
    dropout: bool = False
    repeat_kv: int = 1  # k/v were (B, H_kv, T, D) repeated this many times per head (GQA); q, k, v are the originals
    spelling: str = ""
    nodes: list[fx.Node] = field(default_factory=list)
    dead: list[fx.Node] = field(default_factory=list)

    @property
    def scale(self) -> float | fx.Node | list[tuple[Any, int]] | None:
        if self.default_scale:
            return None
        coeff = 1.0
        computed = []
        for value, power in self.scale_terms:
            number = _number(value)
            if number is None:
                computed.append((value, power))
            else:
                coeff = coeff * number if power > 0 else coeff / number
        if not computed:
            return coeff
        if len(computed) == 1 and computed[0][1] == 1 and coeff == 1.0:
            return computed[0][0]
        return list(self.scale_terms)

    @property
    def ndim(self) -> int | None:
        return _ndim(self.q) or _ndim(self.output)


class _Reject(Exception):
    """A softmax / matmul that looked like attention but is not one the rewrite can take (reason)."""


# -- scores: q @ kᵀ ---------------------------------------------------------------------------------


def _parse_einsum(equation: str) -> tuple[list[str], str] | None:
    eq = equation.replace(" ", "").replace("...", "*")
    if "->" not in eq:
        return None
    lhs, out = eq.split("->")
    ops = lhs.split(",")
    return (ops, out) if len(ops) == 2 else None


def _einsum_operands(node: fx.Node) -> list[Any]:
    rest = list(node.args[1:])
    return list(rest[0]) if len(rest) == 1 and isinstance(rest[0], (list, tuple)) else rest


def _batched_einsum(node: fx.Node) -> tuple[str, str, str, list[fx.Node]] | None:
    """A two-operand einsum over matching batch dims (all but the last two): (a, b, out, operands)."""
    parsed = _parse_einsum(node.args[0]) if node.args and isinstance(node.args[0], str) else None
    operands = _einsum_operands(node)
    if parsed is None or len(operands) != 2:
        return None
    (a, b), out = parsed
    if not (len(a) == len(b) == len(out) >= 3 and a[:-2] == b[:-2] == out[:-2]):
        return None
    return a, b, out, operands


def _scores_einsum(node: fx.Node) -> tuple[fx.Node, fx.Node, bool] | None:
    """``einsum('bhqd,bhkd->bhqk', q, k)`` → (q, k, k_is_transposed)."""
    found = _batched_einsum(node)
    if found is None:
        return None
    a, b, out, operands = found
    i, d = a[-2], a[-1]
    if d in out or out[-2] != i:
        return None
    if b[-1] == d and out[-1] == b[-2] and b[-2] != i:
        return operands[0], operands[1], False
    if b[-2] == d and out[-1] == b[-1] and b[-1] != i:
        return operands[0], operands[1], True
    return None


def _output_einsum(node: fx.Node) -> tuple[fx.Node, fx.Node] | None:
    """``einsum('bhqk,bhkd->bhqd', p, v)`` → (p, v)."""
    found = _batched_einsum(node)
    if found is None:
        return None
    a, b, out, operands = found
    i, j = a[-2], a[-1]
    if b[-2] == j and out[-2] == i and out[-1] == b[-1] and b[-1] not in (i, j):
        return operands[0], operands[1]
    return None


def _is_matmul(node: Any) -> bool:
    return ag.is_call(node, _MATMUL)


def _is_einsum(node: Any) -> bool:
    return ag.is_call(node, ag.EINSUM)


def _normal_dims(dims: Sequence[int], ndim: int | None) -> list[int] | None:
    if ndim is None:
        if all(d < 0 for d in dims):
            return None
        if any(d < 0 for d in dims):
            return None
        return list(dims)
    return [d % ndim for d in dims]


def _untranspose(kt: Any, ndim: int | None) -> tuple[fx.Node, tuple[int, ...] | None, str] | None:
    """kᵀ → (k node, permutation to apply to it or None, spelling)."""
    if not isinstance(kt, fx.Node):
        return None
    if _is(kt, _TRANSPOSE):
        a, b = _arg(kt, 1, "dim0"), _arg(kt, 2, "dim1")
        if not (isinstance(a, int) and isinstance(b, int)):
            return None
        if {a, b} == {-2, -1}:
            return kt.args[0], None, "transpose"
        dims = _normal_dims((a, b), ndim)
        if dims is None:
            return None
        last = (ndim - 1) if ndim is not None else max(dims)
        if set(dims) == {last - 1, last}:
            return kt.args[0], None, "transpose"
        return None
    if kt.op == "call_function" and kt.target is getattr and kt.args[1:] == ("mT",):
        return kt.args[0], None, "mT"
    if _is(kt, _PERMUTE):
        rest = kt.args[1:]
        dims = list(rest[0]) if len(rest) == 1 and isinstance(rest[0], (list, tuple)) else list(rest)
        if not dims and "dims" in kt.kwargs:
            dims = list(kt.kwargs["dims"])
        if not dims or not all(isinstance(d, int) for d in dims):
            return None
        dims = [d % len(dims) for d in dims]
        swapped = dims[:-2] + [dims[-1], dims[-2]]
        perm = None if swapped == list(range(len(dims))) else tuple(swapped)
        return kt.args[0], perm, "permute"
    return None


@dataclass
class _Scores:
    q: fx.Node
    k: fx.Node
    k_perm: tuple[int, ...] | None
    core: fx.Node
    spelling: str
    k_user: fx.Node | None = None  # the node that reads k (kᵀ, or the core)
    q_user: fx.Node | None = None  # the node that reads q (None: any single reader)
    factors: list[tuple[Any, int]] = field(default_factory=list)
    masks: list[tuple[fx.Node, str]] = field(default_factory=list)
    chain: list[fx.Node] = field(default_factory=list)


def _single_user(node: fx.Node, ignore: frozenset | set = frozenset()) -> bool:
    return len([u for u in ag.real_users(node) if u not in ignore]) == 1


def _flattened_core(node: fx.Node) -> _Scores | None:
    """``view(bmm(view(q), view(kᵀ)), (B, H, Tq, Tk))``: a 4-D ``matmul`` decomposed by torch.export."""
    if not _is(node, ag.LAYOUT) or _ndim(node) != 4:
        return None
    mm = ag.back_chain(node)[0]  # through layout ops (core-ATen einsum moves size-1 dims around)
    if not (_is_matmul(mm) and _single_user(mm) and len(mm.args) >= 2 and _ndim(mm) == 3):
        return None
    if not (_is(node, ag.RESHAPE) and node.args[0] is mm) and ag.batch_result(mm, node_shape(node)) is not node:
        return None
    q4 = ag.unflatten_batch(mm.args[0])
    if q4 is None:
        found_q = ag.batch_operand(mm.args[0])
        if found_q is None or found_q[1]:
            return None
        q4 = found_q[0]
    kt4 = ag.unflatten_batch(mm.args[1])
    if kt4 is None:
        found_k = ag.batch_operand(mm.args[1])
        if found_k is None:
            return None
        if found_k[1]:  # the bmm reads k (B, H, Tk, D) itself, transposed by the layout ops
            return _Scores(q4, found_k[0], None, node, "bmm/view", k_user=None, chain=[mm])
        kt4 = found_k[0]
    kt, factors, _ = _peel_prescale(kt4, None)
    found = _untranspose(kt, 4)
    if found is None or not isinstance(found[0], fx.Node):
        return None
    k, perm, how = found
    return _Scores(q4, k, perm, node, f"bmm/{how}", k_user=kt, factors=factors, chain=[mm])


def _scores_core(node: fx.Node, ndim: int | None) -> _Scores | None:
    if _is_einsum(node):
        found = _scores_einsum(node)
        if found is None:
            return None
        q, k, transposed = found
        if not (isinstance(q, fx.Node) and isinstance(k, fx.Node)):
            return None
        perm = None
        if transposed:
            nd = ndim or _ndim(k)
            if nd is None:
                return None
            perm = tuple(list(range(nd - 2)) + [nd - 1, nd - 2])
        return _Scores(q, k, perm, node, "einsum", k_user=node, q_user=node)
    flattened = _flattened_core(node)
    if flattened is not None:
        return flattened
    if _is_matmul(node) and len(node.args) >= 2:
        q, kt = node.args[0], node.args[1]
        if not isinstance(q, fx.Node):
            return None
        nd = ndim or _ndim(kt) or (3 if _is(node, ag.BMM) else None)
        found = _untranspose(kt, nd)
        if found is None:
            return None
        k, perm, how = found
        if not isinstance(k, fx.Node):
            return None
        chain = [kt] if _single_user(kt) else []
        name = "bmm" if _is(node, ag.BMM) else "matmul"
        return _Scores(q, k, perm, node, f"{name}/{how}", k_user=kt, q_user=node, chain=chain)
    return None


def _parse_scores(node: Any, ndim: int | None, depth: int = 0, ignore: frozenset | set = frozenset()
                  ) -> _Scores | None:
    """Walk back from the softmax input: scale factors, masks and casts down to q @ kᵀ.

    ``ignore``: readers of the softmax input besides the softmax (a decomposed safe softmax's guard).
    """
    if not isinstance(node, fx.Node) or depth > 16 or not _single_user(node, ignore if depth == 0 else frozenset()):
        return None
    core = _scores_core(node, ndim)
    if core is not None:
        return core

    def below(inner: Any, factor: tuple[Any, int] | None = None, mask: tuple[Any, str] | None = None
              ) -> _Scores | None:
        found = _parse_scores(inner, ndim, depth + 1)
        if found is None:
            return None
        found.chain.append(node)
        if factor is not None:
            found.factors.append(factor)
        if mask is not None:
            found.masks.append(mask)
        return found

    if _is(node, _CAST_METHODS):
        return below(node.args[0])
    if _is(node, _MUL) and len(node.args) == 2:
        a, b = node.args
        for x, y in ((a, b), (b, a)):
            if isinstance(x, fx.Node) and _scalar_like(y):
                found = below(x, factor=(y, 1))
                if found is not None:
                    return found
        return None
    if _is(node, _DIV) and len(node.args) == 2 and not node.kwargs.get("rounding_mode"):
        a, b = node.args
        return below(a, factor=(b, -1)) if _scalar_like(b) else None
    if _is(node, _ADD) and len(node.args) == 2 and "alpha" not in node.kwargs:
        a, b = node.args
        if _number(b) is not None:
            return below(a)  # a constant shift: softmax ignores it
        if _number(a) is not None:
            return below(b)
        for x, y in ((a, b), (b, a)):
            if isinstance(x, fx.Node) and isinstance(y, fx.Node):
                found = below(x, mask=(y, "additive"))
                if found is not None:
                    return found
        return None
    if _is(node, _MASKED_FILL):
        mask, value = _arg(node, 1, "mask"), _arg(node, 2, "value")
        number = _number(value)
        if isinstance(mask, fx.Node) and number is not None and number <= NEG_THRESHOLD:
            return below(node.args[0], mask=(mask, "fill"))
    return None


def _scalar_like(value: Any) -> bool:
    """A number, or a node that is not a tensor with more than one element."""
    if _number(value) is not None:
        return True
    if not isinstance(value, fx.Node):
        return False
    shape = node_shape(value)
    if shape is None:
        return "tensor_meta" not in value.meta or value.meta.get("tensor_meta") is None
    return math.prod(shape) == 1


def _peel_prescale(node: fx.Node, user: fx.Node | None) -> tuple[fx.Node, list[tuple[Any, int]], list[fx.Node]]:
    """``q * s`` / ``q / s`` feeding only the scores (through ``user``; None: any single reader):
    (q, factors, removed nodes)."""
    factors: list[tuple[Any, int]] = []
    removed: list[fx.Node] = []
    while _single_user(node) and (user is None or user in node.users):
        if _is(node, _MUL) and len(node.args) == 2:
            a, b = node.args
            if isinstance(a, fx.Node) and _number(b) is not None:
                factors.append((b, 1))
                removed.append(node)
                user, node = node, a
                continue
            if isinstance(b, fx.Node) and _number(a) is not None:
                factors.append((a, 1))
                removed.append(node)
                user, node = node, b
                continue
        if _is(node, _DIV) and len(node.args) == 2 and isinstance(node.args[0], fx.Node) \
                and _number(node.args[1]) is not None and not node.kwargs.get("rounding_mode"):
            factors.append((node.args[1], -1))
            removed.append(node)
            user, node = node, node.args[0]
            continue
        break
    return node, factors, removed


# -- softmax / sdpa --------------------------------------------------------------------------------


def _softmax_input(node: fx.Node, gm: fx.GraphModule) -> tuple[Any, Any, str] | None:
    """(input, dim, spelling) if ``node`` is a softmax call (torch, method, ATen or ``nn.Softmax``)."""
    if node.op in ("call_function", "call_method") and graph_patterns.is_op(node, "softmax"):
        return (node.args[0] if node.args else node.kwargs.get("input")), _arg(node, 1, "dim"), "softmax"
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
    return all(not _is(n, ag.LAYOUT) or (_is(n, ag.VIEWS) and node_shape(n) == node_shape(weights[0]))
               for n in before[1:])


def _match_softmax(node: fx.Node, gm: fx.GraphModule) -> AttentionMatch | None:
    found = _softmax_input(node, gm)
    if found is None:
        return None
    inp, dim, spelling = found
    ndim = _ndim(node) or _ndim(inp)
    if not isinstance(inp, fx.Node):
        return None
    if not _last_dim(dim, ndim):
        if isinstance(dim, int) and ndim is None and dim in (2, 3):
            ndim = dim + 1
        else:
            return None
    safe = ag.safe_softmax_tail(node, inp)  # aten._safe_softmax, decomposed
    scores = _parse_scores(inp, ndim, ignore=safe[1] if safe else frozenset())
    if scores is None:
        return None
    # forward: softmax → (casts, dropout, views) → @ v
    chain: list[fx.Node] = []
    cur, dropout = (safe[0] if safe else node), False
    while True:
        users = ag.real_users(cur)
        if len(users) != 1:
            raise _Reject(f"the attention weights ({cur.name}) are also used elsewhere (returned or read): "
                          "linear attention does not form them")
        nxt = users[0]
        is_drop = graph_patterns.is_op(nxt, "dropout", gm) and graph_patterns.target_name(nxt) != "native_dropout"
        if is_drop or _is(nxt, _CAST_METHODS) or _is(nxt, ag.LAYOUT):
            dropout = dropout or is_drop
            chain.append(nxt)
            cur = nxt
            continue
        break
    out = nxt
    if _is_matmul(nxt) and len(nxt.args) >= 2 and nxt.args[0] is cur and nxt.args[1] is not cur:
        v, out_spelling = nxt.args[1], ("bmm" if _is(nxt, ag.BMM) else "matmul")
        reordering = [n for n in chain if _is(n, ag.LAYOUT) and not _is(n, ag.VIEWS)]  # permute, unsqueeze...
        if ndim == 4 and _ndim(nxt) == 3:  # a decomposed 4-D matmul: bmm on (B·H, T, ·) views
            if reordering and not _plain_flattening(cur, [node] + chain):
                return None
            found_v = ag.batch_operand(v)
            v = ag.unflatten_batch(v) or (found_v[0] if found_v and not found_v[1] else None)
            v_shape, p_shape = node_shape(v) if v is not None else None, node_shape(node)
            shape = p_shape[:-1] + v_shape[-1:] if v_shape and p_shape else None
            out = (ag.reshaped_from(nxt, shape) or ag.batch_result(nxt, shape)) if shape else None
            if out is None:
                return None
        elif reordering or (_ndim(nxt) is not None and ndim is not None and _ndim(nxt) != ndim):
            return None
    elif _is_einsum(nxt) and _output_einsum(nxt) is not None and _output_einsum(nxt)[0] is cur:
        v, out_spelling = _output_einsum(nxt)[1], "einsum"
    else:
        return None
    if not isinstance(v, fx.Node):
        return None
    q, q_factors, q_removed = _peel_prescale(scores.q, scores.q_user)
    k, k_factors, k_removed = _peel_prescale(scores.k, scores.k_user)
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
        raise _Reject(f"{node.name}: more than the attention output of {graph_patterns.target_name(node)} is used "
                      "(its log-sum-exp?); linear attention does not compute it")
    q, k, v = args["query"], args["key"], args["value"]
    if not all(isinstance(x, fx.Node) for x in (q, k, v)):
        return None
    is_causal = args["is_causal"] or False
    if not isinstance(is_causal, bool):
        raise _Reject(f"{node.name}: is_causal is computed in the graph ({is_causal}); it must be a constant")
    scale = args["scale"]
    masks = [(args["attn_mask"], "sdpa")] if isinstance(args["attn_mask"], fx.Node) else []
    return AttentionMatch(
        kind="sdpa", anchor=node, output=output, q=q, k=k, v=v,
        scale_terms=[] if scale is None else [(scale, 1)], default_scale=scale is None,
        masks=masks, is_causal=is_causal, dropout=_number(args["dropout_p"]) not in (None, 0.0),
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
        if n in candidates and all(u in dead or _is(u, ag.ASSERTS) for u in n.users) and not _impure(n):
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
        except _Reject as e:
            if skipped is not None:
                skipped.append(str(e))
            continue
        if match is not None:
            _unrepeat(match)
            match.dead = _dead_nodes(gm, match)
            matches.append(match)
    return matches


# ----------------------------------------------------------------------------------------------
# tracing and example values


@contextlib.contextmanager
def _buffers_as_graph_values() -> Iterator[None]:
    """Trace buffers as ``get_attr`` nodes, so ``self.bias[:, :, :T, :T]`` (a proxy size) traces.

    TODO(surgeon.fx.tracing): a ``proxy_buffers`` option of ``trace`` would make this unnecessary.
    """
    old = SurgeonTracer.__dict__.get("proxy_buffer_attributes", None)
    SurgeonTracer.proxy_buffer_attributes = True
    try:
        yield
    finally:
        if old is None:
            del SurgeonTracer.proxy_buffer_attributes
        else:
            SurgeonTracer.proxy_buffer_attributes = old


def trace_for_attention(model: nn.Module, leaf_modules: Sequence[str] = ()) -> fx.GraphModule:
    """``surgeon.fx.tracing.trace`` with buffers traced as graph values (nanoGPT's sliced tril mask)."""
    with _buffers_as_graph_values():
        return trace(model, leaf_modules)


class _Capture(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, wanted: set[fx.Node]) -> None:
        super().__init__(gm)
        self.wanted = wanted
        self.values: dict[fx.Node, Any] = {}

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        if n in self.wanted:
            self.values[n] = out.detach().clone() if isinstance(out, torch.Tensor) else out
        return out


@contextlib.contextmanager
def _eval_mode(gm: fx.GraphModule) -> Iterator[None]:
    """Eval mode while planning, modes restored (a ``torch.export`` module keeps the mode it was exported in)."""
    modes = {m: m.training for m in gm.modules()}
    try:
        with contextlib.suppress(NotImplementedError):
            gm.eval()
        yield
    finally:
        for m, mode in modes.items():
            m.training = mode


def concrete_inputs(example_inputs: Sequence[Any]) -> tuple[Any, ...]:
    """Example inputs with dynamo's symbolic sizes (a dynamic graph's ``SymInt`` inputs) as plain ints."""
    return tuple(_hint(v) if isinstance(v, torch.SymInt) else v for v in example_inputs)


def _hint(v: torch.SymInt) -> int:
    """A symbolic size's example value, read without adding a guard (``int(v)`` would specialize the
    compiled graph to this size and recompile it at every new length)."""
    hint = getattr(getattr(v, "node", None), "hint", None)
    return int(hint) if hint is not None else int(v)


class _Shapes(fx.Interpreter):
    """Shape propagation on real values. ``ShapeProp`` would adopt the fake mode of a running
    ``torch.compile`` and add size guards to it (one recompilation per new sequence length)."""

    def run_node(self, n: fx.Node) -> Any:
        from torch.fx.passes.shape_prop import _extract_tensor_metadata

        out = super().run_node(n)
        if isinstance(out, torch.Tensor):
            n.meta["tensor_meta"] = _extract_tensor_metadata(out)
        return out


def _propagate(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> None:
    with _eval_mode(gm), torch.no_grad():
        _Shapes(gm).run(*example_inputs)


def _capture(gm: fx.GraphModule, example_inputs: Sequence[Any], nodes: set[fx.Node]) -> dict[fx.Node, Any]:
    with _eval_mode(gm):
        with torch.no_grad():
            interp = _Capture(gm, nodes)
            interp.run(*example_inputs)
    return interp.values


_SHAPE_ONLY = {"size", "dim", "numel"}
_SYM_SIZE = ag._packets("sym_size", "sym_numel", "sym_stride")


def state_placeholders(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> set[fx.Node]:
    """Placeholders that are not data: parameters and buffers (dynamo lifts them to inputs) and sizes
    (dynamo's symbolic ints)."""
    state = set()
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for node, value in zip(placeholders, example_inputs):
        name = getattr(getattr(node.meta.get("grapharg"), "source", None), "name", "")
        source = str(name() if callable(name) else name)
        if isinstance(value, nn.Parameter) or not isinstance(value, torch.Tensor) or \
                "_buffers" in source or "_parameters" in source or \
                node.name.startswith(("l_self_buffers_", "l_self_parameters_")) or "_buffers_" in node.name:
            state.add(node)
    return state


def _data_dependent(node: fx.Node, state: set[fx.Node] | frozenset = frozenset()) -> bool:
    """True when ``node`` reads the *values* of a model input (not only its sizes, dtype or device);
    ``state`` placeholders (parameters, buffers, sizes) are not inputs."""
    seen: set[fx.Node] = set()
    stack = [node]
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if n.op == "placeholder":
            if n in state:
                continue
            return True
        if (n.op == "call_method" and n.target in _SHAPE_ONLY) or _is(n, _SYM_SIZE):
            continue
        if n.op == "call_function" and n.target is getattr and n.args[1:2] and \
                n.args[1] in ("shape", "dtype", "device", "ndim"):
            continue
        stack.extend(n.all_input_nodes)
    return False


def allowed_keys(mask: torch.Tensor, kind: str) -> torch.Tensor:
    """Bool tensor, True where a query may attend to a key, from a mask of the given kind."""
    if kind == "fill":
        return ~mask.bool()
    if mask.dtype == torch.bool:
        return mask if kind == "sdpa" else torch.ones_like(mask)
    return mask > NEG_THRESHOLD


def _pattern(allowed: torch.Tensor) -> str:
    """'all', 'causal' (exactly j ≤ i), 'lower' (some j < i seen, nothing above the diagonal) or 'other'."""
    if allowed.dim() < 2:
        return "all" if bool(allowed.all()) else "other"
    tq, tk = allowed.shape[-2:]
    if bool(allowed.all()):
        return "all"
    if tq != tk or tq < 2:
        return "other"
    tril = torch.ones(tq, tk, dtype=torch.bool, device=allowed.device).tril()
    if bool((allowed == tril).all()):
        return "causal"
    strictly_lower = tril.tril(-1)
    if not bool((allowed & ~tril).any()) and bool((allowed & strictly_lower).any()):
        return "lower"
    return "other"


# ----------------------------------------------------------------------------------------------
# plan


def _base_name(match: AttentionMatch, gm: fx.GraphModule | None = None) -> str:
    node = match.anchor
    if node.op == "call_module":
        return str(node.target)
    scope = graph_patterns.module_scope(node, gm)
    leaf = "sdpa" if match.kind == "sdpa" else "softmax"
    return f"{scope}.{leaf}" if scope else leaf


def _grid(n_tokens: int) -> tuple[tuple[int, int] | None, int]:
    for prefix in (1, 0):
        side = math.isqrt(max(n_tokens - prefix, 0))
        if side > 1 and side * side == n_tokens - prefix:
            return (side, side), prefix
    return None, 0


def _describe_types(model: nn.Module, limit: int = 12) -> list[str]:
    seen: list[str] = []
    for m in model.modules():
        if type(m).__name__ not in seen:
            seen.append(type(m).__name__)
    return seen[:limit] + (["..."] if len(seen) > limit else [])


_CONV = {F.conv2d, torch.conv2d} | ag._packets("convolution", "conv2d", "_convolution")


def _has_conv2d(model: nn.Module) -> bool:
    """An image model (patch embedding by a 2-D convolution), as a module or as a call in the graph
    (dynamo and torch.export inline ``nn.Conv2d``)."""
    if any(isinstance(m, nn.Conv2d) for m in model.modules()):
        return True
    graph = getattr(model, "graph", None)
    return graph is not None and any(
        _is(n, _CONV) and len(node_shape(n.args[1]) or []) == 4 for n in graph.nodes
        if len(n.args) > 1 and isinstance(n.args[1], fx.Node))


def _site_data(match: AttentionMatch, values: dict[fx.Node, Any], model: nn.Module, config: LinearizeAttention,
               name: str, state: set[fx.Node] | frozenset = frozenset()) -> dict[str, Any]:
    q_shape, k_shape, v_shape = node_shape(match.q), node_shape(match.k), node_shape(match.v)
    if q_shape is None or k_shape is None or v_shape is None:
        raise PlanError(f"attention site {name!r}: no shapes were recorded for q/k/v; check example_inputs")
    if match.k_perm is not None:
        k_shape = [k_shape[i] for i in match.k_perm]
    nd = len(q_shape)
    if nd not in (3, 4) or len(k_shape) != nd or len(v_shape) != nd:
        raise PlanError(f"attention site {name!r}: q/k/v have shapes {q_shape}/{k_shape}/{v_shape}; the FX path "
                        "takes (batch, heads, tokens, head_dim) or (batch·heads, tokens, head_dim)")
    heads = q_shape[1] if nd == 4 else 1
    kv_heads = k_shape[1] if nd == 4 else 1
    if heads % kv_heads:
        raise PlanError(f"attention site {name!r}: {heads} query heads are not a multiple of {kv_heads} key heads")
    mask_rows, causal_from, kept = [], None, []
    for node, kind in match.masks:
        value = values.get(node)
        if not isinstance(value, torch.Tensor):
            raise PlanError(f"attention site {name!r}: mask {node.name} is not a tensor ({type(value).__name__})")
        pattern = _pattern(allowed_keys(value, kind))
        structural = not _data_dependent(node, state)
        if structural and pattern in ("causal", "all"):
            causal_from = causal_from or ("mask" if pattern == "causal" else None)
            mask_rows.append(f"{node.name}:{kind}:{pattern}:dropped")
            continue
        if pattern in ("causal", "lower"):
            causal_from = "mask"
        kept.append([node.name, kind])
        mask_rows.append(f"{node.name}:{kind}:{'structural' if structural else 'input'}:{pattern}")
    causal = bool(match.is_causal) or causal_from is not None
    scale = match.scale
    computed = not (scale is None or isinstance(scale, float))
    if scale is None:  # SDPA's default
        scale = q_shape[-1] ** -0.5
    elif computed:  # its value on the example inputs, for the report
        scale = 1.0
        for factor, power in match.scale_terms:
            value = float(values[factor]) if isinstance(factor, fx.Node) else float(factor)
            scale = scale * value if power > 0 else scale / value
    grid, n_prefix = (None, 0)
    if config.local and nd in (3, 4) and _has_conv2d(model):
        grid, n_prefix = _grid(q_shape[-2])
    return {
        "spelling": match.spelling, "causal": causal, "heads": heads, "kv_heads": kv_heads,
        "repeat_kv": match.repeat_kv,
        "head_dim": q_shape[-1], "v_dim": v_shape[-1], "ndim": nd, "tokens": [q_shape[-2], k_shape[-2]],
        "scale": scale, "scale_computed": computed, "masks": kept, "mask_notes": mask_rows, "dropout": match.dropout,
        "image_grid": grid is not None, "n_prefix": n_prefix,
    }


def _check_tokens(where: str, data: dict[str, Any], causal: bool) -> None:
    tq, tk = data["tokens"]
    if tq < tk and (causal or data.get("named_by_module")):
        raise PlanError(f"{where} attends {tq} queries to {tk} keys: a decode step over cached keys. Linear attention "
                        "in a rewritten graph has no recurrent state; compile the prefill (use_cache=False), and "
                        "decode with the eager surgered model (surgeon.restore), which keeps its state in the cache")


def _check_site(name: str, data: dict[str, Any], config: LinearizeAttention) -> None:
    causal = data["causal"]
    where = f"attention site {name!r}"
    if data.get("named_by_module") and data["tokens"][0] < data["tokens"][1]:
        _check_tokens(where, data, causal)
    if config.gate == "liger":
        raise ConfigError(f"gate='liger' derives its decay from a pretrained key projection (k_proj), which the FX "
                          f"path does not have ({where} is hand-written attention in a traced graph). The Liger "
                          "gate needs the Hugging Face module path; use gate='learned' or gate='none' here")
    if config.causal is True and not causal:
        raise ConfigError(f"causal=True was asked for, but {where} is bidirectional (no causal mask or is_causal); "
                          "use causal=None (take it from the model)")
    if config.causal is False and causal:
        raise ConfigError(f"causal=False on a causal model ({where} has a causal mask): a decoder's attention must "
                          "stay causal; use causal=None")
    if causal and config.local:
        raise ConfigError(f"local=True is for bidirectional models, but {where} is causal; use window=... "
                          "(softmax over the last `window` tokens) instead")
    if not causal and config.gate != "none":
        raise ConfigError(f"gate={config.gate!r} decays the past of causal attention, but {where} is bidirectional; "
                          "use gate='none'")
    if not causal and config.window > 0 and not config.local:
        raise ConfigError(f"{where} is bidirectional: a sliding window over past tokens has no meaning there; use "
                          "local=True (softmax inside a local window) or window=0")
    _check_tokens(where, data, causal)
    tq, tk = data["tokens"]
    if tq != tk and (causal or config.local):
        raise PlanError(f"{where} attends {tq} queries to {tk} keys (cross-attention); causal and local linear "
                        "attention need self-attention (as many queries as keys)")
    if config.gate == "learned":
        raise ConfigError(f"gate='learned' is not available on the FX path yet ({where}); use gate='none', or the "
                          "Hugging Face module path for a gated model")


def _select_layers(found: list[Site], chosen: list[Site], layers: list[int] | None) -> list[Site]:
    if layers is None:
        return chosen
    if found and all("layer" in s.data for s in found):  # Hugging Face modules: by decoder-layer index
        return [s for s in chosen if s.data["layer"] in set(layers)]
    bad = [i for i in layers if not 0 <= i < len(found)]
    if bad:
        raise ConfigError(f"LinearizeAttention.layers {bad} out of range: the model has {len(found)} attention "
                          f"sites, valid indices 0..{len(found) - 1} ({[s.name for s in found]})")
    wanted = {found[i].name for i in layers}
    picked = [s for s in chosen if s.name in wanted]
    if not picked:
        raise ConfigError(f"LinearizeAttention.layers {layers} selects {sorted(wanted)}, which targets/exclude/"
                          f"filter_fn left out (they kept {[s.name for s in chosen]})")
    return picked


def _assign_unit_paths(gm: fx.GraphModule, sites: list[Site]) -> None:
    """Where each unit goes: the path a recipe recorded; on a graph without a module at a site's
    attention module (dynamo), that module's path itself, so the unit's parameters take the names the
    eager (module-swap) surgery gave them (``model.layers.0.self_attn.feature_q.weight``); else a free
    ``<scope>.linear_attention``."""
    taken: set[str] = set()
    for site in sites:
        recorded = site.data.get("unit")
        if isinstance(recorded, str) and recorded not in taken and _free_path(gm, recorded):
            taken.add(recorded)
            continue
        module = site.data.get("module")
        if site.data.get("named_by_module") and module and module not in taken and _free_path(gm, module):
            taken.add(module)
            site.data["unit"] = module
            continue
        try:
            owner = gm.get_submodule(site.scope) if site.scope else gm
        except AttributeError:
            owner = nn.Module()
        candidate = free_attr_name(owner, "linear_attention")
        while (f"{site.scope}.{candidate}" if site.scope else candidate) in taken:
            candidate = free_attr_name(owner, candidate + "_")
        path = f"{site.scope}.{candidate}" if site.scope else candidate
        taken.add(path)
        site.data["unit"] = path


def _free_path(gm: fx.GraphModule, path: str) -> bool:
    """No module or attribute at ``path`` in ``gm`` yet (a unit can be placed there)."""
    owner: Any = gm
    for part in path.split("."):
        if not hasattr(owner, part):
            return True
        owner = getattr(owner, part)
    return False


def graph_inputs(gm: fx.GraphModule) -> tuple[Any, ...] | None:
    """The example values dynamo recorded for a backend graph's placeholders (None for other graphs)."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    args = [n.meta.get("grapharg") for n in placeholders]
    if not placeholders or any(a is None for a in args):
        return None
    try:
        values = tuple(a.example for a in args)
    except Exception:  # noqa: BLE001 - an erased example (the graph was already compiled)
        return None
    return None if any(v is None for v in values) else values


def _transformers_scope(node: fx.Node, gm: fx.GraphModule) -> str | None:
    """Class name of the node's module when it comes from transformers (the module-swap path names such
    a site by the module's path), else None."""
    t = graph_patterns.module_type(node, gm)
    qualified = f"{t.__module__}.{t.__qualname__}" if isinstance(t, type) else (t or "")
    return qualified.rpartition(".")[2] if qualified.startswith("transformers.") else None


def plan_fx_attention(model: nn.Module, config: LinearizeAttention, ctx: PassContext) -> Plan:
    """Trace ``model``, find its attention call sites and choose the ones ``config`` selects.

    Sites are named by the scope of the softmax / SDPA call (``blocks.0.attn.sdpa``,
    ``blocks.1.attn.softmax``, an ``nn.Softmax`` module by its path; ``@1``, ``@2``… for further calls
    in the same scope). ``config.layers`` indexes the matches in graph order. Nothing is changed.

    ``model`` may be a graph dynamo handed a ``torch.compile`` backend or a ``torch.export`` graph;
    attention inside a Hugging Face module (whose forward dynamo / export inlined) is then named by that
    module's path (``model.layers.0.self_attn``, op = its class), as the module-swap path names it, so a
    recipe saved from the eager surgery supplies the trained parameters (``surgeon.backend(recipe=...)``).
    ``ctx`` fields set by ``surgeon.backend``: ``allow_empty`` (no attention: an empty plan),
    ``name_offsets`` (site bases counted in earlier graphs), ``from_recipe`` (sites come from a recipe).
    """
    inputs = ctx.example_inputs
    if inputs is None and isinstance(model, fx.GraphModule):
        inputs = graph_inputs(model)
    if inputs is None:
        raise ConfigError(f"LinearizeAttention on hand-written attention ({type(model).__name__} is rewritten as a "
                          "traced graph) needs example_inputs to read the head count, head size and masks: "
                          "surgeon.apply(model, LinearizeAttention(...), example_inputs=(x,))")
    gm = trace_for_attention(model, config.leaf_modules)
    inputs = concrete_inputs(inputs)
    _propagate(gm, inputs)
    skipped: list[str] = []
    matches = find_attention(gm, skipped)
    if not matches and ctx.allow_empty:
        return Plan([], {"gm": gm, "matches": {}, "bases": [], "skipped": skipped})
    if not matches:
        types = _describe_types(model)
        hint = ""
        if any(isinstance(m, nn.MultiheadAttention) for m in model.modules()):
            hint = (" nn.MultiheadAttention is traced as one opaque call (a torch.nn leaf); write the attention "
                    "out, or call F.scaled_dot_product_attention, to rewrite it.")
        why = f" Skipped: {'; '.join(skipped)}." if skipped else ""
        raise PlanError(
            f"LinearizeAttention found no attention in {type(model).__name__}: no Hugging Face attention module and "
            f"no softmax(q @ kᵀ · s) @ v or F.scaled_dot_product_attention call in its traced graph (module types: "
            f"{types}).{hint}{why}"
        )
    owners = [_transformers_scope(m.anchor, gm) for m in matches]
    scopes = [graph_patterns.module_scope(m.anchor, gm) for m in matches]
    bases = [scope if owner and scope else _base_name(m, gm) for m, owner, scope in zip(matches, owners, scopes)]
    seen: Counter[str] = Counter(ctx.name_offsets or {})
    found, by_name = [], {}
    for match, base, owner, scope in zip(matches, bases, owners, scopes):
        k = seen[base]
        seen[base] += 1
        name = base if k == 0 else f"{base}@{k}"
        by_name[name] = match
        data: dict[str, Any] = {"index": len(found), "module": scope}
        if owner and scope:
            data["named_by_module"] = True
            numbers = re.findall(r"\.(\d+)(?:\.|$)", "." + scope)
            if numbers:
                data["layer"] = int(numbers[-1])
        found.append(Site(name=name, base=base, kind="fx", op=owner if owner and scope else match.kind,
                          scope=scope, node=match.anchor.name, shape=node_shape(match.output), data=data))
    if ctx.recorded_sites is not None:
        sites = match_recorded(found, ctx.recorded_sites, config.pass_name)
    elif ctx.from_recipe:
        sites = found  # the backend keeps the recipe's sites among these, then plans again with them
    else:
        chosen = select_sites(found, config.targets, config.exclude, config.filter_fn,
                              resolve_module=lambda s: _resolve(model, s), what="attention site")
        sites = _select_layers(found, chosen, config.layers)
    wanted = {n for s in sites for n, _ in by_name[s.name].masks}
    wanted |= {v for s in sites for v, _ in by_name[s.name].scale_terms if isinstance(v, fx.Node)}
    values = _capture(gm, inputs, wanted) if wanted else {}
    state = state_placeholders(gm, inputs)
    for site in sites:
        recorded = dict(site.data)
        data = _site_data(by_name[site.name], values, model, config, site.name, state)
        if ctx.recorded_sites is not None and "causal" in recorded:
            data["causal"] = recorded["causal"]
        _check_site(site.name, {**recorded, **data}, config)
        site.data = {**recorded, **data}
    _assign_unit_paths(gm, sites)
    return Plan(sites, {"gm": gm, "matches": {s.name: by_name[s.name] for s in sites}, "bases": bases,
                        "skipped": skipped})


def _resolve(model: nn.Module, site: Site) -> nn.Module | None:
    """The module whose forward holds the attention (what ``filter_fn`` receives)."""
    try:
        return model.get_submodule(site.scope) if site.scope else model
    except AttributeError:
        return None


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


def _impure(n: fx.Node) -> bool:
    """Side effects that keep an unused node (ATen SDPA and dropout count as impure: random when training)."""
    return n.is_impure() and not (ag.is_sdpa(n) or graph_patterns.is_op(n, "dropout"))


def _erase_dead(gm: fx.GraphModule, start: fx.Node) -> None:
    stack = [start]
    while stack:
        n = stack.pop()
        if n.graph is not gm.graph:
            continue
        for check in [u for u in n.users if _is(u, ag.ASSERTS)]:  # export's metadata checks of a dead value
            gm.graph.erase_node(check)
        if n.users or n.op in ("placeholder", "output") or _impure(n):
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
        mask_kinds=[kind for _, kind in d["masks"]], replaced=d["spelling"],
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
    finish_graph(gm)
    if ctx.example_inputs is not None:
        _propagate(gm, concrete_inputs(ctx.example_inputs))
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
    if any(site.data["dropout"] for site in plan.sites):
        notes.append("attention-weight dropout has no counterpart in linear attention and was dropped")
    return Report("LinearizeAttention", ["site", "replaced", "heads", "head_dim", "features", "window", "causal",
                                         "masks", "params_added"], rows,
                  totals={"params_added": sum(r["params_added"] for r in rows)}, notes=notes)
