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

The plan lives in the recipe (``LinearizeAttention(memory=[4, 12])``): ``surgeon.save`` writes the live
model's slots, so ``surgeon.restore`` and ``to_hf`` rebuild them. Slots are per layer, the same count for
every kv head of a layer (a per-head list is refused: the slot update picks per head among a fixed count).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch.nn as nn

from surgeon.core.errors import ConfigError
from surgeon.core.sites import Site
from surgeon.passes.attention.config import LinearizeAttention
from surgeon.passes.attention.module import LinearAttention


def set_memory(model: nn.Module, slots: int | Sequence[int], block: int | None = None) -> int:
    """Give every causal linearized attention layer of ``model`` ``slots`` memory slots (0 removes them), or
    ``slots[i]`` to the i-th linearized layer in module order (a per-layer allocation such as
    :func:`surgeon.distill.planning.plan_memory` returns); ``block``: prefill tokens per memory update
    (default: keep each layer's). Returns the number of layers.

    Checks every layer before changing any: gated layers (their decayed contributions cannot be taken
    out of the state) and bidirectional ones are refused with their names. ``surgeon.save`` / ``to_hf`` of
    the surgery record the live slots in its recipe, so ``surgeon.restore`` rebuilds them.
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
        if any(isinstance(n, Sequence) for n in slots):
            raise ConfigError("set_memory: a per-head plan (a list per layer) is not supported: every kv head of a "
                              "layer has the same slot count (the update keeps the G worst-recalled tokens per head); "
                              "give one int per layer, e.g. the largest of the layer's heads")
        if len(slots) != n_layers:
            raise ConfigError(f"set_memory: got {len(slots)} slot counts for {n_layers} linearized attention layers; "
                              "give one per layer (in module order) or a single int for all")
        return list(slots)
    return [slots] * n_layers


def apply_memory_plan(units: list[tuple[str, nn.Module]], memory: int | list[int]) -> None:
    """Give the freshly built layers ``units`` (name, LinearAttention; in layer order) their counts from a
    per-layer plan ``memory`` (an int is already set by the module). Checks all before changing any."""
    if isinstance(memory, int):
        return
    if len(memory) != len(units):
        raise ConfigError(f"LinearizeAttention(memory={memory}) gives {len(memory)} slot counts for {len(units)} "
                          f"converted layers ({', '.join(n for n, _ in units)}); give one per converted layer in "
                          "layer order, or one int for all")
    bidirectional = [n for (n, u), count in zip(units, memory) if count and not u.is_causal]
    if bidirectional:
        raise ConfigError(f"LinearizeAttention(memory={memory}): memory slots need causal attention; bidirectional "
                          f"layers given slots: {', '.join(bidirectional)}")
    for (_, unit), count in zip(units, memory):
        unit.memory = count


def live_memory_config(model: nn.Module, config: LinearizeAttention, sites: list[Site]) -> LinearizeAttention:
    """``config`` with ``memory`` / ``memory_block`` as the layers at ``sites`` of ``model`` hold them now (an int
    when every layer has the same count, else one per layer); ``config`` itself when nothing changed."""
    units = [m for s in sites if isinstance(m := _get(model, s.name), LinearAttention)]
    if not units or len(units) != len(sites):
        return config                       # FX units or a renamed model: the recipe's own values
    counts = [u.memory for u in units]
    blocks = sorted({u.memory_block for u in units})
    if len(blocks) > 1:
        raise ConfigError(f"memory_block differs between layers ({blocks}); the recipe holds one: "
                          "set_memory(model, slots, block=N) sets it for all")
    memory: int | list[int] = counts[0] if len(set(counts)) == 1 else counts
    if memory == config.memory and blocks[0] == config.memory_block:
        return config
    return dataclasses.replace(config, memory=memory, memory_block=blocks[0])


def _get(model: nn.Module, name: str) -> nn.Module | None:
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None


__all__ = ["set_memory", "apply_memory_plan", "live_memory_config"]
