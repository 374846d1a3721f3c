"""Prompts of any length in an exported prefill graph: left-pad to the chunk multiple inside the graph.

The chunked linear-attention form needs a sequence that is a multiple of its chunk length. Instead of
asking every client to pad, the prefill graphs (:func:`surgeon.export.export_causal_lm`'s
``prefill.onnx`` and the onnxruntime-genai prompt graph) pad on the left inside the graph (padded
slots masked out: positions and state are those of the unpadded prompt) and slice the logits back:
all positions of the prompt, or only the last one (what generation needs).

Example:
    >>> import torch
    >>> ids, mask, pad = pad_to_chunk(torch.tensor([[5, 6, 7]]), torch.ones(1, 3, dtype=torch.long), 4)
    >>> ids.tolist(), mask.tolist(), pad
    ([[0, 5, 6, 7]], [[0, 1, 1, 1]], 1)
    >>> select_logits(torch.arange(4.0).reshape(1, 4, 1), pad, last_only=False).flatten().tolist()
    [1.0, 2.0, 3.0]
    >>> select_logits(torch.arange(4.0).reshape(1, 4, 1), pad, last_only=True).flatten().tolist()
    [3.0]
"""
from __future__ import annotations

import torch
import torch.nn as nn
from torch import Tensor


def pad_to_chunk(input_ids: Tensor, attention_mask: Tensor, chunk: int) -> tuple[Tensor, Tensor, Tensor | int]:
    """Left-pad ids (with 0) and mask (with 0) to the next multiple of ``chunk``: (ids, mask, pad)."""
    seq = input_ids.shape[1]
    padded = (seq + chunk - 1) // chunk * chunk          # symbolic under torch.export: chunk * ceil(seq / chunk)
    pad = padded - seq
    return (torch.nn.functional.pad(input_ids, (pad, 0)), torch.nn.functional.pad(attention_mask, (pad, 0)), pad)


def select_logits(logits: Tensor, pad: Tensor | int, last_only: bool) -> Tensor:
    """The prompt's logits back from a padded run: every position (``pad:``) or the last one (length 1)."""
    return logits[:, -1:] if last_only else logits[:, pad:]


class AnyLengthPrefill(nn.Module):
    """``(input_ids, attention_mask) -> (logits, *state)``: a prefill module run on the chunk-padded prompt."""

    def __init__(self, prefill: nn.Module, chunk: int, last_only: bool = False) -> None:
        super().__init__()
        self.prefill = prefill
        self.chunk = chunk
        self.last_only = last_only

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> tuple[Tensor, ...]:
        ids, mask, pad = pad_to_chunk(input_ids, attention_mask, self.chunk)
        logits, *state = self.prefill(ids, mask)
        return (select_logits(logits, pad, self.last_only), *state)
