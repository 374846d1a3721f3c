"""The export manifest: what an ONNX export contains and how it was made, as JSON.

One manifest sits next to the graph files. It names every graph (``graphs["model"]`` for a plain
forward export; prefill/decode exports add more entries), and for each graph its inputs and outputs
with dtype and shape, where a dynamic dimension is given by its *name* (``"batch"``) and a fixed one
by its size. :func:`surgeon.export.verify` reads it to know which dims must stay symbolic and which
shapes to test.

Example:
    >>> m = Manifest(graphs={"model": GraphSpec(
    ...     file="model.onnx",
    ...     inputs=[TensorSpec("x", "float32", ["batch", 3], example_shape=[2, 3])],
    ...     outputs=[TensorSpec("output", "float32", ["batch", 4], example_shape=[2, 4])])})
    >>> m.graphs["model"].inputs[0].dynamic_dims
    {0: 'batch'}
    >>> Manifest.from_dict(m.to_dict()) == m
    True
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from surgeon.core.errors import ExportError

FORMAT = "surgeon.onnx"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"

#: dtype names a manifest may use (numpy spelling).
DTYPES = frozenset({
    "float16", "bfloat16", "float32", "float64", "int8", "int16", "int32", "int64",
    "uint8", "uint16", "uint32", "uint64", "bool", "complex64", "complex128",
})

DimSpec = int | str | None  # fixed size, symbolic name, or unknown

#: onnxruntime graph optimization levels a manifest may record, lowest first
#: (surgeon.export.ort_optimize maps them to ``onnxruntime.GraphOptimizationLevel``).
ORT_LEVELS = ("disabled", "basic", "extended", "layout", "all")


@dataclass
class TensorSpec:
    """One graph input or output.

    ``shape`` holds an int for a fixed dim and a name for a dynamic dim (``None`` if the exporter
    left it unknown). ``example_shape`` is the concrete shape used at export. ``value_range``
    (integer/bool inputs only) is ``[min, max]`` of the export example, used to draw test inputs.
    """

    name: str
    dtype: str
    shape: list[DimSpec]
    example_shape: list[int] | None = None
    value_range: list[int] | None = None

    @property
    def dynamic_dims(self) -> dict[int, str]:
        """``{dim index: name}`` for every dim declared dynamic."""
        return {i: d for i, d in enumerate(self.shape) if isinstance(d, str)}

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}
        if self.example_shape is not None:
            d["example_shape"] = list(self.example_shape)
        if self.value_range is not None:
            d["value_range"] = list(self.value_range)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TensorSpec:
        return cls(name=d["name"], dtype=d["dtype"], shape=list(d["shape"]),
                   example_shape=None if d.get("example_shape") is None else list(d["example_shape"]),
                   value_range=None if d.get("value_range") is None else list(d["value_range"]))


@dataclass
class GraphSpec:
    """One ONNX graph file (plus its external-data files) and its interface."""

    file: str
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    data_files: list[str] = field(default_factory=list)
    opset: int | None = None
    notes: list[str] = field(default_factory=list)
    #: onnxruntime graph optimization level sessions should use (None: onnxruntime's default)
    ort_level: str | None = None

    @property
    def example_shapes(self) -> dict[str, list[int] | None]:
        """Input name -> the concrete shape used at export."""
        return {t.name: t.example_shape for t in self.inputs}

    def to_dict(self) -> dict[str, Any]:
        d = {"file": self.file, "data_files": list(self.data_files), "opset": self.opset,
             "inputs": [t.to_dict() for t in self.inputs],
             "outputs": [t.to_dict() for t in self.outputs],
             "example_shapes": self.example_shapes, "notes": list(self.notes)}
        if self.ort_level is not None:
            d["ort_level"] = self.ort_level
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GraphSpec:
        return cls(file=d["file"], data_files=list(d.get("data_files", [])), opset=d.get("opset"),
                   inputs=[TensorSpec.from_dict(t) for t in d["inputs"]],
                   outputs=[TensorSpec.from_dict(t) for t in d["outputs"]],
                   notes=list(d.get("notes", [])), ort_level=d.get("ort_level"))


@dataclass
class Manifest:
    """Everything an export wrote: graphs, versions, exporter settings, the surgery recipe."""

    graphs: dict[str, GraphSpec]
    versions: dict[str, str] = field(default_factory=dict)
    exporter: dict[str, Any] = field(default_factory=dict)
    recipe: dict[str, Any] | None = None
    format_version: int = FORMAT_VERSION
    #: onnxruntime checks recorded by surgeon.export.optimize (per-level parity and latency,
    #: saved optimized models); empty when never run
    onnxruntime: dict[str, Any] = field(default_factory=dict)
    #: folder the graph files live in (set by :func:`load_manifest`; not serialized)
    root: Path | None = field(default=None, compare=False, repr=False)

    def graph(self, name: str | None = None) -> GraphSpec:
        """The graph called ``name`` (default: the only graph, or ``"model"``)."""
        if name is None:
            name = next(iter(self.graphs)) if len(self.graphs) == 1 else "model"
        if name not in self.graphs:
            raise ExportError(f"manifest has no graph {name!r}; it has {sorted(self.graphs)}")
        return self.graphs[name]

    def graph_path(self, name: str | None = None) -> Path:
        """Absolute path of a graph's ``.onnx`` file (needs ``root``, set by ``load_manifest``)."""
        root = self.root if self.root is not None else Path(".")
        return root / self.graph(name).file

    def to_dict(self) -> dict[str, Any]:
        d = {"format": FORMAT, "format_version": self.format_version,
             "graphs": {k: g.to_dict() for k, g in self.graphs.items()},
             "versions": dict(self.versions), "exporter": dict(self.exporter),
             "recipe": self.recipe}
        if self.onnxruntime:
            d["onnxruntime"] = dict(self.onnxruntime)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Manifest:
        """Build from JSON data; raises :class:`ExportError` naming the first problem."""
        validate_manifest_dict(d)
        return cls(graphs={k: GraphSpec.from_dict(g) for k, g in d["graphs"].items()},
                   versions=dict(d.get("versions", {})), exporter=dict(d.get("exporter", {})),
                   recipe=d.get("recipe"), format_version=int(d["format_version"]),
                   onnxruntime=dict(d.get("onnxruntime") or {}))

    def save(self, path: str | Path) -> Path:
        """Validate and write the manifest as JSON (atomically: a temp file, then a rename)."""
        data = self.to_dict()
        validate_manifest_dict(data)
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(data, indent=2) + "\n")
        os.replace(tmp, path)
        return path


def _bad(where: str, what: str) -> ExportError:
    return ExportError(f"invalid export manifest ({where}): {what}. Re-export with "
                       "surgeon.export.to_onnx, or fix the hand-edited manifest.json.")


def _check_tensor(t: Any, where: str, is_input: bool) -> None:
    if not isinstance(t, dict):
        raise _bad(where, f"expected an object, got {type(t).__name__}")
    for key in ("name", "dtype", "shape"):
        if key not in t:
            raise _bad(where, f"missing {key!r}")
    if not isinstance(t["name"], str) or not t["name"]:
        raise _bad(where, "'name' must be a non-empty string")
    where = f"{where} {t['name']!r}"
    if t["dtype"] not in DTYPES:
        raise _bad(where, f"unknown dtype {t['dtype']!r} (known: {sorted(DTYPES)})")
    shape = t["shape"]
    if not isinstance(shape, list) or not all(
            d is None or (isinstance(d, int) and not isinstance(d, bool) and d >= 0)
            or (isinstance(d, str) and d) for d in shape):
        raise _bad(where, f"'shape' must be a list of sizes, dim names or null, got {shape!r}")
    ex = t.get("example_shape")
    if ex is not None:
        if not isinstance(ex, list) or not all(isinstance(d, int) and d >= 0 for d in ex):
            raise _bad(where, f"'example_shape' must be a list of sizes, got {ex!r}")
        if len(ex) != len(shape):
            raise _bad(where, f"'example_shape' {ex} has rank {len(ex)} but 'shape' {shape} has "
                              f"rank {len(shape)}")
        for i, (d, e) in enumerate(zip(shape, ex)):
            if isinstance(d, int) and d != e:
                raise _bad(where, f"dim {i} is fixed to {d} but the example had {e}")
    elif is_input:
        raise _bad(where, "inputs need an 'example_shape'")
    vr = t.get("value_range")
    if vr is not None and (not isinstance(vr, list) or len(vr) != 2
                           or not all(isinstance(v, (int, float)) for v in vr) or vr[0] > vr[1]):
        raise _bad(where, f"'value_range' must be [min, max], got {vr!r}")


def validate_manifest_dict(d: Any) -> None:
    """Raise :class:`ExportError` naming the first thing wrong with manifest JSON data."""
    if not isinstance(d, dict):
        raise _bad("top level", f"expected a JSON object, got {type(d).__name__}")
    if d.get("format", FORMAT) != FORMAT:
        raise _bad("format", f"expected {FORMAT!r}, got {d.get('format')!r}")
    version = d.get("format_version")
    if not isinstance(version, int):
        raise _bad("format_version", f"missing or not an int: {version!r}")
    if version > FORMAT_VERSION:
        raise _bad("format_version", f"version {version} is newer than this surgeon reads "
                                     f"({FORMAT_VERSION}); upgrade surgeon")
    graphs = d.get("graphs")
    if not isinstance(graphs, dict) or not graphs:
        raise _bad("graphs", "must be a non-empty mapping of graph name -> graph")
    for gname, g in graphs.items():
        where = f"graphs[{gname!r}]"
        if not isinstance(g, dict):
            raise _bad(where, f"expected an object, got {type(g).__name__}")
        for key in ("file", "inputs", "outputs"):
            if key not in g:
                raise _bad(where, f"missing {key!r}")
        files = [g["file"], *g.get("data_files", [])]
        for f in files:
            if (not isinstance(f, str) or not f or os.path.isabs(f)
                    or ".." in Path(f).parts):
                raise _bad(where, f"file names must be relative paths inside the export folder, "
                                  f"got {f!r}")
        if not str(g["file"]).endswith(".onnx"):
            raise _bad(where, f"'file' must end in .onnx, got {g['file']!r}")
        for kind in ("inputs", "outputs"):
            items = g[kind]
            if not isinstance(items, list):
                raise _bad(where, f"{kind!r} must be a list")
            for t in items:
                _check_tensor(t, f"{where} {kind[:-1]}", is_input=kind == "inputs")
            names = [t["name"] for t in items]
            dup = sorted({n for n in names if names.count(n) > 1})
            if dup:
                raise _bad(where, f"duplicate {kind} names {dup}")
        opset = g.get("opset")
        if opset is not None and not isinstance(opset, int):
            raise _bad(where, f"'opset' must be an int, got {opset!r}")
        level = g.get("ort_level")
        if level is not None and level not in ORT_LEVELS:
            raise _bad(where, f"'ort_level' must be one of {list(ORT_LEVELS)}, got {level!r}")
    if not isinstance(d.get("onnxruntime", {}), dict):
        raise _bad("onnxruntime", f"must be an object, got {type(d['onnxruntime']).__name__}")
    recipe = d.get("recipe")
    if recipe is not None and not isinstance(recipe, dict):
        raise _bad("recipe", f"must be an object or null, got {type(recipe).__name__}")


def manifest_path_for(path: str | Path) -> Path:
    """Where the manifest of an export lives, given its folder, its ``.onnx`` file or the manifest."""
    path = Path(path)
    if path.suffix == ".json":
        return path
    if path.suffix == ".onnx":
        own = path.with_name(f"{path.stem}.manifest.json")
        if own.exists() or not (path.parent / MANIFEST_NAME).exists():
            return own
        return path.parent / MANIFEST_NAME
    return path / MANIFEST_NAME


def load_manifest(path: str | Path) -> Manifest:
    """Load and validate an export manifest.

    ``path`` may be the export folder, the ``.onnx`` file, or the manifest JSON itself.

    Example:
        >>> import surgeon.export, torch
        >>> res = surgeon.export.to_onnx(torch.nn.Linear(4, 2), "/tmp/doc_lin", torch.randn(2, 4))
        >>> surgeon.export.load_manifest("/tmp/doc_lin").graph().inputs[0].shape
        ['batch', 4]
    """
    mpath = manifest_path_for(path)
    if not mpath.is_file():
        raise ExportError(f"no export manifest at {mpath} (looked up from {path}); export with "
                          "surgeon.export.to_onnx first, or pass the folder it wrote")
    try:
        data = json.loads(mpath.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ExportError(f"cannot read export manifest {mpath}: {e}; re-export with "
                          "surgeon.export.to_onnx") from e
    manifest = Manifest.from_dict(data)
    manifest.root = mpath.parent.resolve()
    return manifest
