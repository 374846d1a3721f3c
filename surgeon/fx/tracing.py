"""The FX path: trace with a configurable leaf policy, explain failures, propagate shapes.

Example:
    >>> import torch, torch.nn as nn
    >>> gm = trace(nn.Sequential(nn.Linear(4, 4), nn.ReLU()))
    >>> [n.op for n in gm.graph.nodes]
    ['placeholder', 'call_module', 'call_module', 'output']
"""
from __future__ import annotations

import os
import traceback
from typing import Any, Callable, Sequence

import torch
import torch.fx as fx
import torch.nn as nn
from torch.fx.passes.shape_prop import ShapeProp

from surgeon.core.modules import eval_mode, free_attr_name, get_submodule, set_submodule  # noqa: F401 (re-exported)
from surgeon.fx import patterns as graph_patterns
from surgeon.core.errors import TraceError

LeafFn = Callable[[nn.Module, str], bool]
_TORCH_DIR = os.path.dirname(torch.__file__)


class SurgeonUnit(nn.Module):
    """Marker base class: modules surgeon inserts are always FX leaves (never traced through)."""


class SurgeonTracer(fx.Tracer):
    """``fx.Tracer`` whose leaf policy is configurable and which remembers where tracing failed.

    ``leaf_modules`` holds qualified module names or class names; ``leaf_fn(module, fqn)`` may add more.
    """

    def __init__(self, leaf_modules: Sequence[str] = (), leaf_fn: LeafFn | None = None) -> None:
        super().__init__()
        self.leaf_names = set(leaf_modules)
        self.leaf_fn = leaf_fn
        self.scope_stack: list[tuple[str, nn.Module]] = []

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if isinstance(m, SurgeonUnit):
            return True
        if module_qualified_name in self.leaf_names or type(m).__name__ in self.leaf_names:
            return True
        if self.leaf_fn is not None and self.leaf_fn(m, module_qualified_name):
            return True
        return super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m: nn.Module, forward: Callable, args: tuple, kwargs: dict) -> Any:
        name = self.path_of_module(m)
        self.scope_stack.append((name, m))
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception as e:
            if not hasattr(e, "_surgeon_scope"):
                e._surgeon_scope = list(self.scope_stack)  # type: ignore[attr-defined]
            raise
        finally:
            self.scope_stack.pop()


def _user_frame(exc: BaseException) -> traceback.FrameSummary | None:
    """The innermost traceback frame that is not torch's own code."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if not f.filename.startswith(_TORCH_DIR)]
    frames = [f for f in frames if os.path.basename(f.filename) != "fx_graph.py"]
    return frames[-1] if frames else None


def trace(
    model: nn.Module, leaf_modules: Sequence[str] = (), leaf_fn: LeafFn | None = None
) -> fx.GraphModule:
    """Symbolically trace ``model``; on failure raise TraceError naming the module and line.

    A model that is already a ``GraphModule`` is returned as is (its graph is the source of truth).
    """
    if isinstance(model, fx.GraphModule):
        return model
    tracer = SurgeonTracer(leaf_modules, leaf_fn)
    try:
        graph = tracer.trace(model)
    except Exception as e:  # noqa: BLE001 - re-raised with context
        scope = getattr(e, "_surgeon_scope", [])
        name, module = scope[-1] if scope else ("", model)
        where = f"module '{name}' ({type(module).__name__})" if name else f"the root module ({type(model).__name__})"
        frame = _user_frame(e)
        line = f" at {frame.filename}:{frame.lineno}: `{(frame.line or '').strip()}`" if frame else ""
        hint_name = name or type(model).__name__
        raise TraceError(
            f"torch.fx could not trace {where}{line}\n  {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}\n"
            f"  To go on, mark it as a leaf (traced as one opaque call; sites inside it are not rewritten): "
            f"pass leaf_modules=[{hint_name!r}] (a qualified name) or [{type(module).__name__!r}] (a class name) "
            f"to the pass, or a leaf_fn(module, fqn) -> bool."
        ) from e
    root_name = type(model).__name__
    return fx.GraphModule(tracer.root, graph, root_name)


def propagate_shapes(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> None:
    """Fill ``node.meta['tensor_meta']`` by running ``gm`` once (eval mode, no grad, modes restored)."""
    with eval_mode(gm), torch.no_grad():
        ShapeProp(gm).propagate(*example_inputs)


def node_shape(node: fx.Node) -> list[int] | None:
    """Output shape recorded by shape propagation (or by dynamo / torch.export metadata), or None."""
    return graph_patterns.node_shape(node)


def node_scope(node: fx.Node, gm: fx.GraphModule | None = None) -> str:
    """Qualified name of the module whose forward made this node ('' for the root).

    Works on ``symbolic_trace``, dynamo and ``torch.export`` graphs (see ``surgeon.fx.patterns``).
    """
    stack = list((node.meta.get("nn_module_stack") or {}).items())
    if node.op == "call_module" and stack:
        stack = stack[:-1]  # the module itself is the last entry
        return graph_patterns._entry_path(*stack[-1], gm) if stack else ""
    return graph_patterns.module_scope(node, gm)


def finish_graph(gm: fx.GraphModule, example_inputs: Sequence[Any] | None = None) -> fx.GraphModule:
    """Lint, drop submodules no node calls any more, recompile, and re-run shape propagation."""
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    if example_inputs is not None:
        propagate_shapes(gm, example_inputs)
    return gm
