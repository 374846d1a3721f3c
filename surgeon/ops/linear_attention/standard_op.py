"""The recurrent part of linear attention as one opaque op, ``surgeon::linear_recurrence``, for export.

ONNX opset 27 has a standard ``LinearAttention`` operator: ``S_t = exp(g_t)·S_{t−1} + k_t ⊗ v_t``,
``o_t = q_t·S_t`` over packed ``[B, T, H·D]`` inputs with an explicit ``past_state`` /
``present_state``. Our linear branch maps onto it with the feature maps computed before it
(``q, k`` := ``φ_q(q), φ_k(k)`` in folding order) and the normaliser carried by a column of ones
appended to ``v`` (one state gives numerator and denominator). Window, sinks and memory slots stay
outside it. A hybrid's query reads the state *before* the step's fold (``strict``); the exporter's
translation subtracts that step's own term ``(q_t·k_t) v_t`` from the op's inclusive output.

Inside :func:`standard_recurrence` the chunked and recurrent forms compute their linear terms with
this op, which runs eagerly as our own chunked recurrence (so outputs are unchanged) and which
``surgeon.export`` translates into the ONNX node; outside it nothing changes.

Example:
    >>> import torch
    >>> fq, fk = torch.rand(2, 1, 3, 5, 4, dtype=torch.float64)
    >>> vv, state = torch.randn(1, 3, 5, 3, dtype=torch.float64), torch.zeros(1, 3, 4, 3, dtype=torch.float64)
    >>> out, new = torch.ops.surgeon.linear_recurrence(fq, fk, vv, state, None, False)
    >>> S = fk[0].transpose(-1, -2) @ vv[0]            # every key folded: the final state
    >>> torch.allclose(new[0], S), torch.allclose(out[0, :, -1], fq[0, :, -1, None].matmul(S).squeeze(-2))
    (True, True)
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor

from surgeon.ops.linear_attention.chunked import gated_linear_chunked, linear_chunked, scalar_gated_linear_chunked

_ENABLED = [False]
CHUNK = 64


@torch.library.custom_op("surgeon::linear_recurrence", mutates_args=())
def linear_recurrence(fq: Tensor, fk: Tensor, vv: Tensor, state: Tensor, log_decay: Tensor | None,
                      strict: bool) -> tuple[Tensor, Tensor]:
    """fq, fk (B,H,T,F), vv (B,H,T,Dv+1) in folding order, state (B,H,F,Dv+1), log_decay None, (B,H,T) or
    (B,H,T,F); returns (Σ fq·S [num | den] (B,H,T,Dv+1), final state). ``strict``: query t reads the state
    before step t's key is folded in (decayed by step t)."""
    if log_decay is None:
        out, new = linear_chunked(fq, fk, vv, state, 1, strict=strict, C=CHUNK)
    elif log_decay.dim() == 3:
        out, new = scalar_gated_linear_chunked(fq, fk, vv, log_decay, state, strict=strict, C=CHUNK)
    else:
        out, new = gated_linear_chunked(fq, fk, vv, log_decay, state, strict=strict, C=CHUNK)
    return out.contiguous(), new.contiguous()


@linear_recurrence.register_fake
def _(fq: Tensor, fk: Tensor, vv: Tensor, state: Tensor, log_decay: Tensor | None,
      strict: bool) -> tuple[Tensor, Tensor]:
    return fq.new_empty((*fq.shape[:3], vv.shape[-1])), state.new_empty(state.shape)


@contextlib.contextmanager
def standard_recurrence(enabled: bool = True) -> Iterator[None]:
    """Within the block, the causal forms compute their linear terms with ``surgeon::linear_recurrence``."""
    before = _ENABLED[0]
    _ENABLED[0] = bool(enabled)
    try:
        yield
    finally:
        _ENABLED[0] = before


def active() -> bool:
    """Whether :func:`standard_recurrence` is on."""
    return _ENABLED[0]


__all__ = ["linear_recurrence", "standard_recurrence", "active"]
