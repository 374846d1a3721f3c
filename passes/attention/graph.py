"""Graph-source helpers of the FX attention matcher: the same attention whatever made the graph.

``passes.attention_fx`` matches ``softmax(q @ kᵀ · s + mask) @ v`` and SDPA calls. This module holds
what it needs to read the three kinds of FX graph alike (see ``surgeon.fx.patterns``):

* op tables with the torch-level callables, method names *and* ATen overload packets of each piece
  (``transpose`` = ``x.transpose`` / ``torch.transpose`` / ``aten.transpose.int`` ...), and :func:`is_call`;
* :func:`unflatten_batch`: the (B, H, T, D) tensor a decomposed ``matmul`` flattened into a 3-D
  ``bmm`` operand (``aten.expand`` → ``aten.clone`` → ``aten.view``);
* :func:`batch_operand` / :func:`batch_result`: the same through any chain of ``unsqueeze`` /
  ``squeeze`` / ``permute`` / ``view`` (core-ATen ``einsum`` moves size-1 dims around its ``bmm``), by
  following which dims of the source each dim holds;
* :func:`unrepeat_kv`: the (B, H_kv, T, D) keys/values under a GQA ``repeat_kv``
  (``x[:, :, None].expand(...).reshape(...)``, ``unsqueeze``/``expand``/``view`` in ATen, or
  ``repeat_interleave``);
* :func:`safe_softmax_tail`: the guard ``aten._safe_softmax`` decomposes into
  (``where(all keys masked, 0, softmax)``);
* :func:`sdpa_arguments`: the arguments of every SDPA spelling by name (``aten._scaled_dot_product_*``
  variants take them in other orders and return tuples).

Example:
    >>> import torch
    >>> class GQA(torch.nn.Module):
    ...     def forward(self, k):
    ...         b, h, t, d = k.shape
    ...         return k[:, :, None, :, :].expand(b, h, 3, t, d).reshape(b, h * 3, t, d)
    >>> ep = torch.export.export(GQA(), (torch.randn(2, 2, 5, 4),))
    >>> gm = ep.module()
    >>> out = next(n for n in gm.graph.nodes if n.op == "output").args[0][0]
    >>> k, groups = unrepeat_kv(out)
    >>> k.op, groups
    ('placeholder', 3)
"""
from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx as fx

from surgeon.fx import patterns as graph_patterns
from surgeon.fx.patterns import arg, node_shape, number

_aten = torch.ops.aten


def _packets(*names: str) -> set:
    return {getattr(_aten, n) for n in names if hasattr(_aten, n)}


def is_call(node: Any, targets: set | frozenset) -> bool:
    """``node`` calls one of ``targets`` (callables, method names or ATen overload packets)."""
    if not isinstance(node, fx.Node) or node.op not in ("call_function", "call_method"):
        return False
    target = node.target
    if target in targets:
        return True
    packet = getattr(target, "overloadpacket", None)
    return packet is not None and packet in targets


# ---------------------------------------------------------------------------------------------- op tables

CASTS = {"to", "float", "half", "bfloat16", "double", "type_as", "type", "contiguous",
         torch.Tensor.to, torch.Tensor.float, torch.Tensor.contiguous, torch.Tensor.type_as,
         } | _packets("_to_copy", "to", "clone", "contiguous", "alias", "type_as", "lift_fresh_copy")
MUL = {operator.mul, torch.mul, torch.Tensor.mul, "mul"} | _packets("mul")
DIV = {operator.truediv, torch.div, torch.true_divide, torch.Tensor.div, "div", "true_divide"} | _packets(
    "div", "true_divide")
ADD = {operator.add, torch.add, torch.Tensor.add, "add"} | _packets("add")
MASKED_FILL = {torch.masked_fill, torch.Tensor.masked_fill, "masked_fill"} | _packets("masked_fill")
TRANSPOSE = {torch.transpose, torch.Tensor.transpose, "transpose", torch.swapaxes, "swapaxes", torch.swapdims,
             "swapdims"} | _packets("transpose", "swapaxes", "swapdims")
PERMUTE = {torch.permute, torch.Tensor.permute, "permute"} | _packets("permute")
EINSUM = {torch.einsum} | _packets("einsum")
BMM = {torch.bmm, torch.Tensor.bmm, "bmm"} | _packets("bmm")
#: reshapes that keep the row-major order of the elements (and no-op expands / copies)
VIEWS = {"view", "reshape", "expand", "expand_as", "clone", "contiguous", torch.reshape, torch.Tensor.view,
         torch.Tensor.reshape, torch.Tensor.expand} | _packets("view", "_unsafe_view", "reshape", "expand",
                                                                "clone", "contiguous", "alias")
UNSQUEEZE = {torch.unsqueeze, torch.Tensor.unsqueeze, "unsqueeze"} | _packets("unsqueeze")
EXPAND = {"expand", torch.Tensor.expand} | _packets("expand")
RESHAPE = {"view", "reshape", torch.reshape, torch.Tensor.view, torch.Tensor.reshape} | _packets(
    "view", "_unsafe_view", "reshape")
REPEAT_INTERLEAVE = {torch.repeat_interleave, torch.Tensor.repeat_interleave, "repeat_interleave"} | _packets(
    "repeat_interleave")
WHERE = {torch.where, "where"} | _packets("where")
FULL_LIKE = {torch.full_like, torch.zeros_like} | _packets("full_like", "zeros_like")
#: assertions export leaves on tensors (``aten._assert_tensor_metadata``): not real uses
ASSERTS = _packets("_assert_tensor_metadata", "_assert_scalar", "_assert_async")
_GUARD = {"logical_not", "any", "all", "eq", "isneginf", "isinf", torch.logical_not, torch.any, torch.all,
          torch.eq, torch.isneginf, operator.eq, operator.invert, "__invert__"} | _packets(
    "logical_not", "any", "all", "eq", "isneginf", "isinf", "bitwise_not")

#: argument names of every SDPA spelling, in positional order (keyword-only ones last)
SDPA_SIGNATURES: dict[str, tuple[str, ...]] = {
    "scaled_dot_product_attention": ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale",
                                     "enable_gqa"),
    "_scaled_dot_product_flash_attention_for_cpu": ("query", "key", "value", "dropout_p", "is_causal", "attn_mask",
                                                    "scale"),
    "_scaled_dot_product_efficient_attention": ("query", "key", "value", "attn_mask", "compute_log_sumexp",
                                                "dropout_p", "is_causal", "scale"),
    "_scaled_dot_product_flash_attention": ("query", "key", "value", "dropout_p", "is_causal", "return_debug_mask",
                                            "scale"),
    "_scaled_dot_product_cudnn_attention": ("query", "key", "value", "attn_mask", "compute_log_sumexp",
                                            "dropout_p", "is_causal", "return_debug_mask", "scale"),
    "_scaled_dot_product_attention_math": ("query", "key", "value", "attn_mask", "dropout_p", "is_causal",
                                           "dropout_mask", "scale", "enable_gqa"),
}
_KEYWORD_ALIASES = {"attn_bias": "attn_mask"}


SHAPE_ONLY_CALLS = {"ones_like", "zeros_like", "full_like", "empty_like", "new_ones", "new_zeros", "new_full",
                    "new_empty", "size", "dim", "numel", "sym_size", "sym_numel"}
SHAPE_ATTRS = ("shape", "dtype", "device", "ndim")


def reads_only_shape(user: fx.Node, node: fx.Node) -> bool:
    """``user`` reads only the size, dtype or device of ``node`` (``torch.ones_like(scores)``, ``x.size(1)``…)."""
    if user.op not in ("call_function", "call_method") or not user.args or user.args[0] is not node:
        return False
    if user.op == "call_function" and user.target is getattr:
        return len(user.args) > 1 and user.args[1] in SHAPE_ATTRS
    if any(a is node for a in list(user.args[1:]) + list(user.kwargs.values())):
        return False
    return graph_patterns.target_name(user) in SHAPE_ONLY_CALLS


def real_users(node: fx.Node) -> list[fx.Node]:
    """Users of ``node`` that read its values: not export's tensor assertions, not shape-only readers."""
    return [u for u in node.users if not is_call(u, ASSERTS) and not reads_only_shape(u, node)]


def is_sdpa(node: Any) -> bool:
    return graph_patterns.is_op(node, "sdpa")


def sdpa_arguments(node: fx.Node) -> tuple[dict[str, Any], fx.Node | None]:
    """(arguments by name, the node holding the attention output) of an SDPA call of any spelling.

    The output is the call itself, or its ``getitem(·, 0)`` for ATen variants that return a tuple
    (None when another element of the tuple is used: the call cannot be replaced).
    """
    name = graph_patterns.target_name(node)
    names = SDPA_SIGNATURES.get(name, SDPA_SIGNATURES["scaled_dot_product_attention"])
    args = {n: arg(node, i, n) for i, n in enumerate(names)}
    for alias, canonical in _KEYWORD_ALIASES.items():
        if alias in node.kwargs:
            args[canonical] = node.kwargs[alias]
    if name == "scaled_dot_product_attention" or node.op != "call_function" or \
            not isinstance(node.target, torch._ops.OpOverload):
        return args, node
    users = real_users(node)
    firsts = [u for u in users if u.target is operator.getitem and u.args[1] == 0]
    others = [u for u in users if u not in firsts and (u.target is not operator.getitem or real_users(u))]
    if len(firsts) != 1 or others:
        return args, None
    return args, firsts[0]


# ---------------------------------------------------------------------------------------------- shapes through views


def unflatten_batch(node: Any) -> fx.Node | None:
    """The 4-D (B, H, a, b) node that a 3-D (B·H, a, b) ``bmm`` operand is a view of, or None.

    Walks back through order-keeping reshapes, no-op expands and copies (a decomposed
    ``matmul``: ``expand`` → ``clone`` → ``view``) and returns the earliest node of such a shape.
    """
    shape = node_shape(node) if isinstance(node, fx.Node) else None
    if shape is None or len(shape) != 3:
        return None
    best, cur = None, node
    for _ in range(8):
        if not is_call(cur, VIEWS) or not isinstance(cur.args[0], fx.Node):
            break
        cur = cur.args[0]
        s = node_shape(cur)
        if s is None:
            break
        if len(s) == 4 and s[-2:] == shape[-2:] and s[0] * s[1] == shape[0]:
            best = cur
    return best


def reshaped_from(node: Any, shape: list[int]) -> fx.Node | None:
    """The single reshape of ``node`` (skipping assertions) to ``shape``, or None."""
    if not isinstance(node, fx.Node):
        return None
    users = real_users(node)
    if len(users) != 1 or not is_call(users[0], RESHAPE):
        return None
    return users[0] if node_shape(users[0]) == list(shape) else None


# ---------------------------------------------------------------------------------------------- GQA


def _repeat_source(node: fx.Node) -> tuple[fx.Node, int] | None:
    """``x[:, :, None].expand(B, Hkv, g, T, D)`` (or ``unsqueeze(x, 2).expand``) → (x, g)."""
    cur = node
    while is_call(cur, CASTS) and isinstance(cur.args[0], fx.Node):
        cur = cur.args[0]
    if not is_call(cur, EXPAND):
        return None
    shape = node_shape(cur)
    src = cur.args[0]
    if shape is None or len(shape) != 5 or not isinstance(src, fx.Node):
        return None
    inner: Any = None
    if is_call(src, UNSQUEEZE) and arg(src, 1, "dim") in (2, -3):
        inner = src.args[0]
    elif src.op == "call_function" and src.target is operator.getitem and isinstance(src.args[1], tuple):
        index = src.args[1]
        if len(index) >= 3 and index[2] is None and all(i == slice(None) for i in index[:2]) and \
                all(i == slice(None) or i is Ellipsis for i in index[3:]):
            inner = src.args[0]
    if not isinstance(inner, fx.Node):
        return None
    base = node_shape(inner)
    if base is None or len(base) != 4 or base != [shape[0], shape[1], shape[3], shape[4]]:
        return None
    return inner, shape[2]


def unrepeat_kv(node: Any) -> tuple[fx.Node, int] | None:
    """(x, groups) if ``node`` repeats each head of the (B, H_kv, T, D) tensor ``x`` ``groups`` times
    (transformers' ``repeat_kv`` in any graph, or ``repeat_interleave(x, g, dim=1)``), else None."""
    if not isinstance(node, fx.Node):
        return None
    shape = node_shape(node)
    if shape is None or len(shape) != 4:
        return None
    if is_call(node, REPEAT_INTERLEAVE):
        x, groups, dim = node.args[0], arg(node, 1, "repeats"), arg(node, 2, "dim")
        base = node_shape(x) if isinstance(x, fx.Node) else None
        if isinstance(groups, int) and dim in (1, -3) and base is not None and len(base) == 4 and \
                base[1] * groups == shape[1]:
            return x, groups
        return None
    if not is_call(node, RESHAPE) or not isinstance(node.args[0], fx.Node):
        return None
    found = _repeat_source(node.args[0])
    if found is None:
        return None
    x, groups = found
    base = node_shape(x)
    return (x, groups) if base is not None and base[1] * groups == shape[1] else None


# ---------------------------------------------------------------------------------------------- safe softmax


def _ancestors_until(start: fx.Node, stop: fx.Node) -> set[fx.Node] | None:
    """Nodes between ``start`` and ``stop`` (exclusive) if every path from ``start`` back ends at ``stop``
    through guard ops (``eq``, ``logical_not``, ``any``...), else None."""
    seen: set[fx.Node] = set()
    stack = [start]
    while stack:
        n = stack.pop()
        if n is stop or n in seen:
            continue
        if not is_call(n, _GUARD):
            return None
        seen.add(n)
        stack.extend(n.all_input_nodes)
    return seen


def safe_softmax_tail(softmax: fx.Node, scores: Any) -> tuple[fx.Node, set[fx.Node]] | None:
    """``where(no key visible, 0, softmax(scores))`` (what ``aten._safe_softmax`` decomposes into) →
    (the ``where`` node, the guard nodes that read ``scores``), or None."""
    if not isinstance(scores, fx.Node):
        return None
    users = real_users(softmax)
    wheres = [u for u in users if is_call(u, WHERE) and len(u.args) == 3 and u.args[2] is softmax]
    if len(wheres) != 1:
        return None
    where = wheres[0]
    cond, zero = where.args[0], where.args[1]
    zero_ok = number(zero) == 0.0 or (is_call(zero, FULL_LIKE) and zero.args[0] is softmax
                                      and (len(zero.args) < 2 or number(zero.args[1]) == 0.0))
    if not zero_ok or not isinstance(cond, fx.Node):
        return None
    if set(users) - {where, zero}:
        return None
    guard = _ancestors_until(cond, scores)
    if guard is None:
        return None
    if isinstance(zero, fx.Node) and zero is not softmax and is_call(zero, FULL_LIKE):
        guard.add(zero)
    return where, guard


__all__ = [
    "ADD", "ASSERTS", "BMM", "CASTS", "DIV", "EINSUM", "MASKED_FILL", "MUL", "PERMUTE", "TRANSPOSE", "VIEWS",
    "is_call", "is_sdpa", "real_users", "reshaped_from", "safe_softmax_tail", "sdpa_arguments",
    "unflatten_batch", "unrepeat_kv",
]


# ---------------------------------------------------------------------------------------------- layouts through
# unsqueeze / permute / view chains (core-ATen einsum: size-1 dims moved around a bmm)

SQUEEZE = {torch.squeeze, torch.Tensor.squeeze, "squeeze"} | _packets("squeeze")
LAYOUT = VIEWS | UNSQUEEZE | SQUEEZE | PERMUTE | TRANSPOSE

_Atom = tuple[int, tuple[int, ...]]  # (dim of the base tensor, path of pieces when that dim was split)
_Group = list[tuple[_Atom, int]]     # atoms (with sizes) a dim of the current tensor holds, major first


def _regroup(groups: list[_Group], shape: list[int]) -> list[_Group] | None:
    """Row-major reshape of a tensor whose dims hold ``groups`` to ``shape`` (atoms split where needed)."""
    queue = [(a, s) for g in groups for a, s in g if s != 1]
    out: list[_Group] = []
    for size in shape:
        group: _Group = []
        prod = 1
        while prod < size:
            if not queue:
                return None
            atom, s = queue.pop(0)
            if prod * s <= size:
                group.append((atom, s))
                prod *= s
                continue
            first = size // prod
            if size % prod or s % first:
                return None
            (d, path) = atom
            group.append(((d, path + (0,)), first))
            queue.insert(0, ((d, path + (1,)), s // first))
            prod = size
        if prod != size:
            return None
        out.append(group)
    return out if not queue else None


def _step(groups: list[_Group], node: fx.Node) -> list[_Group] | None:
    shape = node_shape(node)
    if shape is None:
        return None
    n = len(groups)
    if is_call(node, UNSQUEEZE):
        d = arg(node, 1, "dim")
        if not isinstance(d, int):
            return None
        groups = list(groups)
        groups.insert(d % (n + 1), [])
    elif is_call(node, SQUEEZE):
        dims = arg(node, 1, "dim")
        dims = list(range(n)) if dims is None else [dims] if isinstance(dims, int) else list(dims)
        drop = {d % n for d in dims if all(s == 1 for _, s in groups[d % n])}
        groups = [g for i, g in enumerate(groups) if i not in drop]
    elif is_call(node, PERMUTE):
        rest = node.args[1:]
        dims = list(rest[0]) if len(rest) == 1 and isinstance(rest[0], (list, tuple)) else list(rest)
        if sorted(d % n for d in dims) != list(range(n)):
            return None
        groups = [groups[d % n] for d in dims]
    elif is_call(node, TRANSPOSE):
        a, b = arg(node, 1, "dim0"), arg(node, 2, "dim1")
        if not (isinstance(a, int) and isinstance(b, int)):
            return None
        groups = list(groups)
        groups[a % n], groups[b % n] = groups[b % n], groups[a % n]
    elif is_call(node, VIEWS):
        sizes = [math_prod(s for _, s in g) for g in groups]
        if is_call(node, EXPAND) and sizes != shape:
            return None  # a broadcast, not a layout change
        groups = groups if sizes == shape else _regroup(groups, shape)
    else:
        return None
    return groups if groups is not None and len(groups) == len(shape) else None


def math_prod(values: Any) -> int:
    out = 1
    for v in values:
        out *= v
    return out


def _normalize(groups: list[_Group]) -> list[list[_Atom]]:
    """Atoms without size-1 ones, split pieces that sit together merged back into their parent."""
    out = []
    for g in groups:
        atoms = [a for a, s in g if s != 1]
        merged = True
        while merged:
            merged = False
            for i in range(len(atoms) - 1):
                (d0, p0), (d1, p1) = atoms[i], atoms[i + 1]
                if d0 == d1 and p0[:-1] == p1[:-1] and p0[-1:] == (0,) and p1[-1:] == (1,):
                    atoms[i:i + 2] = [(d0, p0[:-1])]
                    merged = True
                    break
        out.append(atoms)
    return out


def layout_from(base: fx.Node, chain: list[fx.Node]) -> list[list[_Atom]] | None:
    """How the last node of ``chain`` (layout ops applied to ``base`` in order) holds ``base``'s dims."""
    shape = node_shape(base)
    if shape is None:
        return None
    groups: list[_Group] | None = [[((d, ()), s)] for d, s in enumerate(shape)]
    for node in chain:
        groups = _step(groups, node)
        if groups is None:
            return None
    return _normalize(groups)


def back_chain(node: fx.Node, limit: int = 12) -> list[fx.Node]:
    """``node`` and the layout ops before it, earliest first (the first element is their source)."""
    chain = [node]
    while is_call(chain[-1], LAYOUT) and isinstance(chain[-1].args[0], fx.Node) and len(chain) <= limit:
        chain.append(chain[-1].args[0])
    return chain[::-1]


def batch_operand(node: Any) -> tuple[fx.Node, bool] | None:
    """(X, transposed) when the 3-D ``bmm`` operand ``node`` is ``X.reshape(B·H, a, b)`` (or, with
    ``transposed``, ``X.transpose(-2, -1).reshape(...)``) for a 4-D ``X`` before a chain of layout ops."""
    if not isinstance(node, fx.Node) or len(node_shape(node) or []) != 3:
        return None
    chain = back_chain(node)
    for i, base in enumerate(chain[:-1]):
        if len(node_shape(base) or []) != 4:
            continue
        layout = layout_from(base, chain[i + 1:])
        if layout is None:
            continue
        big = [d for d, s in enumerate(node_shape(base)) if s != 1]
        for transposed, order in ((False, [[0, 1], [2], [3]]), (True, [[0, 1], [3], [2]])):
            want = [[(d, ()) for d in dims if d in big] for dims in order]
            if layout == want:
                return base, transposed
    return None


def batch_result(mm: fx.Node, shape: list[int]) -> fx.Node | None:
    """The node after ``mm`` (3-D, (B·H, T, D)) and single-use layout ops that is ``mm.reshape(shape)``."""
    chain: list[fx.Node] = []
    cur = mm
    for _ in range(12):
        users = real_users(cur)
        if len(users) != 1 or not is_call(users[0], LAYOUT):
            return None
        cur = users[0]
        chain.append(cur)
        if node_shape(cur) == list(shape):
            layout = layout_from(mm, chain)
            big = [d for d, s in enumerate(node_shape(mm)) if s != 1]
            b, h = shape[0], shape[1]
            parts = [[(0, (0,))] if b != 1 else [], [(0, (1,))] if h != 1 else []]
            if b == 1 or h == 1:
                parts = [[(0, ())] if b != 1 else [], [(0, ())] if h != 1 else []]
            want = parts + [[(1, ())] if 1 in big else [], [(2, ())] if 2 in big else []]
            return cur if layout == want else None
    return None
