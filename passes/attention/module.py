"""The module swapped in for a Hugging Face attention module: linear / gated / hybrid attention.

It keeps the original projection modules under their original names (``q_proj``…, ``c_attn``,
``query``…), so checkpoints and LoRA targets line up, and adds only the new parameters: the feature
maps, the per-head window weight and the learned gate. Decoding keeps an O(1) state in transformers'
own cache layer ``LinearAttentionAndSlidingWindowAttentionLayer`` (:class:`SinkWindowLayer` adds the
attention sinks): the recurrent state through ``update_recurrent_state``, the last ``window - 1``
keys/values through the layer's sliding window and the sink tokens in fixed slots.

Example:
    >>> import torch, transformers, surgeon
    >>> from surgeon.passes import LinearizeAttention
    >>> cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
    ...                                num_attention_heads=4, num_key_value_heads=2, vocab_size=50)
    >>> model = transformers.LlamaForCausalLM(cfg).eval()
    >>> s = surgeon.apply(model, LinearizeAttention(feature_map="elu1", window=4))
    >>> type(s.model.model.layers[0].self_attn).__name__, s.model.model.layers[0].self_attn.q_proj is not None
    ('LinearAttention', True)
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers.cache_utils import (
    Cache,
    EncoderDecoderCache,
    LinearAttentionAndSlidingWindowAttentionLayer,
)

from surgeon.core.errors import ConfigError
from surgeon.ops.feature_maps import make_feature_map
from surgeon.ops.hybrid_cache import layer_at
from surgeon.ops.linear_attention import (bidirectional_linear_attention, linear_attention, local_window_mask,
                                          update_sinks)
from surgeon.ops.linear_attention.streaming import Carry, run_blocks
from surgeon.ops.linear_attention.weights import (linear_weight, linear_weight_parameter, window_weight,
                                                  window_weight_parameter)
from surgeon.passes.attention.config import LinearizeAttention
from surgeon.passes.attention.layout import AttentionLayout, position_qk, qk_heads
from surgeon.passes.attention.masks import dense_mask

GATE_NORMALIZER = 16.0  # GLA / Liger: log α = logsigmoid(g) / 16 keeps decays close to 1


class LinearAttention(nn.Module):
    """Linear attention with the original module's projections; see the module docstring."""

    def __init__(self, original: nn.Module, layout: AttentionLayout, config: LinearizeAttention, layer_idx: int,
                 causal: bool) -> None:
        super().__init__()
        for name in layout.projection_names + [n for n in (layout.q_norm, layout.k_norm) if n]:
            self.add_module(name, getattr(original, name))
        self.layout = layout
        self.layer_idx = layer_idx
        self.is_causal = causal
        self.window = config.window
        self.sinks = config.sinks if causal else 0
        self.memory = config.memory if causal and isinstance(config.memory, int) else 0   # a plan: set by the handler
        self.memory_block = config.memory_block
        self.gate = config.gate
        self.local = config.local
        self.chunk_size = config.chunk_size
        self.original_class = type(original).__name__
        if hasattr(original, "config"):
            self.config = original.config
        # image models (config with patch_size): local windows are 2-D over the patch grid
        self.image_grid = hasattr(getattr(original, "config", None), "patch_size")
        h, hkv, d = layout.n_heads, layout.n_kv_heads, layout.head_dim
        self.feature_q = make_feature_map(config.feature_map, h, d, config.feature_dim)
        self.feature_k = make_feature_map(config.feature_map, hkv, d, config.feature_dim)
        if config.window > 0:
            self.window_logit = window_weight_parameter(h, config.window_weight_init)
        if config.window > 0 or self.sinks > 0:   # how much the linear branch counts beside the softmax terms
            self.linear_log_weight = linear_weight_parameter(h, config.linear_weight_init)
        if config.gate == "learned":
            hidden = self._input_features()
            self.gate_down = nn.Linear(hidden, config.gate_rank, bias=False)
            self.gate_up = nn.Linear(config.gate_rank, h)
            nn.init.zeros_(self.gate_up.weight)
            nn.init.constant_(self.gate_up.bias, 4.0)  # α = σ(4)^(1/16) ≈ 0.9989: slow decay at init

    # -- construction helpers --------------------------------------------------------------
    def _input_features(self) -> int:
        proj = getattr(self, self.layout.q or self.layout.fused)
        return proj.in_features if isinstance(proj, nn.Linear) else proj.weight.shape[0]

    def extra_repr(self) -> str:
        lay = self.layout
        return (f"replaces={self.original_class}, heads={lay.n_heads}, kv_heads={lay.n_kv_heads}, "
                f"head_dim={lay.head_dim}, feature_map={self.feature_q.kind}, window={self.window}, sinks={self.sinks}, "
                f"{f'memory={self.memory}, ' if self.memory else ''}"
                f"gate={self.gate}, causal={self.is_causal}")

    # -- q, k, v -----------------------------------------------------------------------------
    def _heads(self, x: torch.Tensor, proj: str | None, norm: str | None, flat: torch.Tensor | None = None
               ) -> torch.Tensor:
        y = flat if flat is not None else getattr(self, proj)(x)
        return qk_heads(self.layout, y, getattr(self, norm) if norm else None)  # norm placement: see qk_heads

    def project(self, x: torch.Tensor, position_embeddings: Any = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(q, k, v, k before norm and rotary) in (batch, heads, tokens, head_dim)."""
        lay = self.layout
        if lay.fused:
            qf, kf, vf = getattr(self, lay.fused)(x).split(lay.fused_split, dim=-1)
            q, k, v = (self._heads(x, None, n, f) for n, f in ((lay.q_norm, qf), (lay.k_norm, kf), (None, vf)))
            k_raw = kf.view(*x.shape[:-1], -1, lay.head_dim).transpose(1, 2)
        else:
            k_flat = getattr(self, lay.k)(x)
            q = self._heads(x, lay.q, lay.q_norm)
            k = self._heads(x, None, lay.k_norm, k_flat)
            v = self._heads(x, lay.v, None)
            k_raw = k_flat.view(*x.shape[:-1], -1, lay.head_dim).transpose(1, 2)
        q, k = position_qk(lay, q, k, position_embeddings, self)   # rotary, then norms applied after it
        return q, k, v, k_raw

    def log_decay(self, x: torch.Tensor, k_raw: torch.Tensor) -> torch.Tensor | None:
        """Per-head log decay (batch, heads, tokens), ≤ 0, or None without a gate."""
        if self.gate == "none":
            return None
        if self.gate == "liger":   # Liger: from the pretrained key projection, no new parameters
            g = F.logsigmoid(k_raw.float()).mean(-1) / GATE_NORMALIZER
            return g.repeat_interleave(self.layout.n_heads // self.layout.n_kv_heads, dim=1)
        g = F.logsigmoid(self.gate_up(self.gate_down(x)).float()) / GATE_NORMALIZER
        return g.transpose(1, 2)

    def window_weight(self) -> torch.Tensor | None:
        return window_weight(self.window_logit) if self.window > 0 else None

    def linear_weight(self) -> torch.Tensor | None:
        return linear_weight(self.linear_log_weight) if hasattr(self, "linear_log_weight") else None

    # -- attention transfer (distillation stage 1) ---------------------------------------------
    transfer: bool = False
    """When True (training only, no cache), forward also computes the original softmax attention under
    no_grad, stores ``(linear, softmax)`` outputs before the output projection in ``transfer_pair`` and
    returns the softmax one (teacher forcing: later layers see the teacher's activations)."""
    transfer_pair: tuple[torch.Tensor, torch.Tensor] | None = None

    def softmax_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Any) -> torch.Tensor:
        """The exact softmax attention the original module computed, (batch, heads, tokens, head_dim)."""
        groups = self.layout.n_heads // self.layout.n_kv_heads
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        allowed = None
        if isinstance(mask, torch.Tensor) and mask.dim() == 4:
            cols = mask[..., -k.shape[-2]:]
            allowed = cols if cols.dtype == torch.bool else cols > torch.finfo(cols.dtype).min / 2
        elif isinstance(mask, torch.Tensor) and mask.dim() == 2:
            allowed = mask[:, None, None, -k.shape[-2]:].bool()
        if self.is_causal:
            causal = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).tril()
            allowed = causal if allowed is None else allowed & causal
        return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=self.layout.scale)

    # -- forward -------------------------------------------------------------------------------
    def forward(self, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, None]:
        call = _bind(self.layout, args, kwargs)
        x = call["hidden_states"]
        q, k, v, k_raw = self.project(x, call.get("position_embeddings"))
        cache = call.get("cache")
        if self.transfer:
            if cache is not None and call.get("use_cache", True) is not False and cache.get_seq_length() > 0:
                raise ConfigError(f"layer {self.layer_idx}: attention transfer runs full sequences without a cache")
            with torch.no_grad():
                teacher = self.softmax_attention(q, k, v, call.get("attention_mask"))
            student = (self._causal(q, k, v, self.log_decay(x, k_raw), call.get("attention_mask"), None)
                       if self.is_causal else self._bidirectional(q, k, v, call.get("attention_mask")))
            self.transfer_pair = (student, teacher)
            out = teacher.transpose(1, 2).reshape(*x.shape[:-1], -1)
            return (getattr(self, self.layout.out)(out) if self.layout.out else out), None
        if self.is_causal:
            out = self._causal(q, k, v, self.log_decay(x, k_raw), call.get("attention_mask"), cache)
        else:
            if cache is not None:
                raise ConfigError(f"{self.original_class} (layer {self.layer_idx}) was linearized as bidirectional "
                                  "attention and cannot decode with a cache; linearize a causal model for decoding")
            out = self._bidirectional(q, k, v, call.get("attention_mask"))
        out = out.transpose(1, 2).reshape(*x.shape[:-1], -1)
        if self.layout.out:
            out = getattr(self, self.layout.out)(out)
        return out, None

    def _causal(self, q, k, v, log_decay, mask, cache) -> torch.Tensor:
        w = self.window
        carry, layer = Carry(), None
        if cache is not None:
            if isinstance(cache, EncoderDecoderCache):
                cache = cache.self_attention_cache
            layer = _recurrent_layer(cache, self.layer_idx, w)
            if w > 1 and layer.is_initialized and layer.keys is not None and layer.keys.shape[-2] > 0:
                carry.past_k, carry.past_v = layer.keys[..., -(w - 1):, :], layer.values[..., -(w - 1):, :]
            if layer.is_recurrent_states_initialized[0]:
                carry.state = layer.recurrent_states[0]
            carry.sink_state, carry.memory_state = layer.sink_state, layer.memory_state
            cache.update(k, v, self.layer_idx)
        n_past = 0 if carry.past_k is None else carry.past_k.shape[-2]
        key_mask = _key_mask(mask, n_past + q.shape[-2])
        weights = dict(window_weight=self.window_weight(), linear_weight=self.linear_weight(),
                       chunk_size=self.chunk_size)
        if self.memory:
            done = run_blocks(q, k, v, self.feature_q, self.feature_k, carry, scale=self.layout.scale, window=w,
                              sinks=self.sinks, memory=self.memory, block=self.memory_block, key_mask=key_mask,
                              log_decay=log_decay, **weights)
            out, after = done.out, done.carry
        else:
            out, new_state = linear_attention(
                q, k, v, self.feature_q, self.feature_k, scale=self.layout.scale, window=w, log_decay=log_decay,
                key_mask=key_mask, past_k=carry.past_k, past_v=carry.past_v, state=carry.state, sinks=self.sinks,
                sink_state=carry.sink_state, form="recurrent" if q.shape[-2] == 1 else "chunked",  # 1 step: ~3x faster
                **weights)
            after = Carry(state=new_state)
            if layer is not None and self.sinks:
                seen_k = k if carry.past_k is None else torch.cat([carry.past_k, k], -2)
                seen_v = v if carry.past_v is None else torch.cat([carry.past_v, v], -2)
                after.sink_state = update_sinks(self.sinks, w, carry.sink_state, seen_k, seen_v, key_mask)
        if layer is not None:
            keep = not torch.is_grad_enabled()
            cache.update_recurrent_state(after.state.detach() if keep else after.state, self.layer_idx)
            layer.has_previous_state[0] = True
            layer.sink_state, layer.memory_state = after.sink_state, after.memory_state
        return out

    def _bidirectional(self, q, k, v, mask) -> torch.Tensor:
        local = None
        if self.local:
            grid = _grid(q.shape[-2]) if self.image_grid else {}
            local = local_window_mask(q.shape[-2], self.window, **grid).to(q.device)
        return bidirectional_linear_attention(
            q, k, v, self.feature_q, self.feature_k, scale=self.layout.scale, local_mask=local,
            window_weight=self.window_weight(), key_mask=_key_mask(mask, q.shape[-2]),
            form="chunked", chunk_size=self.chunk_size,
        )


def _bind(layout: AttentionLayout, args: tuple, kwargs: dict) -> dict[str, Any]:
    """The original forward's arguments by name (cache under ``cache`` whatever it was called)."""
    bound = layout.signature.bind_partial(*args, **kwargs).arguments
    call: dict[str, Any] = {}
    for name, value in bound.items():
        param = layout.signature.parameters[name]
        if param.kind is param.VAR_KEYWORD:
            call.update(value)
        else:
            call[name] = value
    first = next(iter(layout.signature.parameters))
    call["hidden_states"] = call.get(first, call.get("hidden_states"))
    for alias in ("past_key_values", "past_key_value", "layer_past"):
        if call.get(alias) is not None and call.get("cache") is None:
            call["cache"] = call[alias]
    if "attention_mask" in call:
        call["attention_mask"] = dense_mask(call["attention_mask"])  # flex_attention's BlockMask -> bool tensor
    return call


class SinkWindowLayer(LinearAttentionAndSlidingWindowAttentionLayer):
    """transformers' linear + sliding-window cache layer plus the attention-sink slots of a hybrid layer.

    ``sink_state`` is ``(keys, values, valid)`` with a fixed number of slots (None before any token
    has left the window); ``memory_state`` the memory slots (``LinearizeAttention(memory=G)``); beam
    search reorders both with the rest of the layer.
    """

    def __init__(self, sliding_window: int, number_of_states: int = 1, **kwargs: Any) -> None:
        super().__init__(sliding_window=sliding_window, number_of_states=number_of_states, **kwargs)
        self.sink_state: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self.memory_state: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def reset(self) -> None:
        super().reset()
        self.sink_state = self.memory_state = None

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        for name in ("sink_state", "memory_state"):
            slots = getattr(self, name)
            if slots is not None:
                setattr(self, name, tuple(t.index_select(0, beam_idx.to(t.device)) for t in slots))


def _recurrent_layer(cache: Cache, idx: int, window: int) -> SinkWindowLayer:
    """This layer's cache entry as a linear + sliding-window (+ sinks) layer (installed on first use)."""
    # sliding_window >= 2: transformers keeps the last sliding_window - 1 tokens (0 would mean all)
    layer = layer_at(cache, idx, LinearAttentionAndSlidingWindowAttentionLayer,
                     lambda: SinkWindowLayer(sliding_window=max(window, 2)))
    for name in ("sink_state", "memory_state"):
        if not hasattr(layer, name):
            setattr(layer, name, None)   # a plain transformers layer (e.g. built from config.layer_types)
    return layer


def _key_mask(mask: torch.Tensor | None, n_keys: int) -> torch.Tensor | None:
    """(batch, n_keys) bool, False for padding keys, from transformers' 2-D or 4-D mask; None if no padding."""
    if mask is None or isinstance(mask, dict):
        return None
    if mask.dim() == 2:
        valid = mask[:, -n_keys:].bool()
    else:
        cols = mask[..., -n_keys:]
        allowed = cols if cols.dtype == torch.bool else cols > torch.finfo(cols.dtype).min / 2
        valid = allowed.any(dim=-2).all(dim=1) if allowed.dim() == 4 else allowed.any(dim=-2)
    if valid.shape[-1] < n_keys:
        return None
    if torch.compiler.is_compiling() or torch.compiler.is_exporting():
        return valid  # no data-dependent branch in captured graphs
    return None if bool(valid.all()) else valid


def _grid(n_tokens: int) -> dict[str, Any]:
    """A square patch grid (ViT: optional leading CLS token) for 2-D local windows; 1-D otherwise."""
    for prefix in (1, 0):
        side = math.isqrt(n_tokens - prefix)
        if side > 1 and side * side == n_tokens - prefix:
            return {"grid": (side, side), "n_prefix": prefix}
    return {}
