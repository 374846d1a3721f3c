"""Export a PyTorch model to ONNX with the dynamo exporter, plus a manifest describing it.

Example:
    >>> import torch, surgeon.export
    >>> res = surgeon.export.to_onnx(torch.nn.Linear(8, 3), "/tmp/doc_export", torch.randn(2, 8))
    >>> res.onnx_path.name, res.manifest.graph().inputs[0].shape
    ('model.onnx', ['batch', 8])
"""
from __future__ import annotations

import contextlib
import importlib.metadata
import inspect
import io
import logging
import re
import sys
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from surgeon.core.modules import eval_mode as model_eval_mode  # noqa: F401 (export modules use this name)
from surgeon.core.errors import ExportError
from surgeon.export.runtime import onnx_dims as _onnx_dims, onnx_dtype as _onnx_dtype  # noqa: F401
from surgeon.export.destination import Destination as _Destination  # noqa: F401 (old private names, kept for
from surgeon.export.destination import commit as _commit  # noqa: F401   modules not yet moved to
from surgeon.export.destination import prepare as _prepare_destination  # noqa: F401   export.destination)
from surgeon.export.destination import rollback as _rollback  # noqa: F401
from surgeon.export.manifest import GraphSpec, Manifest, TensorSpec

__all__ = ["ExportResult", "to_onnx", "flatten_outputs", "model_eval_mode", "quiet_exporter"]


# ----------------------------------------------------------------------------- shared helpers

def flatten_outputs(out: Any, prefix: str = "") -> list[tuple[str, Tensor]]:
    """Flatten a model output into ``[(name, tensor), ...]`` in the exporter's (pytree) order.

    A Tensor is ``"output"``; a tuple/list gives ``"output_0"``, ``"output_1"``; a dict or HF
    ``ModelOutput`` uses its keys (``"logits"``); nesting joins with dots (``"output_1.hidden"``).
    ``None`` entries are skipped, as the ONNX exporter drops them.

    Example:
        >>> import torch
        >>> [n for n, _ in flatten_outputs((torch.ones(1), {"a": torch.ones(1), "b": None}))]
        ['output_0', 'output_1.a']
    """
    if isinstance(out, Tensor):
        return [(prefix or "output", out)]
    if out is None:
        return []
    if isinstance(out, Mapping):  # dict, OrderedDict, HF ModelOutput (non-None fields only)
        items: list[tuple[str, Any]] = [(str(k), v) for k, v in out.items()]
    elif isinstance(out, (tuple, list)):
        items = [(str(i), v) for i, v in enumerate(out)]
        if not prefix:
            items = [(f"output_{k}", v) for k, v in items]
    else:
        where = prefix or "the top level"
        raise TypeError(
            f"model output at {where!r} is a {type(out).__name__}, which cannot be an ONNX output; "
            "return tensors (or tuples/dicts of tensors), e.g. pass use_cache=False or wrap the "
            "model in a module whose forward returns only the tensors you need")
    flat: list[tuple[str, Tensor]] = []
    for key, value in items:
        flat += flatten_outputs(value, f"{prefix}.{key}" if prefix else key)
    return flat


_NOISY_LOGGERS = ("torch", "torch.onnx", "torch.export", "torch._export", "torch._dynamo",
                  "torch.fx", "torch.fx.experimental.symbolic_shapes", "onnxscript", "onnx_ir")


@contextlib.contextmanager
def quiet_exporter() -> Iterator[io.StringIO]:
    """Silence the exporter's Python-level chatter (prints, warnings, torch/onnxscript logging).

    Yields the buffer that captured stdout/stderr. C-level output cannot be caught this way.
    """
    names = set(_NOISY_LOGGERS) | {
        n for n in logging.root.manager.loggerDict
        if n.startswith(("torch.onnx", "torch.export", "torch._export", "torch._dynamo",
                         "torch.fx", "onnxscript", "onnx_ir"))}
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    buf = io.StringIO()
    try:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        with warnings.catch_warnings(), contextlib.redirect_stdout(buf), \
                contextlib.redirect_stderr(buf):
            warnings.simplefilter("ignore")
            yield buf
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float32`` -> ``"float32"`` (the manifest's spelling)."""
    return str(dtype).removeprefix("torch.")


def versions() -> dict[str, str]:
    """Versions of the packages an export depends on."""
    out = {"python": sys.version.split()[0]}
    for pkg in ("surgeon", "torch", "onnx", "onnxruntime", "onnxscript"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


# ----------------------------------------------------------------------------- result type

@dataclass
class ExportResult:
    """What :func:`to_onnx` wrote (``ort``: the optimization-level check, when asked for)."""

    onnx_path: Path
    manifest_path: Path
    manifest: Manifest
    seconds: float
    ort: Any = None
    #: ``to_onnx(passes=...)``: the surgery on the torch.export program (``.model`` is what was
    #: converted, the reference for ``verify``; ``.report`` what the passes changed)
    surgery: Any = None

    def __str__(self) -> str:
        lines = [f"exported {self.onnx_path.parent if len(self.manifest.graphs) > 1 else self.onnx_path} "
                 f"in {self.seconds:.1f} s"]
        for name, g in self.manifest.graphs.items():
            ins = ", ".join(f"{t.name}{t.shape}" for t in g.inputs)
            outs = ", ".join(f"{t.name}{t.shape}" for t in g.outputs)
            level = f", onnxruntime level {g.ort_level}" if g.ort_level else ""
            lines.append(f"  {g.file} (opset {g.opset}{level}): inputs {ins}; outputs {outs}")
        if self.ort is not None:
            lines.append(str(self.ort))
        return "\n".join(lines)


# ----------------------------------------------------------------------------- destination

# ----------------------------------------------------------------------------- arguments

_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def _default_input_names(model: nn.Module, n: int) -> list[str]:
    names: list[str] = []
    try:
        params = inspect.signature(model.forward).parameters.values()
        for p in params:
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
                names.append(p.name)
            elif p.kind == p.VAR_POSITIONAL:
                break
    except (TypeError, ValueError):
        pass
    names = names[:n]
    return names + [f"input_{i}" for i in range(len(names), n)]


def _normalize_axes(
    dynamic_axes: Mapping[str, Any] | None, input_names: list[str], output_names: list[str],
    inputs: tuple[Tensor, ...],
) -> tuple[dict[str, dict[int, str]], dict[str, dict[int, str]]]:
    """Turn ``dynamic_axes`` into ``{input: {dim: name}}`` and ``{output: {dim: name}}``."""
    if dynamic_axes is None:  # default: dim 0 of every input is the batch
        return {n: {0: "batch"} for n, t in zip(input_names, inputs) if t.dim() > 0}, {}
    ins: dict[str, dict[int, str]] = {}
    outs: dict[str, dict[int, str]] = {}
    ranks = dict(zip(input_names, (t.dim() for t in inputs)))
    for key, axes in dynamic_axes.items():
        if key not in ranks and key not in output_names:
            raise ExportError(
                f"dynamic_axes names {key!r}, which is not an input or output of the model; "
                f"inputs are {input_names}, outputs are {output_names}")
        if isinstance(axes, Mapping):
            pairs = [(int(d), str(n)) for d, n in axes.items()]
        elif isinstance(axes, (list, tuple)):
            pairs = [(int(d), "batch" if int(d) == 0 else f"{key}_dim{int(d)}") for d in axes]
        else:
            raise ExportError(f"dynamic_axes[{key!r}] must be a dict {{dim: name}} or a list of "
                              f"dims, got {type(axes).__name__}")
        norm: dict[int, str] = {}
        for d, name in pairs:
            if key in ranks:
                rank = ranks[key]
                if not -rank <= d < rank:
                    raise ExportError(f"dynamic_axes[{key!r}] has dim {d}, but input {key!r} "
                                      f"has only {rank} dims")
                d %= rank
            name = re.sub(r"\W", "_", name)
            if not _IDENT.match(name):
                name = f"d_{name}"
            norm[d] = name
        (ins if key in ranks else outs)[key] = norm
    return ins, outs


def _tile_size_one_dims(
    inputs: tuple[Tensor, ...], input_names: list[str], axes: dict[str, dict[int, str]],
) -> tuple[tuple[Tensor, ...], list[str]]:
    """Tile every dynamic dim whose example size is 1 up to 2 (torch.export specialises 0/1)."""
    sizes: dict[str, tuple[int, str]] = {}
    for name, t in zip(input_names, inputs):
        for d, dim_name in axes.get(name, {}).items():
            size = t.shape[d]
            if dim_name in sizes and sizes[dim_name][0] != size:
                other_size, other = sizes[dim_name]
                raise ExportError(
                    f"dynamic dim {dim_name!r} has size {size} in input {name!r} (dim {d}) but "
                    f"{other_size} in {other}; inputs sharing a dim name must agree. Give them "
                    "different names in dynamic_axes, or make the example sizes equal")
            sizes.setdefault(dim_name, (size, f"input {name!r} dim {d}"))
    notes: list[str] = []
    out = []
    for name, t in zip(input_names, inputs):
        for d, dim_name in axes.get(name, {}).items():
            if t.shape[d] == 0:
                raise ExportError(f"input {name!r} dim {d} ({dim_name!r}) has size 0 in the "
                                  "example; use a size >= 2")
            if t.shape[d] == 1:
                t = torch.cat([t, t], dim=d)
                notes.append(f"input {name!r} dim {d} ({dim_name!r}) had example size 1; tiled to "
                             "2 for export (a size-1 example lets torch.export specialise the dim)")
        out.append(t)
    return tuple(out), notes


# ----------------------------------------------------------------------------- graph reading

def _shorten(text: str, max_lines: int = 14, max_chars: int = 1400) -> str:
    skip = ("For more information", "TORCHDYNAMO_EXTENDED", "docs.google.com", "For C++ stack",
            "For extended logs", "If you suspect", "draft_export", "(Refer to the full stack")
    lines = [ln.rstrip() for ln in text.strip().splitlines()
             if ln.strip() and not any(s in ln for s in skip)]
    short = "\n".join(lines[:max_lines])
    if len(lines) > max_lines:
        short += "\n  [...]"
    return short if len(short) <= max_chars else short[:max_chars] + " [...]"


def _op_call_sites(model: nn.Module, op: str, inputs: tuple[Any, ...], dynamic_shapes: Any) -> list[str]:
    """Where ``op`` (e.g. ``aten._linalg_eigh``) is called: module path, class and source line, from a
    ``torch.export`` capture (the capture succeeded; only the ONNX translation failed)."""
    try:
        with quiet_exporter(), model_eval_mode(model):
            program = torch.export.export(model, inputs, dynamic_shapes=dynamic_shapes, strict=False)
    except Exception:
        return []
    base = op.split(".")[-1].lstrip("_")          # aten._linalg_eigh (decomposed) <- aten.linalg_eigh
    sites = []
    for node in program.graph.nodes:
        parts = str(node.target).split(".")
        if node.op != "call_function" or len(parts) < 2 or parts[-2].lstrip("_") != base:
            continue
        stack = list((node.meta.get("nn_module_stack") or {}).values())
        where = f"module {stack[-1][0]!r} ({getattr(stack[-1][1], '__name__', stack[-1][1])})" if stack else "the root module"
        trace = (node.meta.get("stack_trace") or "").strip().splitlines()
        line = next((ln.strip() for ln in reversed(trace) if ln.strip().startswith("File ")), "")
        sites.append(f"{where}{', ' + line if line else ''}")
    return sites


def _exporter_error(model: nn.Module, e: BaseException, inputs: tuple[Any, ...] | None = None,
                    dynamic_shapes: Any = None) -> ExportError:
    root = e
    seen = {id(root)}
    while root.__cause__ is not None and id(root.__cause__) not in seen:
        root = root.__cause__
        seen.add(id(root))
    kind = type(e).__name__
    stage = {"TorchExportError": "torch.export could not capture the model",
             "ConversionError": "the captured graph could not be translated to ONNX"}.get(
        kind, f"the exporter raised {kind}")
    text = str(root)
    if "GuardOnDataDependent" in type(root).__name__ or "data-dependent" in text:
        hint = ("Python control flow on tensor values (`if x.sum() > 0`, `.item()`) cannot be "
                "exported: use torch.where / torch.cond, or move the decision out of forward")
    elif "No ONNX function found" in text or "DispatchError" in type(root).__name__:
        match = re.search(r"op='([\w.]+)'", text)
        op = match.group(1) if match else "an operator"
        sites = _op_call_sites(model, op, inputs, dynamic_shapes) if match and inputs is not None else []
        where = f" (called in {'; '.join(sites[:3])})" if sites else ""
        hint = (f"{op}{where} has no ONNX translation: replace it with supported ops in that module, "
                "or register a translation (torch.onnx.export's custom_translation_table)")
    elif "Constraints violated" in text or "specialized" in text:
        hint = ("a dim declared dynamic is specialised by the model: drop it from dynamic_axes, "
                "or remove the shape-dependent Python logic")
    else:
        hint = ("reproduce with torch.export.export(model, example_inputs, strict=False) to see "
                "the failing line")
    return ExportError(
        f"ONNX export of {type(model).__name__} failed: {stage}.\n"
        f"{type(root).__name__}: {_shorten(text)}\nWhat to try: {hint}. "
        "(The full exporter error is chained below.)")


def _specialised_error(model: nn.Module, fixed: list[str], inputs: tuple[Tensor, ...],
                       dynamic_shapes: tuple[Any, ...]) -> ExportError:
    """Explain dims that came out fixed; re-run torch.export once to get its reason."""
    reason = ""
    try:
        with quiet_exporter(), model_eval_mode(model):
            torch.export.export(model, inputs, dynamic_shapes=dynamic_shapes, strict=False)
    except Exception as e:  # the constraint violation explains which dim and why
        reason = f"\ntorch.export says: {_shorten(str(e), max_lines=8, max_chars=900)}"
    return ExportError(
        f"ONNX export of {type(model).__name__} fixed dims that were declared dynamic: "
        f"{'; '.join(fixed)}. The model's code specialises them (e.g. a hard-coded size, a "
        "reshape to the example shape, a Python loop over the dim), so the graph would only run "
        f"at the example size.{reason}\nWhat to try: remove the shape-dependent code, or drop "
        "those dims from dynamic_axes if they really are fixed.")


# ----------------------------------------------------------------------------- main entry

def to_onnx(
    model: nn.Module,
    path: str | Path,
    example_inputs: tuple[Tensor, ...] | Tensor | None = None,
    dynamic_axes: dict[str, dict[int, str] | list[int]] | None = None,
    input_names: list[str] | None = None,
    output_names: list[str] | None = None,
    opset: int | None = None,
    recipe: dict | None = None,
    overwrite: bool = False,
    ort_optimize: bool | str | Sequence[str] | Mapping[str, Any] = False,
    save_optimized: bool | str = False,
    passes: Sequence[Any] | None = None,
    linear_op: str = "auto",
) -> ExportResult:
    """Export ``model`` to ONNX (dynamo exporter) and write a manifest next to the graph.

    ``path`` is a folder (gets ``model.onnx`` + ``model.onnx.data`` + ``manifest.json``) or a file
    ending in ``.onnx`` (manifest beside it as ``<stem>.manifest.json``). ``dynamic_axes`` maps an
    input name to ``{dim: name}`` (or a list of dims); the default makes dim 0 of every input a
    dynamic ``"batch"``; ``{}`` exports fixed shapes. A dynamic dim with example size 1 is tiled to
    2 first. Dims declared dynamic must come out symbolic in the graph, else :class:`ExportError`.
    The model is exported in eval mode; its training flags are restored afterwards.

    ``ort_optimize`` (``True``, a level, a list of levels, or a dict of
    :func:`surgeon.export.optimize` keyword arguments) checks the graphs under onnxruntime's
    optimization levels against ``model`` before anything is written, and records the fastest level
    that keeps parity in the manifest; ``save_optimized`` (``True`` = ``"extended"``, or a level) also
    writes the onnxruntime-optimized graph. A linearized causal LM exports as prefill + decode graphs
    (:func:`surgeon.export.export_causal_lm`) and needs no ``example_inputs``; ``linear_op`` picks how its
    recurrence is written (ONNX's ``LinearAttention`` at opset 27 or our own ops: see
    :mod:`surgeon.export.linear_attention_op`).

    ``passes`` (surgeon pass configs) are applied to the ``torch.export`` program's graph (ATen ops)
    before conversion, e.g. ``[LinearizeReLU(init=0.0)]`` or ``[FinalizeReLU()]`` on a surgered
    model; ``result.surgery.model`` is the rewritten module (verify against it) and the manifest
    lists the sites under ``exporter["graph_passes"]``.

    Example:
        >>> import torch, surgeon.export
        >>> net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
        >>> res = surgeon.export.to_onnx(net, "/tmp/doc_mlp", torch.randn(1, 8))
        >>> res.manifest.graph().inputs[0].example_shape   # batch 1 was tiled to 2
        [2, 8]
        >>> surgeon.export.verify("/tmp/doc_mlp", net).passed
        True
    """
    t0 = time.perf_counter()
    if not isinstance(model, nn.Module):
        raise ExportError(f"to_onnx needs an nn.Module, got {type(model).__name__}")
    ort_kwargs = ort_optimize_kwargs(ort_optimize, save_optimized)   # bad levels fail before export
    if _is_linearized_causal_lm(model):
        from surgeon.export.causal_lm import export_causal_lm

        return export_causal_lm(model, path, opset=opset, overwrite=overwrite, recipe=recipe,
                                ort_optimize=ort_kwargs if ort_kwargs is not None else False, linear_op=linear_op)
    if example_inputs is None:
        raise ExportError(f"to_onnx({type(model).__name__}) needs example_inputs (a tensor or a tuple of tensors); "
                          "only linearized causal LMs (prefill + decode graphs) export without them")
    inputs = (example_inputs,) if isinstance(example_inputs, Tensor) else tuple(example_inputs)
    for i, t in enumerate(inputs):
        if not isinstance(t, Tensor):
            raise ExportError(f"example_inputs[{i}] is a {type(t).__name__}; to_onnx takes a "
                              "tensor or a tuple of tensors (wrap the model to fix other args)")
    if input_names is None:
        input_names = _default_input_names(model, len(inputs))
    input_names = list(input_names)
    if len(input_names) != len(inputs) or len(set(input_names)) != len(input_names):
        raise ExportError(f"input_names {input_names} must be {len(inputs)} distinct names, one "
                          "per example input")
    path = Path(path)
    dest = _prepare_destination(path)  # fail fast: nothing expensive has run yet
    try:
        with model_eval_mode(model):
            return _export(model, dest, inputs, dynamic_axes, input_names, output_names, opset,
                           recipe, t0, ort_kwargs, passes)
    except BaseException:
        _rollback(dest)
        raise


def _is_linearized_causal_lm(model: nn.Module) -> bool:
    """A causal LM whose attention ``LinearizeAttention`` swapped: exported as prefill + decode graphs."""
    if not hasattr(model, "generate"):
        return False
    from surgeon.passes.attention.module import LinearAttention

    return any(isinstance(m, LinearAttention) and m.is_causal for m in model.modules())


def _export(
    model: nn.Module, dest: _Destination, inputs: tuple[Tensor, ...],
    dynamic_axes: Mapping[str, Any] | None, input_names: list[str],
    output_names: list[str] | None, opset: int | None, recipe: dict | None, t0: float,
    ort_kwargs: dict[str, Any] | None = None, passes: Sequence[Any] | None = None,
) -> ExportResult:
    import onnx

    # Output structure (names, count) from one eager forward at the example shapes.
    try:
        with torch.no_grad():
            out = model(*inputs)
    except Exception as e:
        raise ExportError(
            f"{type(model).__name__} failed on example_inputs (shapes "
            f"{[list(t.shape) for t in inputs]}) before export: {type(e).__name__}: {e}. Check "
            "the inputs' number, order, dtype and shape") from e
    try:
        flat_out = flatten_outputs(out)
    except TypeError as e:
        raise ExportError(str(e)) from e
    default_out = [n for n, _ in flat_out]
    if output_names is None:
        output_names = default_out
    output_names = list(output_names)
    if len(output_names) != len(flat_out) or len(set(output_names)) != len(output_names):
        raise ExportError(f"output_names {output_names} must be {len(flat_out)} distinct names; "
                          f"the model returns {len(flat_out)} tensors ({default_out})")

    in_axes, out_axes = _normalize_axes(dynamic_axes, input_names, output_names, inputs)
    orig_shapes = [list(t.shape) for t in inputs]
    inputs, notes = _tile_size_one_dims(inputs, input_names, in_axes)
    if notes:
        with torch.no_grad():
            flat_out = flatten_outputs(model(*inputs))

    dims = {n: torch.export.Dim(n) for axes in in_axes.values() for n in axes.values()}
    dynamic_shapes = tuple(
        {d: dims[n] for d, n in in_axes[name].items()} if name in in_axes else None
        for name in input_names)

    graph_surgery = None
    if passes:   # graph passes on the torch.export program; its rewritten module is what we convert
        from surgeon.export.graph_passes import export_program_passes

        graph_surgery = export_program_passes(model, inputs, dynamic_shapes if in_axes else None, passes)
        model = graph_surgery.model

    onnx_file = dest.staging / dest.onnx_name
    try:
        with quiet_exporter():
            torch.onnx.export(
                model, inputs, str(onnx_file), dynamo=True, external_data=True,
                dynamic_shapes=dynamic_shapes if in_axes else None,
                input_names=input_names, output_names=output_names,
                opset_version=opset, verbose=False)
    except Exception as e:
        raise _exporter_error(model, e, inputs, dynamic_shapes if in_axes else None) from e
    if not onnx_file.is_file():
        raise ExportError(f"the exporter reported success but wrote no {onnx_file.name}")

    proto = onnx.load(str(onnx_file), load_external_data=False)
    graph_in = {v.name: v for v in proto.graph.input}
    graph_out = list(proto.graph.output)
    if [v.name for v in graph_out] != output_names:
        raise ExportError(
            f"the ONNX graph has outputs {[v.name for v in graph_out]}, expected {output_names}; "
            "the model's outputs could not be matched one-to-one (non-tensor outputs?)")
    missing = [n for n in input_names if n not in graph_in]
    if missing:
        raise ExportError(f"the ONNX graph lost inputs {missing} (it has {list(graph_in)})")

    fixed: list[str] = []
    in_specs: list[TensorSpec] = []
    for name, t, orig in zip(input_names, inputs, orig_shapes):
        gdims = _onnx_dims(graph_in[name])
        shape: list[int | str | None] = []
        for d, size in enumerate(t.shape):
            declared = in_axes.get(name, {}).get(d)
            got = gdims[d] if d < len(gdims) else None
            if declared is not None:
                if not isinstance(got, str):
                    fixed.append(f"input {name!r} dim {d} ({declared!r}) is fixed to {got}")
                shape.append(declared)
            else:
                shape.append(int(size))
        vr = None
        if not (t.is_floating_point() or t.is_complex()) and t.numel():
            vr = [int(t.min()), int(t.max())]
        in_specs.append(TensorSpec(name, dtype_name(t.dtype), shape,
                                   example_shape=[int(s) for s in t.shape], value_range=vr))
    out_specs: list[TensorSpec] = []
    for (name, tensor), v in zip(zip(output_names, (t for _, t in flat_out)), graph_out):
        gdims = _onnx_dims(v)
        for d, declared in out_axes.get(name, {}).items():
            if d >= len(gdims) or not isinstance(gdims[d], str):
                fixed.append(f"output {name!r} dim {d} ({declared!r}) is fixed to "
                             f"{gdims[d] if d < len(gdims) else 'nothing (rank too small)'}")
        out_specs.append(TensorSpec(name, _onnx_dtype(v), gdims,
                                    example_shape=[int(s) for s in tensor.shape]))
    if fixed:
        raise _specialised_error(model, fixed, inputs, dynamic_shapes)

    opset_used = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    files = sorted(p.name for p in dest.staging.iterdir())
    data_files = [f for f in files if f != dest.onnx_name]
    seconds = time.perf_counter() - t0
    manifest = Manifest(
        graphs={"model": GraphSpec(file=dest.onnx_name, data_files=data_files, opset=opset_used,
                                   inputs=in_specs, outputs=out_specs, notes=notes)},
        versions=versions(),
        exporter={"api": "torch.onnx.export", "dynamo": True, "opset_requested": opset,
                  "original_example_shapes": dict(zip(input_names, orig_shapes)),
                  "export_seconds": round(seconds, 3),
                  **({"graph_passes": [{"pass": e.pass_name, "sites": [st.name for st in e.sites]}
                                       for e in graph_surgery.recipe.entries]} if graph_surgery else {})},
        recipe=recipe)
    manifest.save(dest.staging / dest.manifest_name)
    ort_report = None
    if ort_kwargs is not None:   # checked and recorded in the staging folder: all or nothing
        from surgeon.export.manifest import load_manifest
        from surgeon.export.ort_optimize import optimize

        ort_report = optimize(dest.staging / dest.manifest_name, model, **ort_kwargs)
        manifest = load_manifest(dest.staging / dest.manifest_name)
    _commit(dest, sorted(p.name for p in dest.staging.iterdir()))
    manifest.root = dest.final_dir.resolve()
    return ExportResult(onnx_path=dest.final_dir / dest.onnx_name,
                        manifest_path=dest.final_dir / dest.manifest_name,
                        manifest=manifest, seconds=time.perf_counter() - t0, ort=ort_report,
                        surgery=graph_surgery)


def ort_optimize_kwargs(ort_optimize: Any, save_optimized: bool | str = False) -> dict[str, Any] | None:
    """``to_onnx``'s ``ort_optimize`` / ``save_optimized`` as :func:`surgeon.export.optimize` kwargs.

    Example:
        >>> ort_optimize_kwargs(["all"], save_optimized=True)
        {'levels': ['all'], 'save': True}
        >>> ort_optimize_kwargs(False) is None
        True
    """
    from surgeon.export.runtime import levels as _levels, parse_level

    if ort_optimize is False or ort_optimize is None:
        if save_optimized is False:
            return None
        ort_optimize = True            # saving needs the check: every level
    if isinstance(ort_optimize, Mapping):
        kwargs = dict(ort_optimize)
    elif ort_optimize is True:
        kwargs = {}
    else:
        kwargs = {"levels": ort_optimize}
    if "levels" in kwargs:
        _levels(kwargs["levels"])      # raises ConfigError naming the valid levels
    if save_optimized is not False:
        kwargs["save"] = save_optimized
    if kwargs.get("save", False) not in (False, True):
        parse_level(kwargs["save"])
    return kwargs
