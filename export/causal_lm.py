"""Export a linearized causal LM as two ONNX graphs with explicit, constant-size state.

``prefill.onnx``: ``input_ids``, ``attention_mask`` (batch, any number of tokens, left padding
allowed) → ``logits``, ``state_out.*``. ``decode.onnx``: ``input_ids`` (batch, 1), ``position_ids``
(batch, 1), ``state_in.*`` → ``logits``, ``state_out.*``. Batch and sequence stay symbolic; the prefill
graph left-pads the prompt to a multiple of the chunk length (64 by default) inside the graph
(:mod:`surgeon.export.prompt_padding`), so plain onnxruntime clients (lm-eval's ``onnxruntime``
model) can send prompts as they are. ``last_logits_only=True`` makes ``logits`` ``(batch, 1, vocab)``:
the last position only (what generation needs). Only standard ONNX ops: stock onnxruntime runs both
graphs.

Example:
    >>> import torch, transformers, surgeon, surgeon.export
    >>> from surgeon.passes import LinearizeAttention
    >>> cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
    ...                                num_attention_heads=4, num_key_value_heads=2, vocab_size=50)
    >>> lm = surgeon.apply(transformers.LlamaForCausalLM(cfg).eval(), LinearizeAttention(window=4)).model
    >>> res = export_causal_lm(lm, "/tmp/doc_lm", overwrite=True)        # doctest: +ELLIPSIS
    >>> sorted(res.manifest.graphs), res.manifest.graph("prefill").inputs[0].shape
    (['decode', 'prefill'], ['batch', 'sequence'])
"""
from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from surgeon.core.errors import ExportError
from surgeon.export.manifest import MANIFEST_NAME, GraphSpec, Manifest, TensorSpec, load_manifest
from surgeon.export.onnx_export import (
    ExportResult,
    _commit,
    _exporter_error,
    _onnx_dims,
    _onnx_dtype,
    _prepare_destination,
    _rollback,
    dtype_name,
    model_eval_mode,
    quiet_exporter,
    versions,
)
from surgeon.export.prompt_padding import AnyLengthPrefill
from surgeon.export.stateful_lm import PAST, BlockPrefillLM, DecodeLM, PrefillLM, StateLayout

CHUNK = 64


def config_fingerprint(model: nn.Module) -> dict[str, Any]:
    """The config fields an export records to recognise its model (``exporter.model_config``)."""
    config = getattr(model, "config", None)
    keep = ("model_type", "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "head_dim", "max_position_embeddings")
    return {k: getattr(config, k) for k in keep if isinstance(getattr(config, k, None), (int, str))}


_config_fingerprint = config_fingerprint


def _check_overwrite(out_dir: Path, config: dict[str, Any], overwrite: bool) -> None:
    manifest = out_dir / MANIFEST_NAME
    if not out_dir.exists() or overwrite:
        return
    if not manifest.is_file():
        if any(out_dir.iterdir()):
            raise ExportError(f"{out_dir} exists and holds other files; choose an empty folder or pass overwrite=True")
        return
    old = json.loads(manifest.read_text()).get("exporter", {}).get("model_config")
    if old != config:
        raise ExportError(f"{out_dir} already holds an export of a different model ({old}); pass overwrite=True "
                          "to replace it or choose another folder")


class FixedDimensionError(ExportError):
    """A dimension declared dynamic came out as a number in the ONNX graph."""


def _specs(names: list[str], tensors: list[torch.Tensor], dims: list[dict[int, str]], proto_values: list[Any]
           ) -> list[TensorSpec]:
    specs = []
    for name, t, dyn, v in zip(names, tensors, dims, proto_values):
        got = _onnx_dims(v) if v is not None else list(t.shape)
        shape = [dyn[d] if d in dyn else int(s) for d, s in enumerate(t.shape)]
        for d, declared in dyn.items():
            if d < len(got) and not isinstance(got[d], str):
                raise FixedDimensionError(f"{name} dim {d} ({declared}) came out fixed to {got[d]} in the ONNX "
                                          "graph; the model specialises it")
        vr = [int(t.min()), int(t.max())] if not t.is_floating_point() and t.numel() else None
        specs.append(TensorSpec(name, dtype_name(t.dtype) if v is None else _onnx_dtype(v), shape,
                                example_shape=list(t.shape), value_range=vr))
    return specs


def _rename_dims(proto: Any) -> bool:
    """Give the derived sequence dim a readable name (``64*chunks`` → ``sequence``) in the graph."""
    changed = False
    for value in [*proto.graph.input, *proto.graph.output, *proto.graph.value_info]:
        for dim in value.type.tensor_type.shape.dim:
            if re.fullmatch(r"\d+\*chunks", dim.dim_param):
                dim.dim_param = "sequence"
                changed = True
    return changed


def _export_graph(module: nn.Module, args: tuple, in_names: list[str], out_names: list[str],
                  dynamic: tuple, in_dims: list[dict[int, str]], out_dims: list[dict[int, str]],
                  path: Path, opset: int | None) -> GraphSpec:
    """One graph through the dynamo exporter, first without the exporter's onnxscript optimizer: on a
    30-layer model it took about half the export time, and onnxruntime applies the same constant
    folding and dead-code removal when it loads the graph (measured: equal prefill and decode speed).
    Some graphs (a softmax layer's KV-cache validity) only get their dynamic output dims from the
    optimizer's shape propagation; those are exported again with it."""
    try:
        return _export_graph_once(module, args, in_names, out_names, dynamic, in_dims, out_dims, path, opset, False)
    except FixedDimensionError:
        return _export_graph_once(module, args, in_names, out_names, dynamic, in_dims, out_dims, path, opset, True)


def _export_graph_once(module: nn.Module, args: tuple, in_names: list[str], out_names: list[str],
                       dynamic: tuple, in_dims: list[dict[int, str]], out_dims: list[dict[int, str]],
                       path: Path, opset: int | None, optimize: bool) -> GraphSpec:
    import onnx

    from surgeon.export.linear_attention_op import export_options, finalize

    try:
        with quiet_exporter():
            torch.onnx.export(module, args, str(path), dynamo=True, external_data=True, dynamic_shapes=dynamic,
                              input_names=in_names, output_names=out_names, verbose=False,
                              optimize=optimize, **export_options(opset))
    except Exception as e:
        raise _exporter_error(module, e, args, dynamic) from e
    finalize(path)              # LinearAttention nodes: the graph's opset becomes 27
    proto = onnx.load(str(path), load_external_data=False)
    if _rename_dims(proto):
        onnx.save(proto, str(path))      # external weights stay where they are
    graph_in = {v.name: v for v in proto.graph.input}
    graph_out = {v.name: v for v in proto.graph.output}
    with torch.no_grad():
        outs = module(*args)
    inputs = _specs(in_names, list(args), in_dims, [graph_in.get(n) for n in in_names])
    outputs = _specs(out_names, list(outs), out_dims, [graph_out.get(n) for n in out_names])
    opset_used = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    data = [p.name for p in path.parent.iterdir() if p.name.startswith(path.name) and p.name != path.name]
    return GraphSpec(file=path.name, inputs=inputs, outputs=outputs, data_files=sorted(data), opset=opset_used)


def export_causal_lm(model: nn.Module, out_dir: str | Path, *, batch: int = 2, chunks: int = 3,
                     chunk: int = CHUNK, opset: int | None = None, overwrite: bool = False,
                     recipe: dict | None = None, ort_optimize: Any = False,
                     save_optimized: bool | str = False,
                     softmax_only: bool = False, last_logits_only: bool = False,
                     linear_op: str = "auto") -> ExportResult:
    """Write ``prefill.onnx``, ``decode.onnx`` and ``manifest.json`` for a linearized causal LM.

    The example used for export is ``batch`` × ``chunks·chunk`` tokens (never reused by verify).
    ``ort_optimize`` / ``save_optimized``: as in :func:`surgeon.export.to_onnx` (onnxruntime levels
    checked against the model and recorded before the files are moved into place). ``softmax_only``:
    export a model with no linearized layer (the original, every layer a KV cache) the same way, so
    benchmarks compare both models in one runtime. ``last_logits_only``: ``prefill.onnx`` returns
    the last position's logits only, ``(batch, 1, vocab)`` (default: every position). ``linear_op``: the
    recurrence as ONNX's ``LinearAttention`` ("onnx", opset 27), onnxruntime's contrib kernel ("contrib"), our
    own ops ("ours") or "auto" (:mod:`surgeon.export.linear_attention_op`); the manifest records which.
    """
    from surgeon.export.linear_attention_op import count_nodes, describe, linear_op_export
    from surgeon.export.onnx_export import ort_optimize_kwargs

    t0 = time.perf_counter()
    ort_kwargs = ort_optimize_kwargs(ort_optimize, save_optimized)
    out_dir = Path(out_dir)
    wrap = {"softmax_only": True} if softmax_only else {}
    layout = StateLayout.of(model, **wrap)
    if layout.memory:   # the block prefill graph below (BlockPrefillLM) exports, but onnxruntime fails on blocks
        # shorter than the chunk (ceil(T / C) becomes a truncating ONNX Div): not enabled until that is fixed
        raise ExportError(f"layers {sorted(layout.memory)} have memory slots (LinearizeAttention(memory=...)), which "
                          "the prefill/decode graphs do not carry yet; export without them "
                          "(surgeon.passes.attention.memory_slots.set_memory(model, 0)) and keep memory slots "
                          "for PyTorch inference")
    if recipe is not None:
        recipe = _live(model, recipe)
    if layout.memory and ort_kwargs is not None:
        raise ExportError(f"ort_optimize checks prefill.onnx on whole prompts, and a model with memory slots "
                          f"(layers {sorted(layout.memory)}) is prefilled block by block; export it without "
                          "ort_optimize (onnxruntime still applies its default optimizations when it loads the graphs)")
    config = _config_fingerprint(model)
    _check_overwrite(out_dir, config, overwrite)
    dest = _prepare_destination(out_dir)
    try:
        with model_eval_mode(model), linear_op_export(linear_op, opset) as used:
            graphs = _export_both(model, layout, dest.staging, batch, chunks, chunk, opset, wrap, last_logits_only)
        linear_nodes = {g: count_nodes(dest.staging / spec.file).get("LinearAttention", 0) for g, spec in graphs.items()}
        state = [{"name": s.name, "layer": s.layer, "kind": s.kind, "shape": ["batch", *s.shape],
                  "dtype": dtype_name(s.dtype)} for s in layout.specs]
        manifest = Manifest(graphs=graphs, versions=versions(), recipe=recipe, exporter={
            "api": "surgeon.export.export_causal_lm", "dynamo": True, "kind": "causal_lm_stateful",
            "chunk": 1 if layout.memory else chunk, "prefill_pads": True, "last_logits_only": last_logits_only,
            "prefill_blocks": layout.memory_block, "memory_slots": {str(i): n for i, n in layout.memory.items()},
            "state": state, "state_bytes_per_sequence": layout.state_bytes(1),
            "softmax_layers": list(layout.softmax_layers), "kv_cache_pad": layout.pad,
            "kv_cache_bytes_per_token": layout.kv_bytes_per_token(1),
            "model_config": config, "export_seconds": round(time.perf_counter() - t0, 3),
            "linear_attention_op": describe(used, linear_nodes, linear_op)})
        manifest.save(dest.staging / MANIFEST_NAME)
        ort_report = None
        if ort_kwargs is not None:
            from surgeon.export.ort_optimize import optimize

            with model_eval_mode(model):
                ort_report = optimize(dest.staging, model, **ort_kwargs)
            manifest = load_manifest(dest.staging)
        files = sorted(p.name for p in dest.staging.iterdir())
        _commit(dest, files)
    except BaseException:
        _rollback(dest)
        raise
    manifest.root = out_dir.resolve()
    return ExportResult(onnx_path=out_dir / "prefill.onnx", manifest_path=out_dir / MANIFEST_NAME,
                        manifest=manifest, seconds=time.perf_counter() - t0, ort=ort_report)


def _live(model: nn.Module, recipe: Any) -> dict:
    """The recipe as the live model stands (memory slots set after apply), as a dict."""
    from surgeon.core.persist import live_recipe
    from surgeon.core.recipe import Recipe

    from surgeon.core.errors import SurgeonError

    try:
        recipe = recipe if isinstance(recipe, Recipe) else Recipe.from_dict(dict(recipe))
        return live_recipe(model, recipe).to_dict()
    except SurgeonError:
        return dict(recipe.to_dict() if isinstance(recipe, Recipe) else recipe)   # not a surgeon recipe: as given


def _export_both(model: nn.Module, layout: StateLayout, staging: Path, batch: int, chunks: int, chunk: int,
                 opset: int | None, wrap: dict | None = None, last_only: bool = False) -> dict[str, GraphSpec]:
    vocab = getattr(model.config, "vocab_size", 2)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (batch, chunks * chunk - 3), generator=gen)   # not a chunk multiple: the graph pads
    mask = torch.ones_like(ids)
    mask[0, : chunk // 2] = 0                       # left padding in the example: the mask is a real input
    names = [s.name for s in layout.specs]
    outs = ["logits"] + [n.replace("state.", "state_out.") for n in names]

    def state_dims(past: str) -> list[dict[int, str]]:   # a softmax layer's KV cache grows along "past"
        return [{0: "batch", **({s.shape.index(PAST) + 1: past} if s.grows else {})} for s in layout.specs]

    b = torch.export.Dim("batch", min=1, max=4096)
    past = torch.export.Dim("past", min=2, max=2**20)
    seq = {0: b, 1: torch.export.Dim("sequence", min=2, max=2**20)}
    if layout.memory:
        prefill = _export_block_prefill(model, layout, staging, ids, mask, names, outs, b, past, state_dims, opset)
        with torch.no_grad():
            state = list(PrefillLM(model)(ids, mask)[1:])
        return {"prefill": prefill, "decode": _export_decode(model, layout, staging, state, mask, names, outs, b, past,
                                                            state_dims, opset, gen, vocab, wrap)}
    prefill_module = AnyLengthPrefill(PrefillLM(model, **(wrap or {})), chunk, last_only)
    prefill = _export_graph(
        prefill_module, (ids, mask), ["input_ids", "attention_mask"], outs, (seq, seq),
        [{0: "batch", 1: "sequence"}] * 2,
        [{0: "batch"} if last_only else {0: "batch", 1: "sequence"}] + state_dims("past_out"),
        staging / "prefill.onnx", opset)
    with torch.no_grad():
        state = list(prefill_module(ids, mask)[1:])
    decode = _export_decode(model, layout, staging, state, mask, names, outs, b, past, state_dims, opset, gen, vocab,
                            wrap)
    return {"prefill": prefill, "decode": decode}


def _state_shapes(layout: StateLayout, b: Any, past: Any) -> tuple[dict[int, Any], ...]:
    return tuple({0: b, **({s.shape.index(PAST) + 1: past} if s.grows else {})} for s in layout.specs)


def _export_decode(model: nn.Module, layout: StateLayout, staging: Path, state: list[torch.Tensor], mask: torch.Tensor,
                   names: list[str], outs: list[str], b: Any, past: Any, state_dims: Any, opset: int | None,
                   gen: torch.Generator, vocab: int, wrap: dict | None) -> GraphSpec:
    step_ids = torch.randint(0, vocab, (mask.shape[0], 1), generator=gen)
    positions = mask.sum(-1, keepdim=True)
    in_names = ["input_ids", "position_ids"] + [n.replace("state.", "state_in.") for n in names]
    return _export_graph(
        DecodeLM(model, **(wrap or {})), (step_ids, positions, *state), in_names, outs,
        ({0: b}, {0: b}, _state_shapes(layout, b, past)), [{0: "batch"}, {0: "batch"}] + state_dims("past"),
        [{0: "batch"}] + state_dims("past_out"), staging / "decode.onnx", opset)


def _export_block_prefill(model: nn.Module, layout: StateLayout, staging: Path, ids: torch.Tensor, mask: torch.Tensor,
                          names: list[str], outs: list[str], b: Any, past: Any, state_dims: Any,
                          opset: int | None) -> GraphSpec:
    """``prefill.onnx`` of a model with memory slots: one block of 2…``memory_block`` tokens with the state in
    (:class:`~surgeon.export.stateful_lm.BlockPrefillLM`); the runtime sends the prompt block by block."""
    block = layout.memory_block
    if block < 2:
        raise ExportError(f"memory_block={block}: the prefill graph takes blocks of 2 or more tokens; set a larger "
                          "one (set_memory(model, slots, block=64)) before export")
    n = max(2, block - 1)                    # an example inside the range: no specialisation at its ends
    example = (ids[:, :n], mask[:, :n], (mask[:, :n].cumsum(-1) - 1).clamp(min=0), *layout.zeros(ids.shape[0]))
    tokens = torch.export.Dim("block_tokens", min=2, max=block)
    in_names = ["input_ids", "attention_mask", "position_ids"] + [n.replace("state.", "state_in.") for n in names]
    seq = {0: b, 1: tokens}
    return _export_graph(
        BlockPrefillLM(model), example, in_names, outs, (seq, seq, seq, _state_shapes(layout, b, past)),
        [{0: "batch", 1: "block_tokens"}] * 3 + state_dims("past"),
        [{0: "batch", 1: "block_tokens"}] + state_dims("past_out"), staging / "prefill.onnx", opset)


def load_causal_lm_manifest(path: str | Path) -> Manifest:
    """The manifest of a stateful causal-LM export, or a clear error for anything else."""
    manifest = load_manifest(path)
    if manifest.exporter.get("kind") != "causal_lm_stateful" or set(manifest.graphs) != {"prefill", "decode"}:
        raise ExportError(f"{path} is not a prefill/decode export (graphs {sorted(manifest.graphs)}); "
                          "write one with surgeon.export.to_onnx on a linearized causal LM")
    for name in ("prefill", "decode"):
        file = manifest.graph_path(name)
        if not file.is_file():
            raise ExportError(f"{file} is missing; re-export into {manifest.root}")
    _check_recipe_slots(manifest)
    return manifest


def recipe_slots(recipe: dict | None) -> dict[int, int]:
    """Layer -> memory slots the recipe's LinearizeAttention passes give (layers without slots left out)."""
    out: dict[int, int] = {}
    for entry in (recipe or {}).get("passes", []):
        if entry.get("pass") != "LinearizeAttention":
            continue
        memory = entry.get("config", {}).get("memory", 0)
        layers = [site.get("data", {}).get("layer") for site in entry.get("sites", [])]
        counts = memory if isinstance(memory, list) else [memory] * len(layers)
        out.update({layer: n for layer, n in zip(layers, counts) if layer is not None and n})
    return out


def _check_recipe_slots(manifest: Manifest) -> None:
    """The memory slots the graphs carry are the recipe's, layer by layer (refused at load otherwise)."""
    if not manifest.recipe:
        return
    graphs = {s["layer"]: s["shape"][2] for s in manifest.exporter.get("state", []) if s["kind"] == "memory_keys"}
    want = recipe_slots(manifest.recipe)
    for layer in sorted(set(want) | set(graphs)):
        if want.get(layer, 0) != graphs.get(layer, 0):
            raise ExportError(f"{manifest.root}: layer {layer} has {graphs.get(layer, 0)} memory slots in the graphs "
                              f"but {want.get(layer, 0)} in the recipe; the recipe and the graphs come from different "
                              "models: re-export the model with the recipe it was saved with")
