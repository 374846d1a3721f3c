"""What a Hugging Face attention module computes beyond ``softmax(q·kᵀ·scale + mask)·v``, read from the module.

The swapped module reproduces projections, q/k norms (see ``attention_layout``), rotary (full,
partial, or none per layer), GQA, the scale and padding. Anything else a module carries is a
feature surgeon would silently drop, so it is refused at plan time with its name: extra child
modules (output gates, sub-norms, convolutions, differential-attention group norms), parameters
held directly by the attention module (gpt-oss sinks, DiffLlama's λ), logit soft-capping,
temperature tuning, ALiBi and relative position embeddings.

Example:
    >>> import transformers
    >>> cfg = transformers.Gemma2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2, head_dim=8,
    ...                                 num_attention_heads=4, num_key_value_heads=2, vocab_size=50)
    >>> model = transformers.Gemma2ForCausalLM(cfg)
    >>> unsupported_features(model.model.layers[0].self_attn, "model.layers.0.self_attn", ["q_proj", "k_proj", "v_proj", "o_proj"])
    ['logit soft-capping (attn_logit_softcapping=50.0)']
"""
from __future__ import annotations

import torch.nn as nn

SOFTCAP_ATTRS = ("attn_logit_softcapping", "softcap", "logit_softcapping", "attn_softcapping")
RELATIVE_POSITIONS = ("relative_key", "relative_key_query")


def _set(value: object) -> bool:
    return value is not None and value is not False and value != 0


def unsupported_features(module: nn.Module, fqn: str, known_children: list[str]) -> list[str]:
    """Features of ``module`` that linear attention would drop (empty: everything is understood)."""
    config = getattr(module, "config", None)
    reasons = []
    extra = [name for name, child in module.named_children()
             if name not in known_children and not isinstance(child, (nn.Dropout, nn.Identity))]
    if extra:
        kinds = ", ".join(f"{n} ({type(module.get_submodule(n)).__name__})" for n in extra)
        reasons.append(f"extra submodules the swapped attention would not apply: {kinds}")
    own = [name for name, _ in module.named_parameters(recurse=False)]
    if own:
        reasons.append(f"parameters held by the attention module itself: {', '.join(own)} (e.g. attention sinks "
                       "or differential-attention weights)")
    for attr in SOFTCAP_ATTRS:
        for holder in (module, config):
            value = getattr(holder, attr, None)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
                reasons.append(f"logit soft-capping ({attr}={value})")
                break
        else:
            continue
        break
    if _set(getattr(module, "attn_temperature_tuning", None)):
        reasons.append("attention temperature tuning (attn_temperature_tuning)")
    kind = getattr(module, "position_embedding_type", getattr(config, "position_embedding_type", None))
    if kind in RELATIVE_POSITIONS:
        reasons.append(f"relative position embeddings (position_embedding_type={kind!r})")
    if _set(getattr(config, "alibi", None)) or _set(getattr(config, "use_alibi", None)):
        reasons.append("ALiBi position biases")
    return reasons
