"""A causal call run as consecutive blocks that carry the whole cache (memory slots, long eager calls).

Memory slots (:mod:`~surgeon.ops.linear_attention.memory`) change once per call, so a long prefill
runs as blocks of ``block`` tokens: each block is one :func:`linear_attention` call that continues
the previous one's window, state, sinks and memory, exactly as if the caller had sent the blocks
one by one. Decoding (one token per call) is the block size 1 case.

Example:
    >>> import torch
    >>> from surgeon.ops.feature_maps import make_feature_map
    >>> fm = make_feature_map("elu1", 1, 4)
    >>> q = k = v = torch.randn(1, 1, 10, 4, dtype=torch.float64)
    >>> whole = run_blocks(q, k, v, fm, fm, Carry(), scale=0.5, window=2, sinks=1, memory=2, block=4)
    >>> first = run_blocks(q[:, :, :4], k[:, :, :4], v[:, :, :4], fm, fm, Carry(), scale=0.5, window=2, sinks=1,
    ...                    memory=2, block=4)
    >>> rest = run_blocks(q[:, :, 4:], k[:, :, 4:], v[:, :, 4:], fm, fm, first.carry, scale=0.5, window=2,
    ...                   sinks=1, memory=2, block=4)
    >>> torch.equal(torch.cat([first.out, rest.out], 2), whole.out), torch.equal(rest.carry.state, whole.carry.state)
    (True, True)
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from surgeon.core.errors import ConfigError
from surgeon.ops.linear_attention.api import linear_attention
from surgeon.ops.linear_attention.inputs import FeatureFn
from surgeon.ops.linear_attention.memory import MemoryState, update_memory
from surgeon.ops.linear_attention.sinks import SinkState, update_sinks


@dataclass
class Carry:
    """Everything a call leaves for the next: the window's raw keys/values, the state, sinks and memory slots."""

    past_k: Tensor | None = None
    past_v: Tensor | None = None
    state: Tensor | None = None
    sink_state: SinkState | None = None
    memory_state: MemoryState | None = None


@dataclass
class BlockResult:
    out: Tensor
    carry: Carry = field(default_factory=Carry)


def run_blocks(q: Tensor, k: Tensor, v: Tensor, feature_q: FeatureFn, feature_k: FeatureFn, carry: Carry, *,
               scale: float, window: int, sinks: int, memory: int, block: int, key_mask: Tensor | None = None,
               **kw: Any) -> BlockResult:
    """Hybrid attention over q/k/v (B,·,T,·) in blocks of ``block`` tokens, carrying ``carry``; returns the
    output and the carry after the last token. ``key_mask`` (B, P + T) covers ``carry.past_k`` + the new tokens;
    ``log_decay`` (new tokens only) is cut per block; other keywords go to :func:`linear_attention`
    (``window_weight``, ``linear_weight``, ``chunk_size``…). Also runs long calls without memory (``memory=0``).
    """
    if not isinstance(block, int) or isinstance(block, bool) or block < 1:
        raise ConfigError(f"memory_block must be a positive int (tokens per memory update), got {block!r}")
    log_decay = kw.pop("log_decay", None)
    if memory and log_decay is not None:
        raise ConfigError("memory slots need ungated linear attention: use gate='none' with memory > 0")
    T = q.shape[2]
    keep = max(window - 1, 0)
    outs = []
    # one block: no loop over (and no min with) a symbolic length, so an exported graph keeps it symbolic
    spans = [(0, T)] if T <= block else [(lo, min(lo + block, T)) for lo in range(0, T, block)]
    for lo, hi in spans:
        P = 0 if carry.past_k is None else carry.past_k.shape[2]
        mask = None if key_mask is None else key_mask[:, key_mask.shape[1] - (T - lo) - P:key_mask.shape[1] - (T - hi)]
        out, state = linear_attention(q[:, :, lo:hi], k[:, :, lo:hi], v[:, :, lo:hi], feature_q, feature_k,
                                      scale=scale, window=window, key_mask=mask, past_k=carry.past_k,
                                      past_v=carry.past_v, state=carry.state, sinks=sinks,
                                      sink_state=carry.sink_state, memory_state=carry.memory_state,
                                      log_decay=None if log_decay is None else log_decay[:, :, lo:hi],
                                      form="recurrent" if hi - lo == 1 else "chunked", **kw)
        outs.append(out)
        seen_k = k[:, :, lo:hi] if carry.past_k is None else torch.cat([carry.past_k, k[:, :, lo:hi]], 2)
        seen_v = v[:, :, lo:hi] if carry.past_v is None else torch.cat([carry.past_v, v[:, :, lo:hi]], 2)
        memory_state = None
        if memory:
            filled = None if carry.sink_state is None else carry.sink_state[2].long().sum(-1)
            memory_state, state = update_memory(memory, window, carry.memory_state, seen_k, seen_v, state,
                                                feature_k, scale=scale, key_mask=mask, sinks=sinks, filled_sinks=filled)
        sink_state = update_sinks(sinks, window, carry.sink_state, seen_k, seen_v, mask) if sinks else None
        lo_keep = max(seen_k.shape[2] - keep, 0)
        carry = Carry(seen_k[:, :, lo_keep:] if keep else None, seen_v[:, :, lo_keep:] if keep else None,
                      state, sink_state, memory_state)
    return BlockResult(torch.cat(outs, 2), carry)


__all__ = ["Carry", "BlockResult", "run_blocks"]
