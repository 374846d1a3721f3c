"""The hybrid attention kernel with a family's own score semantics: soft-capping and learned sinks.

Same contract as :func:`surgeon.ops.linear_attention.linear_attention` (package docstring there:
window W(t), attention sinks, linear terms over the folded keys, one shared normaliser, GQA, the
cache of the last max(w−1, 0) raw keys + a recurrent state + sink slots), with two additions that
families put inside their softmax:

- ``softcap`` c: every exact score s becomes c·tanh(s / c) (Gemma 2's logit soft-capping) before the
  exponential, in the window and on the sink tokens;
- ``s_aux`` (H,): a learned logit per head that joins the softmax normaliser with a zero value
  (GPT-OSS's attention sinks): the denominator gains γ·exp(s_aux − m), m taken over it too.

The linear terms are unchanged (no score, no cap). Without either addition the result equals
``linear_attention`` (tests compare them). Linear time: queries run in chunks of ``chunk_size``,
each reading the window's raw keys and the state accumulated before the chunk. No decay (gates).

Example:
    >>> import torch
    >>> from surgeon.ops.feature_maps import make_feature_map
    >>> fq, fk = make_feature_map("elu1", 4, 8), make_feature_map("elu1", 2, 8)
    >>> q, k, v = torch.randn(1, 4, 10, 8), torch.randn(1, 2, 10, 8), torch.randn(1, 2, 10, 8)
    >>> exact = capped_hybrid_attention(q, k, v, fq, fk, scale=8 ** -0.5, window=10, softcap=5.0)
    >>> s = 5.0 * torch.tanh((q @ k.repeat_interleave(2, 1).transpose(-1, -2)) * 8 ** -0.5 / 5.0)
    >>> ref = s.masked_fill(torch.ones(10, 10).triu(1).bool(), float("-inf")).softmax(-1) @ v.repeat_interleave(2, 1)
    >>> torch.allclose(exact.out, ref, atol=1e-5), exact.state.shape
    (True, torch.Size([1, 4, 8, 9]))
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from surgeon.core.errors import ConfigError
from surgeon.ops.linear_attention.sinks import SinkState, check_sink_state, gather_tokens, sink_candidates, update_sinks

NEG = float("-inf")


@dataclass
class KernelResult:
    """``out`` (B,H,T,Dv); the next call's ``state`` (B,H,F,Dv+1) and ``sink_state`` (None without sinks)."""

    out: Tensor
    state: Tensor
    sink_state: SinkState | None


def _repeat(x: Tensor, groups: int) -> Tensor:
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def _finite(m: Tensor) -> Tensor:
    return torch.where(torch.isfinite(m), m, torch.zeros((), dtype=m.dtype))


def capped_hybrid_attention(q: Tensor, k: Tensor, v: Tensor, feature_q, feature_k, *, scale: float, window: int,
                            past: int = 0, key_mask: Tensor | None = None, state: Tensor | None = None,
                            sinks: int = 0, sink_state: SinkState | None = None,
                            window_weight: Tensor | None = None, linear_weight: Tensor | None = None,
                            softcap: float | None = None, s_aux: Tensor | None = None, chunk_size: int = 64,
                            eps: float = 1e-6) -> KernelResult:
    """Causal hybrid attention. q (B,H,T,D) new queries; k, v (B,Hkv,P+T,·): the ``past`` = P cached raw
    tokens (P ≤ max(window−1, 0)) then the new ones; ``key_mask`` (B,P+T) bool marks real tokens."""
    B, H, T, D = q.shape
    Hkv, N, Dv = k.shape[1], k.shape[2], v.shape[-1]
    if N != past + T or v.shape[2] != N or H % Hkv:
        raise ConfigError(f"capped_hybrid_attention: keys/values must hold past ({past}) + {T} new tokens at a divisor "
                          f"of {H} heads, got k {tuple(k.shape)}, v {tuple(v.shape)}")
    if past > max(window - 1, 0):
        raise ConfigError(f"capped_hybrid_attention: {past} cached tokens but window={window} keeps "
                          f"{max(window - 1, 0)}; pass the cache this kernel returned")
    if softcap is not None and not softcap > 0:
        raise ConfigError(f"capped_hybrid_attention: softcap must be > 0 or None, got {softcap}")
    dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    g, w = H // Hkv, window
    valid = torch.ones(B, N, dtype=torch.bool, device=q.device) if key_mask is None else key_mask.to(q.device).bool()
    sk, sv, sok = check_sink_state(sink_state, sinks, k, v)
    is_sink = torch.zeros_like(valid)
    cand_k = cand_v = None
    if sinks:
        is_sink, index, exists = sink_candidates(valid, sok.long().sum(-1), sinks)
        cand_k, cand_v = gather_tokens(k, index).to(dtype), gather_tokens(v, index).to(dtype)
    root = float(scale) ** 0.5
    fq = feature_q(q * root).to(dtype)                                              # (B,H,T,F)
    fold = (valid & ~is_sink)[:, None, :, None]
    fk = _repeat(torch.where(fold, feature_k(k * root).to(dtype), torch.zeros((), dtype=dtype)), g)   # (B,H,N,F)
    F = fq.shape[-1]
    kr, vr = _repeat(k.to(dtype), g), _repeat(v.to(dtype), g)
    vv = torch.cat([vr, torch.ones_like(vr[..., :1])], -1)
    running = (torch.zeros(B, H, F, Dv + 1, dtype=dtype, device=q.device) if state is None else state.to(dtype))
    gamma = (torch.ones(H, dtype=dtype, device=q.device) if window_weight is None else window_weight.to(dtype))
    lam = (torch.ones(H, dtype=dtype, device=q.device) if linear_weight is None else linear_weight.to(dtype))
    gamma, lam = gamma.view(1, H, 1, 1), lam.view(1, H, 1, 1)
    qd = q.to(dtype)

    def cap(s: Tensor) -> Tensor:
        return s if softcap is None else softcap * torch.tanh(s / softcap)

    outs = []
    for a in range(0, T, chunk_size):
        b = min(a + chunk_size, T)
        t = torch.arange(past + a, past + b, device=q.device)[:, None]             # buffer positions (C,1)
        scores, masks, values = [], [], []
        if w > 0:
            lo = max(0, past + a - w + 1)
            j = torch.arange(lo, past + b, device=q.device)[None, :]
            scores.append(cap(scale * qd[:, :, a:b] @ kr[:, :, lo:past + b].transpose(-1, -2)))
            masks.append(((j <= t) & (j > t - w))[None, None] & valid[:, None, None, lo:past + b])
            values.append(vr[:, :, lo:past + b])
        if sinks:
            # sinks of this call, once out of the window; then the slots filled by earlier calls
            scores.append(cap(scale * qd[:, :, a:b] @ _repeat(cand_k, g).transpose(-1, -2)))
            masks.append((exists[:, None, None, :] & (index[:, None, None, :] <= t[None, None] - w)))
            values.append(_repeat(cand_v, g))
            scores.append(cap(scale * qd[:, :, a:b] @ _repeat(sk.to(dtype), g).transpose(-1, -2)))
            masks.append(sok[:, None, None, :].expand(B, 1, b - a, sinks))
            values.append(_repeat(sv.to(dtype), g))
        if scores:
            s = torch.cat(scores, -1).masked_fill(~torch.cat(masks, -1), NEG)
            m = s.amax(-1, keepdim=True)
            if s_aux is not None:
                m = torch.maximum(m, s_aux.to(dtype).view(1, H, 1, 1).expand_as(m))
            p = (s - _finite(m)).exp()
            num, den = p @ torch.cat(values, -2), p.sum(-1, keepdim=True)
            if s_aux is not None:
                den = den + (s_aux.to(dtype).view(1, H, 1, 1) - _finite(m)).exp()
        else:
            num = torch.zeros(B, H, b - a, Dv, dtype=dtype, device=q.device)
            den = torch.zeros_like(num[..., :1])
        lin = fq[:, :, a:b] @ running
        lo2, hi2 = max(0, past + a - w), max(0, past + b - w)                   # keys folded during the chunk
        if hi2 > lo2:
            j2 = torch.arange(lo2, hi2, device=q.device)[None, :]
            kern = (fq[:, :, a:b] @ fk[:, :, lo2:hi2].transpose(-1, -2)).masked_fill(~(j2 <= t - w), 0.0)
            lin = lin + kern @ vv[:, :, lo2:hi2]
            running = running + fk[:, :, lo2:hi2].transpose(-1, -2) @ vv[:, :, lo2:hi2]
        num, den = gamma * num + lam * lin[..., :Dv], gamma * den + lam * lin[..., Dv:]
        out = num / den.clamp_min(eps)
        outs.append(torch.where(valid[:, None, past + a:past + b, None], out, torch.zeros((), dtype=dtype)))
    last = N - w                                       # every token but the last max(w−1, 0) leaves the cache
    if w > 0 and last >= 0:
        running = running + fk[:, :, last:last + 1].transpose(-1, -2) @ vv[:, :, last:last + 1]
    new_sinks = update_sinks(sinks, w, sink_state, k, v, valid) if sinks else None
    return KernelResult(torch.cat(outs, 2).to(q.dtype), running, new_sinks)
