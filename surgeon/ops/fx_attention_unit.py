"""``FxLinearAttention``: the module the FX path of ``LinearizeAttention`` puts where softmax attention was.

It is called in the graph as ``unit(q, k, v, *masks, scale=s)`` on the very tensors the replaced
``softmax(q @ kᵀ · s + mask) @ v`` (or ``F.scaled_dot_product_attention``) read, and returns a tensor of
the same shape as the attention output. q/k/v are (B, H, T, D) or (B·H, T, D) (then one head).

* causal sites: :func:`~surgeon.ops.linear_attention.linear_attention` (a sliding window of exact
  softmax over the last ``window`` tokens, weighted by γ = sigmoid(logit) per head, plus linear
  attention over older tokens);
* bidirectional sites: :func:`~surgeon.ops.linear_attention.bidirectional_linear_attention`, with
  softmax inside a local window (``local=True``; 2-D over a square patch grid for image models).

Masks arrive as the graph computed them; their ``mask_kinds`` say how to read them: ``fill`` (True
hides the key, ``masked_fill``), ``additive`` (≤ -1e4 hides it) or ``sdpa`` (bool True keeps it, float
additive). They become one key-padding mask: a key is valid when any query may see it.

Example:
    >>> import torch
    >>> unit = FxLinearAttention(n_heads=2, n_kv_heads=2, head_dim=4, ndim=4, feature_map="elu1",
    ...                          causal=True, window=0)
    >>> q = k = v = torch.randn(1, 2, 5, 4)
    >>> unit(q, k, v, scale=0.5).shape
    torch.Size([1, 2, 5, 4])
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import torch
import torch.nn as nn
from torch import Tensor

from surgeon.core.errors import ConfigError
from surgeon.fx.tracing import SurgeonUnit
from surgeon.ops.feature_maps import make_feature_map
from surgeon.ops.linear_attention.weights import (linear_weight, linear_weight_parameter, window_weight,
                                                  window_weight_parameter)

NEG_THRESHOLD = -1e4  # an additive mask value at or below this hides the key
MASK_KINDS = ("fill", "additive", "sdpa")


def allowed_from_mask(mask: Tensor, kind: str) -> Tensor:
    """Bool, True where a query may attend to a key.

    Example:
        >>> allowed_from_mask(torch.tensor([0.0, float("-inf")]), "additive").tolist()
        [True, False]
    """
    if kind == "fill":
        return ~mask.bool()
    if mask.dtype == torch.bool:
        return mask if kind == "sdpa" else torch.ones_like(mask)
    return mask > NEG_THRESHOLD


def key_mask_from(masks: Sequence[Tensor], kinds: Sequence[str], batch: int, n_keys: int, ndim: int = 4
                  ) -> Tensor | None:
    """(batch, n_keys) bool, False for keys no query may see; None when every key is visible.

    Masks broadcast against the scores, (B, H, Tq, Tk) (``ndim=4``) or (B·H, Tq, Tk) (``ndim=3``), so
    they are aligned from the right: a 2-D mask is (Tq, Tk), never (B, Tk).

    Example:
        >>> m = torch.tensor([[[[0.0, 0.0, float("-inf")]]], [[[0.0, 0.0, 0.0]]]])  # (2, 1, 1, 3)
        >>> key_mask_from([m], ["additive"], batch=2, n_keys=3).tolist()
        [[True, True, False], [True, True, True]]
    """
    valid = None
    for mask, kind in zip(masks, kinds):
        allowed = allowed_from_mask(mask, kind)
        while allowed.dim() < ndim:
            allowed = allowed.unsqueeze(0)
        allowed = allowed.flatten(0, -ndim).flatten(1, -2).any(dim=1)  # any head, any query -> (b, Tk)
        allowed = allowed.expand(batch, n_keys)
        valid = allowed if valid is None else valid & allowed
    if valid is None:
        return None
    if _tracing(valid):
        return valid  # no data-dependent branch while torch.compile / torch.export trace the unit
    return None if bool(valid.all()) else valid


def _tracing(t: Tensor) -> bool:
    from torch._subclasses.fake_tensor import is_fake

    return torch.compiler.is_compiling() or torch.compiler.is_exporting() or is_fake(t)


class FxLinearAttention(SurgeonUnit):
    """Linear (or hybrid sliding-window) attention on given q, k, v; see the module docstring.

    Args:
        n_heads / n_kv_heads / head_dim: of q and k (3-D inputs: one head).
        ndim: 4 for (B, H, T, D) inputs, 3 for (B·H, T, D).
        feature_map / feature_dim: φ of queries and keys (one map per head, separate for q and k).
        causal: causal (decoder) attention, else bidirectional.
        window: causal: exact softmax over the last ``window`` tokens; bidirectional with ``local``:
            softmax inside a local window of this radius; 0: pure linear attention.
        window_weight_init: initial γ of the softmax terms (a sigmoid of a learnable per-head logit).
        local / image_grid / n_prefix: bidirectional local windows; 2-D over a square grid after
            ``n_prefix`` leading tokens (a CLS token) when ``image_grid``.
        chunk_size: chunk length of the chunked form.
        mask_kinds: how to read each mask passed after q, k, v.
        replaced: what the unit replaced (for its repr).
    """

    def __init__(self, *, n_heads: int, n_kv_heads: int, head_dim: int, ndim: int = 4, feature_map: str = "hedgehog",
                 feature_dim: int | None = None, causal: bool = True, window: int = 0,
                 window_weight_init: float = 0.1, local: bool = False, image_grid: bool = False, n_prefix: int = 0,
                 chunk_size: int = 64, mask_kinds: Sequence[str] = (), replaced: str = "", sinks: int = 0,
                 linear_weight_init: float = 1e-3) -> None:
        super().__init__()
        if ndim not in (3, 4):
            raise ConfigError(f"FxLinearAttention takes (B, H, T, D) or (B·H, T, D) inputs, not {ndim}-D")
        if ndim == 3 and (n_heads != 1 or n_kv_heads != 1):
            raise ConfigError("FxLinearAttention with 3-D (B·H, T, D) inputs has one head per batch row")
        if n_heads % n_kv_heads:
            raise ConfigError(f"{n_heads} query heads are not a multiple of {n_kv_heads} key heads")
        bad = [k for k in mask_kinds if k not in MASK_KINDS]
        if bad:
            raise ConfigError(f"unknown mask kinds {bad}; expected some of {list(MASK_KINDS)}")
        if local and causal:
            raise ConfigError("local windows are for bidirectional attention; causal attention uses window=...")
        if local and window < 1:
            raise ConfigError("local=True needs window > 0 (the local window's radius)")
        self.n_heads, self.n_kv_heads, self.head_dim, self.ndim = n_heads, n_kv_heads, head_dim, ndim
        self.causal, self.window, self.local = causal, window, local
        self.image_grid, self.n_prefix = image_grid, n_prefix
        self.chunk_size = chunk_size
        self.form = "chunked"  # "parallel" / "recurrent" give the same numbers (tests use them)
        self.eps = 1e-6  # added to the normaliser (0 makes window >= T exactly softmax attention)
        self.mask_kinds = list(mask_kinds)
        self.replaced = replaced
        self.feature_q = make_feature_map(feature_map, n_heads, head_dim, feature_dim)
        self.feature_k = make_feature_map(feature_map, n_kv_heads, head_dim, feature_dim)
        self.sinks = sinks if causal else 0
        if self.uses_window:
            self.window_logit = window_weight_parameter(n_heads, window_weight_init)
        if causal and (window > 0 or self.sinks > 0):   # the same hybrid as the module swap (LinearAttention)
            self.linear_log_weight = linear_weight_parameter(n_heads, linear_weight_init)

    @property
    def uses_window(self) -> bool:
        return self.window > 0 and (self.causal or self.local)

    def window_weight(self) -> Tensor | None:
        """γ per head (the weight of the exact-softmax terms), or None without a window."""
        return window_weight(self.window_logit) if self.uses_window else None

    def linear_weight(self) -> Tensor | None:
        """λ per head (the weight of the linear terms beside the softmax ones), or None when only linear terms exist."""
        return linear_weight(self.linear_log_weight) if hasattr(self, "linear_log_weight") else None

    def extra_repr(self) -> str:
        shape = "(B·H, T, D)" if self.ndim == 3 else "(B, H, T, D)"
        return (f"replaced={self.replaced or '?'}, heads={self.n_heads}/{self.n_kv_heads}, head_dim={self.head_dim}, "
                f"inputs={shape}, feature_map={self.feature_q.kind}, causal={self.causal}, window={self.window}, "
                f"sinks={self.sinks}"
                + (f", local=True, image_grid={self.image_grid}" if self.local else ""))

    def _local_mask(self, n_tokens: int, device: torch.device) -> Tensor:
        from surgeon.ops.linear_attention import local_window_mask

        if self.image_grid:
            side = math.isqrt(max(n_tokens - self.n_prefix, 0))
            if side * side != n_tokens - self.n_prefix:
                raise ConfigError(f"{type(self).__name__}: {n_tokens} tokens are not {self.n_prefix} prefix token(s) "
                                  "plus a square patch grid; 2-D local windows need square images")
            return local_window_mask(n_tokens, self.window, grid=(side, side), n_prefix=self.n_prefix).to(device)
        return local_window_mask(n_tokens, self.window).to(device)

    def forward(self, q: Tensor, k: Tensor, v: Tensor, *masks: Tensor, scale: Any = None) -> Tensor:
        from surgeon.ops.linear_attention import bidirectional_linear_attention, linear_attention

        if isinstance(q, torch.fx.Proxy):  # the rewritten graph traced again (symbolic_trace): one opaque call
            tracer = q.tracer
            return tracer.create_proxy("call_module", tracer.path_of_module(self), (q, k, v, *masks), {"scale": scale})
        if len(masks) != len(self.mask_kinds):
            raise ConfigError(f"{type(self).__name__} was built for {len(self.mask_kinds)} mask(s), got {len(masks)}")
        if q.dim() != self.ndim:
            raise ConfigError(f"{type(self).__name__} expects {self.ndim}-D q/k/v, got q of shape {tuple(q.shape)}")
        if self.ndim == 3:
            q, k, v = q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1)
        scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
        key_mask = key_mask_from(masks, self.mask_kinds, q.shape[0], k.shape[-2], self.ndim) if masks else None
        if self.causal:
            out, _ = linear_attention(q, k, v, self.feature_q, self.feature_k, scale=scale, window=self.window,
                                      window_weight=self.window_weight(), linear_weight=self.linear_weight(),
                                      sinks=self.sinks, key_mask=key_mask, form=self.form,
                                      chunk_size=self.chunk_size, eps=self.eps)
        else:
            local = self._local_mask(q.shape[-2], q.device) if self.local else None
            out = bidirectional_linear_attention(q, k, v, self.feature_q, self.feature_k, scale=scale, local_mask=local,
                                                 window_weight=self.window_weight(), key_mask=key_mask, form=self.form,
                                                 chunk_size=self.chunk_size, eps=self.eps)
        return out.squeeze(1) if self.ndim == 3 else out
