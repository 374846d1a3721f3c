"""Causal and bidirectional (hybrid) linear attention in plain PyTorch, in forms that agree exactly.

Causal contract (per batch b, query head h; positions index the concatenation past + current):

- GQA: query head h uses kv head h // (H // Hkv). fq = φ_q(q·√scale) at H heads, fk = φ_k(k·√scale)
  at Hkv heads (then repeated). Score s_tj = scale·q_t·k_j.
- Window w ≥ 0 (w = 0: pure linear attention). W(t) = {j : t−w < j ≤ t}, L(t) = {j ≤ t−w}.
- m_t = max over valid j ∈ W(t) of s_tj; a_tj = γ_h·exp(s_tj − m_t) on W(t);
  b_tj = λ_h·(fq_t·fk_j)·D(t, j) on L(t);
  y_t = (Σ_W a v + Σ_L b v) / (Σ_W a + Σ_L b + eps).
- Decay α_u = exp(log_decay_u) (per head or per feature channel). Token j is *folded* into the
  recurrent state at step e_j = j + max(w−1, 0), the step after which it leaves the raw window the
  cache keeps; it decays from then on: D(t, j) = Π_{u=e_j+1}^{t} α_u. For w = 0 this is GLA's
  Π_{u=j+1}^{t} α_u; for w ≥ 1 it is Π_{u=j+w}^{t} α_u (see "Deviation" below).
- State (B, H, F, Dv+1) = Σ_{folded j} D · fk_j ⊗ [v_j, 1]; recurrence
  state_t = α_t ⊙ state_{t−1} + fk_{t−s} ⊗ [v_{t−s}, 1] with s = max(w−1, 0); a query at t reads
  state_t when w = 0 and α_t ⊙ state_{t−1} when w ≥ 1. The state is accumulated in float32
  (float64 for float64 inputs) whatever the input dtype.
- A cache holds the last max(w−1, 0) raw keys/values (``past_k``, ``past_v``) plus ``state``; the
  returned state folds every token except the last max(w−1, 0) of past + current, so feeding it back
  continues the sequence exactly. ``log_decay`` covers the new positions only.
- Padding (``key_mask`` False) keys contribute nothing; outputs at padded query positions are 0.

Deviation from a decay that starts one step later (Π_{u=j+w+1}^{t}): with a cache of w−1 raw tokens
the token leaving the window is folded one step before it enters L(t), so its decay must start at
j+w for the cache to reproduce the full-sequence result. Without decay both are the same.

Forms: "parallel" (dense masks, quadratic: the readable reference), "chunked" (linear time; the
window and the intra-chunk terms are dense per chunk, the state passes between chunks; without
decay it has no Python loop over time) and "recurrent" (one token at a time: the decode path).

Example:
    >>> import torch
    >>> from surgeon.ops.feature_maps import make_feature_map
    >>> q, k, v = torch.randn(1, 4, 10, 8), torch.randn(1, 2, 10, 8), torch.randn(1, 2, 10, 8)
    >>> fq, fk = make_feature_map("elu1", 4, 8), make_feature_map("elu1", 2, 8)
    >>> out, state = linear_attention(q, k, v, fq, fk, scale=8 ** -0.5, window=3)
    >>> out.shape, state.shape
    (torch.Size([1, 4, 10, 8]), torch.Size([1, 4, 8, 9]))
    >>> ref, _ = linear_attention(q, k, v, fq, fk, scale=8 ** -0.5, window=3, form="recurrent")
    >>> torch.allclose(out, ref, atol=1e-5)
    True
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal

import torch
from torch import Tensor

from surgeon.core.errors import ConfigError

FeatureFn = Callable[[Tensor], Tensor]
CAUSAL_FORMS = ("parallel", "chunked", "recurrent")
BIDIRECTIONAL_FORMS = ("parallel", "chunked")


@dataclass
class _Inputs:
    """Validated inputs in the compute dtype; keys/values/features span past + current (N tokens)."""

    q: Tensor            # (B, H, T, D)
    fq: Tensor           # (B, H, T, F)
    k: Tensor            # (B, Hkv, N, D)
    v: Tensor            # (B, Hkv, N, Dv)
    fk: Tensor           # (B, Hkv, N, F), zero rows at padded keys
    valid: Tensor        # (B, N) bool
    state: Tensor        # (B, H, F, Dv+1)
    gamma: Tensor        # (1, H, 1, 1)
    lam: Tensor          # (1, H, 1, 1)
    log_decay: Tensor | None  # (B, H, T) or (B, H, T, F)
    scale: float
    window: int
    eps: float
    out_dtype: torch.dtype
    fresh: bool = False  # no incoming state (all zeros): skip its matmul

    @property
    def past(self) -> int:
        return self.k.shape[2] - self.q.shape[2]

    @property
    def groups(self) -> int:
        return self.q.shape[1] // self.k.shape[1]


# ----------------------------------------------------------------------------------------- public API
def linear_attention(q: Tensor, k: Tensor, v: Tensor, feature_q: FeatureFn, feature_k: FeatureFn, *, scale: float,
                     window: int = 0, window_weight: Tensor | None = None, linear_weight: Tensor | None = None,
                     log_decay: Tensor | None = None, key_mask: Tensor | None = None,
                     past_k: Tensor | None = None, past_v: Tensor | None = None, state: Tensor | None = None,
                     form: Literal["parallel", "chunked", "recurrent"] = "chunked", chunk_size: int = 64,
                     eps: float = 1e-6) -> tuple[Tensor, Tensor]:
    """Causal (hybrid) linear attention. q (B,H,T,D); k,v (B,Hkv,T,D/Dv) for the new tokens only; returns (out (B,H,T,Dv), new_state (B,H,F,Dv+1)).

    ``window_weight`` γ and ``linear_weight`` λ are (H,) tensors (default 1); ``log_decay`` ≤ 0 is None,
    (B,H,T) or (B,H,T,F); ``key_mask`` (B, P+T) bool marks real tokens; ``past_k``/``past_v``
    (B,Hkv,P,·) with P ≤ max(window−1, 0) and ``state`` continue a cached sequence (see the module doc).

    Example:
        >>> import torch
        >>> from surgeon.ops.feature_maps import make_feature_map
        >>> fq, fk = make_feature_map("hedgehog", 2, 4), make_feature_map("hedgehog", 2, 4)
        >>> q, k, v = torch.randn(3, 1, 2, 7, 4, dtype=torch.float64)
        >>> full, s_full = linear_attention(q, k, v, fq, fk, scale=0.5, window=2, form="parallel")
        >>> a, s = linear_attention(q[:, :, :5], k[:, :, :5], v[:, :, :5], fq, fk, scale=0.5, window=2)
        >>> b, s = linear_attention(q[:, :, 5:], k[:, :, 5:], v[:, :, 5:], fq, fk, scale=0.5, window=2,
        ...                         past_k=k[:, :, 4:5], past_v=v[:, :, 4:5], state=s, form="recurrent")
        >>> torch.allclose(torch.cat([a, b], 2), full), torch.allclose(s, s_full)
        (True, True)
    """
    _check_choice("form", form, CAUSAL_FORMS)
    x = _prepare(q, k, v, feature_q, feature_k, scale=scale, window=window, window_weight=window_weight,
                 linear_weight=linear_weight, log_decay=log_decay, key_mask=key_mask, past_k=past_k,
                 past_v=past_v, state=state, eps=eps)
    if form == "parallel":
        out, new_state = _causal_parallel(x)
    elif form == "recurrent":
        out, new_state = _causal_recurrent(x)
    else:
        out, new_state = _causal_chunked(x, _check_chunk(chunk_size))
    return out.to(x.out_dtype), new_state


def bidirectional_linear_attention(q: Tensor, k: Tensor, v: Tensor, feature_q: FeatureFn, feature_k: FeatureFn, *,
                                   scale: float, local_mask: Tensor | None = None,
                                   window_weight: Tensor | None = None, linear_weight: Tensor | None = None,
                                   key_mask: Tensor | None = None,
                                   form: Literal["parallel", "chunked"] = "chunked", chunk_size: int = 64,
                                   eps: float = 1e-6) -> Tensor:
    """Non-causal linear attention (BERT/ViT); returns (B,H,T,Dv).

    ``local_mask`` (T,T) or (B,T,T) bool marks the pairs that use exact softmax (a CLEAR-style local
    window, e.g. from :func:`local_window_mask`); every other valid pair uses the linear kernel, with
    one shared normaliser (m_t is the max over the local set). "chunked" is linear-time for
    ``local_mask=None`` and for local masks: each block of ``chunk_size`` queries computes exact
    terms only for the key columns its rows touch.

    Example:
        >>> import torch
        >>> from surgeon.ops.feature_maps import make_feature_map
        >>> fm = make_feature_map("elu1", 2, 4)
        >>> q, k, v = torch.randn(3, 1, 2, 9, 4, dtype=torch.float64)
        >>> band = local_window_mask(9, 2)
        >>> a = bidirectional_linear_attention(q, k, v, fm, fm, scale=0.5, local_mask=band, chunk_size=4)
        >>> b = bidirectional_linear_attention(q, k, v, fm, fm, scale=0.5, local_mask=band, form="parallel")
        >>> torch.allclose(a, b)
        True
    """
    _check_choice("form", form, BIDIRECTIONAL_FORMS)
    x = _prepare(q, k, v, feature_q, feature_k, scale=scale, window=0, window_weight=window_weight,
                 linear_weight=linear_weight, log_decay=None, key_mask=key_mask, past_k=None, past_v=None,
                 state=None, eps=eps)
    T = q.shape[2]
    if local_mask is not None:
        local_mask = _check_local_mask(local_mask, q.shape[0], T, q.device)
    if form == "parallel":
        out = _bidir_parallel(x, local_mask)
    else:
        out = _bidir_chunked(x, local_mask, _check_chunk(chunk_size))
    return out.to(x.out_dtype)


def local_window_mask(seq_len: int, window: int, grid: tuple[int, int] | None = None, n_prefix: int = 0) -> Tensor:
    """Bool (T,T): 1-D |i−j| < window, or with grid=(rows, cols) a 2-D window (|Δrow|,|Δcol| < window) over image patches; the first n_prefix tokens (e.g. ViT's CLS) attend to and are attended by everything.

    Example:
        >>> local_window_mask(4, 2).int().tolist()
        [[1, 1, 0, 0], [1, 1, 1, 0], [0, 1, 1, 1], [0, 0, 1, 1]]
        >>> m = local_window_mask(1 + 9, 2, grid=(3, 3), n_prefix=1)
        >>> m[0].all().item(), m[1 + 4, 1:].int().tolist()   # CLS sees all; the centre patch sees its 8 neighbours
        (True, [1, 1, 1, 1, 1, 1, 1, 1, 1])
    """
    for name, value, low in (("seq_len", seq_len, 1), ("window", window, 0), ("n_prefix", n_prefix, 0)):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ConfigError(f"local_window_mask: {name} must be an int ≥ {low}, got {value!r}")
    n = seq_len - n_prefix
    if n < 0:
        raise ConfigError(f"local_window_mask: n_prefix={n_prefix} exceeds seq_len={seq_len}")
    idx = torch.arange(n)
    if grid is None:
        local = (idx[:, None] - idx[None, :]).abs() < window
    else:
        rows, cols = grid
        if rows * cols != n:
            raise ConfigError(f"local_window_mask: grid={grid} has {rows * cols} patches but seq_len − n_prefix = {n}; "
                              "pass grid=(rows, cols) with rows·cols equal to the number of patch tokens")
        r, c = idx // cols, idx % cols
        local = ((r[:, None] - r[None, :]).abs() < window) & ((c[:, None] - c[None, :]).abs() < window)
    mask = torch.ones(seq_len, seq_len, dtype=torch.bool)
    mask[n_prefix:, n_prefix:] = local
    return mask


# ------------------------------------------------------------------------------------ input checks
def _prepare(q: Tensor, k: Tensor, v: Tensor, feature_q: FeatureFn, feature_k: FeatureFn, *, scale: float,
             window: int, window_weight: Tensor | None, linear_weight: Tensor | None, log_decay: Tensor | None,
             key_mask: Tensor | None, past_k: Tensor | None, past_v: Tensor | None, state: Tensor | None,
             eps: float) -> _Inputs:
    """Check shapes, apply the feature maps, join past + current, cast to the compute dtype."""
    B, H, T, _, Hkv, Dv = _check_qkv(q, k, v)
    if not isinstance(window, int) or isinstance(window, bool) or window < 0:
        raise ConfigError(f"window must be an int ≥ 0 (0 = pure linear attention), got {window!r}")
    past_k, past_v = _check_past(past_k, past_v, k, v, window)
    P = past_k.shape[2]
    full_k, full_v = torch.cat([past_k, k], 2), torch.cat([past_v, v], 2)
    valid = _check_key_mask(key_mask, B, P + T, q.device)
    dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    root = float(scale) ** 0.5
    fq = _features(feature_q, q * root, "feature_q", (B, H, T)).to(dtype)
    fk = _features(feature_k, full_k * root, "feature_k", (B, Hkv, P + T)).to(dtype)
    if fq.shape[-1] != fk.shape[-1]:
        raise ConfigError(f"feature_q gives {fq.shape[-1]} features but feature_k gives {fk.shape[-1]}; "
                          "use maps of the same kind and size for queries and keys")
    Fdim = fq.shape[-1]
    fk = fk * valid[:, None, :, None].to(dtype)
    return _Inputs(
        q=q.to(dtype), fq=fq, k=full_k.to(dtype), v=full_v.to(dtype), fk=fk, valid=valid,
        state=_check_state(state, (B, H, Fdim, Dv + 1), dtype, q.device),
        gamma=_check_weight("window_weight", window_weight, H, dtype, q.device),
        lam=_check_weight("linear_weight", linear_weight, H, dtype, q.device),
        log_decay=_check_log_decay(log_decay, (B, H, T), Fdim, dtype),
        scale=float(scale), window=window, eps=float(eps), out_dtype=q.dtype, fresh=state is None,
    )


def _check_qkv(q: Tensor, k: Tensor, v: Tensor) -> tuple[int, int, int, int, int, int]:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor) or t.dim() != 4:
            raise ConfigError(f"{name} must be a 4-D tensor (batch, heads, tokens, head_dim), "
                              f"got {getattr(t, 'shape', type(t).__name__)}")
    B, H, T, D = q.shape
    Hkv = k.shape[1]
    if k.shape[0] != B or k.shape[2] != T or k.shape[3] != D:
        raise ConfigError(f"k has shape {tuple(k.shape)} but q is {tuple(q.shape)}: k must be (B, Hkv, T, D) "
                          "with q's batch, tokens and head_dim")
    if v.shape[:3] != k.shape[:3]:
        raise ConfigError(f"v has shape {tuple(v.shape)} but k is {tuple(k.shape)}: v must be (B, Hkv, T, Dv)")
    if Hkv == 0 or H % Hkv:
        raise ConfigError(f"q has {H} heads and k/v have {Hkv}: the query heads must be a multiple of the "
                          "key/value heads (grouped-query attention); pass k/v before repeat_kv")
    return B, H, T, D, Hkv, v.shape[3]


def _check_past(past_k: Tensor | None, past_v: Tensor | None, k: Tensor, v: Tensor,
                window: int) -> tuple[Tensor, Tensor]:
    if (past_k is None) != (past_v is None):
        raise ConfigError("pass past_k and past_v together (both None, or the cached window keys and values)")
    if past_k is None:
        return k[:, :, :0], v[:, :, :0]
    keep = max(window - 1, 0)
    if past_k.dim() != 4 or past_k.shape[:2] != k.shape[:2] or past_k.shape[3] != k.shape[3]:
        raise ConfigError(f"past_k has shape {tuple(past_k.shape)}; it must be (B, Hkv, P, D) = "
                          f"({k.shape[0]}, {k.shape[1]}, P, {k.shape[3]})")
    if past_v.dim() != 4 or past_v.shape[:3] != past_k.shape[:3] or past_v.shape[3] != v.shape[3]:
        raise ConfigError(f"past_v has shape {tuple(past_v.shape)}; it must be (B, Hkv, P, Dv) matching past_k")
    if past_k.shape[2] > keep:
        raise ConfigError(f"past_k holds {past_k.shape[2]} tokens but window={window} keeps at most {keep} raw "
                          "tokens (window − 1); fold older tokens into `state` (the returned new_state does)")
    return past_k.to(k.dtype), past_v.to(v.dtype)


def _check_key_mask(key_mask: Tensor | None, B: int, N: int, device: torch.device) -> Tensor:
    if key_mask is None:
        return torch.ones(B, N, dtype=torch.bool, device=device)
    if key_mask.shape != (B, N):
        raise ConfigError(f"key_mask has shape {tuple(key_mask.shape)}; it must be (batch, past + new tokens) = "
                          f"({B}, {N}), True for real tokens")
    return key_mask.to(device=device, dtype=torch.bool)


def _features(fn: FeatureFn, x: Tensor, name: str, lead: tuple[int, int, int]) -> Tensor:
    out = fn(x)
    if not isinstance(out, Tensor) or out.dim() != 4 or tuple(out.shape[:3]) != lead:
        raise ConfigError(f"{name} must map (B, heads, T, D) to (B, heads, T, F); for input {tuple(x.shape)} "
                          f"it returned {getattr(out, 'shape', type(out).__name__)}")
    return out


def _check_state(state: Tensor | None, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    if state is None:
        return torch.zeros(shape, dtype=dtype, device=device)
    if tuple(state.shape) != shape:
        raise ConfigError(f"state has shape {tuple(state.shape)}; it must be (B, H, F, Dv+1) = {shape}, "
                          "as returned by the previous call")
    return state.to(device=device, dtype=dtype)


def _check_weight(name: str, w: Tensor | None, H: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    if w is None:
        return torch.ones(1, H, 1, 1, dtype=dtype, device=device)
    w = torch.as_tensor(w)
    if w.numel() not in (1, H) or w.dim() > 1:
        raise ConfigError(f"{name} has shape {tuple(w.shape)}; pass one weight per query head, shape ({H},)")
    return w.to(device=device, dtype=dtype).reshape(-1).expand(H).reshape(1, H, 1, 1)


def _check_log_decay(ld: Tensor | None, bht: tuple[int, int, int], Fdim: int, dtype: torch.dtype) -> Tensor | None:
    if ld is None:
        return None
    if tuple(ld.shape) not in (bht, bht + (Fdim,)):
        raise ConfigError(f"log_decay has shape {tuple(ld.shape)}; it must be (B, H, T) = {bht} (per head) or "
                          f"(B, H, T, F) = {bht + (Fdim,)} (per feature channel), for the new tokens only")
    capturing = torch.compiler.is_compiling() or torch.compiler.is_exporting()
    if not capturing and bool((ld > 0).any()):  # no data-dependent check inside captured graphs
        raise ConfigError("log_decay must be ≤ 0 (decay α = exp(log_decay) in (0, 1]); got positive values — "
                          "use e.g. F.logsigmoid(gate_logits)")
    return ld.to(dtype)


def _check_local_mask(mask: Tensor, B: int, T: int, device: torch.device) -> Tensor:
    if mask.dtype != torch.bool or tuple(mask.shape) not in ((T, T), (B, T, T)):
        raise ConfigError(f"local_mask must be a bool tensor of shape ({T}, {T}) or ({B}, {T}, {T}); "
                          f"got {mask.dtype} {tuple(mask.shape)} (see local_window_mask)")
    return mask.to(device)


def _check_chunk(chunk_size: int) -> int:
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1:
        raise ConfigError(f"chunk_size must be a positive int (e.g. 64), got {chunk_size!r}")
    return chunk_size


def _check_choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"unknown {name}={value!r}; choose one of {', '.join(map(repr, choices))}")


# ------------------------------------------------------------------------------------------- helpers
def _repeat_heads(x: Tensor, groups: int) -> Tensor:
    """(B, Hkv, ...) -> (B, Hkv·groups, ...), HF repeat_kv order."""
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def _with_ones(v: Tensor) -> Tensor:
    """[v, 1]: the extra column carries the normaliser."""
    return torch.cat([v, torch.ones_like(v[..., :1])], dim=-1)


def _decay_state(state: Tensor, log_decay: Tensor) -> Tensor:
    """α ⊙ state for a per-head (B,H) or per-channel (B,H,F) log decay."""
    factor = log_decay.exp()
    return state * (factor[..., None, None] if factor.dim() == 2 else factor[..., None])


def _zeros_out(x: _Inputs) -> tuple[Tensor, Tensor]:
    """Zero window terms (B,H,T,Dv) and (B,H,T,1)."""
    B, H, T, _ = x.q.shape
    num = torch.zeros(B, H, T, x.v.shape[-1], dtype=x.q.dtype, device=x.q.device)
    return num, torch.zeros_like(num[..., :1])


def _finish(x: _Inputs, num: Tensor, den: Tensor, lin: Tensor | None) -> Tensor:
    """Combine window terms and λ-weighted linear terms [num | den]; zero the padded queries."""
    if lin is not None:
        num = num + x.lam * lin[..., :-1]
        den = den + x.lam * lin[..., -1:]
    out = num / (den + x.eps)
    query_valid = x.valid[:, None, x.past:, None]
    return torch.where(query_valid, out, torch.zeros((), dtype=out.dtype))


def _softmax_terms(scores: Tensor, allowed: Tensor, v: Tensor, gamma: Tensor) -> tuple[Tensor, Tensor]:
    """γ·Σ exp(s − m) v and γ·Σ exp(s − m) over allowed keys, m = max allowed score (0 if none)."""
    scores = scores.masked_fill(~allowed, float("-inf"))
    m = scores.amax(-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros((), dtype=m.dtype))
    a = (scores - m).exp()
    return gamma * (a @ v), gamma * a.sum(-1, keepdim=True)


# ------------------------------------------------------------------------------ causal: parallel form
def _causal_parallel(x: _Inputs) -> tuple[Tensor, Tensor]:
    """Dense masks over (new queries) × (past + new keys), straight from the formulas."""
    T = x.q.shape[2]
    N, P, w, g = x.k.shape[2], x.past, x.window, x.groups
    t = torch.arange(P, N, device=x.q.device)[:, None]                       # query positions (T, 1)
    j = torch.arange(N, device=x.q.device)[None, :]                          # key positions (1, N)
    e = j + max(w - 1, 0)                                 # step at which key j is folded
    valid = x.valid[:, None, None, :]
    k, v, fk = _repeat_heads(x.k, g), _repeat_heads(x.v, g), _repeat_heads(x.fk, g)
    num, den = _zeros_out(x)
    if w > 0:
        in_window = (j <= t) & (j > t - w) & valid
        num, den = _softmax_terms(x.scale * x.q @ k.transpose(-1, -2), in_window, v, x.gamma)
    linear = ((e < t) if w > 0 else (e <= t)) & valid
    vv = _with_ones(v)
    if x.log_decay is None:
        kern = (x.fq @ fk.transpose(-1, -2)).masked_fill(~linear, 0.0)
        lin = kern @ vv + x.fq @ x.state
        new_state = x.state + fk.transpose(-1, -2) @ (vv * (e <= N - 1).T)
        return _finish(x, num, den, lin), new_state
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
    new_state = _decay_state(x.state, c_last) + fk_decayed.transpose(-1, -2) @ vv
    return _finish(x, num, den, lin), new_state


# ----------------------------------------------------------------------------- causal: recurrent form
def _causal_recurrent(x: _Inputs) -> tuple[Tensor, Tensor]:
    """One token at a time: window softmax over the last w raw keys, linear terms from the state."""
    T = x.q.shape[2]
    P, w, g = x.past, x.window, x.groups
    k, v, fk = _repeat_heads(x.k, g), _repeat_heads(x.v, g), _repeat_heads(x.fk, g)
    vv = _with_ones(v)
    state = x.state.clone()
    outs = []
    for i in range(T):
        t = P + i
        if x.log_decay is not None:
            state = _decay_state(state, x.log_decay[:, :, i])
        if w == 0:
            state = state + fk[:, :, t, :, None] * vv[:, :, t, None, :]
        lin = x.fq[:, :, i:i + 1] @ state                  # (B,H,1,Dv+1)
        num = torch.zeros_like(lin[..., :-1])
        den = torch.zeros_like(lin[..., -1:])
        if w > 0:
            lo = max(t - w + 1, 0)
            scores = x.scale * x.q[:, :, i:i + 1] @ k[:, :, lo:t + 1].transpose(-1, -2)
            num, den = _softmax_terms(scores, x.valid[:, None, None, lo:t + 1], v[:, :, lo:t + 1], x.gamma)
            if t - w + 1 >= 0:                            # the oldest window token leaves: fold it
                state = state + fk[:, :, lo, :, None] * vv[:, :, lo, None, :]
        outs.append(_finish_step(x, num, den, lin, t))
    return torch.cat(outs, dim=2), state


def _finish_step(x: _Inputs, num: Tensor, den: Tensor, lin: Tensor, t: int) -> Tensor:
    num = num + x.lam * lin[..., :-1]
    den = den + x.lam * lin[..., -1:]
    out = num / (den + x.eps)
    return torch.where(x.valid[:, None, t:t + 1, None], out, torch.zeros((), dtype=out.dtype))


# ------------------------------------------------------------------------------- causal: chunked form
def _causal_chunked(x: _Inputs, C: int) -> tuple[Tensor, Tensor]:
    """Window terms per query chunk (a band of C + w − 1 keys) plus chunked linear attention."""
    num, den = _zeros_out(x)
    if x.window > 0:
        num, den = _window_chunked(x, C)
    fk, vv = _fold_stream(x)
    if x.log_decay is None:
        lin, new_state = _linear_chunked(x.fq, fk, vv, None if x.fresh else x.state, x.groups,
                                         strict=x.window > 0, C=C)
    else:
        gated = _scalar_gated_linear_chunked if x.log_decay.dim() == 3 else _gated_linear_chunked
        lin, new_state = gated(x.fq, _repeat_heads(fk, x.groups), _repeat_heads(vv, x.groups),
                               x.log_decay, x.state, strict=x.window > 0, C=C)
    return _finish(x, num, den, lin), new_state


def _fold_stream(x: _Inputs) -> tuple[Tensor, Tensor]:
    """Keys/values in folding order: slot i (new token i) holds the key folded at that step.

    Key j is folded at step j + max(w−1, 0), so the stream is the past + current keys shifted right by
    max(w−1, 0) − P (zeros before the first key). Returns fk (B,Hkv,T,F) and [v, 1] (B,Hkv,T,Dv+1).
    """
    T = x.q.shape[2]
    shift = max(x.window - 1, 0) - x.past
    fk, vv = x.fk, _with_ones(x.v)
    if shift > 0:
        fk = torch.nn.functional.pad(fk, (0, 0, shift, 0))
        vv = torch.nn.functional.pad(vv, (0, 0, shift, 0))
    return fk[:, :, :T], vv[:, :, :T]


def _to_chunks(x: Tensor, C: int) -> Tensor:
    """(B, h, T, X) -> (B, h, n, C, X), zero-padding T up to a multiple of C."""
    T = x.shape[2]
    n = -(-T // C)
    x = torch.nn.functional.pad(x, (0, 0, 0, n * C - T))
    return x.reshape(*x.shape[:2], n, C, x.shape[-1])


def _group_queries(x: Tensor, groups: int, C: int) -> Tensor:
    """(B, H, T, X) -> (B, Hkv, n, groups·C, X): the query heads sharing a kv head, per chunk."""
    B, H, _, X = x.shape
    c = _to_chunks(x, C)                                   # (B, H, n, C, X)
    n = c.shape[2]
    c = c.reshape(B, H // groups, groups, n, C, X).transpose(2, 3)
    return c.reshape(B, H // groups, n, groups * C, X)


def _ungroup_queries(x: Tensor, groups: int, T: int) -> Tensor:
    """Inverse of :func:`_group_queries`, cutting the padding: -> (B, H, T, X)."""
    B, Hkv, n, GC, X = x.shape
    C = GC // groups
    x = x.reshape(B, Hkv, n, groups, C, X).transpose(2, 3)
    return x.reshape(B, Hkv * groups, n * C, X)[:, :, :T]


def _window_chunked(x: _Inputs, C: int) -> tuple[Tensor, Tensor]:
    """Sliding-window softmax terms: each chunk of C queries sees a band of C + w − 1 keys."""
    T = x.q.shape[2]
    w, P, g = x.window, x.past, x.groups
    n = -(-T // C)
    L = C + w - 1
    lead = w - 1 - P                                       # zero keys in front so key block i starts at i·C
    tail = n * C - T
    k = torch.nn.functional.pad(x.k, (0, 0, lead, tail)).unfold(2, L, C)          # (B,Hkv,n,D,L)
    v = torch.nn.functional.pad(x.v, (0, 0, lead, tail)).unfold(2, L, C).transpose(-1, -2)  # (B,Hkv,n,L,Dv)
    valid = torch.nn.functional.pad(x.valid, (lead, tail), value=False).unfold(1, L, C)      # (B,n,L)
    r = torch.arange(L, device=x.q.device)[None, :] - torch.arange(C, device=x.q.device)[:, None]
    band = ((r >= 0) & (r < w)).repeat(g, 1)                                       # (g·C, L)
    allowed = band & valid[:, None, :, None, :]                                    # (B,1,n,g·C,L)
    scores = x.scale * _group_queries(x.q, g, C) @ k
    num, den = _softmax_terms(scores, allowed, v, torch.ones((), dtype=scores.dtype))
    gamma = x.gamma
    return gamma * _ungroup_queries(num, g, T), gamma * _ungroup_queries(den, g, T)


def _causal_mask(C: int, strict: bool, device: torch.device) -> Tensor:
    return torch.ones(C, C, dtype=torch.bool, device=device).tril(-1 if strict else 0)


def _linear_chunked(fq: Tensor, fk: Tensor, vv: Tensor, state: Tensor | None, groups: int, *, strict: bool,
                    C: int) -> tuple[Tensor, Tensor]:
    """Ungated chunked linear attention, all chunks at once (no loop over time).

    fq (B,H,T,F); fk (B,Hkv,T,F) and vv (B,Hkv,T,Dv+1) in folding order; state (B,H,F,Dv+1) or None.
    Returns [Σ b v | Σ b] without λ, (B,H,T,Dv+1), and the final state.
    """
    T = fq.shape[2]
    q = _group_queries(fq, groups, C)                     # (B,Hkv,n,g·C,F)
    kc, vc = _to_chunks(fk, C), _to_chunks(vv, C)         # (B,Hkv,n,C,F), (B,Hkv,n,C,Dv+1)
    mask = _causal_mask(C, strict, fq.device).repeat(groups, 1)
    intra = (q @ kc.transpose(-1, -2)).masked_fill(~mask, 0.0) @ vc
    chunk_sums = kc.transpose(-1, -2) @ vc                # (B,Hkv,n,F,Dv+1)
    before = chunk_sums.cumsum(2)
    total = before[:, :, -1]
    before = torch.cat([torch.zeros_like(before[:, :, :1]), before[:, :, :-1]], dim=2)
    out = _ungroup_queries(intra + q @ before, groups, T)
    if state is None:
        return out, _repeat_heads(total, groups)
    return out + fq @ state, state + _repeat_heads(total, groups)


def _scalar_gated_linear_chunked(fq: Tensor, fk: Tensor, vv: Tensor, log_decay: Tensor, state: Tensor, *,
                                 strict: bool, C: int) -> tuple[Tensor, Tensor]:
    """Per-head gated chunked linear attention with no loop over chunks (so it exports with a dynamic length).

    All tensors at H heads, log_decay (B,H,T). Inside chunk i with cumulative log decay b: intra terms
    exp(b_t − b_u) q_t·k_u; the state entering chunk i is Σ_{j<i} exp(G⁻_i − G_j) K_j + exp(G⁻_i) S₀,
    with G the inclusive cumulative sum of chunk totals, G⁻ the exclusive one, and K_j chunk j's keys
    decayed to its end. Every exponent is a difference that is ≤ 0.
    """
    T = fq.shape[2]
    q, k, v = _to_chunks(fq, C), _to_chunks(fk, C), _to_chunks(vv, C)        # (B,H,n,C,·)
    ld = torch.nn.functional.pad(log_decay, (0, (-T) % C)).reshape(*log_decay.shape[:2], -1, C)
    b = ld.cumsum(-1)                                                           # (B,H,n,C)
    mask = _causal_mask(C, strict, fq.device)
    diff = (b[..., :, None] - b[..., None, :]).masked_fill(~mask, float("-inf"))
    intra = ((q @ k.transpose(-1, -2)) * diff.exp()) @ v                       # (B,H,n,C,Dv+1)
    total = b[..., -1]                                                          # (B,H,n)
    g_incl = total.cumsum(-1)
    g_excl = g_incl - total
    n = total.shape[-1]
    before = torch.ones(n, n, dtype=torch.bool, device=fq.device).tril(-1)
    m = (g_excl[..., :, None] - g_incl[..., None, :]).masked_fill(~before, float("-inf")).exp()  # (B,H,n,n)
    chunk_kv = (k * (total[..., None] - b).exp()[..., None]).transpose(-1, -2) @ v             # (B,H,n,F,Dv+1)
    entering = torch.einsum("bhij,bhjfd->bhifd", m, chunk_kv) + g_excl.exp()[..., None, None] * state[:, :, None]
    inter = b.exp()[..., None] * (q @ entering)
    out = (intra + inter).reshape(*fq.shape[:2], -1, vv.shape[-1])[:, :, :T]
    last = g_incl[..., -1:]                                                     # (B,H,1)
    final = state * last.exp()[..., None] + torch.einsum("bhj,bhjfd->bhfd", (last - g_incl).exp(), chunk_kv)
    return out, final


def _gated_linear_chunked(fq: Tensor, fk: Tensor, vv: Tensor, log_decay: Tensor, state: Tensor, *, strict: bool,
                          C: int) -> tuple[Tensor, Tensor]:
    """Gated chunked linear attention (per-head or per-channel decay), one chunk at a time.

    All tensors at H heads. Decay factors are exponentials of differences of cumulative log decays
    (never of a positive sum): exp(b_t − b_u) for u ≤ t inside a chunk, exp(b_t) ≤ 1 from the chunk
    start, exp(b_C − b_u) ≤ 1 to the chunk end.
    """
    T = fq.shape[2]
    channel = log_decay.dim() == 4
    mask = _causal_mask(C, strict, fq.device)
    outs = []
    for lo in range(0, T, C):
        q, k, v = fq[:, :, lo:lo + C], fk[:, :, lo:lo + C], vv[:, :, lo:lo + C]
        b = log_decay[:, :, lo:lo + C].cumsum(2)           # (B,H,c[,F])
        c = q.shape[2]
        m = mask[:c, :c]
        if channel:
            scores = _channel_decay_scores(q, k, b, strict)
            inter = (q * b.exp()) @ state
        else:
            diff = (b[:, :, :, None] - b[:, :, None, :]).masked_fill(~m, float("-inf"))
            scores = (q @ k.transpose(-1, -2)) * diff.exp()
            inter = b.exp()[..., None] * (q @ state)
        outs.append(scores @ v + inter)
        b_last = b[:, :, -1]
        to_end = (b_last[:, :, None] - b).exp()
        k_end = k * (to_end if channel else to_end[..., None])
        state = _decay_state(state, b_last) + k_end.transpose(-1, -2) @ v
    return torch.cat(outs, dim=2), state


# ------------------------------------------------------------------------------------ bidirectional
def _bidir_parallel(x: _Inputs, local_mask: Tensor | None) -> Tensor:
    """Dense (T, T) reference: exact softmax on local pairs, the linear kernel elsewhere."""
    g = x.groups
    k, v, fk = _repeat_heads(x.k, g), _repeat_heads(x.v, g), _repeat_heads(x.fk, g)
    valid = x.valid[:, None, None, :]
    if local_mask is None:
        local = torch.zeros_like(valid)
        num, den = _zeros_out(x)
    else:
        local = (local_mask if local_mask.dim() == 2 else local_mask[:, None]) & valid
        num, den = _softmax_terms(x.scale * x.q @ k.transpose(-1, -2), local, v, x.gamma)
    kern = (x.fq @ fk.transpose(-1, -2)).masked_fill(~(valid & ~local), 0.0)
    return _finish(x, num, den, kern @ _with_ones(v))


def _bidir_chunked(x: _Inputs, local_mask: Tensor | None, C: int) -> Tensor:
    """Global linear sums, corrected per query chunk on the key columns its local rows touch."""
    T = x.q.shape[2]
    g = x.groups
    vv = _with_ones(x.v)
    total = x.fk.transpose(-1, -2) @ vv                   # (B,Hkv,F,Dv+1), padded keys are zero rows
    lin = x.fq @ _repeat_heads(total, g)
    num, den = _zeros_out(x)
    if local_mask is None:
        return _finish(x, num, den, lin)
    k, v, fk = _repeat_heads(x.k, g), _repeat_heads(x.v, g), _repeat_heads(x.fk, g)
    nums, dens, fixes = [], [], []
    for lo in range(0, T, C):
        rows = local_mask[..., lo:lo + C, :]               # (c, T) or (B, c, T)
        cols = rows.reshape(-1, T).any(0).nonzero().squeeze(1)
        local = rows[..., cols]
        local = (local if local.dim() == 2 else local[:, None]) & x.valid[:, None, None, cols]
        q, fq = x.q[:, :, lo:lo + C], x.fq[:, :, lo:lo + C]
        n_, d_ = _softmax_terms(x.scale * q @ k[:, :, cols].transpose(-1, -2), local, v[:, :, cols], x.gamma)
        kern = (fq @ fk[:, :, cols].transpose(-1, -2)).masked_fill(~local, 0.0)
        nums.append(n_), dens.append(d_), fixes.append(kern @ _with_ones(v[:, :, cols]))
    lin = lin - torch.cat(fixes, dim=2)
    return _finish(x, torch.cat(nums, 2), torch.cat(dens, 2), lin)



def _channel_decay_scores(q: Tensor, k: Tensor, b: Tensor, strict: bool, sub: int = 16) -> Tensor:
    """Σ_f q_tf k_uf exp(b_tf − b_uf) for u ≤ t (u < t if strict) in one chunk; q, k, b (B,H,c,F) -> (B,H,c,c).

    Tokens are split into sub-blocks of ``sub``. A pair with u in an earlier sub-block than t factors
    through that sub-block's last position e as (q_t·exp(b_t − b_e))·(k_u·exp(b_e − b_u)), both
    exponents ≤ 0, and goes through a matmul; pairs inside one sub-block use exp of the exact
    difference (a sub × sub × F tensor instead of c × c × F).
    """
    B, H, c, Fd = q.shape
    n = -(-c // sub)
    pad = n * sub - c
    qp = torch.nn.functional.pad(q, (0, 0, 0, pad))                                       # (B,H,n·sub,F)
    kp = torch.nn.functional.pad(k, (0, 0, 0, pad)).reshape(B, H, n, sub, Fd)
    bp = torch.cat([b, b[:, :, -1:].expand(B, H, pad, Fd)], dim=2)                          # (B,H,n·sub,F)
    b_blocks = bp.reshape(B, H, n, sub, Fd)
    b_end = b_blocks[:, :, :, -1]                                                            # (B,H,n,F)
    block = torch.arange(n * sub, device=q.device) // sub
    later = block[None, :] > torch.arange(n, device=q.device)[:, None]                     # (n, n·sub)
    q_fac = (bp[:, :, None] - b_end[:, :, :, None]).masked_fill(~later[..., None], float("-inf")).exp()
    k_fac = (b_end[:, :, :, None] - b_blocks).exp()
    off = (qp[:, :, None] * q_fac) @ (kp * k_fac).transpose(-1, -2)                        # (B,H,n,n·sub,sub)
    scores = off.permute(0, 1, 3, 2, 4).reshape(B, H, n, sub, n, sub)
    tri = _causal_mask(sub, strict, q.device)[..., None]
    pair = (b_blocks[:, :, :, :, None] - b_blocks[:, :, :, None]).masked_fill(~tri, float("-inf")).exp()
    diag = (qp.reshape(B, H, n, sub, 1, Fd) * kp[:, :, :, None] * pair).sum(-1)           # (B,H,n,sub,sub)
    scores.diagonal(dim1=2, dim2=4).add_(diag.permute(0, 1, 3, 4, 2))
    return scores.reshape(B, H, n * sub, n * sub)[:, :, :c, :c]
