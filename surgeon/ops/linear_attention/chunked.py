"""The chunked forms: linear time in the sequence length, dense work inside chunks of C tokens.

Causal: window terms per query chunk (a band of C + w − 1 keys), sink terms (a handful of keys) and
chunked linear attention whose state passes between chunks. Bidirectional: global linear sums
corrected per query chunk on the key columns its local rows touch.

Example:
    >>> import torch
    >>> from surgeon.ops.feature_maps import make_feature_map
    >>> from surgeon.ops.linear_attention.inputs import prepare
    >>> from surgeon.ops.linear_attention.reference import causal_parallel
    >>> fm = make_feature_map("elu1", 2, 4)
    >>> q = k = v = torch.randn(1, 2, 19, 4, dtype=torch.float64)
    >>> x = prepare(q, k, v, fm, fm, scale=0.5, window=5, sinks=2)
    >>> torch.allclose(causal_chunked(x, 4)[0], causal_parallel(x)[0])
    True
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from surgeon.ops.linear_attention.common import (Parts, decay_state, empty_parts, finish, repeat_heads, softmax_parts,
                                                 with_ones, with_slots)
from surgeon.ops.linear_attention.inputs import Inputs

# (fq, fk, [v, 1] at H heads in folding order, state, log_decay, strict) -> (linear terms, new state)
Recurrence = Callable[[Tensor, Tensor, Tensor, Tensor, "Tensor | None", bool], tuple[Tensor, Tensor]]


def causal_chunked(x: Inputs, C: int, recurrence: Recurrence | None = None) -> tuple[Tensor, Tensor]:
    """Causal hybrid attention in linear time; returns (out, new_state). ``recurrence``: a function computing
    the linear terms instead (``surgeon::linear_recurrence``, the op an export maps onto ONNX's LinearAttention)."""
    parts = window_chunked(x, C) if x.window > 0 else empty_parts(x)
    parts = with_slots(parts, x)
    fk, vv = fold_stream(x)
    if recurrence is not None:
        lin, new_state = recurrence(x.fq, repeat_heads(fk, x.groups), repeat_heads(vv, x.groups), x.state,
                                    x.log_decay, x.window > 0)
    elif x.log_decay is None:
        lin, new_state = linear_chunked(x.fq, fk, vv, None if x.fresh else x.state, x.groups,
                                        strict=x.window > 0, C=C)
    else:
        gated = scalar_gated_linear_chunked if x.log_decay.dim() == 3 else gated_linear_chunked
        lin, new_state = gated(x.fq, repeat_heads(fk, x.groups), repeat_heads(vv, x.groups),
                               x.log_decay, x.state, strict=x.window > 0, C=C)
    return finish(x, parts, lin), new_state


def fold_stream(x: Inputs) -> tuple[Tensor, Tensor]:
    """Keys/values in folding order: slot i (new token i) holds the key folded at that step.

    Key j is folded at step j + max(w−1, 0), so the stream is the past + current keys shifted right by
    max(w−1, 0) − P (zeros before the first key). Returns fk (B,Hkv,T,F) and [v, 1] (B,Hkv,T,Dv+1).
    """
    T = x.q.shape[2]
    shift = max(x.window - 1, 0) - x.past
    fk, vv = x.fk, with_ones(x.v)
    if shift > 0:
        fk = F.pad(fk, (0, 0, shift, 0))
        vv = F.pad(vv, (0, 0, shift, 0))
    return fk[:, :, :T], vv[:, :, :T]


def to_chunks(x: Tensor, C: int) -> Tensor:
    """(B, h, T, X) -> (B, h, n, C, X), zero-padding T up to a multiple of C."""
    T = x.shape[2]
    n = -(-T // C)
    x = F.pad(x, (0, 0, 0, n * C - T))
    return x.reshape(*x.shape[:2], n, C, x.shape[-1])


def group_queries(x: Tensor, groups: int, C: int) -> Tensor:
    """(B, H, T, X) -> (B, Hkv, n, groups·C, X): the query heads sharing a kv head, per chunk."""
    B, H, _, X = x.shape
    c = to_chunks(x, C)                                    # (B, H, n, C, X)
    n = c.shape[2]
    c = c.reshape(B, H // groups, groups, n, C, X).transpose(2, 3)
    return c.reshape(B, H // groups, n, groups * C, X)


def ungroup_queries(x: Tensor, groups: int, T: int) -> Tensor:
    """Inverse of :func:`group_queries`, cutting the padding: -> (B, H, T, X)."""
    B, Hkv, n, GC, X = x.shape
    C = GC // groups
    x = x.reshape(B, Hkv, n, groups, C, X).transpose(2, 3)
    return x.reshape(B, Hkv * groups, n * C, X)[:, :, :T]


def window_chunked(x: Inputs, C: int) -> Parts:
    """Sliding-window softmax terms: each chunk of C queries sees a band of C + w − 1 keys."""
    T = x.q.shape[2]
    w, P, g = x.window, x.past, x.groups
    n = -(-T // C)
    L = C + w - 1
    lead = w - 1 - P                                       # zero keys in front so key block i starts at i·C
    tail = n * C - T
    k = F.pad(x.k, (0, 0, lead, tail)).unfold(2, L, C)                            # (B,Hkv,n,D,L)
    v = F.pad(x.v, (0, 0, lead, tail)).unfold(2, L, C).transpose(-1, -2)          # (B,Hkv,n,L,Dv)
    valid = F.pad(x.valid, (lead, tail), value=False).unfold(1, L, C)              # (B,n,L)
    r = torch.arange(L, device=x.q.device)[None, :] - torch.arange(C, device=x.q.device)[:, None]
    band = ((r >= 0) & (r < w)).repeat(g, 1)                                       # (g·C, L)
    allowed = band & valid[:, None, :, None, :]                                    # (B,1,n,g·C,L)
    scores = x.scale * group_queries(x.q, g, C) @ k
    num, den, m = softmax_parts(scores, allowed, v)
    return ungroup_queries(num, g, T), ungroup_queries(den, g, T), ungroup_queries(m, g, T)


def causal_mask(C: int, strict: bool, device: torch.device) -> Tensor:
    """Lower-triangular (C, C) bool; strictly lower when ``strict``."""
    return torch.ones(C, C, dtype=torch.bool, device=device).tril(-1 if strict else 0)


def linear_chunked(fq: Tensor, fk: Tensor, vv: Tensor, state: Tensor | None, groups: int, *, strict: bool,
                   C: int) -> tuple[Tensor, Tensor]:
    """Ungated chunked linear attention, all chunks at once (no loop over time).

    fq (B,H,T,F); fk (B,Hkv,T,F) and vv (B,Hkv,T,Dv+1) in folding order; state (B,H,F,Dv+1) or None.
    Returns [Σ b v | Σ b] without λ, (B,H,T,Dv+1), and the final state.
    """
    T = fq.shape[2]
    q = group_queries(fq, groups, C)                      # (B,Hkv,n,g·C,F)
    kc, vc = to_chunks(fk, C), to_chunks(vv, C)           # (B,Hkv,n,C,F), (B,Hkv,n,C,Dv+1)
    mask = causal_mask(C, strict, fq.device).repeat(groups, 1)
    intra = (q @ kc.transpose(-1, -2)).masked_fill(~mask, 0.0) @ vc
    chunk_sums = kc.transpose(-1, -2) @ vc                # (B,Hkv,n,F,Dv+1)
    before = chunk_sums.cumsum(2)
    total = before[:, :, -1]
    before = torch.cat([torch.zeros_like(before[:, :, :1]), before[:, :, :-1]], dim=2)
    out = ungroup_queries(intra + q @ before, groups, T)
    if state is None:
        return out, repeat_heads(total, groups)
    return out + fq @ state, state + repeat_heads(total, groups)


def scalar_gated_linear_chunked(fq: Tensor, fk: Tensor, vv: Tensor, log_decay: Tensor, state: Tensor, *,
                                strict: bool, C: int) -> tuple[Tensor, Tensor]:
    """Per-head gated chunked linear attention with no loop over chunks (so it exports with a dynamic length).

    All tensors at H heads, log_decay (B,H,T). Inside chunk i with cumulative log decay b: intra terms
    exp(b_t − b_u) q_t·k_u; the state entering chunk i is Σ_{j<i} exp(G⁻_i − G_j) K_j + exp(G⁻_i) S₀,
    with G the inclusive cumulative sum of chunk totals, G⁻ the exclusive one (G shifted by one
    chunk, never G − total), both accumulated in float64 so their differences stay accurate at long
    lengths, and K_j chunk j's keys decayed to its end. Every exponent is a difference that is ≤ 0.
    """
    T = fq.shape[2]
    q, k, v = to_chunks(fq, C), to_chunks(fk, C), to_chunks(vv, C)            # (B,H,n,C,·)
    ld = F.pad(log_decay, (0, (-T) % C)).reshape(*log_decay.shape[:2], -1, C)
    b = ld.cumsum(-1)                                                           # (B,H,n,C)
    mask = causal_mask(C, strict, fq.device)
    diff = (b[..., :, None] - b[..., None, :]).masked_fill(~mask, float("-inf"))
    intra = ((q @ k.transpose(-1, -2)) * diff.exp()) @ v                       # (B,H,n,C,Dv+1)
    total = b[..., -1]                                                          # (B,H,n)
    g_incl = total.double().cumsum(-1)
    g_excl = F.pad(g_incl[..., :-1], (1, 0))
    n = total.shape[-1]
    before = torch.ones(n, n, dtype=torch.bool, device=fq.device).tril(-1)
    m = (g_excl[..., :, None] - g_incl[..., None, :]).to(fq.dtype).masked_fill(~before, float("-inf")).exp()
    chunk_kv = (k * (total[..., None] - b).exp()[..., None]).transpose(-1, -2) @ v             # (B,H,n,F,Dv+1)
    entering = (torch.einsum("bhij,bhjfd->bhifd", m, chunk_kv)
                + g_excl.to(fq.dtype).exp()[..., None, None] * state[:, :, None])
    inter = b.exp()[..., None] * (q @ entering)
    out = (intra + inter).reshape(*fq.shape[:2], -1, vv.shape[-1])[:, :, :T]
    last = g_incl[..., -1:]                                                     # (B,H,1)
    final = (state * last.to(fq.dtype).exp()[..., None]
             + torch.einsum("bhj,bhjfd->bhfd", (last - g_incl).to(fq.dtype).exp(), chunk_kv))
    return out, final


def gated_linear_chunked(fq: Tensor, fk: Tensor, vv: Tensor, log_decay: Tensor, state: Tensor, *, strict: bool,
                         C: int) -> tuple[Tensor, Tensor]:
    """Gated chunked linear attention (per-head or per-channel decay), one chunk at a time.

    All tensors at H heads. Decay factors are exponentials of differences of cumulative log decays
    (never of a positive sum): exp(b_t − b_u) for u ≤ t inside a chunk, exp(b_t) ≤ 1 from the chunk
    start, exp(b_C − b_u) ≤ 1 to the chunk end.
    """
    T = fq.shape[2]
    channel = log_decay.dim() == 4
    mask = causal_mask(C, strict, fq.device)
    outs = []
    for lo in range(0, T, C):
        q, k, v = fq[:, :, lo:lo + C], fk[:, :, lo:lo + C], vv[:, :, lo:lo + C]
        b = log_decay[:, :, lo:lo + C].cumsum(2)           # (B,H,c[,F])
        c = q.shape[2]
        m = mask[:c, :c]
        if channel:
            scores = channel_decay_scores(q, k, b, strict)
            inter = (q * b.exp()) @ state
        else:
            diff = (b[:, :, :, None] - b[:, :, None, :]).masked_fill(~m, float("-inf"))
            scores = (q @ k.transpose(-1, -2)) * diff.exp()
            inter = b.exp()[..., None] * (q @ state)
        outs.append(scores @ v + inter)
        b_last = b[:, :, -1]
        to_end = (b_last[:, :, None] - b).exp()
        k_end = k * (to_end if channel else to_end[..., None])
        state = decay_state(state, b_last) + k_end.transpose(-1, -2) @ v
    return torch.cat(outs, dim=2), state


def channel_decay_scores(q: Tensor, k: Tensor, b: Tensor, strict: bool, sub: int = 16) -> Tensor:
    """Σ_f q_tf k_uf exp(b_tf − b_uf) for u ≤ t (u < t if strict) in one chunk; q, k, b (B,H,c,F) -> (B,H,c,c).

    Tokens are split into sub-blocks of ``sub``. A pair with u in an earlier sub-block than t factors
    through that sub-block's last position e as (q_t·exp(b_t − b_e))·(k_u·exp(b_e − b_u)), both
    exponents ≤ 0, and goes through a matmul; pairs inside one sub-block use exp of the exact
    difference (a sub × sub × F tensor instead of c × c × F).
    """
    B, H, c, Fd = q.shape
    n = -(-c // sub)
    pad = n * sub - c
    qp = F.pad(q, (0, 0, 0, pad))                                                          # (B,H,n·sub,F)
    kp = F.pad(k, (0, 0, 0, pad)).reshape(B, H, n, sub, Fd)
    bp = torch.cat([b, b[:, :, -1:].expand(B, H, pad, Fd)], dim=2)                          # (B,H,n·sub,F)
    b_blocks = bp.reshape(B, H, n, sub, Fd)
    b_end = b_blocks[:, :, :, -1]                                                            # (B,H,n,F)
    block = torch.arange(n * sub, device=q.device) // sub
    later = block[None, :] > torch.arange(n, device=q.device)[:, None]                     # (n, n·sub)
    q_fac = (bp[:, :, None] - b_end[:, :, :, None]).masked_fill(~later[..., None], float("-inf")).exp()
    k_fac = (b_end[:, :, :, None] - b_blocks).exp()
    off = (qp[:, :, None] * q_fac) @ (kp * k_fac).transpose(-1, -2)                        # (B,H,n,n·sub,sub)
    scores = off.permute(0, 1, 3, 2, 4).reshape(B, H, n, sub, n, sub)
    tri = causal_mask(sub, strict, q.device)[..., None]
    pair = (b_blocks[:, :, :, :, None] - b_blocks[:, :, :, None]).masked_fill(~tri, float("-inf")).exp()
    diag = (qp.reshape(B, H, n, sub, 1, Fd) * kp[:, :, :, None] * pair).sum(-1)           # (B,H,n,sub,sub)
    scores.diagonal(dim1=2, dim2=4).add_(diag.permute(0, 1, 3, 4, 2))
    return scores.reshape(B, H, n * sub, n * sub)[:, :, :c, :c]


def bidir_chunked(x: Inputs, local_mask: Tensor | None, C: int) -> Tensor:
    """Global linear sums, split per query chunk into the key columns its local rows touch and the rest.

    The keys outside a chunk's columns enter through (total − their sum), the linear pairs inside
    them directly: no output is formed as a difference of linear terms, so a local window covering
    every key leaves exactly the softmax (total − sum over all keys is the same matmul twice: 0).
    """
    T = x.q.shape[2]
    g = x.groups
    vv = with_ones(x.v)
    total = x.fk.transpose(-1, -2) @ vv                   # (B,Hkv,F,Dv+1), padded keys are zero rows
    if local_mask is None:
        return finish(x, empty_parts(x), x.fq @ repeat_heads(total, g))
    k, v, fk = repeat_heads(x.k, g), repeat_heads(x.v, g), repeat_heads(x.fk, g)
    chunks, lins = [], []
    for lo in range(0, T, C):
        rows = local_mask[..., lo:lo + C, :]               # (c, T) or (B, c, T)
        cols = rows.reshape(-1, T).any(0).nonzero().squeeze(1)
        local = rows[..., cols]
        local = (local if local.dim() == 2 else local[:, None]) & x.valid[:, None, None, cols]
        q, fq = x.q[:, :, lo:lo + C], x.fq[:, :, lo:lo + C]
        chunks.append(softmax_parts(x.scale * q @ k[:, :, cols].transpose(-1, -2), local, v[:, :, cols]))
        outside = total - x.fk[:, :, cols].transpose(-1, -2) @ vv[:, :, cols]       # (B,Hkv,F,Dv+1)
        kern = (fq @ fk[:, :, cols].transpose(-1, -2)).masked_fill(local, 0.0)      # linear pairs inside cols
        lins.append(fq @ repeat_heads(outside, g) + kern @ with_ones(v[:, :, cols]))
    parts = tuple(torch.cat([c[i] for c in chunks], 2) for i in range(3))
    return finish(x, parts, torch.cat(lins, dim=2))
