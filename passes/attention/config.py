"""``LinearizeAttention``: the config of the attention-linearization pass (softmax → linear / gated / hybrid).

The handler (``surgeon.passes.attention.handler``) reaches attention two ways with the same config: Hugging
Face attention modules are swapped in place (module path), hand-written attention in traceable code
(``softmax(q @ kᵀ · s + mask) @ v`` or ``F.scaled_dot_product_attention``) is rewritten in the FX
graph (FX path).

Example:
    >>> cfg = LinearizeAttention(feature_map="hedgehog", window=64, layers=[0, 1])
    >>> cfg.to_dict()["window"], cfg.pass_name
    (64, 'LinearizeAttention')
    >>> LinearizeAttention(gate="sometimes").validate()
    Traceback (most recent call last):
    ...
    surgeon.core.errors.ConfigError: LinearizeAttention.gate: 'sometimes' is not one of ['none', 'liger', 'learned']
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal

from surgeon.core.config import PassConfig
from surgeon.core.errors import ConfigError

FeatureMapKind = Literal["elu1", "relu", "hedgehog", "taylor2"]
GateKind = Literal["none", "liger", "learned"]


@dataclass(kw_only=True)
class LinearizeAttention(PassConfig):
    """Replace softmax attention with linear attention (optionally gated, optionally a sliding-window hybrid).

    Args:
        feature_map: φ applied to queries and keys: ``elu1`` (1 + ELU), ``relu``, ``hedgehog``
            (learnable per-head map, LoLCATs form, initialised close to softmax) or ``taylor2``
            (Based's 2nd-order Taylor map of exp).
        feature_dim: hedgehog's projection size per head (its φ has 2·feature_dim features); default head_dim.
        gate: ``none``; ``liger`` (decay from the pretrained key projection, no new parameters: per head
            log α = mean(logsigmoid(k)) / 16); ``learned`` (GLA-style low-rank data-dependent decay).
        gate_rank: rank of the ``learned`` gate.
        window: causal models: exact softmax over the last ``window`` tokens + linear attention over
            older ones under one shared normaliser (LoLCATs); bidirectional models with ``local``:
            softmax inside a local window of this radius. 0 = pure linear attention.
        sinks: causal hybrids: the first ``sinks`` tokens of each sequence stay exact softmax keys after
            they leave the window (StreamingLLM's attention sinks), under the one normaliser shared with
            the window and the linear branch; kept in the decode state (0 = none).
        memory: causal hybrids: exact softmax slots per kv head for the tokens beyond the window that the
            linear state recalls worst (LoLA's sparse cache: a passkey read once is blurred by the state,
            kept here it is recalled exactly); updated once per call, in the decode state (0 = none).
            Ungated linear attention only. Can be added to a converted, distilled model afterwards
            (:func:`surgeon.passes.attention.memory_slots.set_memory`). A list gives one count per converted
            layer in layer order (a per-layer plan such as ``plan_memory`` returns; ``surgeon.save`` writes
            the live model's plan this way).
        memory_block: prefill tokens per memory update (decoding updates at every token).
        linear_weight_init: initial per-head weight λ of the linear terms beside the softmax ones
            (learnable). The default, 1e-3, starts a hybrid at (almost exactly) sinks + window, which
            on pretrained models is far better than an untrained linear branch (SmolLM2 @1024, window 64,
            4 sinks: ratio 1.51 at λ→0, 1.92 at λ=0.01, 79 at λ=1; benchmarks/results/hybrid_init_smollm2.json);
            attention transfer then raises it
            where the linear branch helps. The linear terms sum over every key beyond the window, so a
            smaller φ (larger φ(q)·φ(k)) needs a smaller start: with hedgehog ``feature_dim=16`` at
            window 256 ``benchmarks/distill_smollm2.py`` starts at λ = 1e-6. Pure linear attention (window 0, no sinks) has no λ.
        window_weight_init: initial per-head weight γ of the softmax terms (a sigmoid of a learnable
            logit; LoLCATs initialises 0.1); linear terms have weight 1.
        local: bidirectional models only: keep softmax inside a local window around each query
            (CLEAR); 2-D (|Δrow|, |Δcol| < window) when the tokens form an image grid (ViT).
        causal: ``None`` takes it from the model; ``True`` on a bidirectional model is an error.
        layers: layer indices to convert (others stay softmax); ``None`` converts all.
        chunk_size: chunk length of the linear-time prefill form.
        targets / exclude / filter_fn: module selection by name, as in every pass.
        leaf_modules: FX path only: modules traced as opaque calls.
        strict: FX path: a softmax / SDPA call left un-rewritten is an error (PlanError listing each with
            its reason) instead of a report note.
    """

    feature_map: FeatureMapKind = "hedgehog"
    feature_dim: int | None = None
    gate: GateKind = "none"
    gate_rank: int = 16
    window: int = 64
    sinks: int = 4
    memory: int | list[int] = 0
    memory_block: int = 64
    linear_weight_init: float = 1e-3
    window_weight_init: float = 0.1
    local: bool = False
    causal: bool | None = None
    layers: list[int] | None = None
    chunk_size: int = 64
    targets: str | list[str] | None = None
    exclude: str | list[str] | None = None
    filter_fn: Callable | None = None
    leaf_modules: list[str] | tuple[str, ...] = ()
    strict: bool = False

    def check(self) -> None:
        if self.window < 0:
            raise ConfigError(f"LinearizeAttention.window must be >= 0 (0 = pure linear attention), got {self.window}")
        if isinstance(self.sinks, bool) or not isinstance(self.sinks, int) or self.sinks < 0:
            raise ConfigError(f"LinearizeAttention.sinks must be an int >= 0 (first tokens kept as exact softmax), "
                              f"got {self.sinks!r}")
        counts = self.memory if isinstance(self.memory, list) else [self.memory]
        for name, value in [*(("memory", c) for c in counts), ("memory_block", self.memory_block)]:
            if isinstance(value, bool) or not isinstance(value, int) or value < (name == "memory_block"):
                raise ConfigError(f"LinearizeAttention.{name} must be an int >= {int(name == 'memory_block')}"
                                  f"{' (or a list of them, one per converted layer)' if name == 'memory' else ''}, "
                                  f"got {getattr(self, name)!r}")
        if any(counts) and (self.local or self.causal is False):
            raise ConfigError(f"LinearizeAttention(memory={self.memory}) keeps past tokens for later queries: it needs "
                              "causal attention (decoding); bidirectional / local attention has no past, use memory=0")
        if any(counts) and self.gate != "none":
            raise ConfigError(f"LinearizeAttention(memory={self.memory}) keeps tokens out of the linear state, which "
                              f"needs ungated attention; gate={self.gate!r} decays contributions that then cannot be "
                              "taken out exactly: use gate='none' or memory=0")
        if not self.linear_weight_init > 0:
            raise ConfigError(f"LinearizeAttention.linear_weight_init must be > 0, got {self.linear_weight_init}")
        if not 0.0 < self.window_weight_init < 1.0:
            raise ConfigError(f"LinearizeAttention.window_weight_init must be in (0, 1), got {self.window_weight_init}")
        if self.chunk_size < 1:
            raise ConfigError(f"LinearizeAttention.chunk_size must be >= 1, got {self.chunk_size}")
        if self.gate_rank < 1:
            raise ConfigError(f"LinearizeAttention.gate_rank must be >= 1, got {self.gate_rank}")
        if self.feature_dim is not None and (self.feature_dim < 1 or self.feature_map != "hedgehog"):
            raise ConfigError("LinearizeAttention.feature_dim sets hedgehog's projection size: use it only with "
                              f"feature_map='hedgehog' and a positive value (got {self.feature_dim} with "
                              f"feature_map={self.feature_map!r})")
        if self.local and self.window == 0:
            raise ConfigError("LinearizeAttention(local=True) keeps softmax inside a local window: set window > 0 "
                              "(its radius in tokens / patches)")
        if self.local and self.causal:
            raise ConfigError("LinearizeAttention(local=True) is for bidirectional models (BERT, ViT); causal models "
                              "use window=... (a sliding window over past tokens) instead")
        if self.local and self.gate != "none":
            raise ConfigError(f"gate={self.gate!r} is a decay over past tokens and needs causal attention; "
                              "local (bidirectional) attention has no past: use gate='none'")
        if self.layers is not None and len(set(self.layers)) != len(self.layers):
            raise ConfigError(f"LinearizeAttention.layers has duplicates: {self.layers}")
