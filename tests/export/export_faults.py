"""Faults injected into a prefill/decode export, to prove verification catches them (test helpers).

Each function writes a faulty copy of an export folder: the graphs are edited as protos loaded without
their weights; the external data files are copied unchanged (onnx and onnxruntime refuse symbolic and
hard links to them).
"""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper


def _copy_export(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    for f in Path(src).iterdir():
        if f.suffix == ".onnx" or f.name == "manifest.json":
            shutil.copy(f, dst / f.name)
        elif not (dst / f.name).exists():
            shutil.copy(f, dst / f.name)
    return dst


def _load(folder: Path, graph: str) -> onnx.ModelProto:
    return onnx.load(str(folder / f"{graph}.onnx"), load_external_data=False)


def _save(proto: onnx.ModelProto, folder: Path, graph: str) -> None:
    onnx.save(proto, str(folder / f"{graph}.onnx"))


def scalar_constants(proto: onnx.ModelProto) -> list[tuple[str, float, str]]:
    """(value name, value, consumer op) of every float scalar constant in the graph."""
    consumers = {}
    for n in proto.graph.node:
        for i in n.input:
            consumers.setdefault(i, n.op_type)
    out = []
    for n in proto.graph.node:
        if n.op_type == "Constant" and n.attribute and n.attribute[0].type == onnx.AttributeProto.TENSOR:
            arr = numpy_helper.to_array(n.attribute[0].t)
            if arr.size == 1 and arr.dtype.kind == "f":
                out.append((n.output[0], float(arr.reshape(())), consumers.get(n.output[0], "")))
    for init in proto.graph.initializer:
        if init.data_location != onnx.TensorProto.EXTERNAL and init.data_type in (1, 11):
            arr = numpy_helper.to_array(init)
            if arr.size == 1:
                out.append((init.name, float(arr.reshape(())), consumers.get(init.name, "")))
    return out


def change_constant(src: Path, dst: Path, name: str, factor: float, graphs=("prefill", "decode")) -> Path:
    """Multiply the scalar constant ``name`` by ``factor`` in the given graphs."""
    dst = _copy_export(src, dst)
    for g in graphs:
        proto = _load(dst, g)
        hit = False
        for n in proto.graph.node:
            if n.op_type == "Constant" and n.output[0] == name:
                arr = numpy_helper.to_array(n.attribute[0].t)
                n.attribute[0].t.CopyFrom(numpy_helper.from_array((arr * factor).astype(arr.dtype), n.attribute[0].t.name))
                hit = True
        for i, init in enumerate(proto.graph.initializer):
            if init.name == name:
                arr = numpy_helper.to_array(init)
                proto.graph.initializer[i].CopyFrom(numpy_helper.from_array((arr * factor).astype(arr.dtype), name))
                hit = True
        if hit:
            _save(proto, dst, g)
    return dst


def drop_state_update(src: Path, dst: Path, state: str) -> Path:
    """decode.onnx returns ``state_in.<state>`` unchanged as ``state_out.<state>``."""
    dst = _copy_export(src, dst)
    proto = _load(dst, "decode")
    out_name = f"state_out.{state}"
    for n in proto.graph.node:
        n.output[:] = [f"{o}__dropped" if o == out_name else o for o in n.output]
        n.input[:] = [f"{i}__dropped" if i == out_name else i for i in n.input]
    proto.graph.node.append(helper.make_node("Identity", [f"state_in.{state}"], [out_name]))
    _save(proto, dst, "decode")
    return dst


def offset_positions(src: Path, dst: Path, offset: int = 1) -> Path:
    """decode.onnx reads ``position_ids + offset``."""
    dst = _copy_export(src, dst)
    proto = _load(dst, "decode")
    for n in proto.graph.node:
        n.input[:] = ["position_ids__shifted" if i == "position_ids" else i for i in n.input]
    proto.graph.initializer.append(numpy_helper.from_array(np.array(offset, dtype=np.int64), "position_offset"))
    proto.graph.node.insert(0, helper.make_node("Add", ["position_ids", "position_offset"], ["position_ids__shifted"]))
    _save(proto, dst, "decode")
    return dst
