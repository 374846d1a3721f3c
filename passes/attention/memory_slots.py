"""Add (or remove) memory slots on a model that is already linearized, e.g. after distillation.

Memory slots (``LinearizeAttention(memory=G)``, LoLA's sparse cache) hold no parameters: they keep
the key/value pairs the linear state recalls worst as exact softmax keys. LoLA adds them to a
linearized, distilled model without further training; :func:`set_memory` does that on a live model.

Example:
    >>> import torch, transformers, surgeon
    >>> from surgeon.passes import LinearizeAttention
    >>> cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
    ...                                num_attention_heads=4, num_key_value_heads=2, vocab_size=50)
    >>> model = surgeon.apply(transformers.LlamaForCausalLM(cfg).eval(), LinearizeAttention(window=4)).model
    >>> set_memory(model, 8)
    2
    >>> model.model.layers[0].self_attn.memory
    8
    >>> set_memory(model, [4, 12])                    # one count per layer (e.g. from plan_memory)
    2
    >>> [layer.self_attn.memory for layer in model.model.layers]
    [4, 12]
"""
from __future__ import annotations

from collections.abc import Sequence

import torch.nn as nn

from surgeon.core.errors import ConfigError
from surgeon.passes.attention.module import LinearAttention


def set_memory(model: nn.Module, slots: int | Sequence[int], block: int | None = None) -> int:
    """Give every causal linearized attention layer of ``model`` ``slots`` memory slots (0 removes them), or
    ``slots[i]`` to the i-th linearized layer in module order (a per-layer allocation such as
    :func:`surgeon.distill.planning.plan_memory` returns); ``block``: prefill tokens per memory update
    (default: keep each layer's). Returns the number of layers.

    Checks every layer before changing any: gated layers (their decayed contributions cannot be taken
    out of the state) and bidirectional ones are refused with their names. It changes the live model
    only: a surgery saved with ``surgeon.save`` restores with the memory of its recipe
    (``LinearizeAttention(memory=...)``), so call it again after ``surgeon.restore``.
    """
    units = [(n, m) for n, m in model.named_modules() if isinstance(m, LinearAttention)]
    if not units:
        raise ConfigError(f"set_memory: {type(model).__name__} has no linearized attention layer; run "
                          "surgeon.apply(model, LinearizeAttention(...)) first")
    per_layer = _per_layer(slots, len(units))
    for name, value, low in [*(("slots", n, 0) for n in per_layer), ("block", 1 if block is None else block, 1)]:
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ConfigError(f"set_memory: {name} must be an int >= {low}, got {value!r}")
    with_slots = [(n, u) for (n, u), count in zip(units, per_layer) if count]
    gated = [n for n, u in with_slots if u.gate != "none"]
    bidirectional = [n for n, u in with_slots if not u.is_causal]
    if gated or bidirectional:
        raise ConfigError(f"set_memory: memory slots need causal, ungated linear attention; refused layers: "
                          f"{', '.join(gated + bidirectional)} (gated: {len(gated)}, bidirectional: "
                          f"{len(bidirectional)}); nothing was changed")
    for (_, unit), count in zip(units, per_layer):
        unit.memory = count
        if block is not None:
            unit.memory_block = block
    return len(units)


def _per_layer(slots: int | Sequence[int], n_layers: int) -> list[int]:
    """One slot count per linearized layer (an int is repeated; a sequence must have one per layer)."""
    if isinstance(slots, Sequence) and not isinstance(slots, str):
        if len(slots) != n_layers:
            raise ConfigError(f"set_memory: got {len(slots)} slot counts for {n_layers} linearized attention layers; "
                              "give one per layer (in module order) or a single int for all")
        return list(slots)
    return [slots] * n_layers


__all__ = ["set_memory"]
