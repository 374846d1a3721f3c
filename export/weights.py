"""Write a model's current weights into an existing ONNX export, without tracing it again.

Fine-tuning (``surgeon.distill``) changes values, not the graph: an export of the same model made
before training needs only its initializers rewritten, which takes seconds where tracing a 30-layer
causal LM takes minutes. Each initializer is matched by name to the module the graph was exported
from (``PrefillLM`` / ``DecodeLM`` wrappers for a causal LM, the model itself otherwise); external
initializers are overwritten in place (same offset, same length), inline ones in the ``.onnx`` file.
Every graph is then checked with the verifier's weight check; a graph whose weights the exporter
transformed (a folded ``W.T`` under the onnxscript optimizer) cannot be refreshed by name and raises
an :class:`~surgeon.core.errors.ExportError` that says to export again.

Example:
    >>> import torch, surgeon.export
    >>> from surgeon.export.weights import update_weights
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    >>> _ = surgeon.export.to_onnx(net, "/tmp/doc_update_weights", torch.randn(2, 4), overwrite=True)
    >>> with torch.no_grad():
    ...     _ = net[0].weight.mul_(2.0)                      # "training" after export
    >>> update_weights("/tmp/doc_update_weights", net).tensors
    {'model': 4}
    >>> surgeon.export.verify("/tmp/doc_update_weights", net).passed
    True
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from surgeon.core.errors import ExportError
from surgeon.export.manifest import Manifest, load_manifest, manifest_path_for

# ONNX TensorProto data types -> torch dtypes (the ones a model's weights and buffers use)
_TORCH_DTYPES = {1: torch.float32, 2: torch.uint8, 3: torch.int8, 5: torch.int16, 6: torch.int32, 7: torch.int64,
                 9: torch.bool, 10: torch.float16, 11: torch.float64, 16: torch.bfloat16}


@dataclass
class WeightUpdate:
    """What :func:`update_weights` wrote: initializers per graph, bytes, seconds."""

    tensors: dict[str, int] = field(default_factory=dict)
    bytes_written: int = 0
    seconds: float = 0.0


def exported_modules(manifest: Manifest, model: nn.Module) -> dict[str, nn.Module]:
    """graph name -> the module that graph was exported from (its parameter names are the initializer names)."""
    if manifest.exporter.get("kind") != "causal_lm_stateful":
        return {name: model for name in manifest.graphs}
    from surgeon.export.prompt_padding import AnyLengthPrefill
    from surgeon.export.stateful_lm import DecodeLM, PrefillLM

    exporter = manifest.exporter
    wrap = {"softmax_only": True} if len(exporter.get("softmax_layers", [])) == len(
        {s["layer"] for s in exporter.get("state", [])}) else {}     # the original, every layer a KV cache
    prefill: nn.Module = PrefillLM(model, **wrap)
    if exporter.get("prefill_blocks"):           # memory slots: one block with the state in
        from surgeon.export.stateful_lm import BlockPrefillLM

        return {"prefill": BlockPrefillLM(model), "decode": DecodeLM(model)}
    if exporter.get("prefill_pads"):
        prefill = AnyLengthPrefill(prefill, int(exporter["chunk"]), bool(exporter.get("last_logits_only")))
    return {"prefill": prefill, "decode": DecodeLM(model, **wrap)}


def _tensor_bytes(value: torch.Tensor, data_type: int, where: str) -> bytes:
    dtype = _TORCH_DTYPES.get(data_type)
    if dtype is None:
        raise ExportError(f"{where}: ONNX data type {data_type} has no torch counterpart here; export again")
    flat = value.detach().to("cpu", dtype).contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b""


def _update_graph(path: Path, module: nn.Module) -> tuple[int, int]:
    """Overwrite the initializers of one graph that name a tensor of ``module``; (count, bytes).

    Every name, shape and byte length is checked before the first byte is written."""
    import onnx
    from onnx import numpy_helper

    proto = onnx.load(str(path), load_external_data=False)
    state = {**dict(module.named_parameters(remove_duplicate=False)),
             **dict(module.named_buffers(remove_duplicate=False))}
    planned = []
    for init in proto.graph.initializer:
        value = state.get(init.name)
        if value is None:
            continue                           # a constant of the graph (not a model tensor)
        where = f"{path.name}: initializer {init.name}"
        if tuple(init.dims) != tuple(value.shape):
            raise ExportError(f"{where} has shape {list(init.dims)} but the model's tensor has {list(value.shape)}: "
                              "this export is of another model; export it again")
        data = _tensor_bytes(value, init.data_type, where)
        external = init.data_location == onnx.TensorProto.EXTERNAL
        info = {e.key: e.value for e in init.external_data}
        if external and int(info.get("length", len(data))) != len(data):
            raise ExportError(f"{where}: {info.get('length')} bytes on disk, {len(data)} in the model; export again")
        planned.append((init, value, data, info if external else None))
    handles: dict[str, Any] = {}
    try:
        for init, value, data, info in planned:
            if info is None:
                array = value.detach().to("cpu", _TORCH_DTYPES[init.data_type]).numpy()
                init.CopyFrom(numpy_helper.from_array(array, init.name))
                continue
            f = handles.get(info["location"])
            if f is None:
                f = handles[info["location"]] = open(path.parent / info["location"], "r+b")
            f.seek(int(info.get("offset", 0)))
            f.write(data)
    finally:
        for f in handles.values():
            f.close()
    if any(info is None for *_, info in planned):
        onnx.save(proto, str(path))            # external initializers stay references to the data files
    return len(planned), sum(len(data) for _, _, data, _ in planned)


def update_weights(path: str | Path, model: nn.Module, *, check: bool = True) -> WeightUpdate:
    """Write ``model``'s parameters and buffers into the export at ``path`` (a folder or manifest).

    The export must come from the same architecture (same names and shapes; a mismatch raises before
    anything is written to that graph). Saved onnxruntime-optimized graphs are stale afterwards and
    refused: export again with ``save_optimized`` instead. ``check`` (default) re-reads every graph
    and raises :class:`ExportError` if any weight still differs from the model.
    """
    from surgeon.export.divergence import weight_mismatches

    start = time.perf_counter()
    manifest = load_manifest(path)
    if (manifest.onnxruntime or {}).get("optimized_models"):
        raise ExportError(f"{manifest_path_for(path)} lists saved onnxruntime-optimized graphs, which hold the old "
                          "weights in fused form: export again (surgeon.export.to_onnx) instead of updating weights")
    report = WeightUpdate()
    modules = exported_modules(manifest, model)
    was = model.training
    model.eval()
    try:
        for name, module in modules.items():
            count, written = _update_graph(manifest.graph_path(name), module)
            report.tensors[name] = count
            report.bytes_written += written
        if check:
            for name, module in modules.items():
                stale = weight_mismatches(path, module, graph=name)
                if stale:
                    names = ", ".join(w.name for w in stale[:4])
                    raise ExportError(f"{manifest.graph_path(name).name}: weights {names} could not be matched by "
                                      "name (the exporter transformed them); export the model again")
    finally:
        model.train(was)
    report.seconds = time.perf_counter() - start
    return report


__all__ = ["update_weights", "exported_modules", "WeightUpdate"]
