"""The onnxruntime side of ``surgeon.export`` in one leaf module: optimization levels and sessions.

Every module that runs a graph makes its session here (:func:`make_session`), so options (threads,
no spinning, quiet logs, the level a manifest recorded) are set in one place; nothing here imports
another export module except the manifest's level names.

Example:
    >>> parse_level("ORT_ENABLE_BASIC"), levels(["all", "basic"])
    ('basic', ['basic', 'all'])
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from surgeon.core.errors import ConfigError, ExportError
from surgeon.export.manifest import ORT_LEVELS

__all__ = ["LEVELS", "parse_level", "levels", "session_options", "make_session", "onnx_dims", "onnx_dtype"]

_ORT_NAMES = {"disabled": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC",
              "extended": "ORT_ENABLE_EXTENDED", "layout": "ORT_ENABLE_LAYOUT", "all": "ORT_ENABLE_ALL"}


def _available() -> tuple[str, ...]:
    try:
        import onnxruntime as ort
    except ImportError:  # the names are still known; sessions will fail with a clear error
        return ORT_LEVELS
    return tuple(n for n in ORT_LEVELS if hasattr(ort.GraphOptimizationLevel, _ORT_NAMES[n]))


#: levels this onnxruntime knows, lowest first (``layout`` exists from onnxruntime 1.22 on)
LEVELS: tuple[str, ...] = _available()
_ALIASES = {"none": "disabled", "disable": "disabled", "off": "disabled", "0": "disabled",
            "1": "basic", "2": "extended", "3": "layout", "99": "all", "enable_all": "all"}


def parse_level(level: Any) -> str:
    """A level name (``"extended"``), ``ORT_ENABLE_EXTENDED``, a ``GraphOptimizationLevel`` or its
    number → the manifest's name; anything else is a :class:`ConfigError` listing the levels.

    Example:
        >>> parse_level("ORT_ENABLE_ALL"), parse_level(1), parse_level("Extended")
        ('all', 'basic', 'extended')
        >>> parse_level("fast")
        Traceback (most recent call last):
        ...
        surgeon.core.errors.ConfigError: unknown onnxruntime graph optimization level 'fast'; use one of ['disabled', 'basic', 'extended', 'layout', 'all'] (or onnxruntime.GraphOptimizationLevel)
    """
    name = getattr(level, "name", None)  # onnxruntime.GraphOptimizationLevel member
    text = name if isinstance(name, str) else str(level) if isinstance(level, (str, int)) else None
    if text is not None and not isinstance(level, bool):
        key = text.strip().lower().removeprefix("ort_").removeprefix("graphoptimizationlevel.")
        key = {"disable_all": "disabled", "enable_basic": "basic", "enable_extended": "extended",
               "enable_layout": "layout"}.get(key, key)
        key = _ALIASES.get(key, key)
        if key in LEVELS:
            return key
    raise ConfigError(f"unknown onnxruntime graph optimization level {level!r}; use one of "
                      f"{list(LEVELS)} (or onnxruntime.GraphOptimizationLevel)")


def session_options(level: str | None = None, threads: int | None = None) -> Any:
    """``onnxruntime.SessionOptions`` at ``level`` (None: onnxruntime's default, ``all``).

    ``threads`` sets ``intra_op_num_threads``; worker threads never spin between runs, so timings
    on few cores are not skewed by idle ORT threads.

    Example:
        >>> session_options("basic", threads=1).graph_optimization_level.name
        'ORT_ENABLE_BASIC'
    """
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if level is not None:
        opts.graph_optimization_level = getattr(ort.GraphOptimizationLevel,
                                                _ORT_NAMES[parse_level(level)])
    if threads:
        opts.intra_op_num_threads = int(threads)
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return opts


def make_session(model: str | Path | bytes | Any, level: str | None = None, threads: int | None = None,
                 providers: Sequence[str] = ("CPUExecutionProvider",), options: Any = None) -> Any:
    """An ``InferenceSession`` for ``model`` (a path, serialized bytes or an ``onnx.ModelProto``) at
    ``level``; a load failure is an :class:`ExportError`.

    Example:
        >>> import onnx, onnx.helper as h
        >>> g = h.make_graph([h.make_node("Relu", ["x"], ["y"])], "g",
        ...                  [h.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2])],
        ...                  [h.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2])])
        >>> import numpy as np
        >>> sess = make_session(h.make_model(g, opset_imports=[h.make_opsetid("", 17)]), "basic", threads=1)
        >>> sess.run(None, {"x": np.array([-1.0, 2.0], dtype=np.float32)})[0].tolist()
        [0.0, 2.0]
    """
    import onnxruntime as ort

    what = model if isinstance(model, (str, Path)) else "an in-memory graph"
    source = str(model) if isinstance(model, (str, Path)) else model if isinstance(model, bytes) \
        else model.SerializeToString()
    opts = options if options is not None else session_options(level, threads)
    try:
        return ort.InferenceSession(source, opts, providers=list(providers))
    except Exception as e:
        text = " ".join(str(e).split())[:400]
        raise ExportError(f"onnxruntime cannot load {what} at optimization level {level or 'default'}: "
                          f"{type(e).__name__}: {text}") from e


# ----------------------------------------------------------------------------- results


def levels(levels: Sequence[Any] | str | bool | None) -> list[str]:
    """The level names a ``levels=`` argument asks for, lowest first (None / True: all of :data:`LEVELS`)."""
    if levels is None or levels is True:
        chosen = list(LEVELS)
    elif levels is False:
        raise ConfigError("levels=False checks nothing; pass None/True for every level, or a list")
    elif isinstance(levels, (str, int)) or hasattr(levels, "name"):
        chosen = [parse_level(levels)]
    else:
        chosen = [parse_level(lv) for lv in levels]
        if not chosen:
            raise ConfigError(f"levels is empty; use some of {list(LEVELS)}")
    return sorted(set(chosen), key=ORT_LEVELS.index)


def onnx_dims(value_info: Any) -> list[int | str | None]:
    """The dims of an ONNX graph input / output: ints, symbolic names, or None when unknown."""
    dims: list[int | str | None] = []
    for d in value_info.type.tensor_type.shape.dim:
        if d.HasField("dim_param") and d.dim_param:
            dims.append(d.dim_param)
        elif d.HasField("dim_value"):
            dims.append(int(d.dim_value))
        else:
            dims.append(None)
    return dims


def onnx_dtype(value_info: Any) -> str:
    """The numpy dtype name of an ONNX graph input / output (``float32``)."""
    import onnx

    elem = value_info.type.tensor_type.elem_type
    try:
        return onnx.helper.tensor_dtype_to_np_dtype(elem).name
    except Exception:  # e.g. a dtype numpy lacks
        return onnx.TensorProto.DataType.Name(elem).lower()
