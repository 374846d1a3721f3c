"""Attention cost model: FLOPs and decode-state bytes of softmax vs. linearized attention.

Counting convention (per converted layer, batch 1, one FLOP = one multiply or add, so a
multiply-accumulate is 2 FLOPs; projections q/k/v/o are excluded — they are unchanged):

* softmax prefill of L tokens (causal): QKᵀ and PV over the lower triangle, 2·H·L²·D.
* softmax decode at context L: 4·H·L·D per token; its state is the KV cache, 2·Hkv·L·D elements.
* linear attention (feature size F, value dim D, window w, chunk C): per token 4·H·F·(D+1) for the
  state read-out and update, 2·H·min(C, L)·(F + D) for the intra-chunk part of the chunked prefill,
  4·H·(w + k)·D for the softmax window and the k attention sinks, plus the feature maps (hedgehog:
  2·(H+Hkv)·D·f). Its decode state is H·F·(D+1) fp32 elements plus the window's (w−1) and the
  sinks' k keys and values.

Example:
    >>> c = AttentionShape(n_heads=9, n_kv_heads=3, head_dim=64, feature_dim=128, window=64, chunk=64)
    >>> softmax_state_bytes(c, 1024, 4) // 1024, linear_state_bytes(c, 4) // 1024
    (1536, 387)
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class AttentionShape:
    """One attention layer's sizes; ``feature_dim`` is φ's output size F, ``hedgehog_dim`` its projection."""

    n_heads: int
    n_kv_heads: int
    head_dim: int
    feature_dim: int
    window: int
    chunk: int
    hedgehog_dim: int = 0
    sinks: int = 0


def softmax_prefill_flops(s: AttentionShape, length: int) -> int:
    return 2 * s.n_heads * length * length * s.head_dim


def softmax_decode_flops(s: AttentionShape, context: int) -> int:
    return 4 * s.n_heads * context * s.head_dim


def softmax_state_bytes(s: AttentionShape, context: int, dtype_bytes: int) -> int:
    return 2 * s.n_kv_heads * context * s.head_dim * dtype_bytes


def _feature_map_flops(s: AttentionShape) -> int:
    return 2 * (s.n_heads + s.n_kv_heads) * s.head_dim * s.hedgehog_dim


def linear_decode_flops(s: AttentionShape) -> int:
    window = 4 * s.n_heads * (s.window + s.sinks) * s.head_dim
    return 4 * s.n_heads * s.feature_dim * (s.head_dim + 1) + window + _feature_map_flops(s)


def linear_prefill_flops(s: AttentionShape, length: int) -> int:
    intra = 2 * s.n_heads * min(s.chunk, length) * (s.feature_dim + s.head_dim)
    return length * (linear_decode_flops(s) + intra)


def linear_state_bytes(s: AttentionShape, dtype_bytes: int) -> int:
    recurrent = s.n_heads * s.feature_dim * (s.head_dim + 1) * 4  # accumulated in fp32
    window = 2 * s.n_kv_heads * (max(s.window - 1, 0) + s.sinks) * s.head_dim * dtype_bytes
    return recurrent + window


def cost_rows(shapes: list[AttentionShape], contexts: tuple[int, ...], dtype_bytes: int) -> list[dict]:
    """One row per context length, summed over the converted layers."""
    rows = []
    for n in contexts:
        sm_state = sum(softmax_state_bytes(s, n, dtype_bytes) for s in shapes)
        lin_state = sum(linear_state_bytes(s, dtype_bytes) for s in shapes)
        sm_flops = sum(softmax_prefill_flops(s, n) for s in shapes)
        lin_flops = sum(linear_prefill_flops(s, n) for s in shapes)
        rows.append({
            "context": n,
            "softmax_kv_MiB": sm_state / 2**20, "linear_state_MiB": lin_state / 2**20,
            "state_ratio": sm_state / lin_state,
            "softmax_prefill_GFLOP": sm_flops / 1e9, "linear_prefill_GFLOP": lin_flops / 1e9,
            "softmax_decode_MFLOP/tok": sum(softmax_decode_flops(s, n) for s in shapes) / 1e6,
            "linear_decode_MFLOP/tok": sum(linear_decode_flops(s) for s in shapes) / 1e6,
        })
    return rows
