"""Causal and bidirectional (hybrid) linear attention in plain PyTorch, in forms that agree exactly.

Causal contract (per batch b, query head h; positions index the concatenation past + current):

- GQA: query head h uses kv head h // (H // Hkv). fq = φ_q(q·√scale) at H heads, fk = φ_k(k·√scale)
  at Hkv heads (then repeated). Score s_tj = scale·q_t·k_j.
- Window w ≥ 0 (w = 0: pure linear attention). W(t) = {j : t−w < j ≤ t}, L(t) = {j ≤ t−w}.
- Sinks k ≥ 0 (StreamingLLM's attention sinks): the first k valid tokens of each sequence are never
  folded into the state; once they leave the window they stay exact softmax keys. S(t) = sinks in L(t).
- m_t = max over valid j ∈ W(t) ∪ S(t) of s_tj (one normaliser); a_tj = γ_h·exp(s_tj − m_t) on
  W(t) ∪ S(t); b_tj = λ_h·(fq_t·fk_j)·D(t, j) on L(t) \\ S(t);
  y_t = (Σ a v + Σ b v) / max(Σ a + Σ b, eps).
- Decay α_u = exp(log_decay_u) (per head or per feature channel). Token j is *folded* into the
  recurrent state at step e_j = j + max(w−1, 0), the step after which it leaves the raw window the
  cache keeps; it decays from then on: D(t, j) = Π_{u=e_j+1}^{t} α_u. For w = 0 this is GLA's
  Π_{u=j+1}^{t} α_u; for w ≥ 1 it is Π_{u=j+w}^{t} α_u (see "Deviation" below).
- State (B, H, F, Dv+1) = Σ_{folded j} D · fk_j ⊗ [v_j, 1]; recurrence
  state_t = α_t ⊙ state_{t−1} + fk_{t−s} ⊗ [v_{t−s}, 1] with s = max(w−1, 0); a query at t reads
  state_t when w = 0 and α_t ⊙ state_{t−1} when w ≥ 1. The state is accumulated in float32
  (float64 for float64 inputs) whatever the input dtype.
- A cache holds the last max(w−1, 0) raw keys/values (``past_k``, ``past_v``), the sink tokens that
  have left the window (``sink_state``: k fixed slots, :func:`update_sinks`) plus ``state``; the
  returned state folds every token except the last max(w−1, 0) of past + current and the sinks, so
  feeding it back continues the sequence exactly. ``log_decay`` covers the new positions only.
- Padding (``key_mask`` False) keys contribute nothing; outputs at padded query positions are 0.

Deviation from a decay that starts one step later (Π_{u=j+w+1}^{t}): with a cache of w−1 raw tokens
the token leaving the window is folded one step before it enters L(t), so its decay must start at
j+w for the cache to reproduce the full-sequence result. Without decay both are the same.

Forms (one module each): ``reference`` ("parallel": dense masks, quadratic, the readable
reference), ``chunked`` (linear time; the window and the intra-chunk terms are dense per chunk, the
state passes between chunks; without decay it has no Python loop over time) and ``recurrent`` (one
token at a time: the decode path).

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
from surgeon.ops.linear_attention.api import (BIDIRECTIONAL_FORMS, CAUSAL_FORMS, bidirectional_linear_attention,
                                              linear_attention, local_window_mask)
from surgeon.ops.linear_attention.sinks import SinkState, empty_sinks, update_sinks

__all__ = ["linear_attention", "bidirectional_linear_attention", "local_window_mask", "update_sinks",
           "empty_sinks", "SinkState", "CAUSAL_FORMS", "BIDIRECTIONAL_FORMS"]
