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
from typing import Any, Callable

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
OUTPUT_PROJ = ("o_proj", "c_proj", "out_proj", "wo", "Wo", "to_out", "dense")
QK_NORMS = (("q_norm", "k_norm"), ("q_layernorm", "k_layernorm"), ("query_layernorm", "key_layernorm"))


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
    fused_split: tuple[int, int, int] | None = None
    norm_placement: str = "per_head"
    use_rotary: bool = True
    own_window: int | None = None
    norm_after_rotary: bool = False

    @property
    def projection_names(self) -> list[str]:
        return [n for n in (self.q, self.k, self.v, self.fused, self.out) if n]


def _linear_out(module: nn.Module) -> int | None:
    """Output features of nn.Linear, GPT-2's Conv1D (weight (in, out)) or a peft layer wrapping one."""
    base = getattr(module, "base_layer", None)
    if isinstance(base, nn.Module) and type(module).__module__.startswith("peft."):
        return _linear_out(base)
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


def _config_value(config, name: str):
    """``config.<name>`` or None (per-layer configs raise on ambiguous global reads: treat as unknown)."""
    try:
        return getattr(config, name, None)
    except Exception:  # transformers' AmbiguousGlobalPerLayerAttributeError and the like
        return None


def _rotary_function(module: nn.Module) -> Callable | None:
    """The family's own ``apply_rotary_pos_emb`` (from the module's modeling file), if it has one."""
    return getattr(sys.modules.get(type(module).__module__), "apply_rotary_pos_emb", None)


def describe(module: nn.Module, fqn: str) -> AttentionLayout | None:
    """The layout of ``module`` if it looks like self-attention, else ``None``; raises on inconsistent sizes."""
    separate, fused = _projections(module)
    if separate is None and fused is None:
        return None
    if getattr(module, "is_cross_attention", False) or re.search(r"(encoder_attn|cross_?attn|crossattention)$", fqn):
        return None
    config = getattr(module, "config", None)
    children = dict(module.named_children())
    total = _linear_out(children[fused]) if fused else None
    if separate:
        q_out, k_out = _linear_out(children[separate[0]]), _linear_out(children[separate[1]])
    n_heads = _first_int(getattr(module, "num_heads", None), getattr(module, "num_attention_heads", None),
                         getattr(module, "n_head", None), _config_value(config, "num_attention_heads"))
    head_dim = _first_int(getattr(module, "head_dim", None), getattr(module, "attention_head_size", None),
                          _config_value(config, "head_dim"))
    if n_heads is None and head_dim is None:
        raise PlanError(f"{fqn}: cannot tell the number of heads (no num_heads / head_dim on the module or its config)")
    if fused:
        q_out, k_out = _fused_sizes(module, config, fqn, fused, total, n_heads, head_dim)
    head_dim = head_dim or q_out // n_heads
    n_heads = n_heads or q_out // head_dim
    if separate and n_heads and head_dim and q_out == 2 * n_heads * head_dim:
        raise ConfigError(f"{fqn}.{separate[0]}: the q projection has 2 × {n_heads} heads × head_dim {head_dim} outputs: "
                          "queries packed with an output gate (Qwen3-Next style), which linear attention does not "
                          "apply; leave these layers out (layers=[...])")
    if n_heads * head_dim != q_out or k_out % head_dim:
        raise ConfigError(f"{fqn}: head sizes don't divide: q projection has {q_out} outputs for {n_heads} heads × "
                          f"head_dim {head_dim}, k projection {k_out}; fix the config's num_attention_heads / head_dim")
    n_kv = k_out // head_dim
    if n_heads % n_kv:
        raise ConfigError(f"{fqn}: {n_heads} query heads are not a multiple of {n_kv} key/value heads (GQA needs it)")
    scale = getattr(module, "scaling", None)
    scale = float(scale) if isinstance(scale, (int, float)) else head_dim ** -0.5
    causal = bool(getattr(module, "is_causal", _config_value(config, "is_decoder")))
    params = inspect.signature(module.forward).parameters
    cache_arg = next((n for n in ("cache", "past_key_values", "past_key_value", "layer_past") if n in params), None)
    out = next((n for n in OUTPUT_PROJ if n in children and _linear_out(children[n])), None)
    norms = next(((a, b) for a, b in QK_NORMS if a in children and b in children), (None, None))
    layer_idx = getattr(module, "layer_idx", None)
    own_window = _own_window(module, config, layer_idx)
    return AttentionLayout(
        q=separate[0] if separate else None, k=separate[1] if separate else None, v=separate[2] if separate else None,
        fused=fused, out=out, n_heads=n_heads, n_kv_heads=n_kv, head_dim=head_dim, scale=scale, causal=causal,
        q_norm=norms[0], k_norm=norms[1], layer_idx=layer_idx if isinstance(layer_idx, int) else None,
        cache_arg=cache_arg, signature=inspect.signature(module.forward), rotary=_rotary_function(module),
        fused_split=(q_out, k_out, total - q_out - k_out) if fused else None,
        norm_placement=norm_placement(module, norms[0], n_heads, head_dim, fqn) if norms[0] else "per_head",
        use_rotary=bool(getattr(module, "use_rope", True)),
        norm_after_rotary=bool(norms[0]) and _called_after_rotary(module, norms[0]),
        own_window=own_window,
    )


def _own_window(module: nn.Module, config, layer_idx) -> int | None:
    """The model's own sliding window for this layer: the module's ``sliding_window``, else the config's
    (per layer through ``layer_types`` when it has them, else for every layer); None for global attention."""
    if hasattr(module, "sliding_window"):
        value = module.sliding_window
    else:
        value = _config_value(config, "sliding_window")
        kinds = _config_value(config, "layer_types")
        if isinstance(kinds, (list, tuple)) and isinstance(layer_idx, int) and layer_idx < len(kinds):
            value = value if kinds[layer_idx] in ("sliding_attention", "chunked_attention") else None
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def _fused_sizes(module: nn.Module, config, fqn: str, fused: str, total: int, n_heads: int | None,
                 head_dim: int | None) -> tuple[int, int]:
    """(q, k) output sizes of a fused q | k | v projection: q has the query heads, k and v split the rest
    equally (any heads / kv-heads split: GPT-2, Phi-3-medium / Phi-4 GQA, GPTBigCode multi-query)."""
    if n_heads and head_dim and total > n_heads * head_dim:
        q_out = n_heads * head_dim
        k_out = (total - q_out) // 2
        if q_out + 2 * k_out == total and k_out % head_dim == 0:
            return q_out, k_out
    elif n_heads is None and total % 3 == 0:
        return total // 3, total // 3
    elif head_dim is None and n_heads and total % 3 == 0:
        return total // 3, total // 3
    raise PlanError(f"{fqn}.{fused}: fused qkv projection has {total} outputs, which is not q | k | v for "
                    f"{n_heads} query heads of head_dim {head_dim} plus equal key and value parts; set the module's "
                    "or the config's num_attention_heads / head_dim to the projection's layout")


def _called_after_rotary(module: nn.Module, name: str) -> bool:
    """Whether the forward calls ``self.<name>(`` after applying rotary (NanoChat, HunYuan), read from its source."""
    try:
        src = inspect.getsource(type(module).forward)
    except (OSError, TypeError):
        return False
    norm, rotary = src.find(f"self.{name}("), src.find("rotary")
    return norm >= 0 and 0 <= rotary < norm


def norm_placement(module: nn.Module, name: str, n_heads: int, head_dim: int | None, fqn: str) -> str:
    """Where a q/k norm applies, read from its parameters: ``flat`` over the whole projection (OLMo),
    ``per_head`` over each head's last dim (Qwen3, weightless RMS/L2 norms, Cohere's (heads, head_dim)
    weight on (…, heads, head_dim)), or ``heads_first`` for a list of per-head norms on (B, H, T, D)
    (StableLM's ``qk_layernorm``)."""
    norm = getattr(module, name)
    weight = getattr(norm, "weight", None)
    if isinstance(weight, torch.Tensor):
        if head_dim and weight.dim() == 1 and weight.numel() == head_dim:
            return "per_head"
        if head_dim and weight.dim() == 2 and weight.shape[-1] == head_dim:
            return "per_head"
        if weight.dim() == 1:
            return "flat"
    parts = [m for m in norm.children() if isinstance(m, nn.ModuleList)]
    if parts and len(parts[0]) == n_heads:
        return "heads_first"
    if not list(norm.parameters()):
        return "per_head"
    shapes = {n: tuple(p.shape) for n, p in norm.named_parameters()}
    raise ConfigError(f"{fqn}.{name} ({type(norm).__name__}, parameters {shapes}): surgeon cannot tell whether this "
                      f"q/k norm applies per head (head_dim {head_dim}) or over the whole projection; "
                      "leave this layer out (layers=[...]) or open an issue with this message")


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


def qk_heads(layout: AttentionLayout, y: torch.Tensor, norm: nn.Module | None) -> torch.Tensor:
    """A q or k projection (B, T, H·D) as heads (B, H, T, D), through its q/k norm where the model applies it."""
    if layout.norm_after_rotary:
        norm = None                              # applied by position_qk
    if norm is not None and layout.norm_placement == "flat":
        y = norm(y)
    y = y.view(*y.shape[:-1], -1, layout.head_dim)
    if norm is not None and layout.norm_placement == "per_head":
        y = norm(y)
    y = y.transpose(1, 2)
    if norm is not None and layout.norm_placement == "heads_first":
        y = norm(y)
    return y


def position_qk(layout: AttentionLayout, q: torch.Tensor, k: torch.Tensor, position_embeddings: Any,
                owner: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary (when the model passes cos/sin), then the q/k norms that the model applies after rotary."""
    if position_embeddings is not None:
        q, k = apply_rotary(layout, q, k, *position_embeddings)
    if layout.norm_after_rotary:
        q, k = getattr(owner, layout.q_norm)(q), getattr(owner, layout.k_norm)(k)
    return q, k


def apply_rotary(layout: AttentionLayout, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
                 sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The family's own rotary function when it has one, else the standard rotate-half form.

    Layers without rotary (``use_rotary`` False: SmolLM3's NoPE layers) pass q, k through; a rotary
    table narrower than head_dim (partial rotary: StableLM, Phi) rotates the leading dims only.
    """
    if not layout.use_rotary:
        return q, k
    rot = cos.shape[-1]
    if rot < q.shape[-1]:
        (q_rot, q_pass), (k_rot, k_pass) = q.split([rot, q.shape[-1] - rot], -1), k.split([rot, k.shape[-1] - rot], -1)
        q_rot, k_rot = apply_rotary(layout, q_rot, k_rot, cos, sin)
        return torch.cat([q_rot, q_pass], -1), torch.cat([k_rot, k_pass], -1)
    if layout.rotary is not None:
        return layout.rotary(q, k, cos, sin)
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
