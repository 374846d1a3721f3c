"""Validated inputs of the linear-attention forms: shapes checked, feature maps applied, past + current joined.

Example:
    >>> import torch
    >>> from surgeon.ops.feature_maps import make_feature_map
    >>> fm = make_feature_map("elu1", 2, 4)
    >>> q = k = v = torch.randn(1, 2, 5, 4)
    >>> x = prepare(q, k, v, fm, fm, scale=0.5, window=2)
    >>> x.fq.shape, x.past, x.groups
    (torch.Size([1, 2, 5, 4]), 0, 1)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from surgeon.core.errors import ConfigError
from surgeon.ops.linear_attention.sinks import (SinkState, all_filled, check_sink_state, gather_tokens,
                                               sink_candidates)

FeatureFn = Callable[[Tensor], Tensor]


@dataclass
class Inputs:
    """Inputs in the compute dtype; keys/values/features span past + current (N tokens)."""

    q: Tensor            # (B, H, T, D)
    fq: Tensor           # (B, H, T, F)
    k: Tensor            # (B, Hkv, N, D)
    v: Tensor            # (B, Hkv, N, Dv)
    fk: Tensor           # (B, Hkv, N, F), zero rows at padded keys and at sink tokens (never folded)
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
    sink_k: Tensor | None = None        # (B, Hkv, 2k, D): the k cached sink slots, then the k new candidates
    sink_v: Tensor | None = None        # (B, Hkv, 2k, Dv)
    sink_visible: Tensor | None = None  # (B, 1, T, 2k) bool: query t sees sink s
    memory_k: Tensor | None = None      # (B, Hkv, G, D): memory slots (every query of the call sees the filled ones)
    memory_v: Tensor | None = None      # (B, Hkv, G, Dv)
    memory_filled: Tensor | None = None  # (B, Hkv, G) bool

    @property
    def past(self) -> int:
        return self.k.shape[2] - self.q.shape[2]

    @property
    def groups(self) -> int:
        return self.q.shape[1] // self.k.shape[1]


def prepare(q: Tensor, k: Tensor, v: Tensor, feature_q: FeatureFn, feature_k: FeatureFn, *, scale: float,
            window: int, window_weight: Tensor | None = None, linear_weight: Tensor | None = None,
            log_decay: Tensor | None = None, key_mask: Tensor | None = None, past_k: Tensor | None = None,
            past_v: Tensor | None = None, state: Tensor | None = None, eps: float = 1e-6, sinks: int = 0,
            sink_state: SinkState | None = None, memory_state: tuple[Tensor, Tensor, Tensor] | None = None) -> Inputs:
    """Check shapes, apply the feature maps, join past + current, cast to the compute dtype."""
    B, H, T, _, Hkv, Dv = _check_qkv(q, k, v)
    if not isinstance(window, int) or isinstance(window, bool) or window < 0:
        raise ConfigError(f"window must be an int ≥ 0 (0 = pure linear attention), got {window!r}")
    past_k, past_v = _check_past(past_k, past_v, k, v, window)
    P = past_k.shape[2]
    full_k, full_v = torch.cat([past_k, k], 2), torch.cat([past_v, v], 2)
    N = P + T
    valid = _check_key_mask(key_mask, B, N, q.device)
    dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    root = float(scale) ** 0.5
    fq = _features(feature_q, q * root, "feature_q", (B, H, T)).to(dtype)
    fk = _features(feature_k, full_k * root, "feature_k", (B, Hkv, N)).to(dtype)
    if fq.shape[-1] != fk.shape[-1]:
        raise ConfigError(f"feature_q gives {fq.shape[-1]} features but feature_k gives {fk.shape[-1]}; "
                          "use maps of the same kind and size for queries and keys")
    Fdim = fq.shape[-1]
    sink_state = check_sink_state(sink_state, sinks, k, v)
    is_sink = index = is_cand = None
    linear_key = valid
    settled = sinks > 0 and all_filled(sink_state[2])   # every slot filled: no new token is a sink
    if sinks > 0 and not settled:
        is_sink, index, is_cand = sink_candidates(valid, sink_state[2].long().sum(-1), sinks)
        linear_key = valid & ~is_sink                    # sink tokens are never folded into the state
    fk = fk * linear_key[:, None, :, None].to(dtype)
    x = Inputs(
        q=q.to(dtype), fq=fq, k=full_k.to(dtype), v=full_v.to(dtype), fk=fk, valid=valid,
        state=_check_state(state, (B, H, Fdim, Dv + 1), dtype, q.device),
        gamma=_check_weight("window_weight", window_weight, H, dtype, q.device),
        lam=_check_weight("linear_weight", linear_weight, H, dtype, q.device),
        log_decay=_check_log_decay(log_decay, (B, H, T), Fdim, dtype),
        scale=float(scale), window=window, eps=float(eps), out_dtype=q.dtype, fresh=state is None,
    )
    if settled:                                           # the cached slots only, all visible
        x.sink_k, x.sink_v = sink_state[0].to(x.k.dtype), sink_state[1].to(x.v.dtype)
        x.sink_visible = sink_state[2][:, None, None, :].expand(-1, -1, T, -1)
    elif sinks > 0:
        _attach_sinks(x, sink_state, index, is_cand)
    if memory_state is not None:
        from surgeon.ops.linear_attention.memory import check_memory_state   # memory builds on this module
        if log_decay is not None:
            raise ConfigError("memory slots need ungated linear attention (a decayed contribution cannot be taken "
                              "out of the state exactly): pass log_decay=None or no memory_state")
        mk, mv, ok = check_memory_state(memory_state, memory_state[0].shape[2], k, v)
        x.memory_k, x.memory_v, x.memory_filled = mk.to(dtype), mv.to(dtype), ok
    return x


def _attach_sinks(x: Inputs, cached: SinkState, index: Tensor, is_cand: Tensor) -> None:
    """Sink keys a query may see: every filled cached slot, and a new candidate once it has left the window."""
    P, T, w = x.past, x.q.shape[2], x.window
    x.sink_k = torch.cat([cached[0].to(x.k.dtype), gather_tokens(x.k, index)], 2)
    x.sink_v = torch.cat([cached[1].to(x.v.dtype), gather_tokens(x.v, index)], 2)
    t = torch.arange(P, P + T, device=x.q.device)[None, :, None]        # query positions in past + current
    j = index[:, None, :]                                                # (B, 1, k) candidate positions
    left = (j + max(w - 1, 0) < t) if w > 0 else (j <= t)               # same rule as the linear branch
    new = left & is_cand[:, None, :]                                     # (B, T, k)
    old = cached[2][:, None, :].expand(-1, T, -1)
    x.sink_visible = torch.cat([old, new], -1)[:, None]


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
    if not capturing:  # no data-dependent check inside captured graphs
        if not bool(torch.isfinite(ld).all()):
            raise ConfigError("log_decay has non-finite values (−inf would zero the state and give NaN, NaN spreads): "
                              "clamp it, e.g. F.logsigmoid(gate_logits).clamp(min=-30)")
        if bool((ld > 0).any()):
            raise ConfigError("log_decay must be ≤ 0 (decay α = exp(log_decay) in (0, 1]); got positive values — "
                              "use e.g. F.logsigmoid(gate_logits)")
    return ld.to(dtype)


def check_local_mask(mask: Tensor, B: int, T: int, device: torch.device) -> Tensor:
    """A bool (T, T) or (B, T, T) local-pair mask on ``device``, or a clear error."""
    if mask.dtype != torch.bool or tuple(mask.shape) not in ((T, T), (B, T, T)):
        raise ConfigError(f"local_mask must be a bool tensor of shape ({T}, {T}) or ({B}, {T}, {T}); "
                          f"got {mask.dtype} {tuple(mask.shape)} (see local_window_mask)")
    return mask.to(device)


def check_chunk(chunk_size: int) -> int:
    """``chunk_size`` if it is a positive int, else a clear error."""
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1:
        raise ConfigError(f"chunk_size must be a positive int (e.g. 64), got {chunk_size!r}")
    return chunk_size


def check_choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    """A clear error when ``value`` is not one of ``choices``."""
    if value not in choices:
        raise ConfigError(f"unknown {name}={value!r}; choose one of {', '.join(map(repr, choices))}")
