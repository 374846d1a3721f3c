"""The two graphs of the onnxruntime-genai flavour: state packed into genai's per-layer pair.

onnxruntime-genai cannot take arbitrary state tensors: a layer carries ``past_key_values.%d.conv_state``
(rank 3, ``[batch, C, K]``) and ``past_key_values.%d.recurrent_state`` (rank 4), every layer with
layer 0's shape, zero at the start, passed back each step uninterpreted. :class:`GenaiPacking`
enumerates a linearized layer's state from :class:`surgeon.export.stateful_lm.StateLayout` (so
every kind the layout lists travels, whatever it is): the ``recurrent`` tensor is the
``recurrent_state``; every other tensor (window keys / values / validity flags, ...) is flattened,
cast to the state dtype and concatenated into ``conv_state`` ``[batch, N, 1]``. Zeros unpack to the
empty state (validity flags 0: no valid slot).

Both graphs take ``attention_mask`` over the whole history and compute positions from it (no
``position_ids``). The prompt graph moves right padding (genai's layout) to the left inside the
graph, then left-pads to its chunk multiple, so prompts of any length and batches of unequal prompts
give the same numbers as one prompt at a time.

Example:
    >>> import torch, transformers, surgeon
    >>> from surgeon.passes import LinearizeAttention
    >>> cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
    ...                                num_attention_heads=4, num_key_value_heads=2, vocab_size=50)
    >>> lm = surgeon.apply(transformers.LlamaForCausalLM(cfg).eval(), LinearizeAttention(window=4)).model
    >>> packing = GenaiPacking.of(lm)
    >>> packing.recurrent_shape, "window_keys" in {s.kind for s in packing.packed[0]}
    ((4, 16, 9), True)
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
from torch import Tensor

from surgeon.core.errors import ExportError
from surgeon.export.prompt_padding import pad_to_chunk, select_logits
from surgeon.export.stateful_lm import StatefulLM, StateLayout, StateSpec

PAST_CONV = "past_key_values.%d.conv_state"
PAST_RECURRENT = "past_key_values.%d.recurrent_state"
PRESENT_CONV = "present.%d.conv_state"
PRESENT_RECURRENT = "present.%d.recurrent_state"


@dataclass(frozen=True)
class GenaiPacking:
    """How each linear layer's state tensors map onto genai's (conv_state, recurrent_state) pair."""

    layout: StateLayout
    layers: tuple[int, ...]
    packed: dict[int, tuple[StateSpec, ...]]     # layer -> the specs packed into conv_state, in order
    recurrent: dict[int, StateSpec]
    conv_shape: tuple[int, int]                  # without batch: (N, 1)
    recurrent_shape: tuple[int, ...]
    dtype: torch.dtype

    @staticmethod
    def of(model: nn.Module) -> "GenaiPacking":
        layout = StateLayout.of(model)
        if layout.memory:
            raise ExportError(f"layers {sorted(layout.memory)} have memory slots, which update once per prompt block: "
                              "the onnxruntime-genai prompt graph runs a whole prompt in one call and cannot carry "
                              "them yet; export with surgeon.export.to_onnx (prefill/decode graphs, run block by block "
                              "by surgeon.export.OnnxGenerator), or remove them for genai "
                              "(surgeon.passes.attention.memory_slots.set_memory(model, 0))")
        if layout.softmax_layers:
            raise ExportError(f"layers {list(layout.softmax_layers)} are kept as softmax attention: the "
                              "onnxruntime-genai flavour packs only constant-size linear-attention state; linearize "
                              "every layer (LinearizeAttention(layers=None)) or use surgeon.export.to_onnx's "
                              "prefill/decode graphs with surgeon.export.OnnxGenerator")
        by_layer: dict[int, list[StateSpec]] = {}
        for spec in layout.specs:
            by_layer.setdefault(spec.layer, []).append(spec)
        packed, recurrent, sizes, shapes = {}, {}, set(), set()
        for layer, specs in sorted(by_layer.items()):
            rec = [s for s in specs if s.kind == "recurrent"]
            if len(rec) != 1 or any(s.grows for s in specs):
                raise ExportError(f"layer {layer}'s state {[s.kind for s in specs]} does not fit genai's "
                                  "(conv_state, recurrent_state) pair: one constant-size recurrent state is needed")
            recurrent[layer] = rec[0]
            packed[layer] = tuple(s for s in specs if s.kind != "recurrent")
            sizes.add(tuple((s.kind, s.shape) for s in packed[layer]))
            shapes.add(rec[0].shape)
        if len(sizes) > 1 or len(shapes) > 1:
            raise ExportError("the linearized layers carry state of different shapes (different windows or "
                              "feature maps per layer); onnxruntime-genai allocates every layer with layer 0's "
                              "shape: linearize all layers with one configuration")
        first = next(iter(packed))
        n = sum(int(torch.Size(s.shape).numel()) for s in packed[first])
        dtype = recurrent[first].dtype
        return GenaiPacking(layout, tuple(sorted(packed)), packed, recurrent, (max(n, 1), 1),
                            tuple(recurrent[first].shape), dtype)

    # -- pack / unpack --------------------------------------------------------------------------
    def unpack(self, conv: list[Tensor], rec: list[Tensor]) -> list[Tensor]:
        """genai's per-layer pairs -> the state list of ``StatefulLM`` (layout order)."""
        by_name: dict[str, Tensor] = {}
        for layer, c, r in zip(self.layers, conv, rec):
            by_name[self.recurrent[layer].name] = r
            flat = c.reshape(c.shape[0], -1)
            offset = 0
            for spec in self.packed[layer]:
                n = int(torch.Size(spec.shape).numel())
                part = flat[:, offset:offset + n].reshape(c.shape[0], *spec.shape)
                by_name[spec.name] = part > 0.5 if spec.dtype == torch.bool else part.to(spec.dtype)
                offset += n
        return [by_name[s.name] for s in self.layout.specs]

    def pack(self, state: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        """The state list of ``StatefulLM`` -> genai's (conv_state, recurrent_state) per layer."""
        by_name = {s.name: t for s, t in zip(self.layout.specs, state)}
        conv, rec = [], []
        for layer in self.layers:
            r = by_name[self.recurrent[layer].name]
            rec.append(r)
            parts = [by_name[s.name].reshape(r.shape[0], -1).to(self.dtype) for s in self.packed[layer]]
            flat = torch.cat(parts, dim=1) if parts else r.new_zeros((r.shape[0], 1))
            conv.append(flat.unsqueeze(-1))
        return conv, rec

    def input_names(self) -> list[str]:
        return [n for i in self.layers for n in (PAST_CONV % i, PAST_RECURRENT % i)]

    def output_names(self) -> list[str]:
        return [n for i in self.layers for n in (PRESENT_CONV % i, PRESENT_RECURRENT % i)]


def _split(packing: GenaiPacking, state: tuple[Tensor, ...]) -> tuple[list[Tensor], list[Tensor]]:
    return list(state[0::2]), list(state[1::2])


def _interleave(conv: list[Tensor], rec: list[Tensor]) -> list[Tensor]:
    return [t for pair in zip(conv, rec) for t in pair]


def left_align(input_ids: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Move each row's padding to the left (genai pads on the right): a gather, same shapes."""
    seq = input_ids.shape[1]
    shift = seq - mask.long().sum(-1, keepdim=True)                      # pads of each row
    index = torch.arange(seq, device=input_ids.device)[None, :] - shift
    index = torch.where(index < 0, index + seq, index)                   # the left slots take the pads
    return input_ids.gather(1, index), mask.gather(1, index)


class GenaiPrompt(nn.Module):
    """``(input_ids, attention_mask, *pairs) -> (logits, *pairs)``: the prompt, any length, padded in the graph."""

    def __init__(self, model: nn.Module, chunk: int, last_only: bool = True) -> None:
        super().__init__()
        self.step = StatefulLM(model)
        self.packing = GenaiPacking.of(model)
        self.chunk = chunk
        self.last_only = last_only

    def forward(self, input_ids: Tensor, attention_mask: Tensor, *pairs: Tensor) -> tuple[Tensor, ...]:
        seq = input_ids.shape[1]
        new_mask = attention_mask[:, -seq:]
        ids, mask, pad = pad_to_chunk(*left_align(input_ids, new_mask), self.chunk)
        past = attention_mask.shape[1] - seq                                 # tokens before this prompt
        before = attention_mask[:, :past].long().sum(-1, keepdim=True)
        positions = (mask.long().cumsum(-1) - 1).clamp(min=0) + before
        state = self.packing.unpack(*_split(self.packing, pairs))
        logits, *new_state = self.step(ids, mask, positions, *state)
        logits = select_logits(logits, pad, self.last_only)     # last only: a fixed 1 (genai allocates it)
        return (logits, *_interleave(*self.packing.pack(new_state)))


class GenaiDecode(nn.Module):
    """``(input_ids (batch, 1), attention_mask (batch, past + 1), *pairs) -> (logits, *pairs)``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.step = StatefulLM(model)
        self.packing = GenaiPacking.of(model)

    def forward(self, input_ids: Tensor, attention_mask: Tensor, *pairs: Tensor) -> tuple[Tensor, ...]:
        positions = attention_mask.long().sum(-1, keepdim=True) - 1
        state = self.packing.unpack(*_split(self.packing, pairs))
        logits, *new_state = self.step(input_ids, attention_mask[:, -1:], positions, *state)
        return (logits, *_interleave(*self.packing.pack(new_state)))
