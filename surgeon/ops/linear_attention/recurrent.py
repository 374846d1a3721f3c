"""The recurrent form: one token at a time (the decode path), O(1) state per step.

Example:
    >>> import torch
    >>> from surgeon.ops.feature_maps import make_feature_map
    >>> from surgeon.ops.linear_attention.inputs import prepare
    >>> from surgeon.ops.linear_attention.reference import causal_parallel
    >>> fm = make_feature_map("elu1", 2, 4)
    >>> q = k = v = torch.randn(1, 2, 9, 4, dtype=torch.float64)
    >>> x = prepare(q, k, v, fm, fm, scale=0.5, window=3, sinks=2)
    >>> torch.allclose(causal_recurrent(x)[0], causal_parallel(x)[0])
    True
"""
from __future__ import annotations

import torch
from torch import Tensor

from surgeon.ops.linear_attention.common import (decay_state, empty_parts, finish, repeat_heads, softmax_parts,
                                                 with_ones, with_slots)
from surgeon.ops.linear_attention.chunked import Recurrence, fold_stream
from surgeon.ops.linear_attention.inputs import Inputs


def causal_recurrent(x: Inputs, recurrence: Recurrence | None = None) -> tuple[Tensor, Tensor]:
    """Window softmax over the last w raw keys, sink terms, linear terms from the state; returns (out, state).

    ``recurrence``: a function computing every step's linear terms and the final state at once
    (``surgeon::linear_recurrence``, see :mod:`~surgeon.ops.linear_attention.standard_op`).
    """
    T = x.q.shape[2]
    P, w, g = x.past, x.window, x.groups
    k, v, fk = repeat_heads(x.k, g), repeat_heads(x.v, g), repeat_heads(x.fk, g)
    vv = with_ones(v)
    state = x.state.clone()
    empty = empty_parts(x)                                 # no window terms (w = 0): sliced per step
    if recurrence is not None:
        f_stream, v_stream = fold_stream(x)
        lin_all, final = recurrence(x.fq, repeat_heads(f_stream, g), repeat_heads(v_stream, g), x.state,
                                    x.log_decay, w > 0)
    outs = []
    for i in range(T):
        t = P + i
        if recurrence is not None:
            parts = tuple(p[:, :, i:i + 1] for p in empty)
            if w > 0:
                lo = max(t - w + 1, 0)
                scores = x.scale * x.q[:, :, i:i + 1] @ k[:, :, lo:t + 1].transpose(-1, -2)
                parts = softmax_parts(scores, x.valid[:, None, None, lo:t + 1], v[:, :, lo:t + 1])
            parts = with_slots(parts, x, slice(i, i + 1))
            outs.append(finish(x, parts, lin_all[:, :, i:i + 1], slice(i, i + 1)))
            continue
        if x.log_decay is not None:
            state = decay_state(state, x.log_decay[:, :, i])
        if w == 0:
            state = state + fk[:, :, t, :, None] * vv[:, :, t, None, :]
        lin = x.fq[:, :, i:i + 1] @ state                  # (B,H,1,Dv+1)
        parts = tuple(p[:, :, i:i + 1] for p in empty)
        if w > 0:
            lo = max(t - w + 1, 0)
            scores = x.scale * x.q[:, :, i:i + 1] @ k[:, :, lo:t + 1].transpose(-1, -2)
            parts = softmax_parts(scores, x.valid[:, None, None, lo:t + 1], v[:, :, lo:t + 1])
            if t - w + 1 >= 0:                            # the oldest window token leaves: fold it
                state = state + fk[:, :, lo, :, None] * vv[:, :, lo, None, :]
        parts = with_slots(parts, x, slice(i, i + 1))
        outs.append(finish(x, parts, lin, slice(i, i + 1)))
    return torch.cat(outs, dim=2), (final if recurrence is not None else state)
