"""Plan-time checks of the module-swap path: refuse what would be converted wrong, before touching the model.

Example:
    >>> import transformers
    >>> from surgeon.passes.attention.layout import find_attention_modules
    >>> cfg = transformers.MistralConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, sliding_window=16,
    ...                                  num_attention_heads=4, num_key_value_heads=2, vocab_size=50)
    >>> model = transformers.MistralForCausalLM(cfg)
    >>> check_modules(model, find_attention_modules(model), window=16)[1] is None   # probed: nothing to correct
    True
    >>> check_modules(model, find_attention_modules(model), window=32, verify=False)
    Traceback (most recent call last):
    ...
    surgeon.core.errors.ConfigError: LinearizeAttention cannot convert 2 attention modules exactly:
      model.layers.0.self_attn: the model's own sliding window is 16 tokens, smaller than window=32 (the softmax part would see keys the model never attended to); choose window <= 16
      model.layers.1.self_attn: the model's own sliding window is 16 tokens, smaller than window=32 (the softmax part would see keys the model never attended to); choose window <= 16
    Leave these modules out (layers=[...] or exclude=[...]) or change the setting named above; the model was not changed.
"""
from __future__ import annotations

import torch.nn as nn

from surgeon.core.errors import ConfigError
from surgeon.passes.attention.layout import AttentionLayout
from surgeon.passes.attention.semantics import unsupported_features


ATTENTION_LAYER_TYPES = (None, "full_attention", "sliding_attention", "attention", "global", "local")


def _layer_type(model: nn.Module, layer: int | None) -> str | None:
    config = getattr(unwrap_peft(model), "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        try:
            config = config.get_text_config()
        except Exception:  # several text configs: keep the top-level one
            pass
    try:
        kinds = getattr(config, "layer_types", None)
    except Exception:
        return None
    if isinstance(kinds, (list, tuple)) and isinstance(layer, int) and 0 <= layer < len(kinds):
        return kinds[layer]
    return None


def unwrap_peft(model: nn.Module) -> nn.Module:
    """The transformers model inside a peft wrapper (``PeftModel`` → its base model), else ``model``."""
    if type(model).__module__.startswith("peft.") and hasattr(model, "get_base_model"):
        return model.get_base_model()
    return model


def linearized_modules(model: nn.Module) -> list[str]:
    """Paths of attention modules this pass already swapped in."""
    from surgeon.passes.attention.module import LinearAttention

    return [n for n, m in model.named_modules() if isinstance(m, LinearAttention)]


def check_modules(model: nn.Module, found: list[tuple[str, AttentionLayout]], window: int,
                  verify: bool = True, layer_of: dict[str, int] | None = None
                  ) -> tuple[dict[str, AttentionLayout], str | None]:
    """Raise ConfigError naming every module that would not be converted exactly; return the layouts the probe
    corrected and why nothing was probed (None when the probe ran).

    Structural reasons first (unknown submodules, own parameters, soft-capping…), then the model's own
    sliding window against ``window``, then (``verify``) the numerical probe of :mod:`attention_probe`.
    """
    reasons: dict[str, list[str]] = {}
    for fqn, lay in found:
        module = model.get_submodule(fqn)
        known = lay.projection_names + [n for n in (lay.q_norm, lay.k_norm) if n]
        why = unsupported_features(module, fqn, known)
        kind = _layer_type(model, (layer_of or {}).get(fqn, lay.layer_idx))
        if kind not in ATTENTION_LAYER_TYPES:
            why.append(f"its cache layer is a {kind!r} layer (config.layer_types): the model keeps its own recurrent "
                       "state there, which the linear-attention state would overwrite")
        if lay.own_window is not None and window > lay.own_window:
            why.append(f"the model's own sliding window is {lay.own_window} tokens, smaller than window={window} "
                       "(the softmax part would see keys the model never attended to); "
                       f"choose window <= {lay.own_window}")
        if why:
            reasons[fqn] = why
    corrected: dict[str, AttentionLayout] = {}
    unverified = None if verify else "not asked for"
    if verify and not reasons:
        from surgeon.passes.attention.probe import probe_attention

        result = probe_attention(model, found, layer_of)
        reasons.update({fqn: [why] for fqn, why in result.mismatches.items()})
        corrected, unverified = result.layouts, result.skipped
    if reasons:
        lines = [f"  {fqn}: {'; '.join(why)}" for fqn, why in reasons.items()]
        raise ConfigError(f"LinearizeAttention cannot convert {len(reasons)} attention modules exactly:\n"
                          + "\n".join(lines) + "\nLeave these modules out (layers=[...] or exclude=[...]) or change "
                          "the setting named above; the model was not changed.")
    return corrected, unverified


def match_original(new: nn.Module, original: nn.Module, kept: list[str]) -> None:
    """Put ``new``'s own parameters (those not in ``kept`` submodules) on ``original``'s device and dtype.

    Floating-point parameters take the dtype of the original's floating-point weights; on ``meta`` they
    stay uninitialised like the rest of the model.
    """
    ref = next((p for p in original.parameters() if p.is_floating_point()), None)
    if ref is None:
        return
    for name, module in new.named_modules():
        if name.split(".")[0] in kept:
            continue
        for pname, param in list(module.named_parameters(recurse=False)):
            if param.device != ref.device or (param.is_floating_point() and param.dtype != ref.dtype):
                data = param.data.to(device=ref.device, dtype=ref.dtype if param.is_floating_point() else None)
                module._parameters[pname] = nn.Parameter(data, requires_grad=param.requires_grad)
        for bname, buf in list(module.named_buffers(recurse=False)):
            if buf is not None and buf.device != ref.device:
                module._buffers[bname] = buf.to(ref.device)
