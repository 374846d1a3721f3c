"""FX attention matcher, first half: attention scores ``q @ kᵀ`` with their scale factors, masks and casts.

See :mod:`surgeon.passes.attention.fx` for what the FX path recognises.
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
import torch.fx as fx

from surgeon.fx.tracing import node_shape
from surgeon.passes.attention import graph as ag

# ----------------------------------------------------------------------------------------------
# what the matcher recognises

# one table per piece, with torch-level, method and ATen spellings (passes.attention_graph)
_MATMUL = {operator.matmul, torch.matmul, torch.Tensor.matmul, "matmul", "__matmul__"} | ag.BMM | ag._packets("matmul")
CAST_METHODS = ag.CASTS
_MUL, _DIV, _ADD, _MASKED_FILL = ag.MUL, ag.DIV, ag.ADD, ag.MASKED_FILL
_TRANSPOSE, _PERMUTE = ag.TRANSPOSE, ag.PERMUTE
NEG_THRESHOLD = -1e4  # an additive mask value at or below this hides the key (-inf, finfo.min, -1e9, -1e4)


def fx_is(node: Any, targets: set) -> bool:
    return ag.is_call(node, targets)


def fx_number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def arg(node: fx.Node, i: int, name: str, default: Any = None) -> Any:
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(name, default)


def fx_ndim(node: Any) -> int | None:
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
            number = fx_number(value)
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
        return fx_ndim(self.q) or fx_ndim(self.output)


class Reject(Exception):
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


def output_einsum(node: fx.Node) -> tuple[fx.Node, fx.Node] | None:
    """``einsum('bhqk,bhkd->bhqd', p, v)`` → (p, v)."""
    found = _batched_einsum(node)
    if found is None:
        return None
    a, b, out, operands = found
    i, j = a[-2], a[-1]
    if b[-2] == j and out[-2] == i and out[-1] == b[-1] and b[-1] not in (i, j):
        return operands[0], operands[1]
    return None


def is_matmul(node: Any) -> bool:
    return ag.is_call(node, _MATMUL)


def is_einsum(node: Any) -> bool:
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
    if fx_is(kt, _TRANSPOSE):
        a, b = arg(kt, 1, "dim0"), arg(kt, 2, "dim1")
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
    if fx_is(kt, _PERMUTE):
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
    if not fx_is(node, ag.LAYOUT) or fx_ndim(node) != 4:
        return None
    mm = ag.back_chain(node)[0]  # through layout ops (core-ATen einsum moves size-1 dims around)
    if not (is_matmul(mm) and _single_user(mm) and len(mm.args) >= 2 and fx_ndim(mm) == 3):
        return None
    if not (fx_is(node, ag.RESHAPE) and node.args[0] is mm) and ag.batch_result(mm, node_shape(node)) is not node:
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
    kt, factors, _ = peel_prescale(kt4, None)
    found = _untranspose(kt, 4)
    if found is None or not isinstance(found[0], fx.Node):
        return None
    k, perm, how = found
    return _Scores(q4, k, perm, node, f"bmm/{how}", k_user=kt, factors=factors, chain=[mm])


def _scores_core(node: fx.Node, ndim: int | None) -> _Scores | None:
    if is_einsum(node):
        found = _scores_einsum(node)
        if found is None:
            return None
        q, k, transposed = found
        if not (isinstance(q, fx.Node) and isinstance(k, fx.Node)):
            return None
        perm = None
        if transposed:
            nd = ndim or fx_ndim(k)
            if nd is None:
                return None
            perm = tuple(list(range(nd - 2)) + [nd - 1, nd - 2])
        return _Scores(q, k, perm, node, "einsum", k_user=node, q_user=node)
    flattened = _flattened_core(node)
    if flattened is not None:
        return flattened
    if is_matmul(node) and len(node.args) >= 2:
        q, kt = node.args[0], node.args[1]
        if not isinstance(q, fx.Node):
            return None
        nd = ndim or fx_ndim(kt) or (3 if fx_is(node, ag.BMM) else None)
        found = _untranspose(kt, nd)
        if found is None:
            return None
        k, perm, how = found
        if not isinstance(k, fx.Node):
            return None
        chain = [kt] if _single_user(kt) else []
        name = "bmm" if fx_is(node, ag.BMM) else "matmul"
        return _Scores(q, k, perm, node, f"{name}/{how}", k_user=kt, q_user=node, chain=chain)
    return None


def parse_scores(node: Any, ndim: int | None, depth: int = 0, ignore: frozenset | set = frozenset()
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
        found = parse_scores(inner, ndim, depth + 1)
        if found is None:
            return None
        found.chain.append(node)
        if factor is not None:
            found.factors.append(factor)
        if mask is not None:
            found.masks.append(mask)
        return found

    if fx_is(node, CAST_METHODS):
        return below(node.args[0])
    if fx_is(node, _MUL) and len(node.args) == 2:
        a, b = node.args
        for x, y in ((a, b), (b, a)):
            if isinstance(x, fx.Node) and _scalar_like(y):
                found = below(x, factor=(y, 1))
                if found is not None:
                    return found
        return None
    if fx_is(node, _DIV) and len(node.args) == 2 and not node.kwargs.get("rounding_mode"):
        a, b = node.args
        return below(a, factor=(b, -1)) if _scalar_like(b) else None
    if fx_is(node, _ADD) and len(node.args) == 2 and "alpha" not in node.kwargs:
        a, b = node.args
        if fx_number(b) is not None:
            return below(a)  # a constant shift: softmax ignores it
        if fx_number(a) is not None:
            return below(b)
        for x, y in ((a, b), (b, a)):
            if isinstance(x, fx.Node) and isinstance(y, fx.Node):
                found = below(x, mask=(y, "additive"))
                if found is not None:
                    return found
        return None
    if fx_is(node, _MASKED_FILL):
        mask, value = arg(node, 1, "mask"), arg(node, 2, "value")
        number = fx_number(value)
        if isinstance(mask, fx.Node) and number is not None and number <= NEG_THRESHOLD:
            return below(node.args[0], mask=(mask, "fill"))
    return None


def _scalar_like(value: Any) -> bool:
    """A number, or a node that is not a tensor with more than one element."""
    if fx_number(value) is not None:
        return True
    if not isinstance(value, fx.Node):
        return False
    shape = node_shape(value)
    if shape is None:
        return "tensor_meta" not in value.meta or value.meta.get("tensor_meta") is None
    return math.prod(shape) == 1


def peel_prescale(node: fx.Node, user: fx.Node | None) -> tuple[fx.Node, list[tuple[Any, int]], list[fx.Node]]:
    """``q * s`` / ``q / s`` feeding only the scores (through ``user``; None: any single reader):
    (q, factors, removed nodes)."""
    factors: list[tuple[Any, int]] = []
    removed: list[fx.Node] = []
    while _single_user(node) and (user is None or user in node.users):
        if fx_is(node, _MUL) and len(node.args) == 2:
            a, b = node.args
            if isinstance(a, fx.Node) and fx_number(b) is not None:
                factors.append((b, 1))
                removed.append(node)
                user, node = node, a
                continue
            if isinstance(b, fx.Node) and fx_number(a) is not None:
                factors.append((a, 1))
                removed.append(node)
                user, node = node, b
                continue
        if fx_is(node, _DIV) and len(node.args) == 2 and isinstance(node.args[0], fx.Node) \
                and fx_number(node.args[1]) is not None and not node.kwargs.get("rounding_mode"):
            factors.append((node.args[1], -1))
            removed.append(node)
            user, node = node, node.args[0]
            continue
        break
    return node, factors, removed


