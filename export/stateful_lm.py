"""A linearized causal LM as two pure functions with explicit, fixed-size state: prefill and decode.

Per linearized layer the state is the recurrent state ``(batch, heads, F, head_dim + 1)`` (fp32) plus,
for hybrids, the softmax window's last ``window - 1`` keys and values and a validity flag per slot,
and for layers with attention sinks the ``sinks`` sink keys and values with a flag per slot.
Its size never depends on the context length. Layers left as softmax attention (``layers=`` of
``LinearizeAttention``, ``keep_softmax`` of distillation) carry an ordinary KV cache of their own,
``(batch, kv_heads, past, head_dim)`` plus a validity flag per cached token, which grows by one per
decoded token. Both wrappers run the unchanged Hugging Face forward: the state enters through
transformers' own cache layers (``LinearAttentionAndSlidingWindowAttentionLayer`` / ``DynamicLayer``,
prefilled from the inputs) and is read back from them, and the attention mask is passed already 4-D,
so nothing in the graph depends on Python-side cache bookkeeping.

The softmax layers' cache starts with ``pad = max(window) - 1`` invalid slots, so its key axis always
ends with the linear layers' window slots: one 4-D mask over ``past + new`` keys serves every layer
(linear layers read its last columns, softmax layers all of it).

Example:
    >>> import torch, transformers, surgeon
    >>> from surgeon.passes import LinearizeAttention
    >>> cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
    ...                                num_attention_heads=4, num_key_value_heads=2, vocab_size=50)
    >>> lm = surgeon.apply(transformers.LlamaForCausalLM(cfg).eval(), LinearizeAttention(window=4, sinks=2)).model
    >>> layout = StateLayout.of(lm)
    >>> [s.name.split(".")[-1] for s in layout.specs][:7]
    ['recurrent', 'window_keys', 'window_values', 'window_valid', 'sink_keys', 'sink_values', 'sink_valid']
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
from torch import Tensor
from transformers.cache_utils import Cache, DynamicLayer

from surgeon.core.errors import ExportError
from surgeon.passes.attention.module import LinearAttention, SinkWindowLayer


@dataclass(frozen=True)
class StateSpec:
    """One state tensor: name, shape without the batch dim, dtype, and the layer it belongs to."""

    name: str
    layer: int
    kind: str          # recurrent | window_keys | window_values | window_valid | sink_keys | sink_values |
                       # sink_valid | memory_keys | memory_values | memory_valid | keys | values | valid
    shape: tuple[int | str, ...]   # "past": the growing key axis of a softmax layer's KV cache
    dtype: torch.dtype

    @property
    def grows(self) -> bool:
        return PAST in self.shape


PAST = "past"


def _softmax_shape(config: object) -> tuple[int, int]:
    """(kv heads, head dim) of the model's softmax attention, from its config."""
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = getattr(config, "num_attention_heads", None)
    if not heads:
        raise ExportError(f"{type(config).__name__} names no num_attention_heads: cannot lay out the KV cache "
                          "of the layers left as softmax attention; linearize every layer instead")
    kv = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return kv, head_dim


@dataclass(frozen=True)
class StateLayout:
    """Which layers are linear and what state each carries between graph calls."""

    layers: tuple[tuple[int, nn.Module], ...]
    n_layers: int
    specs: tuple[StateSpec, ...]
    softmax_layers: tuple[int, ...] = ()
    pad: int = 0        # invalid slots a softmax layer's cache starts with: max(window) - 1
    memory_block: int = 0   # layers with memory slots: prefill tokens per slot update (0: no such layer)

    @property
    def memory(self) -> dict[int, int]:
        """Layer -> memory slots, for the layers that have them."""
        return {i: m.memory for i, m in self.layers if m.memory}

    @staticmethod
    def of(model: nn.Module, softmax_only: bool = False) -> "StateLayout":
        """The layout of ``model``'s state; ``softmax_only`` accepts a model with no linear layer (the original,
        exported with its KV cache for like-for-like comparisons)."""
        units = sorted(((m.layer_idx, m) for m in model.modules() if isinstance(m, LinearAttention)),
                       key=lambda item: item[0])
        if not units and not softmax_only:
            raise ExportError(f"{type(model).__name__} has no linearized attention layers: export it with "
                              "surgeon.export.to_onnx(model, path, example_inputs) as one forward graph, or "
                              "apply LinearizeAttention first")
        blocks = {m.memory_block for _, m in units if getattr(m, "memory", 0)}
        if len(blocks) > 1:
            named = {i: m.memory_block for i, m in units if m.memory}
            raise ExportError(f"layers with memory slots update them every memory_block tokens, and these differ "
                              f"(layer: block {named}); the prefill graph runs one block size: "
                              "set_memory(model, slots, block=N) sets one for all")
        bidirectional = [i for i, m in units if not m.is_causal]
        if bidirectional:
            raise ExportError(f"layers {bidirectional} are bidirectional: prefill/decode graphs are for causal LMs; "
                              "export encoders with surgeon.export.to_onnx as one forward graph")
        config = getattr(model, "config", None)
        n_layers = getattr(config, "num_hidden_layers", None) or len(units)
        softmax = tuple(sorted(set(range(n_layers)) - {i for i, _ in units}))
        dtype = next(model.parameters()).dtype
        pad = max((max(unit.window - 1, 0) for _, unit in units), default=0)
        specs = []
        for idx in range(n_layers):
            unit = dict(units).get(idx)
            if unit is None:
                kv, head_dim = _softmax_shape(config)
                specs += [StateSpec(f"state.{idx}.keys", idx, "keys", (kv, PAST, head_dim), dtype),
                          StateSpec(f"state.{idx}.values", idx, "values", (kv, PAST, head_dim), dtype),
                          StateSpec(f"state.{idx}.valid", idx, "valid", (PAST,), torch.bool)]
                continue
            lay = unit.layout
            features = unit.feature_q.out_dim
            state_dtype = torch.float64 if dtype == torch.float64 else torch.float32
            specs.append(StateSpec(f"state.{idx}.recurrent", idx, "recurrent",
                                   (lay.n_heads, features, lay.head_dim + 1), state_dtype))
            if unit.window > 1:
                w = unit.window - 1
                specs += [
                    StateSpec(f"state.{idx}.window_keys", idx, "window_keys", (lay.n_kv_heads, w, lay.head_dim), dtype),
                    StateSpec(f"state.{idx}.window_values", idx, "window_values", (lay.n_kv_heads, w, lay.head_dim),
                              dtype),
                    StateSpec(f"state.{idx}.window_valid", idx, "window_valid", (w,), torch.bool),
                ]
            if unit.sinks:
                n = unit.sinks
                specs += [
                    StateSpec(f"state.{idx}.sink_keys", idx, "sink_keys", (lay.n_kv_heads, n, lay.head_dim), dtype),
                    StateSpec(f"state.{idx}.sink_values", idx, "sink_values", (lay.n_kv_heads, n, lay.head_dim), dtype),
                    StateSpec(f"state.{idx}.sink_valid", idx, "sink_valid", (n,), torch.bool),
                ]
            if unit.memory:
                n = unit.memory
                specs += [
                    StateSpec(f"state.{idx}.memory_keys", idx, "memory_keys", (lay.n_kv_heads, n, lay.head_dim), dtype),
                    StateSpec(f"state.{idx}.memory_values", idx, "memory_values", (lay.n_kv_heads, n, lay.head_dim),
                              dtype),
                    StateSpec(f"state.{idx}.memory_valid", idx, "memory_valid", (lay.n_kv_heads, n), torch.bool),
                ]
        return StateLayout(tuple(units), n_layers, tuple(specs), softmax, pad if softmax else 0,
                           next(iter(blocks), 0))

    def zeros(self, batch: int, device: torch.device | None = None) -> list[Tensor]:
        """The state before any token: zero recurrent states, empty (invalid) window and KV-cache slots."""
        return [torch.zeros((batch, *self.concrete(s, self.pad)), dtype=s.dtype, device=device) for s in self.specs]

    @staticmethod
    def concrete(spec: StateSpec, past: int) -> tuple[int, ...]:
        return tuple(past if d == PAST else d for d in spec.shape)

    def state_bytes(self, batch: int = 1, past: int = 0) -> int:
        """Bytes of state for ``batch`` sequences; softmax layers' KV caches counted at ``past`` slots."""
        return sum(batch * torch.Size(self.concrete(s, past)).numel() * torch.empty((), dtype=s.dtype).element_size()
                   for s in self.specs)

    def kv_bytes_per_token(self, batch: int = 1) -> int:
        """How much the softmax layers' KV caches grow per token (0 when every layer is linear)."""
        return self.state_bytes(batch, past=1) - self.state_bytes(batch, past=0)


def _window(layout: StateLayout, idx: int) -> int:
    """Window slots of linear layer ``idx`` (0 for a softmax layer)."""
    unit = dict(layout.layers).get(idx)
    return max(unit.window - 1, 0) if unit is not None else 0


class StatefulLM(nn.Module):
    """``(input_ids, attention_mask, position_ids, *state) -> (logits, *new_state)`` for any chunk length."""

    def __init__(self, model: nn.Module, softmax_only: bool = False) -> None:
        super().__init__()
        self.model = model
        self.layout = StateLayout.of(model, softmax_only)

    def _cache(self, state: tuple[Tensor, ...]) -> tuple[Cache, Tensor | None]:
        by_layer: dict[int, dict[str, Tensor]] = {}
        for spec, tensor in zip(self.layout.specs, state):
            by_layer.setdefault(spec.layer, {})[spec.kind] = tensor
        layers = []
        window_valid = past_valid = None
        for idx in range(self.layout.n_layers):
            parts = by_layer[idx]
            if "keys" in parts:                       # a softmax layer: its own KV cache
                layer = DynamicLayer()
                layer.is_initialized = True
                layer.dtype, layer.device = parts["keys"].dtype, parts["keys"].device
                layer.keys, layer.values = parts["keys"], parts["values"]
                past_valid = parts["valid"]
                layers.append(layer)
                continue
            w = _window(self.layout, idx)
            layer = SinkWindowLayer(sliding_window=max(w + 1, 2))
            if "sink_keys" in parts:
                layer.sink_state = (parts["sink_keys"], parts["sink_values"], parts["sink_valid"])
            if "memory_keys" in parts:
                layer.memory_state = (parts["memory_keys"], parts["memory_values"], parts["memory_valid"])
            layer.is_initialized = True
            layer.dtype, layer.device = parts["recurrent"].dtype, parts["recurrent"].device
            if w:
                layer.keys, layer.values = parts["window_keys"], parts["window_values"]
                layer.cumulative_length = w
                window_valid = parts["window_valid"]
            else:
                unit = dict(self.layout.layers)[idx]
                empty = parts["recurrent"].new_zeros((parts["recurrent"].shape[0], unit.layout.n_kv_heads, 0,
                                                      unit.layout.head_dim))
                layer.keys, layer.values = empty, empty
            layer.recurrent_states[0] = parts["recurrent"].clone()
            layer.is_recurrent_states_initialized[0] = True
            layer.has_previous_state[0] = True
            layers.append(layer)
        # the softmax caches' key axis ends with the window slots (see the module docstring)
        return Cache(layers=layers), past_valid if past_valid is not None else window_valid

    def forward(self, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor, *state: Tensor
                ) -> tuple[Tensor, ...]:
        cache, past_valid = self._cache(state)
        new_valid = attention_mask.bool()
        key_valid = new_valid if past_valid is None else torch.cat([past_valid, new_valid], dim=1)
        n_new, n_keys = input_ids.shape[1], key_valid.shape[1]
        # query t (absolute key index n_keys - n_new + t) sees valid keys up to itself
        causal = torch.ones(n_new, n_keys, dtype=torch.bool, device=input_ids.device).tril(n_keys - n_new)
        mask = key_valid[:, None, None, :] & causal[None, None]
        if self.layout.softmax_layers:
            # additive form for the original attention (eager adds it; a fully padded query row stays finite)
            dtype = next(self.model.parameters()).dtype
            mask = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)
        out = self.model(input_ids=input_ids, attention_mask=mask, position_ids=position_ids,
                         cache=cache, use_cache=True)
        new_state = []
        for spec in self.layout.specs:
            layer = cache.layers[spec.layer]
            w = _window(self.layout, spec.layer)
            if spec.kind == "recurrent":
                new_state.append(layer.recurrent_states[0])
            elif spec.kind.startswith("sink_"):
                new_state.append(layer.sink_state[("sink_keys", "sink_values", "sink_valid").index(spec.kind)])
            elif spec.kind.startswith("memory_"):
                new_state.append(layer.memory_state[("memory_keys", "memory_values", "memory_valid").index(spec.kind)])
            elif spec.kind in ("keys", "window_keys"):
                new_state.append(layer.keys if spec.kind == "keys" else layer.keys[..., -w:, :])
            elif spec.kind in ("values", "window_values"):
                new_state.append(layer.values if spec.kind == "values" else layer.values[..., -w:, :])
            elif spec.kind == "valid":
                new_state.append(key_valid)
            else:
                new_state.append(key_valid[:, -w:])
        return (out.logits, *new_state)


class PrefillLM(nn.Module):
    """``(input_ids, attention_mask) -> (logits, *state)`` from an empty state (left padding allowed)."""

    def __init__(self, model: nn.Module, softmax_only: bool = False) -> None:
        super().__init__()
        self.step = StatefulLM(model, softmax_only)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> tuple[Tensor, ...]:
        positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        state = self.step.layout.zeros(input_ids.shape[0], input_ids.device)
        return self.step(input_ids, attention_mask, positions, *state)


class BlockPrefillLM(nn.Module):
    """``(input_ids, attention_mask, position_ids, *state) -> (logits, *state)``: one prefill block of a model
    with memory slots. Every layer updates its slots once per call, so a runtime that sends the prompt in
    blocks of ``layout.memory_block`` tokens (the last one shorter) computes what the PyTorch forward computes
    on the whole prompt (it splits it the same way)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.step = StatefulLM(model)

    def forward(self, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor, *state: Tensor
                ) -> tuple[Tensor, ...]:
        units = [unit for _, unit in self.step.layout.layers]
        saved = [(unit.memory_block, unit.chunk_size) for unit in units]
        block = self.step.layout.memory_block
        try:
            for unit in units:
                unit.memory_block = ONE_BLOCK     # the whole call is one block, whatever its (symbolic) length
                # one chunk longer than any block: the chunked form is exact at any chunk length, and a single
                # chunk keeps a symbolic length ≤ block free of chunk-count guards when exported
                unit.chunk_size = max(unit.chunk_size, block + 1)
            return self.step(input_ids, attention_mask, position_ids, *state)
        finally:
            for unit, (memory_block, chunk) in zip(units, saved):
                unit.memory_block, unit.chunk_size = memory_block, chunk


ONE_BLOCK = 2**30   # > any exported sequence length (their Dim max is 2**20)


class DecodeLM(nn.Module):
    """``(input_ids (batch, 1), position_ids (batch, 1), *state) -> (logits, *state)``: one token."""

    def __init__(self, model: nn.Module, softmax_only: bool = False) -> None:
        super().__init__()
        self.step = StatefulLM(model, softmax_only)

    def forward(self, input_ids: Tensor, position_ids: Tensor, *state: Tensor) -> tuple[Tensor, ...]:
        return self.step(input_ids, torch.ones_like(input_ids), position_ids, *state)
