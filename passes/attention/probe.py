"""Check numerically, before any change, that the swapped module reproduces each attention module.

One short forward of the model (``PROBE_TOKENS`` tokens, eval mode, no cache) records each candidate
module's inputs and output; the linear-attention module built with a window covering the probe
(exact softmax) must reproduce that output. A module that computes something surgeon does not read
(a different attention rule, an unusual norm order, relative positions…) is then refused at plan
time with the measured difference, instead of being converted silently wrong. Models on the
``meta`` device or without a way to build inputs are not probed (the report says so).

Example:
    >>> import torch, transformers
    >>> from surgeon.passes.attention.layout import find_attention_modules
    >>> cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
    ...                                num_attention_heads=4, num_key_value_heads=2, vocab_size=50)
    >>> model = transformers.LlamaForCausalLM(cfg)
    >>> result = probe_attention(model, find_attention_modules(model))
    >>> result.mismatches, result.skipped
    ({}, None)
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any

import torch
import torch.nn as nn

from surgeon.passes.attention.layout import AttentionLayout

PROBE_TOKENS = 8
CACHE_ARGS = ("cache", "past_key_values", "past_key_value", "layer_past")


@dataclass
class ProbeResult:
    """``mismatches``: fqn -> why the swap would not reproduce it; ``skipped``: why nothing was probed."""

    mismatches: dict[str, str] = field(default_factory=dict)
    skipped: str | None = None
    layouts: dict[str, AttentionLayout] = field(default_factory=dict)  # reading changed by the probe


def _inputs(model: nn.Module) -> dict[str, torch.Tensor] | None:
    config = getattr(model, "config", None)
    name = getattr(model, "main_input_name", "input_ids")
    device = next(model.parameters()).device
    if name == "input_ids":
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        vocab = getattr(text, "vocab_size", None) or 2
        ids = torch.randint(0, min(vocab, 1000), (1, PROBE_TOKENS), generator=torch.Generator().manual_seed(0))
        return {"input_ids": ids.to(device)}
    if name == "pixel_values" and isinstance(getattr(config, "image_size", None), int):
        shape = (1, getattr(config, "num_channels", 3), config.image_size, config.image_size)
        dtype = next(model.parameters()).dtype
        return {"pixel_values": torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(device, dtype)}
    return None


def probe_inputs(model: nn.Module) -> dict[str, torch.Tensor] | None:
    """A short synthetic input for ``model`` (token ids or an image), or None when none can be built."""
    return _inputs(model)


def _record(model: nn.Module, found: list[tuple[str, AttentionLayout]], inputs: dict) -> dict[str, tuple]:
    calls: dict[str, tuple] = {}
    hooks = []
    for fqn, _ in found:
        def hook(module, args, kwargs, output, fqn=fqn):
            calls.setdefault(fqn, (args, dict(kwargs), output))
        hooks.append(model.get_submodule(fqn).register_forward_hook(hook, with_kwargs=True))
    try:
        probe_forward(model, inputs)
    finally:
        for h in hooks:
            h.remove()
    return calls


def probe_forward(model: nn.Module, inputs: dict) -> Any:
    """One forward of ``model`` on ``inputs`` in eval mode without gradients and without a cache where the model
    takes ``use_cache``; every module's training flag is set back afterwards."""
    modes = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        with torch.no_grad():
            try:
                return model(**inputs, use_cache=False)
            except TypeError:
                return model(**inputs)
    finally:
        for m, mode in modes:
            m.training = mode


def _first(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


def _structure(output: Any) -> str:
    if isinstance(output, (tuple, list)):
        return f"a {type(output).__name__} of {len(output)}"
    return type(output).__name__


def probe_attention(model: nn.Module, found: list[tuple[str, AttentionLayout]],
                    layer_of: dict[str, int] | None = None) -> ProbeResult:
    """Run the probe; see the module docstring."""
    from surgeon.passes.attention.config import LinearizeAttention
    from surgeon.passes.attention.module import LinearAttention

    params = list(model.parameters())
    if not params or any(p.is_meta for p in params):
        return ProbeResult(skipped="parameters on the meta device")
    inputs = _inputs(model)
    if inputs is None:
        return ProbeResult(skipped=f"no probe input for main input {getattr(model, 'main_input_name', '?')!r}")
    try:
        calls = _record(model, found, inputs)
    except Exception as e:  # the model's own forward on a synthetic input: report, don't guess
        return ProbeResult(skipped=f"probe forward failed ({type(e).__name__}: {str(e)[:120]})")
    result = ProbeResult()
    names = {f.name for f in fields(LinearizeAttention)}
    for position, (fqn, layout) in enumerate(found):
        if fqn not in calls:
            result.mismatches[fqn] = ("not called by a plain forward of the model (cross-attention, or unused): "
                                      "surgeon cannot tell what it attends to")
            continue
        args, kwargs, output = calls[fqn]
        kwargs = {k: (None if k in CACHE_ARGS else v) for k, v in kwargs.items()}
        original = model.get_submodule(fqn)
        layer = (layer_of or {}).get(fqn, position)
        errors = []
        # the static reading first, then the alternatives a module's attributes cannot always tell:
        # rotary skipped on this layer (Cohere2's global layers), causality set by the model's mask only
        for candidate in (layout, replace(layout, use_rotary=not layout.use_rotary),
                          replace(layout, causal=not layout.causal)):
            exact = LinearizeAttention(feature_map="elu1", window=PROBE_TOKENS * 4, local=not candidate.causal,
                                       gate="none", **({"sinks": 0} if "sinks" in names else {}))
            try:
                swapped = LinearAttention(original, candidate, exact, layer, candidate.causal)
                swapped.to(device=params[0].device)
                with torch.no_grad():
                    returned = swapped(*args, **kwargs)
                got, ref = _first(returned), _first(output)
                if _structure(returned) != _structure(output):
                    errors.append(f"{type(original).__name__} returns {_structure(output)}, the swapped module "
                                  f"{_structure(returned)}: its caller expects another output format")
                    continue
                err = (got.double() - ref.double()).abs().max().item() / max(ref.double().abs().max().item(), 1e-6)
            except Exception as e:
                errors.append(f"the swapped module fails on this module's inputs ({type(e).__name__}: {e})")
                continue
            if err <= (1e-3 if ref.dtype in (torch.float32, torch.float64) else 5e-2):
                if candidate is not layout:
                    result.layouts[fqn] = candidate
                break
            errors.append(f"with a window covering all {PROBE_TOKENS} probe tokens (exact softmax) the swapped "
                          f"module differs from {type(original).__name__} by {err:.1e} (relative): the module "
                          "computes something surgeon does not read")
        else:
            result.mismatches[fqn] = errors[0]
    return result
