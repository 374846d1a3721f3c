"""Linearized attention at the *kernel*: the model's own attention module stays, only its attention function changes.

transformers' attention modules compute q/k/v, rotary, q/k norms and output gates themselves and
call ``ALL_ATTENTION_FUNCTIONS[config._attn_implementation](module, query, key, value, mask, ...)``
after ``cache.update``. This file registers the hybrid as such a function (with a matching
``AttentionMaskInterface`` entry, so padding masks arrive). A converted module carries a
:class:`KernelHybrid` child named ``hybrid`` (feature maps, γ, λ); modules without one fall through
to the implementation the model had (``eager`` or ``sdpa``). Decoding state lives in a
:class:`~surgeon.ops.hybrid_cache.KernelHybridLayer` that a forward pre-hook installs at the
module's layer index in the cache the module receives: the function reaches it through the module.

Semantics the family passes to its kernel are carried, not dropped: ``scaling``, ``softcap``
(inside the window and on sinks), ``s_aux`` (learned sinks in the shared normaliser),
``sliding_window`` (checked at plan time), ``is_causal``.

Example:
    >>> import torch, transformers, surgeon
    >>> from surgeon.passes import LinearizeAttention
    >>> cfg = transformers.Gemma2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2, head_dim=8,
    ...                                 num_attention_heads=4, num_key_value_heads=2, vocab_size=50)
    >>> model = transformers.Gemma2ForCausalLM(cfg).eval()
    >>> ids = torch.randint(0, 50, (1, 12))
    >>> ref = model(ids).logits
    >>> s = surgeon.apply(model, LinearizeAttention(feature_map="elu1", window=16))
    >>> type(s.model.model.layers[0].self_attn.hybrid).__name__, s.model.config._attn_implementation
    ('KernelHybrid', 'surgeon_hybrid_eager')
    >>> torch.allclose(s.model(ids).logits, ref, atol=1e-5)
    True
"""
from __future__ import annotations

import inspect
import sys
from typing import Any, Callable

import torch
import torch.nn as nn
from transformers.cache_utils import Cache, EncoderDecoderCache
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask, sdpa_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from surgeon.core.errors import ConfigError
from surgeon.ops.feature_maps import make_feature_map
from surgeon.ops.hybrid_cache import KernelHybridLayer, layer_at
from surgeon.ops.hybrid_kernel import capped_hybrid_attention
from surgeon.ops.linear_attention import bidirectional_linear_attention, local_window_mask
from surgeon.ops.linear_attention.weights import (linear_weight, linear_weight_parameter, window_weight,
                                                  window_weight_parameter)

HYBRID = "hybrid"          # the child holding the new parameters on the original module
PROBE_CALLS = "_surgeon_kernel_calls"
CACHE_ARGS = ("cache", "past_key_values", "past_key_value", "layer_past")
BASES = ("sdpa", "eager")


def implementation_name(base: str, probe: bool = False) -> str:
    """The registered attention-implementation name over ``base`` ('sdpa' or 'eager')."""
    return f"surgeon_{'probe' if probe else 'hybrid'}_{base}"


def base_of(attn_implementation: str | None) -> str:
    """The fallback implementation for modules left as they are: the model's, reduced to eager / sdpa."""
    if attn_implementation is None or attn_implementation == "eager" or attn_implementation.endswith("_eager"):
        return "eager"
    return "sdpa"


def base_function(module: nn.Module, base: str) -> Callable:
    """The model's own kernel for ``base``: its modeling file's ``eager_attention_forward``, or the registry's sdpa."""
    if base == "eager":
        fn = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
        if fn is None:
            raise ConfigError(f"{type(module).__name__}: its modeling file has no eager_attention_forward to keep for "
                              "the layers left unconverted; load the model with attn_implementation='sdpa'")
        return fn
    return ALL_ATTENTION_FUNCTIONS["sdpa"]


def key_valid(mask: Any, n_keys: int) -> torch.Tensor | None:
    """(B, n_keys) bool (False = padding) for the last ``n_keys`` key columns of a 2-D / 4-D mask; None = all real."""
    if not isinstance(mask, torch.Tensor):
        return None
    cols = mask[..., -n_keys:]
    allowed = cols.bool() if cols.dtype == torch.bool or mask.dim() == 2 else cols > torch.finfo(cols.dtype).min / 2
    if cols.is_floating_point() and mask.dim() == 4 and not (torch.compiler.is_compiling()
                                                             or torch.compiler.is_exporting()):
        if bool((allowed & (cols != 0)).any()):
            raise ConfigError("the attention mask carries additive score biases (finite values other than 0, e.g. a "
                              "dynamic / position bias), which the hybrid kernel reads only as padding; this model "
                              "cannot be converted at the kernel at this length")
    if allowed.shape[-1] < n_keys:
        return None
    valid = allowed if allowed.dim() == 2 else allowed.any(dim=-2).all(dim=1)
    if torch.compiler.is_compiling() or torch.compiler.is_exporting():
        return valid
    return None if bool(valid.all()) else valid


class KernelHybrid(nn.Module):
    """The new parameters of one converted attention module and the hybrid kernel call."""

    def __init__(self, n_heads: int, n_kv_heads: int, head_dim: int, config: Any, layer_idx: int,
                 causal: bool) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, head_dim
        self.layer_idx, self.causal = layer_idx, causal
        self.window = config.window
        self.sinks = config.sinks if causal else 0
        self.local = config.local
        self.chunk_size = config.chunk_size
        self.feature_q = make_feature_map(config.feature_map, n_heads, head_dim, config.feature_dim)
        self.feature_k = make_feature_map(config.feature_map, n_kv_heads, head_dim, config.feature_dim)
        if config.window > 0:
            self.window_logit = window_weight_parameter(n_heads, config.window_weight_init)
        if config.window > 0 or self.sinks > 0:
            self.linear_log_weight = linear_weight_parameter(n_heads, config.linear_weight_init)
        self.cache_layer: KernelHybridLayer | None = None   # set by the pre-hook for the duration of a call

    def extra_repr(self) -> str:
        return (f"heads={self.n_heads}, kv_heads={self.n_kv_heads}, head_dim={self.head_dim}, "
                f"feature_map={self.feature_q.kind}, window={self.window}, sinks={self.sinks}, causal={self.causal}")

    def weights(self) -> dict[str, torch.Tensor | None]:
        return dict(window_weight=window_weight(self.window_logit) if hasattr(self, "window_logit") else None,
                    linear_weight=linear_weight(self.linear_log_weight) if hasattr(self, "linear_log_weight") else None)

    def attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: Any,
               kwargs: dict[str, Any]) -> torch.Tensor:
        """(B, T, H, Dv): the hybrid over the module's q (B,H,T,D) and k/v (B,Hkv,P+T,·)."""
        scale = kwargs.get("scaling")
        scale = float(scale) if scale is not None else self.head_dim ** -0.5
        causal = kwargs.get("is_causal", self.causal)
        T = query.shape[-2]
        if not causal:
            local = local_window_mask(T, self.window).to(query.device) if self.local else None
            out = bidirectional_linear_attention(query, key, value, self.feature_q, self.feature_k, scale=scale,
                                                 local_mask=local, key_mask=key_valid(mask, T),
                                                 chunk_size=self.chunk_size, **self.weights())
            return out.transpose(1, 2).contiguous()
        layer = self.cache_layer
        past = key.shape[-2] - T
        if layer is None and past:
            raise ConfigError(f"layer {self.layer_idx}: the attention function received {key.shape[-2]} keys for "
                              f"{T} queries but no cache of ours; decode with the cache the model creates "
                              "(DynamicCache) so the linear state is kept")
        s_aux = kwargs.get("s_aux")
        result = capped_hybrid_attention(
            query, key, value, self.feature_q, self.feature_k, scale=scale, window=self.window, past=past,
            key_mask=key_valid(mask, key.shape[-2]), state=None if layer is None else layer.state,
            sinks=self.sinks, sink_state=None if layer is None else layer.sink_state,
            softcap=kwargs.get("softcap"), s_aux=None if s_aux is None else s_aux.to(query.device),
            chunk_size=self.chunk_size, **self.weights())
        if layer is not None:
            layer.store(result.state, result.sink_state)
        return result.out.transpose(1, 2).contiguous()


def install_layer(cache: Any, idx: int, window: int) -> KernelHybridLayer | None:
    """This layer's entry of ``cache`` as a :class:`KernelHybridLayer` (installed on first use)."""
    if isinstance(cache, EncoderDecoderCache):
        cache = cache.self_attention_cache
    if not isinstance(cache, Cache):
        return None
    return layer_at(cache, idx, KernelHybridLayer, lambda: KernelHybridLayer(window))


def _find_cache(module: nn.Module, args: tuple, kwargs: dict) -> Any:
    for name in CACHE_ARGS:
        if kwargs.get(name) is not None:
            return kwargs[name]
    if len(args) > 1:
        bound = inspect.signature(module.forward).bind_partial(*args).arguments
        return next((bound[n] for n in CACHE_ARGS if bound.get(n) is not None), None)
    return None


def pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
    """Install / find this module's cache layer before the module calls ``cache.update``."""
    unit = module._modules[HYBRID]
    cache = _find_cache(module, args, kwargs)
    unit.cache_layer = install_layer(cache, unit.layer_idx, unit.window) if unit.causal else None


def post_hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
    module._modules[HYBRID].cache_layer = None


def _hybrid(base: str) -> Callable:
    def hybrid_attention(module, query, key, value, attention_mask, **kwargs):
        unit = module._modules.get(HYBRID) if isinstance(module, nn.Module) else None
        if not isinstance(unit, KernelHybrid):
            return base_function(module, base)(module, query, key, value, attention_mask, **kwargs)
        return unit.attend(query, key, value, attention_mask, kwargs), None
    hybrid_attention.__name__ = f"surgeon_hybrid_{base}"
    return hybrid_attention


def _probe(base: str) -> Callable:
    def probe_attention(module, query, key, value, attention_mask, **kwargs):
        out = base_function(module, base)(module, query, key, value, attention_mask, **kwargs)
        calls = module.__dict__.setdefault(PROBE_CALLS, [])
        if not calls:
            calls.append(dict(query=query, key=key, value=value, mask=attention_mask, kwargs=dict(kwargs),
                              output=out[0]))
        return out
    return probe_attention


def register() -> None:
    """Register the hybrid and probe implementations (and their mask functions) over eager and sdpa."""
    for base in BASES:
        mask = eager_mask if base == "eager" else sdpa_mask
        for probe, fn in ((False, _hybrid(base)), (True, _probe(base))):
            name = implementation_name(base, probe)
            if name not in ALL_ATTENTION_FUNCTIONS._global_mapping:
                ALL_ATTENTION_FUNCTIONS.register(name, fn)
                ALL_MASK_ATTENTION_FUNCTIONS.register(name, mask)


register()
