"""Public entry points of the linear-attention ops (contract in the package docstring).

Example:
    >>> import torch
    >>> from surgeon.ops.feature_maps import make_feature_map
    >>> fm = make_feature_map("elu1", 2, 4)
    >>> q = k = v = torch.randn(1, 2, 6, 4)
    >>> linear_attention(q, k, v, fm, fm, scale=0.5, window=2, sinks=1)[0].shape
    torch.Size([1, 2, 6, 4])
"""
from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from surgeon.core.errors import ConfigError
from surgeon.ops.linear_attention.chunked import bidir_chunked, causal_chunked
from surgeon.ops.linear_attention.inputs import FeatureFn, check_chunk, check_choice, check_local_mask, prepare
from surgeon.ops.linear_attention.memory import MemoryState
from surgeon.ops.linear_attention.recurrent import causal_recurrent
from surgeon.ops.linear_attention.reference import bidir_parallel, causal_parallel
from surgeon.ops.linear_attention.sinks import SinkState
from surgeon.ops.linear_attention.standard_op import active as standard_op_active, linear_recurrence

CAUSAL_FORMS = ("parallel", "chunked", "recurrent")
# Eager chunked calls longer than this run as consecutive blocks carrying the cache exactly: every
# intermediate then stays below glibc's mmap threshold, which keeps the time linear in the length
# (one 16 K call page-faults fresh memory on every op). Graph capture sees one block (no loop).
BLOCK_TOKENS = 2048
BIDIRECTIONAL_FORMS = ("parallel", "chunked")


def linear_attention(q: Tensor, k: Tensor, v: Tensor, feature_q: FeatureFn, feature_k: FeatureFn, *, scale: float,
                     window: int = 0, window_weight: Tensor | None = None, linear_weight: Tensor | None = None,
                     log_decay: Tensor | None = None, key_mask: Tensor | None = None,
                     past_k: Tensor | None = None, past_v: Tensor | None = None, state: Tensor | None = None,
                     sinks: int = 0, sink_state: SinkState | None = None, memory_state: MemoryState | None = None,
                     form: Literal["parallel", "chunked", "recurrent"] = "chunked", chunk_size: int = 64,
                     eps: float = 1e-6) -> tuple[Tensor, Tensor]:
    """Causal (hybrid) linear attention. q (B,H,T,D); k,v (B,Hkv,T,D/Dv) for the new tokens only; returns (out (B,H,T,Dv), new_state (B,H,F,Dv+1)).

    ``window_weight`` γ and ``linear_weight`` λ are (H,) tensors (default 1); ``log_decay`` ≤ 0 is None,
    (B,H,T) or (B,H,T,F); ``key_mask`` (B, P+T) bool marks real tokens; ``past_k``/``past_v``
    (B,Hkv,P,·) with P ≤ max(window−1, 0) and ``state`` continue a cached sequence. ``sinks`` keeps
    the first valid tokens as exact softmax keys forever; ``sink_state`` holds those that left the
    window in earlier calls (fixed-size slots, see :mod:`~surgeon.ops.linear_attention.sinks`); the
    next call's comes from :func:`update_sinks` (None = no token has left yet). ``memory_state``: the
    memory slots (LoLA's sparse cache, :mod:`~surgeon.ops.linear_attention.memory`), exact softmax keys
    every query of the call sees; the next call's comes from :func:`update_memory`, which also takes the
    kept tokens out of the returned state.

    Example:
        >>> import torch
        >>> from surgeon.ops.feature_maps import make_feature_map
        >>> from surgeon.ops.linear_attention import update_sinks
        >>> fq, fk = make_feature_map("hedgehog", 2, 4), make_feature_map("hedgehog", 2, 4)
        >>> q, k, v = torch.randn(3, 1, 2, 7, 4, dtype=torch.float64)
        >>> full, s_full = linear_attention(q, k, v, fq, fk, scale=0.5, window=2, sinks=2, form="parallel")
        >>> a, s = linear_attention(q[:, :, :5], k[:, :, :5], v[:, :, :5], fq, fk, scale=0.5, window=2, sinks=2)
        >>> sinks = update_sinks(2, 2, None, k[:, :, :5], v[:, :, :5])
        >>> b, s = linear_attention(q[:, :, 5:], k[:, :, 5:], v[:, :, 5:], fq, fk, scale=0.5, window=2, sinks=2,
        ...                         past_k=k[:, :, 4:5], past_v=v[:, :, 4:5], state=s, sink_state=sinks,
        ...                         form="recurrent")
        >>> torch.allclose(torch.cat([a, b], 2), full), torch.allclose(s, s_full)
        (True, True)
    """
    check_choice("form", form, CAUSAL_FORMS)
    capturing = torch.compiler.is_compiling() or torch.compiler.is_exporting()
    # no shape guard when captured (`capturing` first: T > BLOCK_TOKENS on a symbolic T would bound the export);
    # calls with memory slots come in blocks already (see streaming.run_blocks)
    if form == "chunked" and not capturing and memory_state is None and q.shape[2] > BLOCK_TOKENS:
        return _in_blocks(q, k, v, feature_q, feature_k, scale=scale, window=window, window_weight=window_weight,
                          linear_weight=linear_weight, log_decay=log_decay, key_mask=key_mask, past_k=past_k,
                          past_v=past_v, state=state, sinks=sinks, sink_state=sink_state, chunk_size=chunk_size,
                          eps=eps)
    x = prepare(q, k, v, feature_q, feature_k, scale=scale, window=window, window_weight=window_weight,
                linear_weight=linear_weight, log_decay=log_decay, key_mask=key_mask, past_k=past_k,
                past_v=past_v, state=state, eps=eps, sinks=sinks, sink_state=sink_state, memory_state=memory_state)
    recurrence = linear_recurrence if standard_op_active() else None   # export: ONNX's LinearAttention
    if form == "parallel":
        out, new_state = causal_parallel(x)
    elif form == "recurrent":
        out, new_state = causal_recurrent(x, recurrence)
    else:
        out, new_state = causal_chunked(x, check_chunk(chunk_size), recurrence)
    return out.to(x.out_dtype), new_state


def _in_blocks(q: Tensor, k: Tensor, v: Tensor, feature_q: FeatureFn, feature_k: FeatureFn, *, past_k: Tensor | None,
               past_v: Tensor | None, state: Tensor | None, sink_state: SinkState | None, window: int, sinks: int,
               **kw) -> tuple[Tensor, Tensor]:
    """A long chunked call as consecutive calls of BLOCK_TOKENS, each continuing the previous one's cache."""
    from surgeon.ops.linear_attention.streaming import Carry, run_blocks   # the block runner builds on this module

    done = run_blocks(q, k, v, feature_q, feature_k, Carry(past_k, past_v, state, sink_state), window=window,
                      sinks=sinks, memory=0, block=BLOCK_TOKENS, **kw)
    return done.out, done.carry.state


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
    check_choice("form", form, BIDIRECTIONAL_FORMS)
    x = prepare(q, k, v, feature_q, feature_k, scale=scale, window=0, window_weight=window_weight,
                linear_weight=linear_weight, key_mask=key_mask, eps=eps)
    T = q.shape[2]
    if local_mask is not None:
        local_mask = check_local_mask(local_mask, q.shape[0], T, q.device)
    if form == "parallel":
        out = bidir_parallel(x, local_mask)
    else:
        out = bidir_chunked(x, local_mask, check_chunk(chunk_size))
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
