"""The onnxruntime-genai flavour of a linearized causal LM: ``genai_config.json`` + prompt and decode graphs.

:func:`to_genai` writes a folder that ``onnxruntime_genai.Model(folder)`` runs as a
``decoder-pipeline`` model: ``prompt.onnx`` (``run_on_prompt``) and ``decode.onnx``
(``run_on_token_gen``), per-layer state in genai's ``conv_state`` / ``recurrent_state`` pair
(:mod:`surgeon.export.genai_graphs`), the tokenizer when given, and ``manifest.json``. The folder is
built beside its destination and renamed into place.

Example:
    >>> import torch, transformers, surgeon, surgeon.export
    >>> from surgeon.passes import LinearizeAttention
    >>> cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
    ...                                num_attention_heads=4, num_key_value_heads=2, vocab_size=50)
    >>> lm = surgeon.apply(transformers.LlamaForCausalLM(cfg).eval(), LinearizeAttention(window=4)).model
    >>> res = surgeon.export.to_genai(lm, "/tmp/doc_genai", overwrite=True)
    >>> import onnxruntime_genai as og
    >>> gen_params = og.GeneratorParams(og.Model(str(res.onnx_path.parent)))
    >>> gen_params.set_search_options(max_length=13, do_sample=False)
    >>> g = og.Generator(og.Model(str(res.onnx_path.parent)), gen_params)
    >>> g.append_tokens([[1, 2, 3]])
    >>> while not g.is_done(): g.generate_next_token()
    >>> want = lm.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=10, do_sample=False)[0].tolist()
    >>> list(g.get_sequence(0)) == want
    True
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from surgeon.core.errors import ExportError
from surgeon.export.causal_lm import CHUNK, _check_overwrite, _config_fingerprint, _export_graph
from surgeon.export.genai_graphs import GenaiDecode, GenaiPacking, GenaiPrompt
from surgeon.export.manifest import MANIFEST_NAME, Manifest
from surgeon.export.onnx_export import ExportResult, _commit, _prepare_destination, _rollback, model_eval_mode, versions

GENAI_CONFIG = "genai_config.json"


def genai_config(model: nn.Module, packing: GenaiPacking, prompt: Any, decode: Any,
                 context_length: int | None = None) -> dict[str, Any]:
    """The ``genai_config.json`` content for the two graphs."""
    cfg = model.config
    gen = getattr(model, "generation_config", None)

    def token(name: str, default: Any = None) -> Any:
        value = getattr(gen, name, None) if gen is not None else None
        value = value if value is not None else getattr(cfg, name, None)
        return value if value is not None else default

    eos = token("eos_token_id", 0)
    pad = token("pad_token_id", eos[0] if isinstance(eos, list) else eos)
    heads = cfg.num_attention_heads
    context = context_length or int(getattr(cfg, "max_position_embeddings", 2048))
    names_in = {"input_ids": "input_ids", "attention_mask": "attention_mask",
                "past_conv_names": "past_key_values.%d.conv_state",
                "past_recurrent_names": "past_key_values.%d.recurrent_state"}
    names_out = {"logits": "logits", "present_conv_names": "present.%d.conv_state",
                 "present_recurrent_names": "present.%d.recurrent_state"}

    def stage(graph: Any, on_prompt: bool) -> dict[str, Any]:
        return {"filename": graph.file, "inputs": [t.name for t in graph.inputs],
                "outputs": [t.name for t in graph.outputs], "run_on_prompt": on_prompt,
                "run_on_token_gen": not on_prompt}

    return {
        "model": {
            "bos_token_id": token("bos_token_id", 0), "eos_token_id": eos, "pad_token_id": pad,
            "context_length": context, "vocab_size": cfg.vocab_size, "type": "decoder-pipeline",
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "head_size": getattr(cfg, "head_dim", None) or cfg.hidden_size // heads,
                "hidden_size": cfg.hidden_size, "num_attention_heads": heads,
                "num_key_value_heads": getattr(cfg, "num_key_value_heads", None) or heads,
                "num_hidden_layers": cfg.num_hidden_layers,
                "inputs": names_in, "outputs": names_out,
                "pipeline": [{"prompt": stage(prompt, True), "decode": stage(decode, False)}],
            },
        },
        "search": {"do_sample": False, "max_length": context, "min_length": 0, "num_beams": 1,
                   "num_return_sequences": 1, "past_present_share_buffer": False, "temperature": 1.0,
                   "top_k": 1, "top_p": 1.0, "repetition_penalty": 1.0, "length_penalty": 1.0,
                   "early_stopping": True, "no_repeat_ngram_size": 0, "diversity_penalty": 0.0},
    }


def to_genai(model: nn.Module, out_dir: str | Path, tokenizer: Any = None, *, chunk: int | None = None,
             last_logits_only: bool = True, overwrite: bool = False, opset: int | None = None,
             context_length: int | None = None, recipe: dict | None = None) -> ExportResult:
    """Write an onnxruntime-genai ``decoder-pipeline`` folder for a linearized causal LM.

    ``chunk``: the prompt graph left-pads to a multiple of it (default: the layers' chunk length).
    ``last_logits_only`` (default on): the prompt graph returns the last position's logits only
    (what generation needs). Layers kept as softmax attention are refused (their growing KV cache
    has no place in genai's fixed-shape recurrent pair). Batch size 1: onnxruntime-genai 0.18 runs
    the prompt graph at every step of a batch, where padding to the chunk would push tokens out of
    the window, so the graphs fix the batch to 1 and onnxruntime refuses more (naming ``input_ids``).
    A later prompt on a non-empty state (a second turn) is exact when its length is a chunk multiple.
    """
    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    packing = GenaiPacking.of(model)             # refuses unsupported layers before anything is written
    chunk = chunk or _chunk_length(model)
    fingerprint = {**_config_fingerprint(model), "flavour": "onnxruntime-genai"}
    _check_overwrite(out_dir, fingerprint, overwrite)
    dest = _prepare_destination(out_dir)
    try:
        with model_eval_mode(model):
            prompt, decode = _export_graphs(model, packing, dest.staging, chunk, last_logits_only, opset)
        config = genai_config(model, packing, prompt, decode, context_length)
        (dest.staging / GENAI_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        if tokenizer is not None:
            tokenizer.save_pretrained(dest.staging)
        manifest = Manifest(graphs={"prompt": prompt, "decode": decode}, versions=versions(), recipe=recipe,
                            exporter={"api": "surgeon.export.to_genai", "dynamo": True, "kind": "onnxruntime_genai",
                                      "chunk": chunk, "last_logits_only": last_logits_only,
                                      "state": {"conv_state": [1, *packing.conv_shape],
                                                "recurrent_state": [1, *packing.recurrent_shape],
                                                "packed": {str(i): [s.name for s in packing.packed[i]]
                                                           for i in packing.layers}},
                                      "model_config": fingerprint,
                                      "export_seconds": round(time.perf_counter() - t0, 3)})
        manifest.save(dest.staging / MANIFEST_NAME)
        _commit(dest, sorted(p.name for p in dest.staging.iterdir()))
    except BaseException:
        _rollback(dest)
        raise
    manifest.root = out_dir.resolve()
    return ExportResult(onnx_path=out_dir / prompt.file, manifest_path=out_dir / MANIFEST_NAME, manifest=manifest,
                        seconds=time.perf_counter() - t0)


def _chunk_length(model: nn.Module) -> int:
    """The chunk length every linear layer's chunked form divides (no padding inside the layers)."""
    from surgeon.passes.attention.module import LinearAttention

    sizes = [m.chunk_size for m in model.modules() if isinstance(m, LinearAttention)]
    return math.lcm(*sizes) if sizes else CHUNK


def _export_graphs(model: nn.Module, packing: GenaiPacking, staging: Path, chunk: int,
                   last_only: bool, opset: int | None) -> tuple[Any, Any]:
    vocab, batch = model.config.vocab_size, 1
    gen = torch.Generator().manual_seed(0)
    seq = chunk + 5                               # not a chunk multiple: the graph pads
    ids = torch.randint(0, vocab, (batch, seq), generator=gen)
    mask = torch.ones((batch, seq + 3), dtype=torch.long)   # 3 tokens of history: a prompt after earlier turns
    mask[0, -2:] = 0                              # padding in the mask: a real input
    zeros = [torch.zeros((batch, *packing.conv_shape), dtype=packing.dtype),
             torch.zeros((batch, *packing.recurrent_shape), dtype=packing.dtype)] * len(packing.layers)
    in_state, out_state = packing.input_names(), packing.output_names()
    s = torch.export.Dim("sequence", min=2, max=2**20)
    total = torch.export.Dim("total_sequence_length", min=2, max=2**20)
    state_dims: list[dict[int, str]] = [{}] * len(in_state)
    prompt_module = GenaiPrompt(model, chunk, last_only)
    prompt = _export_graph(
        prompt_module, (ids, mask, *zeros), ["input_ids", "attention_mask", *in_state], ["logits", *out_state],
        ({1: s}, {1: total}, tuple({} for _ in in_state)),
        [{1: "sequence"}, {1: "total_sequence_length"}] + state_dims,
        [{} if last_only else {1: "sequence"}] + state_dims, staging / "prompt.onnx", opset)
    with torch.no_grad():
        logits, *state = prompt_module(ids, mask, *zeros)
    step_ids = torch.randint(0, vocab, (batch, 1), generator=gen)
    step_mask = torch.cat([mask, torch.ones((batch, 1), dtype=mask.dtype)], dim=1)
    decode = _export_graph(
        GenaiDecode(model), (step_ids, step_mask, *state), ["input_ids", "attention_mask", *in_state],
        ["logits", *out_state], ({}, {1: total}, tuple({} for _ in in_state)),
        [{}, {1: "total_sequence_length"}] + state_dims, [{}] + state_dims, staging / "decode.onnx", opset)
    return prompt, decode


__all__ = ["to_genai", "genai_config", "GENAI_CONFIG"]
