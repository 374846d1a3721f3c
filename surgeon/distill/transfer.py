"""Stage 1, attention transfer: train each linearized layer's new parameters to reproduce its softmax output.

Every ``LinearAttention`` in transfer mode computes the original softmax attention of its own q/k/v
under ``no_grad``, returns it (so later layers see exactly the teacher's activations) and records
``(linear, softmax)`` per-head outputs. Because of that teacher forcing the layers are independent:

* ``layer`` / ``block`` mode: one no-grad forward of the model caches each layer's inputs (the
  arguments its attention module receives), then each block of layers trains on its cached inputs
  alone, so a step costs ``block_size`` attention modules, not the model;
* ``joint`` mode: every step is one forward of the whole model and the loss sums all layers (LoLCATs).

The projections (q/k/v/o) are frozen and stay bit-identical. ``original_attention(unit)`` rebuilds the
module a layer replaced (same class, config and layer index, sharing the projections), which is how
``keep_softmax=k`` puts the k worst layers back.

Example:
    >>> import transformers, surgeon
    >>> from surgeon.passes import LinearizeAttention
    >>> cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
    ...                                num_attention_heads=4, num_key_value_heads=2, vocab_size=50)
    >>> model = surgeon.apply(transformers.LlamaForCausalLM(cfg), LinearizeAttention(window=4)).model
    >>> [name for name, _ in linear_units(model)]
    ['model.layers.0.self_attn', 'model.layers.1.self_attn']
    >>> sorted({n.split(".")[0] for n in new_parameters(linear_units(model)[0][1])})
    ['feature_k', 'feature_q', 'linear_log_weight', 'window_logit']
    >>> type(original_attention(model, 'model.layers.1.self_attn')).__name__
    'LlamaAttention'
"""
from __future__ import annotations

import sys
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from surgeon.core.errors import ConfigError
from surgeon.fx.tracing import get_submodule, set_submodule
from surgeon.passes.attention.module import LinearAttention

_NORMS = ("q_norm", "k_norm", "q_layernorm", "k_layernorm")
_CACHE_KEYS = ("past_key_values", "past_key_value", "layer_past", "cache", "use_cache", "cache_position")


def is_linear_unit(module: nn.Module) -> bool:
    return isinstance(module, LinearAttention)


def linear_units(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(qualified name, LinearAttention)`` of every linearized layer, in model order."""
    return [(n, m) for n, m in model.named_modules() if is_linear_unit(m)]


def require_units(model: nn.Module) -> list[tuple[str, nn.Module]]:
    units = linear_units(model)
    if not units:
        kinds = sorted({type(m).__name__ for m in model.modules() if "attention" in type(m).__name__.lower()})
        raise ConfigError(f"{type(model).__name__} has no linearized attention layer (attention modules found: "
                          f"{kinds or 'none'}); run surgeon.apply(model, LinearizeAttention(...)) first and "
                          "distill the returned surgery.model")
    return units


def new_parameters(unit: nn.Module) -> dict[str, nn.Parameter]:
    """The parameters a linearized layer added (feature maps, window weights, gates), by local name."""
    keep = set(unit.layout.projection_names) | set(_NORMS)
    return {n: p for n, p in unit.named_parameters() if n.split(".")[0] not in keep}


def stage1_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every new parameter of every linearized layer, by qualified name (what stage 1 changes)."""
    return {f"{name}.{n}": p.detach().clone() for name, unit in linear_units(model)
            for n, p in new_parameters(unit).items()}


def load_stage1_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy ``stage1_state`` tensors back (layers restored to softmax since are skipped)."""
    params = {f"{name}.{n}": p for name, unit in linear_units(model) for n, p in new_parameters(unit).items()}
    with torch.no_grad():
        for key, value in state.items():
            if key in params:
                params[key].copy_(value)


def set_transfer(model: nn.Module, on: bool) -> None:
    for _, unit in linear_units(model):
        unit.transfer = on
        if not on:
            unit.transfer_pair = None


def pair_mse(unit: nn.Module) -> torch.Tensor:
    student, teacher = unit.transfer_pair
    return F.mse_loss(student.float(), teacher.float())


# -- cached layer inputs ------------------------------------------------------------------------------
class LayerInputs:
    """The arguments each chosen layer's attention received, one entry per packed sequence."""

    def __init__(self) -> None:
        self.items: dict[str, list[tuple[tuple, dict]]] = {}

    @torch.no_grad()
    def capture(self, model: nn.Module, units: list[tuple[str, nn.Module]], packs: torch.Tensor, batch: int) -> None:
        device = next(model.parameters()).device
        store = {name: [] for name, _ in units}
        hooks = []

        last = max(units, key=lambda item: getattr(item[1], "layer_idx", 0))[0]   # runs last

        def hook_for(name):
            def hook(module, args, kwargs):
                args = tuple(_detach(a) for a in args)
                kwargs = {k: _detach(v) for k, v in kwargs.items() if k not in _CACHE_KEYS}
                store[name].append((args, kwargs))
                if name == last:
                    raise _CaptureDone   # later layers and the LM head are not needed
            return hook

        for name, unit in units:
            hooks.append(unit.register_forward_pre_hook(hook_for(name), with_kwargs=True))
        was = model.training
        model.eval()
        set_transfer(model, True)
        try:
            for i in range(0, packs.shape[0], batch):
                try:
                    model(input_ids=packs[i:i + batch].to(device), use_cache=False)
                except _CaptureDone:
                    pass
        finally:
            for h in hooks:
                h.remove()
            set_transfer(model, False)
            model.train(was)
        for name, calls in store.items():
            self.items[name] = [item for args, kwargs in calls for item in _split(args, kwargs)]

    def batch(self, name: str, indices: list[int]) -> tuple[tuple, dict]:
        chosen = [self.items[name][i] for i in indices]
        if len(chosen) == 1:
            return chosen[0]
        return _collate([c[0] for c in chosen]), {k: _collate([c[1][k] for c in chosen]) for k in chosen[0][1]}

    def clear(self) -> None:
        self.items.clear()


class _CaptureDone(Exception):
    """Raised by the deepest capture hook: the rest of the forward is skipped."""


def _detach(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return x.detach()
    if isinstance(x, tuple):
        return tuple(_detach(v) for v in x)
    return x


def _split(args: tuple, kwargs: dict) -> list[tuple[tuple, dict]]:
    """One call over a batch → one call per sequence (tensors whose first dim is the batch are sliced)."""
    first = args[0] if args else kwargs.get("hidden_states")
    b = first.shape[0]

    def piece(x: Any, i: int) -> Any:
        if isinstance(x, torch.Tensor) and x.dim() > 0 and x.shape[0] == b and b > 1:
            return x[i:i + 1].clone()
        if isinstance(x, torch.Tensor) and b == 1 and x is first:
            return x.clone()
        if isinstance(x, tuple):
            return tuple(piece(v, i) for v in x)
        return x

    return [(tuple(piece(a, i) for a in args), {k: piece(v, i) for k, v in kwargs.items()}) for i in range(b)]


def _collate(values: list[Any]) -> Any:
    v0 = values[0]
    if all(v is v0 for v in values):
        return v0
    if isinstance(v0, torch.Tensor):
        return torch.cat(values, 0)
    if isinstance(v0, tuple):
        return tuple(_collate([v[j] for v in values]) for j in range(len(v0)))
    return v0


def cache_bytes_per_pack(model: nn.Module, seq_len: int) -> int:
    hidden = getattr(model.config, "hidden_size", None) or getattr(model.config, "n_embd", 1024)
    return hidden * seq_len * next(model.parameters()).element_size()


# -- per-layer transfer error ----------------------------------------------------------------------------
@torch.no_grad()
def layer_errors(model: nn.Module, packs: torch.Tensor, batch: int = 1) -> dict[str, float]:
    """Mean attention-transfer MSE (linear vs softmax output, before o_proj) per linearized layer."""
    units = linear_units(model)
    device = next(model.parameters()).device
    sums = {name: 0.0 for name, _ in units}
    was = model.training
    model.eval()
    set_transfer(model, True)
    try:
        n = 0
        for i in range(0, packs.shape[0], batch):
            model(input_ids=packs[i:i + batch].to(device), use_cache=False)
            for name, unit in units:
                sums[name] += float(pair_mse(unit))
            n += 1
    finally:
        set_transfer(model, False)
        model.train(was)
    return {name: s / max(n, 1) for name, s in sums.items()}


# -- back to softmax -------------------------------------------------------------------------------------
def _original_class(model: nn.Module, fqn: str, unit: nn.Module) -> type:
    parent_name = fqn.rpartition(".")[0]
    candidates = [type(get_submodule(model, parent_name))] if parent_name else []
    candidates.append(type(model))
    for cls in candidates:
        module = sys.modules.get(cls.__module__)
        found = getattr(module, unit.original_class, None)
        if isinstance(found, type):
            return found
    import transformers

    found = getattr(transformers, unit.original_class, None)
    if isinstance(found, type):
        return found
    raise ConfigError(f"{fqn}: cannot find the class {unit.original_class} it replaced (looked in "
                      f"{[c.__module__ for c in candidates]}); this layer cannot go back to softmax attention")


def original_attention(model: nn.Module, fqn: str) -> nn.Module:
    """The softmax attention module that ``fqn`` replaced: rebuilt from its class, config and layer index,
    sharing the linearized layer's projection (and q/k-norm) modules, so it computes exactly the original."""
    unit = get_submodule(model, fqn)
    if not is_linear_unit(unit):
        raise ConfigError(f"{fqn} is a {type(unit).__name__}, not a linearized attention layer")
    cls = _original_class(model, fqn, unit)
    config = getattr(unit, "config", None)
    if config is None:
        raise ConfigError(f"{fqn}: the replaced {unit.original_class} kept no config; cannot rebuild it")
    try:
        module = cls(config=config, layer_idx=unit.layer_idx)
    except TypeError:
        module = cls(config, layer_idx=unit.layer_idx)
    shared = list(unit.layout.projection_names) + [n for n in _NORMS if hasattr(unit, n)]
    for name in shared:
        if hasattr(module, name):
            setattr(module, name, getattr(unit, name))
    own = {n.split(".")[0] for n, _ in module.named_parameters()} - set(shared)
    if own:
        raise ConfigError(f"{fqn}: the rebuilt {cls.__name__} has parameters {sorted(own)} the linearized layer "
                          "did not keep; cannot restore it exactly")
    ref = next(unit.parameters())
    module.to(device=ref.device, dtype=ref.dtype)
    module.train(unit.training)
    return module


def restore_softmax(model: nn.Module, names: list[str]) -> list[str]:
    """Put the original softmax attention back at ``names`` (in place); returns the names restored."""
    rebuilt = {name: original_attention(model, name) for name in names}
    for name, module in rebuilt.items():
        set_submodule(model, name, module)
    return list(rebuilt)


__all__ = ["linear_units", "new_parameters", "stage1_state", "load_stage1_state", "set_transfer", "pair_mse",
           "LayerInputs", "layer_errors", "original_attention", "restore_softmax", "require_units"]
