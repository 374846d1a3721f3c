"""A transformers cache layer for an attention *kernel* converted to a hybrid: window + sinks + recurrent state.

The model's own attention module calls ``cache.update(k, v, layer_idx)`` before the attention
function; this layer keeps only the last ``max(window − 1, 0)`` raw keys/values and returns them
followed by the new ones, so the kernel sees exactly the window it needs. The kernel then stores
the recurrent state and the sink slots here (:meth:`store`). Memory per layer is O(window), not
O(tokens). Mask sizes are those of a full-attention layer (every token counts), so masks built for
the model's other layers line up, and ``get_seq_length`` counts every token seen.

Example:
    >>> import torch
    >>> layer = KernelHybridLayer(window=3)
    >>> k = torch.arange(5.).view(1, 1, 5, 1)
    >>> keys, _ = layer.update(k, k)
    >>> keys.shape[-2], layer.keys.flatten().tolist(), layer.get_seq_length()
    (5, [3.0, 4.0], 5)
    >>> keys, _ = layer.update(k[:, :, :1] + 10, k[:, :, :1])
    >>> keys.flatten().tolist(), layer.get_mask_sizes(1)
    ([3.0, 4.0, 10.0], (7, 0))
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from transformers.cache_utils import DynamicLayer

from surgeon.core.errors import ConfigError


class KernelHybridLayer(DynamicLayer):
    """Raw window + recurrent ``state`` (B,H,F,Dv+1) + ``sink_state`` slots of one converted layer."""

    is_sliding = False
    is_croppable = False

    def __init__(self, window: int, **kwargs: Any) -> None:
        super().__init__()
        self.window = window
        self.cumulative_length = 0
        self.state: torch.Tensor | None = None
        self.sink_state: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    @property
    def keep(self) -> int:
        return max(self.window - 1, 0)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
               ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.cumulative_length += key_states.shape[-2]
        if self.keys.numel() == 0:
            full_k, full_v = key_states, value_states
        else:
            full_k, full_v = torch.cat([self.keys, key_states], -2), torch.cat([self.values, value_states], -2)
        n = full_k.shape[-2]
        self.keys, self.values = full_k[..., n - min(self.keep, n):, :], full_v[..., n - min(self.keep, n):, :]
        return full_k, full_v

    def store(self, state: torch.Tensor, sink_state: tuple[torch.Tensor, ...] | None) -> None:
        """Keep the kernel's state after a call (detached outside autograd)."""
        keep = not torch.is_grad_enabled()
        self.state = state.detach() if keep else state
        self.sink_state = (None if sink_state is None else
                           tuple(t.detach() if keep else t for t in sink_state))

    def get_seq_length(self) -> int:
        return self.cumulative_length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.cumulative_length + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        super().reset()
        self.cumulative_length = 0
        self.state = self.sink_state = None

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove:
            raise ConfigError("a converted (linear-state) attention layer cannot drop tokens from its cache: the "
                              "recurrent state has folded them in; decode without assisted / speculative generation")

    def _each(self, fn) -> None:
        if self.is_initialized and self.keys is not None:
            self.keys, self.values = fn(self.keys), fn(self.values)
        if self.state is not None:
            self.state = fn(self.state)
        if self.sink_state is not None:
            self.sink_state = tuple(fn(t) for t in self.sink_state)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._each(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._each(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._each(lambda t: t[indices, ...])


def layer_at(cache: Any, idx: int, kind: type, make: Callable[[], Any]) -> Any:
    """``cache.layers[idx]`` as a ``kind`` layer: installed (``make()``) on first use, after padding the list with
    empty dynamic layers; a softmax layer that already holds tokens is refused (start from a fresh cache)."""
    while len(cache.layers) <= idx:
        cache.layers.append(DynamicLayer())
    layer = cache.layers[idx]
    if not isinstance(layer, kind):
        if getattr(layer, "is_initialized", False) and layer.get_seq_length() > 0:
            raise ConfigError(f"cache layer {idx} already holds {layer.get_seq_length()} tokens of softmax keys/values; "
                              "start decoding from a fresh cache after linearizing the model")
        layer = make()
        cache.layers[idx] = layer
    return layer
