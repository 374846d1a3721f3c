"""One description of the ops surgeon matches, whatever made the FX graph.

Three kinds of graph reach the FX passes:

* ``symbolic_trace`` graphs: torch-level calls (``F.relu``, ``x.relu()``) and ``call_module`` nodes;
* graphs a ``torch.compile`` backend receives from dynamo: torch-level functions and methods, modules
  inlined (``nn.ReLU`` becomes ``F.relu``), parameters as placeholders, and
  ``node.meta['nn_module_stack']`` naming each node's module as ``"L['self'].layer1.0"``;
* ``torch.export`` graphs: ATen overloads (``aten.relu.default``, ``aten.hardtanh.default``, ...),
  before or after ``run_decompositions()``, with ``nn_module_stack`` holding the real FQN.

An :class:`OpSpec` lists, for one logical op, its torch-level callables, method names, module types
and ATen overload packets; :func:`is_op` asks "is this node that op?" for any of the three graphs,
and :func:`module_path` gives the FQN of the module a node came from, as the eager model names it.

Example:
    >>> import torch, torch.nn as nn, torch.nn.functional as F, torch.fx as fx
    >>> class Net(nn.Module):
    ...     def __init__(self):
    ...         super().__init__(); self.act = nn.ReLU()
    ...     def forward(self, x):
    ...         return F.relu6(self.act(x))
    >>> gm = fx.symbolic_trace(Net())
    >>> [(n.name, relu_kind(n, gm), module_path(n, gm)) for n in gm.graph.nodes if relu_kind(n, gm)]
    [('act', 'relu', 'act'), ('relu6', 'relu6', '')]
    >>> ep = torch.export.export(Net(), (torch.randn(2, 3),))
    >>> [(str(n.target), relu_kind(n), module_path(n)) for n in ep.graph.nodes if relu_kind(n)]
    [('aten.relu.default', 'relu', 'act'), ('aten.relu6.default', 'relu6', '')]
    >>> graph_source(ep.graph_module)
    'export'
"""
from __future__ import annotations

import operator
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Literal

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

GraphSource = Literal["symbolic_trace", "dynamo", "export"]
ActKind = Literal["relu", "relu6"]

#: gm.meta key under which a backend may store ``{str(id(module)): fqn}`` of the model it compiles,
#: so graphs of resumed frames (inside a submodule after a graph break) still map to root FQNs.
MODULE_IDS_META = "surgeon_module_ids"

#: gm.meta key: FQN of the module whose ``forward`` the captured frame runs (a graph that dynamo
#: started inside a submodule, after a graph break); nodes with an empty ``nn_module_stack`` are there.
FRAME_SCOPE_META = "surgeon_frame_scope"

#: gm.meta key: the eager model a ``torch.export`` graph was made from (``to_onnx(passes=...)``
#: sets it), so a pass can read attributes of modules the export inlined (a ``MaskedReLU``'s kind).
SOURCE_MODEL_META = "surgeon_source_model"

_aten = torch.ops.aten


def _packets(*names: str) -> frozenset:
    """ATen overload packets by name (names missing in this torch build are skipped)."""
    return frozenset(getattr(_aten, n) for n in names if hasattr(_aten, n))


@dataclass(frozen=True)
class OpSpec:
    """Every spelling of one logical op.

    ``functions``: ``call_function`` targets (torch-level callables); ``methods``: ``call_method``
    names; ``modules``: module types (``call_module`` targets, or a dynamo/export node's innermost
    ``nn_module_stack`` entry); ``aten``: ATen overload packets (any overload matches).
    """

    name: str
    functions: frozenset = frozenset()
    methods: frozenset[str] = frozenset()
    modules: tuple[type, ...] = ()
    aten: frozenset = frozenset()
    #: optional extra condition on the node (argument values), e.g. clamp with min 0
    check: Callable[[fx.Node], bool] | None = field(default=None, compare=False)

    def matches_target(self, node: fx.Node, gm: fx.GraphModule | None = None) -> bool:
        if node.op == "call_function":
            target = node.target
            packet = getattr(target, "overloadpacket", None)
            return target in self.functions or (packet is not None and packet in self.aten)
        if node.op == "call_method":
            return node.target in self.methods
        if node.op == "call_module" and gm is not None and self.modules:
            try:
                return type(gm.get_submodule(str(node.target))) in self.modules
            except AttributeError:
                return False
        return False


OPS: dict[str, OpSpec] = {}


def register_op(spec: OpSpec) -> OpSpec:
    """Add (or replace) a logical op; :func:`is_op` then knows ``spec.name``."""
    OPS[spec.name] = spec
    return spec


# ---------------------------------------------------------------------------------------------- args


def number(value: Any) -> float | None:
    """A Python number as float (bools and graph values give None)."""
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def arg(node: fx.Node, i: int, name: str, default: Any = None) -> Any:
    """Argument ``i`` (positional) or ``name`` (keyword) of a call node."""
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(name, default)


def target_name(node: fx.Node) -> str:
    """A call's bare name: ``relu_`` for ``aten.relu_.default``, ``x.relu_()`` and ``torch.relu_``."""
    target = node.target
    if isinstance(target, str):
        return target
    packet = getattr(target, "overloadpacket", None)
    if packet is not None:
        return packet.__name__
    return getattr(target, "__name__", str(target))


# ---------------------------------------------------------------------------------------------- ReLU family

_CLAMP_MIN = {torch.clamp_min, "clamp_min", "clamp_min_"} | set(_packets("clamp_min", "clamp_min_"))


def _clamp_kind(node: fx.Node) -> ActKind | None:
    """clamp(x, 0) / clamp(x, min=0) / clamp(x, 0, 6) / clamp_min(x, 0), any spelling."""
    target = getattr(node.target, "overloadpacket", node.target)
    low = number(arg(node, 1, "min"))
    high_raw = None if target in _CLAMP_MIN else arg(node, 2, "max")
    if low != 0.0:
        return None
    if high_raw is None:
        return "relu"
    return "relu6" if number(high_raw) == 6.0 else None


def _hardtanh_kind(node: fx.Node) -> ActKind | None:
    low = number(arg(node, 1, "min_val", -1.0))
    high = number(arg(node, 2, "max_val", 1.0))
    return "relu6" if (low, high) == (0.0, 6.0) else None


register_op(OpSpec(
    "relu",
    functions=frozenset({F.relu, F.relu_, torch.relu, torch.relu_, torch.Tensor.relu, torch.Tensor.relu_}),
    methods=frozenset({"relu", "relu_"}),
    modules=(nn.ReLU,),
    aten=_packets("relu", "relu_"),
))
register_op(OpSpec(
    "relu6",
    functions=frozenset({F.relu6}),
    methods=frozenset(),
    modules=(nn.ReLU6,),
    aten=_packets("relu6", "relu6_"),
))
_HARDTANH = OpSpec("hardtanh", functions=frozenset({F.hardtanh, F.hardtanh_}), modules=(nn.Hardtanh,),
                   aten=_packets("hardtanh", "hardtanh_"))
_CLAMP = OpSpec("clamp", functions=frozenset({torch.clamp, torch.clip, torch.clamp_min, torch.Tensor.clamp,
                                              torch.Tensor.clip, torch.Tensor.clamp_min}),
                methods=frozenset({"clamp", "clip", "clamp_", "clip_", "clamp_min", "clamp_min_"}),
                aten=_packets("clamp", "clamp_", "clip", "clip_", "clamp_min", "clamp_min_"))
register_op(_HARDTANH)
register_op(_CLAMP)


def relu_kind(node: fx.Node, gm: fx.GraphModule | None = None) -> ActKind | None:
    """``"relu"`` / ``"relu6"`` if the node computes that activation, else None (any graph source).

    ReLU: ``nn.ReLU``, ``F.relu``, ``torch.relu``, ``x.relu()``, in-place forms, ``clamp(min=0)``,
    ``clamp_min(0)``, ``aten.relu[_]``. ReLU6: ``nn.ReLU6``, ``F.relu6``, ``hardtanh(0, 6)`` (function,
    module or ATen), ``clamp(0, 6)``, ``aten.relu6``.
    """
    if node.op == "call_module":
        if gm is None:
            return None
        try:
            module = gm.get_submodule(str(node.target))
        except AttributeError:
            return None
        if type(module) is nn.ReLU:
            return "relu"
        if type(module) is nn.ReLU6:
            return "relu6"
        if type(module) is nn.Hardtanh and (module.min_val, module.max_val) == (0.0, 6.0):
            return "relu6"
        return None
    if node.op not in ("call_function", "call_method"):
        return None
    if OPS["relu"].matches_target(node):
        return "relu"
    if OPS["relu6"].matches_target(node):
        return "relu6"
    if _HARDTANH.matches_target(node):
        if type_is(module_type(node, gm), (nn.ReLU6,)):
            return "relu6"  # an inlined nn.ReLU6: dynamic=True passes its bounds as graph values
        return _hardtanh_kind(node)
    if _CLAMP.matches_target(node):
        return _clamp_kind(node)
    return None


# ---------------------------------------------------------------------------------------------- attention pieces

register_op(OpSpec(
    "softmax",
    functions=frozenset({F.softmax, torch.softmax, torch.Tensor.softmax, torch._C._nn.softmax}
                        if hasattr(torch._C._nn, "softmax") else {F.softmax, torch.softmax, torch.Tensor.softmax}),
    methods=frozenset({"softmax"}),
    modules=(nn.Softmax,),
    aten=_packets("softmax", "_softmax", "_safe_softmax"),
))
register_op(OpSpec(
    "sdpa",
    functions=frozenset({F.scaled_dot_product_attention, torch._C._nn.scaled_dot_product_attention}),
    aten=_packets("scaled_dot_product_attention", "_scaled_dot_product_flash_attention_for_cpu",
                  "_scaled_dot_product_efficient_attention", "_scaled_dot_product_flash_attention",
                  "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_attention_math"),
))
register_op(OpSpec(
    "matmul",
    functions=frozenset({operator.matmul, torch.matmul, torch.bmm, torch.mm, torch.Tensor.matmul,
                         torch.Tensor.bmm, torch.Tensor.mm}),
    methods=frozenset({"matmul", "bmm", "mm", "__matmul__"}),
    aten=_packets("matmul", "bmm", "mm"),
))
register_op(OpSpec(
    "dropout",
    functions=frozenset({F.dropout, torch.dropout}),
    methods=frozenset(),
    modules=(nn.Dropout,),
    aten=_packets("dropout", "native_dropout"),
))


def is_op(node: Any, name: str, gm: fx.GraphModule | None = None) -> bool:
    """Is ``node`` the logical op ``name`` (``"relu"``, ``"relu6"``, ``"softmax"``, ``"sdpa"``, ...)?

    ``gm`` is needed only to look at ``call_module`` targets. ``relu`` / ``relu6`` include the
    argument-checked spellings (``clamp(min=0)``, ``hardtanh(0, 6)``); see :func:`relu_kind`.
    """
    if not isinstance(node, fx.Node):
        return False
    if name in ("relu", "relu6"):
        return relu_kind(node, gm) == name
    try:
        spec = OPS[name]
    except KeyError:
        raise KeyError(f"unknown op {name!r}; known ops are {sorted(OPS)} (add one with register_op)") from None
    if not spec.matches_target(node, gm):
        return False
    return spec.check(node) if spec.check is not None else True


def is_inplace(node: fx.Node, gm: fx.GraphModule | None = None) -> bool:
    """True for ``relu_`` (function, method or ATen), ``inplace=True`` calls and in-place modules."""
    if node.op == "call_module":
        if gm is None:
            return False
        try:
            return bool(getattr(gm.get_submodule(str(node.target)), "inplace", False))
        except AttributeError:
            return False
    if node.kwargs.get("inplace", False):
        return True
    if node.op == "call_function" and node.target in (F.relu, F.relu6, F.hardtanh, F.dropout):
        # dynamo spells nn.ReLU(inplace=True) as F.relu(x, inplace=True) or passes it positionally
        flag = arg(node, {F.relu: 1, F.relu6: 1, F.hardtanh: 3, F.dropout: 3}[node.target], "inplace", False)
        if flag is True:
            return True
    name = target_name(node)
    return name.endswith("_") and not name.endswith("__")


# ---------------------------------------------------------------------------------------------- where a node came from

# the compiled frame's root: L['self'], or L['args'][0] when a decorator wraps forward(self, ...)
_DYNAMO_ROOT = re.compile(r"^L\['[^']*'\](\[\d+\])?\.?")
_DYNAMO_INDEX = re.compile(r"\[(\d+)\]")
_DYNAMO_KEY = re.compile(r"\._modules\['([^']+)'\]|\['([^']+)'\]")


def graph_source(gm: fx.GraphModule) -> GraphSource:
    """Which tracer made ``gm``: ``"dynamo"``, ``"export"`` (ATen ops) or ``"symbolic_trace"``."""
    meta = getattr(gm, "meta", {}) or {}
    if "dynamo_compile_id" in meta or "dynamo_flat_name_to_original_fqn" in meta:
        return "dynamo"
    for node in gm.graph.nodes:
        if node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload):
            return "export"
        if "example_value" in node.meta:
            return "dynamo"
    return "symbolic_trace"


def normalize_path(path: str) -> str:
    """Dynamo's ``"L['self'].layers[0]._modules['fc']"`` → ``"layers.0.fc"``; FQNs unchanged."""
    path = _DYNAMO_ROOT.sub("", path)
    path = _DYNAMO_INDEX.sub(r".\1", path)
    path = _DYNAMO_KEY.sub(lambda m: "." + (m.group(1) or m.group(2)), path)
    return path.strip(".").replace("..", ".")


def _stack(node: fx.Node) -> list[tuple[Any, Any]]:
    stack = node.meta.get("nn_module_stack") or {}
    return list(stack.items())


def _entry_path(key: Any, value: Any, gm: fx.GraphModule | None) -> str:
    ids = (getattr(gm, "meta", None) or {}).get(MODULE_IDS_META) if gm is not None else None
    if ids and str(key) in ids:
        return ids[str(key)]
    path = value[0] if isinstance(value, tuple) and value else str(key).split("@")[0]
    return normalize_path(str(path))


def module_path(node: fx.Node, gm: fx.GraphModule | None = None) -> str:
    """FQN (as in ``model.named_modules()``) of the innermost module that made ``node``; ``""`` = root.

    For a ``call_module`` node that is the module itself (``node.target``). Dynamo's stack keys are
    module ids: when ``gm.meta[MODULE_IDS_META]`` maps them to FQNs (``surgeon.backend`` sets it),
    that mapping wins over the printed path.
    """
    if node.op == "call_module":
        return str(node.target)
    stack = _stack(node)
    if not stack:
        return str((getattr(gm, "meta", None) or {}).get(FRAME_SCOPE_META, "")) if gm is not None else ""
    return _entry_path(*stack[-1], gm)


def module_type(node: fx.Node, gm: fx.GraphModule | None = None) -> type | str | None:
    """Type of the innermost module that made ``node`` (a class, or a qualified name from export)."""
    if node.op == "call_module" and gm is not None:
        try:
            return type(gm.get_submodule(str(node.target)))
        except AttributeError:
            return None
    stack = _stack(node)
    if not stack:
        return None
    value = stack[-1][1]
    return value[1] if isinstance(value, tuple) and len(value) > 1 else None


def type_is(t: type | str | None, classes: tuple[type, ...]) -> bool:
    """``t`` (a class or export's ``"torch.nn.modules.activation.ReLU"``) is exactly one of ``classes``."""
    if t is None:
        return False
    if isinstance(t, type):
        return t in classes
    return any(t in (f"{c.__module__}.{c.__qualname__}", c.__qualname__) for c in classes)


def module_call(node: fx.Node, gm: fx.GraphModule | None, name: str) -> str | None:
    """The FQN of the module whose whole forward is this ``name`` op, else None.

    ``call_module`` → its target; on dynamo/export graphs, a node whose innermost module is an
    ``OPS[name].modules`` instance (``nn.ReLU`` inlined to ``aten.relu``) → that module's FQN.
    """
    spec = OPS.get(name)
    modules = spec.modules if spec is not None else ()
    if name == "relu6":
        modules = modules + (nn.Hardtanh,)
    if node.op == "call_module":
        return str(node.target)
    if modules and type_is(module_type(node, gm), modules):
        return module_path(node, gm)
    return None


def module_scope(node: fx.Node, gm: fx.GraphModule | None = None) -> str:
    """FQN of the module whose forward contains ``node`` (a module's own call → its parent)."""
    if node.op == "call_module":
        return str(node.target).rpartition(".")[0]
    return module_path(node, gm)


# ---------------------------------------------------------------------------------------------- shapes


def _int_or_hint(d: Any) -> int | None:
    if isinstance(d, int):
        return d
    hint = getattr(getattr(d, "node", None), "hint", None)
    return int(hint) if isinstance(hint, int) else None


def node_shape(node: fx.Node) -> list[int] | None:
    """Output shape from shape propagation (``tensor_meta``), export (``val``) or dynamo
    (``example_value``); symbolic sizes give their example value (hint), or None."""
    for key in ("tensor_meta", "val", "example_value"):
        value = node.meta.get(key)
        shape = getattr(value, "shape", None)
        if shape is not None:
            dims = [_int_or_hint(d) for d in shape]
            return None if any(d is None for d in dims) else dims
    return None
