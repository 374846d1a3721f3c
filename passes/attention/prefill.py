"""Chunked prefill by default: a linearized causal LM reads a long prompt in blocks, with the carried state.

A constant-state model needs no more memory for a 32 K-token prompt than for one block of it, but one
forward over the whole prompt holds every layer's activations for all its tokens (SmolLM2 at 32 K:
~3 GB of resident growth). transformers' ``generate`` already knows how to prefill in chunks through the
cache (``generation_config.prefill_chunk_size``); ``LinearizeAttention`` turns it on with
:data:`PREFILL_CHUNK` tokens unless the model's generation config already names a size. Outputs are
unchanged (the cache carries the exact state). Like transformers' own option it needs the cache: pass
``prefill_chunk_size=None`` to ``generate(use_cache=False)``.

Example:
    >>> import torch, transformers, surgeon
    >>> from surgeon.passes import LinearizeAttention
    >>> cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
    ...                                num_attention_heads=4, num_key_value_heads=2, vocab_size=50)
    >>> lm = surgeon.apply(transformers.LlamaForCausalLM(cfg), LinearizeAttention(window=4)).model
    >>> lm.generation_config.prefill_chunk_size
    2048
"""
from __future__ import annotations

import torch.nn as nn

PREFILL_CHUNK = 2048


def default_prefill_chunking(model: nn.Module, chunk: int = PREFILL_CHUNK) -> None:
    """Set ``model.generation_config.prefill_chunk_size`` to ``chunk`` when the model generates and names none."""
    config = getattr(model, "generation_config", None)
    if config is not None and hasattr(model, "generate") and getattr(config, "prefill_chunk_size", None) is None:
        config.prefill_chunk_size = chunk


__all__ = ["PREFILL_CHUNK", "default_prefill_chunking"]
