"""Pieces every linear-attention form shares: head repetition, softmax terms with their running max,
merging softmax parts under one normaliser, the attention-sink terms and the final division.

Example:
    >>> import torch
    >>> s = torch.tensor([[[[0.0, 1.0, 5.0]]]])
    >>> v = torch.eye(3)[None, None]
    >>> a = softmax_parts(s[..., :2], torch.ones(1, 2, dtype=torch.bool), v[..., :2, :])
    >>> b = softmax_parts(s[..., 2:], torch.ones(1, 1, dtype=torch.bool), v[..., 2:, :])
    >>> num, den, m = merge_parts(a, b)
    >>> torch.allclose(num / den, torch.softmax(s, -1) @ v), m.item()
    (True, 5.0)
"""
from __future__ import annotations

import torch
from torch import Tensor

from surgeon.ops.linear_attention.inputs import Inputs

Parts = tuple[Tensor, Tensor, Tensor]   # Σ exp(s − m) v, Σ exp(s − m), m (−inf where no key is allowed)


def repeat_heads(x: Tensor, groups: int) -> Tensor:
    """(B, Hkv, ...) -> (B, Hkv·groups, ...), HF repeat_kv order."""
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def with_ones(v: Tensor) -> Tensor:
    """[v, 1]: the extra column carries the normaliser."""
    return torch.cat([v, torch.ones_like(v[..., :1])], dim=-1)


def decay_state(state: Tensor, log_decay: Tensor) -> Tensor:
    """α ⊙ state for a per-head (B,H) or per-channel (B,H,F) log decay."""
    factor = log_decay.exp()
    return state * (factor[..., None, None] if factor.dim() == 2 else factor[..., None])


def empty_parts(x: Inputs) -> Parts:
    """No softmax terms: zero (B,H,T,Dv), zero (B,H,T,1), m = −inf."""
    B, H, T, _ = x.q.shape
    num = torch.zeros(B, H, T, x.v.shape[-1], dtype=x.q.dtype, device=x.q.device)
    den = torch.zeros_like(num[..., :1])
    return num, den, torch.full_like(den, float("-inf"))


def softmax_parts(scores: Tensor, allowed: Tensor, v: Tensor) -> Parts:
    """Σ exp(s − m) v and Σ exp(s − m) over allowed keys, with m the max allowed score (−inf if none)."""
    scores = scores.masked_fill(~allowed, float("-inf"))
    m = scores.amax(-1, keepdim=True)
    a = (scores - _finite(m)).exp()
    return a @ v, a.sum(-1, keepdim=True), m


def merge_parts(a: Parts, b: Parts) -> Parts:
    """Two sets of softmax terms under one shared max (the one normaliser of window and sinks)."""
    m = torch.maximum(a[2], b[2])
    fa, fb = (a[2] - _finite(m)).exp(), (b[2] - _finite(m)).exp()
    return a[0] * fa + b[0] * fb, a[1] * fa + b[1] * fb, m


def sink_parts(x: Inputs, rows: slice | None = None) -> Parts | None:
    """Exact softmax terms over the sink tokens that have left the window (None without sinks)."""
    if x.sink_k is None or x.sink_k.shape[2] == 0:
        return None
    g = x.groups
    q = x.q if rows is None else x.q[:, :, rows]
    visible = x.sink_visible if rows is None else x.sink_visible[:, :, rows]
    k, v = repeat_heads(x.sink_k, g), repeat_heads(x.sink_v, g)
    return softmax_parts(x.scale * q @ k.transpose(-1, -2), visible, v)


def memory_parts(x: Inputs, rows: slice | None = None) -> Parts | None:
    """Exact softmax terms over the filled memory slots (every query of the call sees them; None without memory)."""
    if x.memory_k is None or x.memory_k.shape[2] == 0:
        return None
    g = x.groups
    q = x.q if rows is None else x.q[:, :, rows]
    k, v = repeat_heads(x.memory_k, g), repeat_heads(x.memory_v, g)
    return softmax_parts(x.scale * q @ k.transpose(-1, -2), repeat_heads(x.memory_filled, g)[:, :, None, :], v)


def with_slots(parts: Parts, x: Inputs, rows: slice | None = None) -> Parts:
    """``parts`` merged with the sink and memory-slot terms under the one normaliser."""
    for extra in (sink_parts(x, rows), memory_parts(x, rows)):
        if extra is not None:
            parts = merge_parts(parts, extra)
    return parts


def finish(x: Inputs, parts: Parts, lin: Tensor | None, rows: slice | None = None) -> Tensor:
    """γ-weighted softmax terms plus λ-weighted linear terms [num | den], divided; padded queries are 0."""
    num, den = x.gamma * parts[0], x.gamma * parts[1]
    if lin is not None:
        num = num + x.lam * lin[..., :-1]
        den = den + x.lam * lin[..., -1:]
    out = num / den.clamp_min(x.eps)  # not den + eps: that scales every output by 1 - eps/den
    query_valid = x.valid[:, None, x.past:, None]
    if rows is not None:
        query_valid = query_valid[:, :, rows]
    return torch.where(query_valid, out, torch.zeros((), dtype=out.dtype))


def _finite(m: Tensor) -> Tensor:
    return torch.where(torch.isfinite(m), m, torch.zeros((), dtype=m.dtype))
