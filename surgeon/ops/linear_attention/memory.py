"""Memory slots (LoLA's sparse cache): the tokens the linear state recalls worst stay exact softmax keys.

A linear state is a low-rank associative memory: a passkey or a name read once, hundreds of tokens
ago, is blurred by everything folded with it. ``memory`` fixed slots per kv head keep the key/value
pairs of tokens that have left the window and that the state reproduces worst, scored by their
*self-recall error* ‖v_j − φ(k_j)ᵀS_v / φ(k_j)ᵀS_z‖² against the state S (LoLA, McDermott et al.
2025). After every call the candidates — the slots and the tokens that left the window during the
call — compete; the ``memory`` worst-recalled stay (taken out of the state), the others are folded
into it. Every filled slot is an exact softmax key for the queries of the next call, under the one
normaliser shared with the window, the sinks and the linear branch. The state stays a fixed size:
``memory`` tokens of keys/values per layer.

The slots are updated once per call, so a prefill runs in blocks (``memory_block`` tokens, see
:func:`~surgeon.ops.linear_attention.streaming.run_blocks`); decoding one token per call updates them at
every step. Ungated linear attention only (a decayed contribution cannot be taken out of the state exactly).

Example:
    >>> import torch
    >>> from surgeon.ops.feature_maps import make_feature_map
    >>> from surgeon.ops.linear_attention import linear_attention
    >>> fm = make_feature_map("elu1", 1, 4)
    >>> k = v = torch.randn(1, 1, 12, 4, dtype=torch.float64)
    >>> out, state = linear_attention(k, k, v, fm, fm, scale=0.5, window=2)
    >>> mem, state2 = update_memory(3, 2, None, k, v, state, fm, scale=0.5)
    >>> mem[2].sum().item(), state2.shape == state.shape
    (3, True)
"""
from __future__ import annotations

import torch
from torch import Tensor

from surgeon.core.errors import ConfigError
from surgeon.ops.linear_attention.common import with_ones
from surgeon.ops.linear_attention.inputs import FeatureFn
from surgeon.ops.linear_attention.sinks import sink_candidates

MemoryState = tuple[Tensor, Tensor, Tensor]   # keys (B,Hkv,G,D), values (B,Hkv,G,Dv), filled (B,Hkv,G) bool


def empty_memory(keys: Tensor, values: Tensor, slots: int) -> MemoryState:
    """``slots`` empty memory slots shaped like ``keys`` (B,Hkv,·,D) / ``values`` (B,Hkv,·,Dv)."""
    B, Hkv = keys.shape[:2]
    return (keys.new_zeros(B, Hkv, slots, keys.shape[3]), values.new_zeros(B, Hkv, slots, values.shape[3]),
            torch.zeros(B, Hkv, slots, dtype=torch.bool, device=keys.device))


def check_memory_state(state: MemoryState | None, slots: int, keys: Tensor, values: Tensor) -> MemoryState:
    """The memory slots (empty when ``state`` is None), or a clear error naming the bad part."""
    if not isinstance(slots, int) or isinstance(slots, bool) or slots < 0:
        raise ConfigError(f"memory must be an int ≥ 0 (exact softmax slots for the worst-recalled tokens), "
                          f"got {slots!r}")
    if state is None:
        return empty_memory(keys, values, slots)
    if not isinstance(state, (tuple, list)) or len(state) != 3:
        raise ConfigError("memory_state must be (keys, values, filled) as returned by update_memory")
    mk, mv, ok = state
    B, Hkv = keys.shape[:2]
    for name, t, want in (("memory keys", mk, (B, Hkv, slots, keys.shape[3])),
                          ("memory values", mv, (B, Hkv, slots, values.shape[3])),
                          ("memory filled", ok, (B, Hkv, slots))):
        if tuple(t.shape) != want:
            raise ConfigError(f"{name} have shape {tuple(t.shape)}; they must be {want} (batch, kv heads, memory slots"
                              f"{', head_dim' if len(want) == 4 else ''}); pass memory=G as the cache was built with")
    return mk, mv, ok.to(device=keys.device, dtype=torch.bool)


def recall_error(fk: Tensor, v: Tensor, state: Tensor, own: bool, eps: float = 1e-6) -> Tensor:
    """‖v − φ(k)ᵀS_v / φ(k)ᵀS_z‖² per token; fk (B,Hkv,n,F), v (B,Hkv,n,Dv), state (B,Hkv,F,Dv+1) -> (B,Hkv,n).

    ``own``: the tokens are not in ``state`` (memory slots); each is scored as if folded in, like the
    candidates that are, so both compete on the same footing.
    """
    read = fk @ state
    if own:
        read = read + (fk * fk).sum(-1, keepdim=True) * with_ones(v)
    recalled = read[..., :-1] / read[..., -1:].clamp_min(eps)
    return (v - recalled).pow(2).sum(-1)


def update_memory(slots: int, window: int, memory_state: MemoryState | None, keys: Tensor, values: Tensor,
                  state: Tensor, feature_k: FeatureFn, *, scale: float, key_mask: Tensor | None = None,
                  sinks: int = 0, filled_sinks: Tensor | None = None) -> tuple[MemoryState, Tensor]:
    """The memory slots and state after a call that saw ``keys``/``values`` (B,Hkv,N,·): past window + new tokens.

    ``state`` (B,H,F,Dv+1) is the call's returned state (every token that left the window folded in).
    Candidates: the filled slots and the valid non-sink tokens that left the window in the call (all
    but the last max(window−1, 0)); ``filled_sinks`` (B,) counts the sinks cached *before* the call.
    Returns the new slots and the state with the kept candidates taken out and the dropped slots folded in.
    """
    mk, mv, ok = check_memory_state(memory_state, slots, keys, values)
    if slots == 0:
        return (mk, mv, ok), state
    B, Hkv, N, _ = keys.shape
    H = state.shape[1]
    g = H // Hkv
    dtype = state.dtype
    root = float(scale) ** 0.5
    left = N - max(window - 1, 0)
    valid = torch.ones(B, N, dtype=torch.bool, device=keys.device) if key_mask is None else key_mask.bool()
    if sinks > 0:
        filled = torch.zeros(B, dtype=torch.long, device=keys.device) if filled_sinks is None else filled_sinks
        valid = valid & ~sink_candidates(valid, filled.long(), sinks)[0]
    k_new, v_new = keys[:, :, :max(left, 0)], values[:, :, :max(left, 0)].to(dtype)
    cand_ok = valid[:, None, :max(left, 0)].expand(B, Hkv, -1)
    per_kv = state.reshape(B, Hkv, g, *state.shape[2:]).mean(2)          # identical per group without decay
    # features from the keys in their own dtype, as the fold computed them (what is taken out is what went in)
    f_new, f_mem = feature_k(k_new * root).to(dtype), feature_k(mk.to(keys.dtype) * root).to(dtype)
    mk, mv = mk.to(dtype), mv.to(dtype)
    err = torch.cat([recall_error(f_mem, mv, per_kv, own=True), recall_error(f_new, v_new, per_kv, own=False)], -1)
    err = err.masked_fill(~torch.cat([ok, cand_ok], -1), float("-inf"))
    keep = err.topk(slots, dim=-1).indices                                     # (B,Hkv,G)
    chosen = torch.zeros_like(err, dtype=torch.bool).scatter(-1, keep, True) & torch.isfinite(err)
    taken = (f_new * chosen[..., slots:, None]).transpose(-1, -2) @ with_ones(v_new)      # kept: out of the state
    dropped = (f_mem * (ok & ~chosen[..., :slots])[..., None]).transpose(-1, -2) @ with_ones(mv)   # folded in
    state = state + (dropped - taken).repeat_interleave(g, dim=1)
    all_k, all_v = torch.cat([mk, k_new.to(dtype)], 2), torch.cat([mv, v_new], 2)
    return (_pick(all_k, keep).to(keys.dtype), _pick(all_v, keep).to(values.dtype), chosen.gather(-1, keep)), state


def _pick(x: Tensor, index: Tensor) -> Tensor:
    """x (B,Hkv,N,X) at per-head token indices (B,Hkv,G) -> (B,Hkv,G,X)."""
    return x.gather(2, index[..., None].expand(-1, -1, -1, x.shape[-1]))


__all__ = ["MemoryState", "empty_memory", "check_memory_state", "recall_error", "update_memory"]
