"""Hybrid planning under a decode-state budget: which window, and which layers stay softmax attention.

The per-layer cost of a configuration is measured, not guessed: for each candidate window the
attention-transfer error of every layer (linear hybrid vs the original softmax output) is measured
on a few sequences, and a layer kept as softmax costs nothing in error but its whole KV cache at the
budget's context. ``plan_hybrid`` returns every configuration that fits the budget, best first (the
lowest total transfer error), and a clear error listing the closest options when none fits.

Example:
    >>> errors = {64: {0: 0.5, 1: 2.0}, 128: {0: 0.3, 1: 1.0}}
    >>> state = lambda window, softmax_layers: 1000 * window + 100_000 * len(softmax_layers)
    >>> best = plan_hybrid(errors, state, budget_bytes=150_000)[0]
    >>> best.window, best.softmax_layers, best.state_bytes
    (128, (), 128000)
    >>> plan_hybrid(errors, state, budget_bytes=10_000)
    Traceback (most recent call last):
    ...
    surgeon.core.errors.ConfigError: no hybrid configuration fits a decode state of 10,000 bytes; the closest: window 64, softmax layers [] (64,000 bytes, transfer error 2.5); window 128, softmax layers [] (128,000 bytes, transfer error 1.3); window 64, softmax layers [1] (164,000 bytes, transfer error 0.5)
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn as nn

from surgeon.core.apply import apply
from surgeon.core.errors import ConfigError
from surgeon.distill.transfer import layer_errors, linear_units
from surgeon.passes.attention.config import LinearizeAttention

StateFn = Callable[[int, tuple[int, ...]], int]


@dataclass(frozen=True)
class HybridOption:
    """One configuration: the window, the layers left as softmax, its decode-state bytes and total transfer error."""

    window: int
    softmax_layers: tuple[int, ...]
    state_bytes: int
    error: float

    def describe(self) -> str:
        return (f"window {self.window}, softmax layers {list(self.softmax_layers)} "
                f"({self.state_bytes:,} bytes, transfer error {self.error:.3g})")


def plan_hybrid(errors: dict[int, dict[int, float]], state_bytes: StateFn, budget_bytes: int,
                max_softmax_layers: int = 4) -> list[HybridOption]:
    """Configurations within ``budget_bytes``, lowest total transfer error first.

    ``errors[window][layer]``: measured transfer error of each layer at each candidate window;
    ``state_bytes(window, softmax_layers)``: the decode state of that configuration (at the
    budget's context, since softmax layers' KV caches grow with it). For each window the layers
    kept as softmax are the ones with the largest error (up to ``max_softmax_layers``).
    """
    if not errors:
        raise ConfigError("plan_hybrid: no measured transfer errors (errors[window][layer]) to plan from")
    options = []
    for window, per_layer in sorted(errors.items()):
        ranked = sorted(per_layer, key=per_layer.get, reverse=True)
        for k in range(0, min(max_softmax_layers, len(ranked)) + 1):
            kept = tuple(sorted(ranked[:k]))
            error = sum(e for layer, e in per_layer.items() if layer not in kept)
            options.append(HybridOption(window, kept, int(state_bytes(window, kept)), error))
    fits = sorted((o for o in options if o.state_bytes <= budget_bytes), key=lambda o: (o.error, o.state_bytes))
    if not fits:
        closest = sorted(options, key=lambda o: o.state_bytes)[:3]
        raise ConfigError(f"no hybrid configuration fits a decode state of {budget_bytes:,} bytes; the closest: "
                          + "; ".join(o.describe() for o in closest))
    return fits


def measure_errors(model: nn.Module, packs: torch.Tensor, windows: list[int], **linearize: Any
                   ) -> dict[int, dict[int, float]]:
    """Transfer error of every layer at every window, before training: ``errors[window][layer]``.

    Each window converts a copy of ``model`` with ``LinearizeAttention(window=w, **linearize)``
    (the default linear weight starts the hybrid at sinks + window) and measures each layer's
    linear-vs-softmax output MSE on ``packs``.
    """
    errors: dict[int, dict[int, float]] = {}
    for window in windows:
        converted = apply(model, LinearizeAttention(window=window, **linearize)).model
        by_name = layer_errors(converted, packs)
        index = {name: unit.layer_idx for name, unit in linear_units(converted)}
        errors[window] = {index[name]: err for name, err in by_name.items()}
    return errors


def measure_retrieval(model: nn.Module, trials: list[tuple[torch.Tensor, int]], window: int,
                      layers: list[int] | None = None, progress: bool = True, **linearize: Any) -> dict[int, float]:
    """Recall beyond the window with one layer at a time kept as softmax: ``scores[layer]``, and ``scores[-1]``
    with none kept.

    ``trials``: ``(ids, answer_start)`` probes whose answer lies beyond the window (needle / MQAR, e.g.
    :func:`surgeon.distill.evaluate.make_niah_trials`); a trial counts when every answer token is the
    greedy prediction. ``model`` is converted once with ``LinearizeAttention(window=window, **linearize)``
    (untrained: sinks + window when λ starts near 0); each layer in turn gets its original softmax attention
    back (sharing the projections) for the probes. A layer that alone restores recall is a retrieval layer,
    the one to keep as softmax when recall beyond the window matters more than state bytes.
    """
    sets = None if layers is None else [()] + [(layer,) for layer in layers]
    scores = retrieval_scores(model, trials, window, sets, progress, **linearize)
    return {(kept[0] if kept else -1): score for kept, score in scores.items()}


def retrieval_scores(model: nn.Module, trials: list[tuple[torch.Tensor, int]], window: int,
                     sets: list[tuple[int, ...]] | None = None, progress: bool = True, **linearize: Any
                     ) -> dict[tuple[int, ...], float]:
    """As :func:`measure_retrieval`, for *sets* of layers kept as softmax together (``()``: none kept;
    default: no layer, then every layer alone)."""
    from tqdm.auto import tqdm

    from surgeon.distill.evaluate import exact_continuation
    from surgeon.distill.transfer import original_attention
    from surgeon.fx.tracing import set_submodule

    if not trials:
        raise ConfigError("measure_retrieval: no trials; build them with surgeon.distill.evaluate.make_niah_trials")
    converted = apply(model, LinearizeAttention(window=window, **linearize)).model.eval()
    units = {unit.layer_idx: (name, unit) for name, unit in linear_units(converted)}
    sets = [()] + [(layer,) for layer in units] if sets is None else sets
    missing = sorted({layer for kept in sets for layer in kept} - set(units))
    if missing:
        raise ConfigError(f"measure_retrieval: layers {missing} are not linearized attention layers of the converted "
                          f"model (its layers: {sorted(units)})")

    @torch.no_grad()
    def score() -> float:
        return sum(exact_continuation(converted, ids, start) for ids, start in trials) / len(trials)

    scores: dict[tuple[int, ...], float] = {}
    for kept in tqdm(sets, desc=f"recall with softmax layers kept (window {window})", disable=not progress):
        for layer in kept:
            set_submodule(converted, units[layer][0], original_attention(converted, units[layer][0]))
        try:
            scores[tuple(kept)] = score()
        finally:
            for layer in kept:
                set_submodule(converted, *units[layer])
    return scores


_SCORES_FORM = ("a dict {layer: score} (int or int-like string keys, e.g. from JSON; -1: none exact), a "
                "per-layer list or 1-D tensor of scores, or retrieval_heads' (layers, heads) tensor (best head "
                "per layer)")


def _score(value: Any, where: str) -> float:
    if isinstance(value, torch.Tensor):
        value = value.detach().double().amax() if value.numel() else None   # a layer's heads: the best one
    elif isinstance(value, (list, tuple)) and value and all(isinstance(v, (int, float)) for v in value):
        value = max(value)
    if isinstance(value, bool) or not isinstance(value, (int, float, torch.Tensor)) or not math.isfinite(float(value)):
        raise ConfigError(f"plan_memory: the score of {where} is {value!r}; expected a finite number. Pass "
                          f"{_SCORES_FORM}")
    return float(value)


def _layer_scores(retrieval: Any) -> dict[int, float]:
    """``retrieval`` in any of the accepted forms as ``{layer: score}``."""
    if isinstance(retrieval, torch.Tensor):
        if retrieval.dim() not in (1, 2) or retrieval.numel() == 0:
            raise ConfigError(f"plan_memory: a tensor of retrieval scores of shape {tuple(retrieval.shape)}; "
                              f"expected {_SCORES_FORM}")
        retrieval = list(retrieval)
    if isinstance(retrieval, (list, tuple)):
        return {i: _score(v, f"layer {i}") for i, v in enumerate(retrieval)}
    if not isinstance(retrieval, dict):
        raise ConfigError(f"plan_memory: retrieval is a {type(retrieval).__name__}; expected {_SCORES_FORM}")
    scores: dict[int, float] = {}
    for key, value in retrieval.items():
        try:
            layer = int(key) if isinstance(key, str) else key
        except ValueError:
            layer = None
        if isinstance(layer, bool) or not isinstance(layer, int):
            raise ConfigError(f"plan_memory: retrieval key {key!r} is not a layer index; expected {_SCORES_FORM}")
        if layer in scores:
            raise ConfigError(f"plan_memory: layer {layer} appears twice in the retrieval keys ({key!r})")
        scores[layer] = _score(value, f"layer {key!r}")
    return scores


def plan_memory(retrieval: dict[int, float] | list[float] | torch.Tensor, slots: int, boost: float = 2.5, threshold: float = 0.5) -> list[int]:
    """Memory slots per linearized layer (in layer order) holding the state of ``slots`` in every layer, with
    more where recall is made: the retrieval layers.

    ``retrieval[layer]``: how much a layer does for recall beyond the window (a dict, possibly with the
    string keys JSON gives; a per-layer list or tensor; or retrieval_heads' (layers, heads) tensor), either
    :func:`~surgeon.distill.retrieval.retrieval_heads`' attention mass (its best head) or
    :func:`measure_retrieval`'s recall with the layer alone exact (its ``-1`` entry, none exact, is then
    subtracted). Layers within ``threshold`` of the best are retrieval layers: the best gets ``boost × slots``,
    the others in proportion to their score, and the slots they add are taken evenly from the remaining
    layers, so the total (the decode-state bytes) stays ``slots ×`` layers. No retrieval layer: ``slots``
    everywhere.

    Example:
        >>> plan_memory({0: 0.1, 1: 0.8, 2: 0.6, 3: 0.2}, slots=8, boost=2.0)
        [1, 16, 14, 1]
    """
    retrieval = _layer_scores(retrieval)
    layers = sorted(k for k in retrieval if k >= 0)
    if not layers:
        raise ConfigError("plan_memory: no layer in the retrieval scores; pass retrieval_heads' or "
                          "measure_retrieval's result")
    if isinstance(slots, bool) or not isinstance(slots, int) or slots < 0:
        raise ConfigError(f"plan_memory: slots must be an int >= 0, got {slots!r}")
    if not boost >= 1.0:
        raise ConfigError(f"plan_memory: boost must be >= 1 (how many times the uniform slots the best retrieval "
                          f"layer gets), got {boost!r}")
    if not 0.0 < threshold <= 1.0:
        raise ConfigError(f"plan_memory: threshold must be in (0, 1] (a fraction of the best layer's score), "
                          f"got {threshold!r}")
    gain = {layer: max(float(retrieval[layer]) - float(retrieval.get(-1, 0.0)), 0.0) for layer in layers}
    best = max(gain.values())
    alloc = {layer: slots for layer in layers}
    chosen = [layer for layer in layers if best > 0 and gain[layer] >= threshold * best]
    donors = [layer for layer in layers if layer not in chosen]
    if not chosen or not donors or slots == 0:
        return [alloc[layer] for layer in layers]
    for layer in chosen:
        alloc[layer] = int(round(slots * (1 + (boost - 1) * gain[layer] / best)))
    extra = sum(alloc.values()) - slots * len(layers)
    if extra > slots * len(donors):
        raise ConfigError(f"plan_memory: the {len(chosen)} retrieval layers would take {extra} slots more than the "
                          f"other {len(donors)} layers hold ({slots} each); lower boost (now {boost}) or raise "
                          f"threshold (now {threshold})")
    each, rest = divmod(extra, len(donors))
    for i, layer in enumerate(donors):
        alloc[layer] -= each + (1 if i < rest else 0)
    return [alloc[layer] for layer in layers]


def state_bytes_fn(n_layers: int, n_heads: int, n_kv_heads: int, head_dim: int, features: int, sinks: int,
                   context: int, dtype_bytes: int = 4, memory: int = 0) -> StateFn:
    """Decode-state bytes of a hybrid configuration at ``context`` tokens (batch 1), for :func:`plan_hybrid`.

    A linear layer holds its fp32 recurrent state, the window's last w − 1, the sinks' and the
    ``memory`` slots' keys and values; a softmax layer its KV cache of ``context`` tokens.

    Example:
        >>> state = state_bytes_fn(30, 9, 3, 64, 32, sinks=4, context=8192)
        >>> with_slots = state_bytes_fn(30, 9, 3, 64, 32, sinks=4, context=8192, memory=64)
        >>> (with_slots(256, ()) - state(256, ())) // (30 * 64)     # one key + value per slot, layer and kv head
        1536
    """
    def state(window: int, softmax_layers: tuple[int, ...]) -> int:
        kv_token = 2 * n_kv_heads * head_dim * dtype_bytes
        linear = n_heads * features * (head_dim + 1) * 4 + (max(window - 1, 0) + sinks + memory) * kv_token
        n_soft = len(softmax_layers)
        return (n_layers - n_soft) * linear + n_soft * context * kv_token
    return state


def pareto(options: list[HybridOption]) -> list[HybridOption]:
    """The options no other beats on both state bytes and error, by increasing state."""
    front, best = [], float("inf")
    for o in sorted(options, key=lambda o: (o.state_bytes, o.error)):
        if o.error < best:
            front.append(o)
            best = o.error
    return front


__all__ = ["HybridOption", "plan_hybrid", "pareto", "measure_errors", "measure_retrieval", "retrieval_scores", "plan_memory",
           "state_bytes_fn"]
