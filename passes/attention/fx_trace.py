"""Tracing for the FX attention path and example values of graph nodes (shapes, masks, data dependence)."""
from __future__ import annotations

import contextlib
from typing import Any, Iterator, Sequence

import torch
import torch.fx as fx
import torch.nn as nn

from surgeon.fx.tracing import SurgeonTracer, trace
from surgeon.passes.attention import graph as ag
from surgeon.passes.attention.fx_scores import NEG_THRESHOLD, fx_is

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


def propagate(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> None:
    with _eval_mode(gm), torch.no_grad():
        _Shapes(gm).run(*example_inputs)


def capture(gm: fx.GraphModule, example_inputs: Sequence[Any], nodes: set[fx.Node]) -> dict[fx.Node, Any]:
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


def data_dependent(node: fx.Node, state: set[fx.Node] | frozenset = frozenset()) -> bool:
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
        if (n.op == "call_method" and n.target in _SHAPE_ONLY) or fx_is(n, _SYM_SIZE):
            continue
        if n.args and isinstance(n.args[0], fx.Node) and ag.reads_only_shape(n, n.args[0]):
            stack.extend(a for a in n.all_input_nodes if a is not n.args[0])  # ones_like(scores): its size only
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


def fx_pattern(allowed: torch.Tensor) -> str:
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


def export_for_attention(model: nn.Module, example_inputs: Sequence[Any]) -> fx.GraphModule:
    """``torch.export`` capture (every tensor dim dynamic) for code ``symbolic_trace`` cannot follow,
    e.g. ``torch.ones(t, t)`` with a traced size; the matcher reads its ATen graph like any other."""
    from torch.export import Dim, export

    shapes = tuple({i: Dim.AUTO for i in range(v.dim())} if isinstance(v, torch.Tensor) else None
                   for v in example_inputs)
    with torch.no_grad():
        return export(model, tuple(example_inputs), dynamic_shapes=shapes, strict=False).module()
