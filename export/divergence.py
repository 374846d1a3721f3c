"""Where an ONNX export stops matching PyTorch: the first diverging module and ONNX node.

When :func:`surgeon.export.verify` fails, the outputs only say *that* the graph differs. This module
says *where*: the dynamo exporter tags every ONNX node with the module scopes it came from
(``pkg.torch.onnx.name_scopes``), so the values that leave each module's nodes are that module's
outputs in the graph. One onnxruntime run exposes all of them; forward hooks record the same modules'
outputs in PyTorch; comparing them (``torch.onnx.verification.VerificationInfo``) in the order
PyTorch finished the modules names the first module — innermost first — whose output diverges, and
the ONNX node that produced it. The graph's weights are compared with the model's too: a model edited
after export is the most common cause, and it is named directly.

Example:
    >>> import torch, surgeon.export
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    >>> _ = surgeon.export.to_onnx(net, "/tmp/doc_diverge", torch.randn(2, 4), overwrite=True)
    >>> with torch.no_grad():
    ...     _ = net[2].weight.add_(0.5)         # the model changes after export
    >>> rep = locate_divergence("/tmp/doc_diverge", net, (torch.randn(3, 4),))
    >>> rep.first.module, rep.first.onnx_op, [w.name for w in rep.weights]
    ('2', 'Gemm', ['2.weight'])
"""
from __future__ import annotations

import ast
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from surgeon.core.errors import ExportError
from surgeon.export.manifest import load_manifest

__all__ = ["locate_divergence", "divergence_or_reason", "weight_mismatches", "DivergenceReport", "ModuleDivergence", "WeightMismatch"]

_SCOPES_KEY = "pkg.torch.onnx.name_scopes"
_FLOAT_TYPES = {1, 10, 11, 16}       # onnx TensorProto FLOAT, FLOAT16, DOUBLE, BFLOAT16


@dataclass
class WeightMismatch:
    """A graph initializer whose values differ from the model's tensor of the same name."""

    name: str
    max_abs: float


@dataclass
class ModuleDivergence:
    """One module's output: PyTorch (hooks) vs onnxruntime (the value leaving its ONNX nodes)."""

    module: str
    module_class: str
    onnx_value: str
    onnx_node: str
    onnx_op: str
    max_abs: float
    max_rel: float
    diverges: bool


@dataclass
class DivergenceReport:
    """What :func:`locate_divergence` found; ``first`` is None when every module matches."""

    graph: str
    atol: float
    rtol: float
    modules: list[ModuleDivergence] = field(default_factory=list)
    weights: list[WeightMismatch] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)    # modules whose outputs could not be paired

    @property
    def first(self) -> ModuleDivergence | None:
        return next((m for m in self.modules if m.diverges), None)

    def summary(self) -> str:
        """One paragraph: the first diverging module / node, and weights that changed."""
        parts = []
        if self.weights:
            names = ", ".join(f"{w.name!r} (max abs {w.max_abs:.3g})" for w in self.weights[:5])
            more = f" and {len(self.weights) - 5} more" if len(self.weights) > 5 else ""
            parts.append(f"the graph's weights differ from the model's at {names}{more}: the model "
                         "changed after export; re-export it (or verify the model that was exported)")
        m = self.first
        if m is not None:
            parts.append(f"the first module whose output diverges is {m.module!r} ({m.module_class}): "
                         f"ONNX node {m.onnx_node!r} ({m.onnx_op}) gives value {m.onnx_value!r} with "
                         f"max abs error {m.max_abs:.3e} (max rel {m.max_rel:.3e})")
        elif self.modules:
            parts.append(f"all {len(self.modules)} compared module outputs match within atol="
                         f"{self.atol:g} + rtol={self.rtol:g}; the difference arises in the root "
                         "module's own ops or in values that leave no submodule")
        else:
            parts.append("no module output could be paired with an ONNX value (graph without "
                         "module scopes?)")
        return "; ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["first"] = None if self.first is None else asdict(self.first)
        d["summary"] = self.summary()
        return d

    def __str__(self) -> str:
        return self.summary()


# ----------------------------------------------------------------------------- the ONNX side

def _node_modules(node: Any) -> list[str]:
    """Module paths a node sits in, outermost first (root '' left out)."""
    for prop in node.metadata_props:
        if prop.key == _SCOPES_KEY:
            try:
                scopes = ast.literal_eval(prop.value)
            except (ValueError, SyntaxError):
                return []
            return [s for s in scopes[:-1] if s]      # the last entry is the FX node's own name
    return []


def _float_values(proto: Any) -> set[str]:
    """Names of values onnx shape inference types as floating point."""
    import onnx

    try:
        inferred = onnx.shape_inference.infer_shapes(proto, data_prop=False)
    except Exception:
        inferred = proto
    g = inferred.graph
    return {v.name for v in [*g.value_info, *g.output, *g.input]
            if v.type.tensor_type.elem_type in _FLOAT_TYPES}


def _module_boundaries(proto: Any, node_scopes: list[list[str]]) -> dict[str, list[tuple[str, Any]]]:
    """module path -> [(value, producing node)] leaving that module's nodes, in graph order."""
    g = proto.graph
    scopes = [set(m) for m in node_scopes]
    consumers: dict[str, list[int]] = {}
    for i, n in enumerate(g.node):
        for name in n.input:
            consumers.setdefault(name, []).append(i)
    graph_outputs = {o.name for o in g.output}
    floats = _float_values(proto)
    out: dict[str, list[tuple[str, Any]]] = {}
    for i, n in enumerate(g.node):
        for value in n.output:
            if not value or value not in floats:
                continue
            for module in scopes[i]:
                leaves = value in graph_outputs or any(module not in scopes[j] for j in consumers.get(value, []))
                if leaves:
                    out.setdefault(module, []).append((value, n))
    return out


def _run_with_values(proto: Any, values: list[str], feeds: dict[str, np.ndarray],
                     level: str | None, providers: Sequence[str]) -> dict[str, np.ndarray]:
    """One onnxruntime run of ``proto`` with ``values`` exposed as extra outputs."""
    import onnx

    from surgeon.export.ort_optimize import session_options
    import onnxruntime as ort

    existing = {o.name for o in proto.graph.output}
    extra = [v for v in values if v not in existing]
    proto.graph.output.extend(onnx.helper.make_empty_tensor_value_info(v) for v in extra)
    try:
        sess = ort.InferenceSession(proto.SerializeToString(), session_options(level),
                                    providers=list(providers))
    finally:
        del proto.graph.output[len(proto.graph.output) - len(extra):]
    names = [o.name for o in sess.get_outputs()]
    wanted = {x.name for x in sess.get_inputs()}
    results = sess.run(None, {k: v for k, v in feeds.items() if k in wanted})
    return dict(zip(names, results))


# ----------------------------------------------------------------------------- the PyTorch side

def _flat_tensors(obj: Any) -> list[Tensor]:
    if isinstance(obj, Tensor):
        return [obj]
    if isinstance(obj, dict):
        return [t for v in obj.values() for t in _flat_tensors(v)]
    if isinstance(obj, (list, tuple)):
        return [t for v in obj for t in _flat_tensors(v)]
    if hasattr(obj, "to_tuple"):                      # transformers ModelOutput
        return _flat_tensors(obj.to_tuple())
    return []


def _torch_module_outputs(model: nn.Module, inputs: tuple[Tensor, ...], wanted: set[str]
                          ) -> tuple[list[tuple[str, list[Tensor]]], set[str]]:
    """Outputs of the ``wanted`` modules in the order they finish; the set of modules called twice."""
    finished: list[tuple[str, list[Tensor]]] = []
    calls: dict[str, int] = {}
    handles = []

    def hook(name: str):
        def record(_module: nn.Module, _args: Any, output: Any) -> None:
            calls[name] = calls.get(name, 0) + 1
            finished.append((name, [t.detach().clone() for t in _flat_tensors(output)
                                    if t.is_floating_point()]))
        return record

    try:
        for name, module in model.named_modules():
            if name in wanted:
                handles.append(module.register_forward_hook(hook(name)))
        with torch.no_grad():
            model(*inputs)
    finally:
        for h in handles:
            h.remove()
    return finished, {n for n, c in calls.items() if c > 1}


def _weight_mismatches(proto: Any, node_scopes: list[list[str]], model: nn.Module, atol: float,
                       rtol: float) -> list[WeightMismatch]:
    """The model's parameters / buffers whose values in the graph differ (model edited after export).

    Initializers are traced to the model by name, and through the innermost module of each node
    that reads them: that catches weights the exporter renamed (``val_12``: a folded ``W.T``) or
    shared between modules whose values were equal at export. A read initializer is a mismatch when
    it equals none of its module's parameters of that shape (either orientation for 2-D); it is
    named when exactly one parameter has that shape.
    """
    from onnx import numpy_helper

    state = {**dict(model.named_parameters(remove_duplicate=False)),
             **dict(model.named_buffers(remove_duplicate=False))}     # tied weights under every name
    own = {name: dict(m.named_parameters(recurse=False)) for name, m in model.named_modules()}
    inits = {i.name: i for i in proto.graph.initializer}
    arrays: dict[str, np.ndarray] = {}                # float64 copies, each made once
    wants: dict[str, np.ndarray] = {}

    def error(init: str, pname: str, flip: bool) -> float | None:
        """Max abs difference beyond tolerance (0.0 when within it); None if the shapes differ."""
        dims = tuple(inits[init].dims)
        if (dims[::-1] if flip else dims) != tuple(state[pname].shape):
            return None
        if init not in arrays:                        # native dtype: export copies weights bit for bit
            arrays[init] = numpy_helper.to_array(inits[init])
        if pname not in wants:
            t = state[pname].detach().cpu()
            wants[pname] = (t.float() if t.dtype == torch.bfloat16 else t).numpy()
        got, want = (arrays[init].T if flip else arrays[init]), wants[pname]
        if got.dtype == want.dtype and np.array_equal(got, want, equal_nan=True):
            return 0.0                                # the common case, without float64 copies
        got, want = got.astype(np.float64), want.astype(np.float64)
        err = np.abs(got - want)
        return float(err.max()) if (err > atol + rtol * np.abs(want)).any() else 0.0

    out: dict[str, float] = {}
    for name in inits:
        if name in state and inits[name].data_type in _FLOAT_TYPES:
            e = error(name, name, False)
            if e:
                out[name] = e
    for node, scopes in zip(proto.graph.node, node_scopes):
        params = own.get(scopes[-1], {}) if scopes else {}
        for name in node.input:
            if name not in inits or inits[name].data_type not in _FLOAT_TYPES or not params:
                continue
            errors = {(f"{scopes[-1]}.{p}", flip): error(name, f"{scopes[-1]}.{p}", flip)
                      for p, t in params.items() for flip in ((False, True) if t.dim() == 2 else (False,))}
            errors = {k: e for k, e in errors.items() if e is not None}
            if not errors or min(errors.values()) == 0.0:
                continue                     # not this module's weight, or equal to one of them
            candidates = {pname for pname, _ in errors}
            if len(candidates) == 1:
                pname = candidates.pop()
                out[pname] = max(out.get(pname, 0.0), min(errors.values()))
    return [WeightMismatch(n, e) for n, e in sorted(out.items())]


# ----------------------------------------------------------------------------- entry point

def locate_divergence(path: str | Path, model: nn.Module, inputs: Sequence[Tensor], *,
                      graph: str | None = None, atol: float = 1e-5, rtol: float = 1e-4,
                      ort_level: str | None = None,
                      providers: Sequence[str] = ("CPUExecutionProvider",),
                      criterion: Any = None) -> DivergenceReport:
    """Find the first module whose output differs between an ONNX export and ``model``.

    ``path``: an export folder / manifest / ``.onnx`` written by :func:`surgeon.export.to_onnx`;
    ``graph`` picks one graph of a multi-graph export (``"prefill"``); ``model`` is the module that
    graph was exported from (for a causal LM's prefill graph,
    ``surgeon.export.stateful_lm.PrefillLM(model)``) and ``inputs`` its positional inputs at any
    shape the graph accepts. The model is run in eval mode under ``no_grad``; its hooks are removed
    and its training flags restored afterwards. onnxruntime runs at ``ort_level`` (default: the level
    the manifest records), with every module's output exposed. A module diverges when its output
    fails ``criterion`` (a :class:`surgeon.export.Criterion`, as verify uses) or, without one, when
    any element is beyond ``atol + rtol·|torch|``; weights are always compared at ``atol`` / ``rtol``.

    Example:
        >>> import torch, surgeon.export
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        >>> _ = surgeon.export.to_onnx(net, "/tmp/doc_locate", torch.randn(2, 4), overwrite=True)
        >>> locate_divergence("/tmp/doc_locate", net, (torch.randn(5, 4),)).first is None
        True
    """
    import onnx

    from surgeon.export.onnx_export import model_eval_mode

    manifest = load_manifest(path)
    gname = graph if graph is not None else next(iter(manifest.graphs))
    spec = manifest.graph(gname)
    onnx_path = manifest.graph_path(gname)
    try:
        proto = onnx.load(str(onnx_path))
    except Exception as e:
        raise ExportError(f"cannot read ONNX graph {onnx_path} with its external data: {e}") from e
    inputs = tuple(inputs)
    names = [t.name for t in spec.inputs]
    if len(inputs) != len(names):
        raise ExportError(f"locate_divergence needs {len(names)} inputs ({names}) for graph "
                          f"{gname!r}, got {len(inputs)}")
    feeds = {n: t.detach().cpu().numpy() for n, t in zip(names, inputs)}
    level = ort_level if ort_level is not None else spec.ort_level

    report = DivergenceReport(graph=str(onnx_path), atol=atol, rtol=rtol)
    node_scopes = [_node_modules(n) for n in proto.graph.node]
    report.weights = _weight_mismatches(proto, node_scopes, model, atol, rtol)
    boundaries = _module_boundaries(proto, node_scopes)
    with model_eval_mode(model):
        finished, repeated = _torch_module_outputs(model, inputs, set(boundaries))
    values = sorted({v for vals in boundaries.values() for v, _ in vals})
    ort_values = _run_with_values(proto, values, feeds, level, providers)
    classes = {n: type(m).__name__ for n, m in model.named_modules()}

    from torch.onnx.verification import VerificationInfo

    for module, outputs in finished:
        if module in repeated:
            if module not in report.skipped:
                report.skipped.append(module)
            continue
        candidates = [(v, node) for v, node in boundaries[module] if v in ort_values]
        for t in outputs:
            same_shape = [(v, node) for v, node in candidates
                          if tuple(ort_values[v].shape) == tuple(t.shape)]
            if len(same_shape) != 1:      # none, or ambiguous: not paired
                if module not in report.skipped:
                    report.skipped.append(module)
                continue
            value, node = same_shape[0]
            got = torch.from_numpy(np.ascontiguousarray(ort_values[value])).to(t.dtype)
            info = VerificationInfo.from_tensors(name=value, expected=t.cpu(), actual=got)
            if criterion is not None:
                bad = not criterion.check(value, ort_values[value], t.cpu().numpy()).passed
            else:
                bad = bool((~torch.isclose(got.double(), t.cpu().double(), atol=atol, rtol=rtol,
                                           equal_nan=True)).any())
            report.modules.append(ModuleDivergence(
                module=module, module_class=classes.get(module, "?"), onnx_value=value,
                onnx_node=node.name, onnx_op=node.op_type, max_abs=float(info.max_abs_diff),
                max_rel=float(info.max_rel_diff), diverges=bad))
    return report


def weight_mismatches(path: str | Path, model: nn.Module, *, graph: str | None = None, atol: float = 0.0,
                      rtol: float = 1e-6) -> list[WeightMismatch]:
    """The model's parameters / buffers that the ONNX graph holds with other values (beyond ``atol + rtol·|w|``).

    ``model`` is the module the graph was exported from (for a causal LM's graphs, ``PrefillLM(model)``
    / ``DecodeLM(model)``). Export copies weights bit for bit, so the default bound only allows for
    a transposed or re-laid-out copy; anything else is a model edited after export.

    Example:
        >>> import torch, surgeon.export
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
        >>> _ = surgeon.export.to_onnx(net, "/tmp/doc_weights", torch.randn(2, 4), overwrite=True)
        >>> weight_mismatches("/tmp/doc_weights", net)
        []
        >>> with torch.no_grad():
        ...     _ = net[0].weight.mul_(1 + 1e-3)
        >>> [w.name for w in weight_mismatches("/tmp/doc_weights", net)]
        ['0.weight']
    """
    import onnx

    manifest = load_manifest(path)
    gname = graph if graph is not None else next(iter(manifest.graphs))
    onnx_path = manifest.graph_path(gname)
    try:
        proto = onnx.load(str(onnx_path))
    except Exception as e:
        raise ExportError(f"cannot read ONNX graph {onnx_path} with its external data: {e}") from e
    return _weight_mismatches(proto, [_node_modules(n) for n in proto.graph.node], model, atol, rtol)


def divergence_or_reason(path: str | Path, model: nn.Module, inputs: Sequence[Tensor], **kwargs: Any
                         ) -> dict[str, Any]:
    """:func:`locate_divergence` as a dict for a failed verification; if locating itself fails, a
    dict whose ``summary`` says why (diagnosis never turns a verification result into a crash)."""
    try:
        return locate_divergence(path, model, inputs, **kwargs).to_dict()
    except Exception as e:  # diagnosis only: the verification result stands without it
        text = " ".join(str(e).split())[:300]
        return {"summary": f"could not locate the first diverging module ({type(e).__name__}: {text})"}
