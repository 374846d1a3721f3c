"""Find Hugging Face attention modules structurally and describe how to compute their q, k, v.

No per-family code: a module is attention when its children include query/key/value projections
under a known spelling (``q_proj/k_proj/v_proj``, BERT's ``query/key/value``, ``q/k/v``, ``wq/wk/wv``,
``to_q/to_k/to_v``) or a fused GPT-2 style ``c_attn`` / ``qkv_proj`` / ``qkv`` / ``Wqkv`` (q | k | v
along the output dim). Head counts come from the module, its config, or the projection shapes.

Example:
    >>> import transformers
    >>> cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
    ...                                num_attention_heads=4, num_key_value_heads=2, vocab_size=50)
    >>> model = transformers.LlamaForCausalLM(cfg)
    >>> [(name, lay.n_heads, lay.n_kv_heads, lay.head_dim, lay.causal) for name, lay in find_attention_modules(model)]
    [('model.layers.0.self_attn', 4, 2, 8, True), ('model.layers.1.self_attn', 4, 2, 8, True)]
"""
from __future__ import annotations

import inspect
import re
import sys
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn

from surgeon.core.errors import ConfigError, PlanError

SEPARATE_QKV = (
    ("q_proj", "k_proj", "v_proj"),
    ("query", "key", "value"),
    ("q", "k", "v"),
    ("wq", "wk", "wv"),
    ("to_q", "to_k", "to_v"),
)
FUSED_QKV = ("c_attn", "qkv_proj", "qkv", "Wqkv")
OUTPUT_PROJ = ("o_proj", "c_proj", "out_proj", "wo", "to_out", "dense")
QK_NORMS = (("q_norm", "k_norm"), ("q_layernorm", "k_layernorm"))


@dataclass
class AttentionLayout:
    """How one attention module computes q, k, v and its output."""

    q: str | None
    k: str | None
    v: str | None
    fused: str | None
    out: str | None
    n_heads: int
    n_kv_heads: int
    head_dim: int
    scale: float
    causal: bool
    q_norm: str | None
    k_norm: str | None
    layer_idx: int | None
    cache_arg: str | None
    signature: inspect.Signature
    rotary: Callable | None

    @property
    def projection_names(self) -> list[str]:
        return [n for n in (self.q, self.k, self.v, self.fused, self.out) if n]


def _linear_out(module: nn.Module) -> int | None:
    """Output features of nn.Linear or GPT-2's Conv1D (weight (in, out))."""
    if isinstance(module, nn.Linear):
        return module.out_features
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):
        return module.nf
    return None


def _projections(module: nn.Module) -> tuple[tuple[str, str, str] | None, str | None]:
    children = dict(module.named_children())
    for names in SEPARATE_QKV:
        if all(n in children and _linear_out(children[n]) for n in names):
            return names, None
    for name in FUSED_QKV:
        if name in children and _linear_out(children[name]):
            return None, name
    return None, None


def _first_int(*values) -> int | None:
    for v in values:
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            return v
    return None


def _rotary_function(module: nn.Module) -> Callable | None:
    """The family's own ``apply_rotary_pos_emb`` (from the module's modeling file), if it has one."""
    return getattr(sys.modules.get(type(module).__module__), "apply_rotary_pos_emb", None)


def describe(module: nn.Module, fqn: str) -> AttentionLayout | None:
    """The layout of ``module`` if it looks like self-attention, else ``None``; raises on inconsistent sizes."""
    separate, fused = _projections(module)
    if separate is None and fused is None:
        return None
    if getattr(module, "is_cross_attention", False):
        return None
    config = getattr(module, "config", None)
    children = dict(module.named_children())
    if separate:
        q_out, k_out = _linear_out(children[separate[0]]), _linear_out(children[separate[1]])
    else:
        total = _linear_out(children[fused])
        if total % 3:
            raise PlanError(f"{fqn}.{fused}: fused qkv projection has {total} outputs, not divisible by 3 (q | k | v)")
        q_out = k_out = total // 3
    n_heads = _first_int(getattr(module, "num_heads", None), getattr(module, "num_attention_heads", None),
                         getattr(config, "num_attention_heads", None))
    head_dim = _first_int(getattr(module, "head_dim", None), getattr(module, "attention_head_size", None),
                          getattr(config, "head_dim", None))
    if n_heads is None and head_dim is None:
        raise PlanError(f"{fqn}: cannot tell the number of heads (no num_heads / head_dim on the module or its config)")
    head_dim = head_dim or q_out // n_heads
    n_heads = n_heads or q_out // head_dim
    if n_heads * head_dim != q_out or k_out % head_dim:
        raise ConfigError(f"{fqn}: head sizes don't divide: q projection has {q_out} outputs for {n_heads} heads × "
                          f"head_dim {head_dim}, k projection {k_out}; fix the config's num_attention_heads / head_dim")
    n_kv = k_out // head_dim
    if n_heads % n_kv:
        raise ConfigError(f"{fqn}: {n_heads} query heads are not a multiple of {n_kv} key/value heads (GQA needs it)")
    scale = getattr(module, "scaling", None)
    scale = float(scale) if isinstance(scale, (int, float)) else head_dim ** -0.5
    causal = bool(getattr(module, "is_causal", getattr(config, "is_decoder", False)))
    params = inspect.signature(module.forward).parameters
    cache_arg = next((n for n in ("cache", "past_key_values", "past_key_value", "layer_past") if n in params), None)
    out = next((n for n in OUTPUT_PROJ if n in children and _linear_out(children[n])), None)
    norms = next(((a, b) for a, b in QK_NORMS if a in children and b in children), (None, None))
    layer_idx = getattr(module, "layer_idx", None)
    return AttentionLayout(
        q=separate[0] if separate else None, k=separate[1] if separate else None, v=separate[2] if separate else None,
        fused=fused, out=out, n_heads=n_heads, n_kv_heads=n_kv, head_dim=head_dim, scale=scale, causal=causal,
        q_norm=norms[0], k_norm=norms[1], layer_idx=layer_idx if isinstance(layer_idx, int) else None,
        cache_arg=cache_arg, signature=inspect.signature(module.forward), rotary=_rotary_function(module),
    )


def is_transformers_module(module: nn.Module) -> bool:
    """Defined by Hugging Face transformers (their models no longer trace with torch.fx: swap modules)."""
    return type(module).__module__.startswith("transformers.")


def find_attention_modules(model: nn.Module) -> list[tuple[str, AttentionLayout]]:
    """Every transformers self-attention module of ``model`` in module order, with its layout (outermost wins).

    Attention in user code (not from transformers) is left to the FX path, which sees its actual math.
    """
    found: list[tuple[str, AttentionLayout]] = []
    for fqn, module in model.named_modules():
        if not fqn or not is_transformers_module(module) or any(fqn.startswith(p + ".") for p, _ in found):
            continue
        layout = describe(module, fqn)
        if layout is not None:
            found.append((fqn, layout))
    return found


def layer_index(fqn: str, layout: AttentionLayout, position: int) -> int:
    """The decoder-layer index of an attention module: its ``layer_idx``, else the number in its path."""
    if layout.layer_idx is not None:
        return layout.layer_idx
    numbers = re.findall(r"\.(\d+)(?:\.|$)", "." + fqn)
    return int(numbers[-1]) if numbers else position


def module_types(model: nn.Module, limit: int = 12) -> list[str]:
    """Distinct module class names of ``model`` (for errors that must say what was found)."""
    seen: list[str] = []
    for m in model.modules():
        name = type(m).__name__
        if name not in seen:
            seen.append(name)
    return seen[:limit] + (["..."] if len(seen) > limit else [])


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(layout: AttentionLayout, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
                 sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The family's own rotary function when it has one, else the standard rotate-half form."""
    if layout.rotary is not None:
        return layout.rotary(q, k, cos, sin)
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
