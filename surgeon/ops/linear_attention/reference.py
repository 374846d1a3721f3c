"""The readable reference forms: dense (quadratic) masks straight from the formulas of the package docstring.

Example:
    >>> import torch
    >>> from surgeon.ops.feature_maps import make_feature_map
    >>> from surgeon.ops.linear_attention.inputs import prepare
    >>> fm = make_feature_map("elu1", 2, 4)
    >>> q = k = v = torch.randn(1, 2, 6, 4, dtype=torch.float64)
    >>> out, state = causal_parallel(prepare(q, k, v, fm, fm, scale=0.5, window=2, sinks=1))
    >>> out.shape, state.shape
    (torch.Size([1, 2, 6, 4]), torch.Size([1, 2, 4, 5]))
"""
from __future__ import annotations

import torch
from torch import Tensor

from surgeon.ops.linear_attention.common import (decay_state, empty_parts, finish, repeat_heads, softmax_parts,
                                                 with_ones, with_slots)
from surgeon.ops.linear_attention.inputs import Inputs


def causal_parallel(x: Inputs) -> tuple[Tensor, Tensor]:
    """Dense masks over (new queries) × (past + new keys); returns (out, new_state)."""
    T = x.q.shape[2]
    N, P, w, g = x.k.shape[2], x.past, x.window, x.groups
    t = torch.arange(P, N, device=x.q.device)[:, None]                       # query positions (T, 1)
    j = torch.arange(N, device=x.q.device)[None, :]                          # key positions (1, N)
    e = j + max(w - 1, 0)                                 # step at which key j is folded
    valid = x.valid[:, None, None, :]
    k, v, fk = repeat_heads(x.k, g), repeat_heads(x.v, g), repeat_heads(x.fk, g)
    parts = empty_parts(x)
    if w > 0:
        in_window = (j <= t) & (j > t - w) & valid
        parts = softmax_parts(x.scale * x.q @ k.transpose(-1, -2), in_window, v)
    parts = with_slots(parts, x)
    linear = ((e < t) if w > 0 else (e <= t)) & valid
    vv = with_ones(v)
    if x.log_decay is None:
        kern = (x.fq @ fk.transpose(-1, -2)).masked_fill(~linear, 0.0)
        lin = kern @ vv + x.fq @ x.state
        new_state = x.state + fk.transpose(-1, -2) @ (vv * (e <= N - 1).T)
        return finish(x, parts, lin), new_state
    c = x.log_decay.cumsum(2)                             # (B,H,T[,F]): Σ log α over new positions ≤ t
    idx = (e[0] - P).clamp(0, T - 1)                      # folding step of each key, in new-token index
    c_fold = c[:, :, idx]                                 # (B,H,N[,F])
    channel = c.dim() == 4
    exponent = c[:, :, :, None] - c_fold[:, :, None, :]   # (B,H,T,N[,F])
    mask = linear[..., None] if channel else linear
    decay = exponent.masked_fill(~mask, float("-inf")).exp()
    if channel:
        kern = torch.einsum("bhtf,bhnf,bhtnf->bhtn", x.fq, fk, decay)
        lin = kern @ vv + (x.fq * c.exp()) @ x.state
    else:
        kern = (x.fq @ fk.transpose(-1, -2)) * decay
        lin = kern @ vv + c.exp()[..., None] * (x.fq @ x.state)
    c_last = c[:, :, -1]
    folded = (e[0] <= N - 1)
    fold_exp = (c_last[:, :, None] - c_fold).masked_fill(~(folded[:, None] if channel else folded), float("-inf"))
    fk_decayed = fk * (fold_exp.exp() if channel else fold_exp.exp()[..., None])
    new_state = decay_state(x.state, c_last) + fk_decayed.transpose(-1, -2) @ vv
    return finish(x, parts, lin), new_state


def bidir_parallel(x: Inputs, local_mask: Tensor | None) -> Tensor:
    """Dense (T, T) reference: exact softmax on local pairs, the linear kernel elsewhere."""
    g = x.groups
    k, v, fk = repeat_heads(x.k, g), repeat_heads(x.v, g), repeat_heads(x.fk, g)
    valid = x.valid[:, None, None, :]
    if local_mask is None:
        local = torch.zeros_like(valid)
        parts = empty_parts(x)
    else:
        local = (local_mask if local_mask.dim() == 2 else local_mask[:, None]) & valid
        parts = softmax_parts(x.scale * x.q @ k.transpose(-1, -2), local, v)
    kern = (x.fq @ fk.transpose(-1, -2)).masked_fill(~(valid & ~local), 0.0)
    return finish(x, parts, kern @ with_ones(v))
