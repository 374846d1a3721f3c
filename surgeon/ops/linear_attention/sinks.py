"""Attention sinks: the first k valid tokens of each sequence stay exact softmax keys forever.

The sink cache has a fixed size: k key/value slots and a flag per slot, filled in order as sink
tokens leave the sliding window (``(sink_k (B,Hkv,k,D), sink_v (B,Hkv,k,Dv), sink_valid (B,k))``).
Padding never becomes a sink: ranks count valid tokens only, per row. No shape depends on the data,
so the same code runs eagerly, in ``torch.export`` and in ONNX graphs.

Example:
    >>> import torch
    >>> k = torch.arange(6.).reshape(1, 1, 6, 1)
    >>> valid = torch.tensor([[False, True, True, True, True, True]])    # one left-padding slot
    >>> sk, sv, ok = update_sinks(2, 3, None, k, k, valid)               # window 3 keeps 2 raw: 4 slots left
    >>> sk.flatten().tolist(), ok.tolist()
    ([1.0, 2.0], [[True, True]])
"""
from __future__ import annotations

import torch
from torch import Tensor

from surgeon.core.errors import ConfigError

SinkState = tuple[Tensor, Tensor, Tensor]


def empty_sinks(keys: Tensor, values: Tensor, sinks: int) -> SinkState:
    """k empty (invalid) sink slots shaped like ``keys`` (B,Hkv,·,D) / ``values`` (B,Hkv,·,Dv)."""
    B, Hkv = keys.shape[:2]
    return (keys.new_zeros(B, Hkv, sinks, keys.shape[3]), values.new_zeros(B, Hkv, sinks, values.shape[3]),
            torch.zeros(B, sinks, dtype=torch.bool, device=keys.device))


def check_sink_state(state: SinkState | None, sinks: int, keys: Tensor, values: Tensor) -> SinkState:
    """The cached sink slots (empty when ``state`` is None), or a clear error naming the bad part."""
    if not isinstance(sinks, int) or isinstance(sinks, bool) or sinks < 0:
        raise ConfigError(f"sinks must be an int ≥ 0 (the number of first tokens kept as exact softmax), got {sinks!r}")
    if state is None:
        return empty_sinks(keys, values, sinks)
    if sinks == 0:
        raise ConfigError("a sink state was passed but sinks=0; pass sinks=k (the count the cache was built with)")
    if not isinstance(state, (tuple, list)) or len(state) != 3:
        raise ConfigError("sink_state must be (sink_k, sink_v, sink_valid) as returned by update_sinks")
    sk, sv, ok = state
    B, Hkv = keys.shape[:2]
    if tuple(sk.shape) != (B, Hkv, sinks, keys.shape[3]):
        raise ConfigError(f"sink_k has shape {tuple(sk.shape)}; it must be (B, Hkv, sinks, D) = "
                          f"({B}, {Hkv}, {sinks}, {keys.shape[3]})")
    if tuple(sv.shape) != (B, Hkv, sinks, values.shape[3]):
        raise ConfigError(f"sink_v has shape {tuple(sv.shape)}; it must be (B, Hkv, sinks, Dv) = "
                          f"({B}, {Hkv}, {sinks}, {values.shape[3]})")
    if tuple(ok.shape) != (B, sinks):
        raise ConfigError(f"sink_valid has shape {tuple(ok.shape)}; it must be (batch, sinks) = ({B}, {sinks})")
    return sk, sv, ok.to(device=keys.device, dtype=torch.bool)


def all_filled(sink_valid: Tensor) -> bool:
    """Every sink slot of every row is filled (no token can become a sink any more): the decode steps of a
    long generation skip the candidate search. Always False while a graph is captured (no data-dependent
    branch there)."""
    if torch.compiler.is_compiling() or torch.compiler.is_exporting():
        return False
    return bool(sink_valid.all())


def sink_candidates(valid: Tensor, filled: Tensor, sinks: int) -> tuple[Tensor, Tensor, Tensor]:
    """Which of the past + current tokens are sinks: the valid ones whose rank (after ``filled`` cached sinks) < k.

    valid (B,N) bool; filled (B,) cached sink count. Returns is_sink (B,N), the index of each
    candidate (B,k) (the s-th valid token of past + current) and whether candidate s is a sink (B,k).
    """
    rank = valid.long().cumsum(-1) - 1                                                   # (B,N)
    is_sink = valid & (rank + filled[:, None] < sinks)
    s = torch.arange(sinks, device=valid.device)
    hit = valid[:, None, :] & (rank[:, None, :] == s[None, :, None])                   # (B,k,N)
    index = hit.long().argmax(-1)                                                        # (B,k)
    exists = hit.any(-1)
    return is_sink, index, exists & (s[None, :] + filled[:, None] < sinks)


def gather_tokens(x: Tensor, index: Tensor) -> Tensor:
    """x (B,h,N,X) at per-row token indices (B,k) -> (B,h,k,X)."""
    idx = index[:, None, :, None].expand(x.shape[0], x.shape[1], index.shape[1], x.shape[3])
    return x.gather(2, idx)


def update_sinks(sinks: int, window: int, state: SinkState | None, keys: Tensor, values: Tensor,
                 key_mask: Tensor | None = None) -> SinkState:
    """The sink cache after a call that saw ``keys``/``values`` (B,Hkv,N,·): the window's raw past, then the new tokens.

    Sink candidates that left the window during the call (all but the last max(window−1, 0) of
    past + current) fill the next free slots in order.
    """
    sk, sv, ok = check_sink_state(state, sinks, keys, values)
    if sinks == 0 or all_filled(ok):
        return sk, sv, ok
    B, _, N, _ = keys.shape
    valid = torch.ones(B, N, dtype=torch.bool, device=keys.device) if key_mask is None else key_mask.bool()
    filled = ok.long().sum(-1)
    _, index, is_cand = sink_candidates(valid, filled, sinks)
    left = is_cand & (index < N - max(window - 1, 0))                                    # (B,k)
    slot = torch.arange(sinks, device=keys.device)[None, :] - filled[:, None]           # candidate for each slot
    src = slot.clamp(0, sinks - 1)
    take = (slot >= 0) & left.gather(1, src)                                             # (B,k)
    rows = index.gather(1, src)
    new_k, new_v = gather_tokens(keys, rows), gather_tokens(values, rows)
    put = take[:, None, :, None]
    return (torch.where(put, new_k.to(sk.dtype), sk), torch.where(put, new_v.to(sv.dtype), sv), ok | take)
