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
    if T == 1 and recurrence is None and x.memory_k is None:
        return one_token(x)
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


def one_token(x: Inputs) -> tuple[Tensor, Tensor]:
    """One decode step with fewer, larger ops: the g query heads of a kv head read its keys together (no
    repeated window), window and sink keys share one softmax (one normaliser, as in the contract), and only
    the token leaving the window is folded (its outer product broadcast over the g heads)."""
    B, H, _, D = x.q.shape
    Hkv, g, t, w = x.k.shape[1], x.groups, x.past, x.window
    state = x.state if x.log_decay is None else decay_state(x.state, x.log_decay[:, :, 0])
    Fd, Dv1 = state.shape[-2:]

    def fold(j: int) -> Tensor:                      # state + φ(k_j) ⊗ [v_j, 1] for every query head
        outer = x.fk[:, :, j, :, None] * with_ones(x.v[:, :, j])[:, :, None, :]            # (B,Hkv,F,Dv+1)
        return (state.reshape(B, Hkv, g, Fd, Dv1) + outer[:, :, None]).reshape(B, H, Fd, Dv1)

    if w == 0:
        state = fold(t)
    lin = x.fq @ state                               # read after the fold (w = 0) or before it (w ≥ 1)
    keys, values, allowed = [], [], []
    if w > 0:
        lo = max(t - w + 1, 0)
        keys.append(x.k[:, :, lo:t + 1]), values.append(x.v[:, :, lo:t + 1])
        allowed.append(x.valid[:, None, None, lo:t + 1])
    if x.sink_k is not None and x.sink_k.shape[2] > 0:
        keys.append(x.sink_k), values.append(x.sink_v), allowed.append(x.sink_visible)
    if keys:
        k, v = (torch.cat(keys, 2), torch.cat(values, 2)) if len(keys) > 1 else (keys[0], values[0])
        scores = x.scale * x.q.reshape(B, Hkv, g, D) @ k.transpose(-1, -2)                  # (B,Hkv,g,L)
        num, den, m = softmax_parts(scores, torch.cat(allowed, -1) if len(allowed) > 1 else allowed[0], v)
        parts = (num.reshape(B, H, 1, -1), den.reshape(B, H, 1, 1), m.reshape(B, H, 1, 1))
    else:
        parts = empty_parts(x)
    if w > 0 and t - w + 1 >= 0:                     # the oldest window token leaves: fold it
        state = fold(t - w + 1)
    return finish(x, parts, lin), state
