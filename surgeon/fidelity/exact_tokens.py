"""Zero-training baselines at equal decode-state bytes: the *original* model keeping only some exact tokens.

A policy decides which past tokens each layer and kv head keeps as exact keys/values (the decode state):

* ``sinks`` first tokens + the last ``window`` tokens (StreamingLLM) — ``heavy=0``;
* plus ``heavy`` tokens chosen by attention received (``score="h2o"``: accumulated over every query so far,
  H2O) or by the newest query's attention (``score="tova"``, TOVA), per kv head;
* ``heavy`` given per layer and kv head (a per-head split: retrieval heads keep more, streaming heads keep
  sinks + window) under one total.

:class:`ExactTokenModel` runs the original model with such a cache: the model's own attention modules
compute q/k/v and rotary, and a kernel registered in transformers' attention-function registry attends to
the kept tokens + the new ones, then evicts. The prompt is processed in blocks of ``block`` tokens (exact
causal attention inside a block, eviction after it: chunked prefill), then one token per step.

Example:
    >>> import torch, transformers
    >>> cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
    ...     num_attention_heads=4, num_key_value_heads=2, vocab_size=50)
    >>> model = transformers.LlamaForCausalLM(cfg).eval()
    >>> ids = torch.randint(0, 50, (1, 40))
    >>> full = model.model(input_ids=ids).last_hidden_state
    >>> engine = ExactTokenModel(model, ExactTokenPolicy(sinks=2, window=100, block=8))   # room for all
    >>> bool(torch.allclose(engine.prefill(ids), full, atol=1e-5))
    True
    >>> tight = ExactTokenModel(model, ExactTokenPolicy(sinks=2, window=6, heavy=4, block=8))
    >>> _ = tight.prefill(ids); tight.kept_tokens()
    [[12, 12], [12, 12]]
    >>> engine.generate(ids, 4) == model.generate(ids, max_new_tokens=4, do_sample=False)[0, 40:].tolist()
    True
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Iterator, Literal

import torch
import torch.nn as nn
from torch import Tensor

from surgeon.core.errors import ConfigError

KERNEL = "surgeon_exact_tokens"
_STATE_ATTR = "surgeon_exact_tokens_state"


@dataclass(frozen=True)
class ExactTokenPolicy:
    """Which exact tokens each layer / kv head keeps between steps (the decode state)."""

    sinks: int = 4
    window: int = 256
    heavy: int | tuple[tuple[int, ...], ...] = 0
    score: Literal["h2o", "tova"] = "h2o"
    block: int = 32

    def __post_init__(self) -> None:
        if self.sinks < 0 or self.window < 1 or self.block < 1:
            raise ConfigError(f"ExactTokenPolicy: sinks >= 0, window >= 1, block >= 1 (got {self.sinks}, "
                              f"{self.window}, {self.block})")
        if self.score not in ("h2o", "tova"):
            raise ConfigError(f"ExactTokenPolicy.score must be 'h2o' or 'tova', got {self.score!r}")
        if isinstance(self.heavy, int) and self.heavy < 0:
            raise ConfigError(f"ExactTokenPolicy.heavy must be >= 0, got {self.heavy}")

    def heavy_of(self, layer: int, kv_heads: int) -> list[int]:
        if isinstance(self.heavy, int):
            return [self.heavy] * kv_heads
        if layer >= len(self.heavy) or len(self.heavy[layer]) != kv_heads:
            raise ConfigError(f"ExactTokenPolicy.heavy: layer {layer} needs {kv_heads} per-kv-head counts, got "
                              f"{self.heavy[layer] if layer < len(self.heavy) else 'none'}")
        return [int(x) for x in self.heavy[layer]]

    def tokens(self, layers: int, kv_heads: int) -> int:
        """Exact tokens kept in all layers and kv heads together (times bytes per token-head = the state)."""
        return sum(self.sinks + self.window + h for i in range(layers) for h in self.heavy_of(i, kv_heads))

    def state_bytes(self, config: Any, bytes_per_value: int = 4) -> int:
        """Decode-state bytes (K and V of every kept token, batch 1) for a transformers ``config``."""
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        kv = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        return self.tokens(config.num_hidden_layers, kv) * 2 * head_dim * bytes_per_value

    @property
    def name(self) -> str:
        heavy = self.heavy if isinstance(self.heavy, int) else f"per-head {sum(map(sum, self.heavy))}"
        return f"sinks {self.sinks} + window {self.window}" + (f" + {self.score} {heavy}" if heavy else "")


@dataclass
class _LayerTokens:
    """The kept tokens of one layer: keys/values (kv heads, n, d), positions, scores, validity."""

    budgets: Tensor
    policy: ExactTokenPolicy
    k: Tensor | None = None
    v: Tensor | None = None
    pos: Tensor | None = None
    score: Tensor | None = None
    valid: Tensor | None = None
    next_pos: int = 0
    extra: dict = field(default_factory=dict)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, scaling: float) -> Tensor:
        if q.shape[0] != 1:
            raise ConfigError(f"ExactTokenModel runs batch 1, got a batch of {q.shape[0]}")
        hq, tb, d = q.shape[1], q.shape[2], q.shape[3]
        hkv = k.shape[1]
        new_pos = torch.arange(self.next_pos, self.next_pos + tb).expand(hkv, tb)
        if self.k is None:
            keys, vals, pos = k[0], v[0], new_pos
            valid = torch.ones(hkv, tb, dtype=torch.bool)
            score = torch.zeros(hkv, tb)
        else:
            keys, vals = torch.cat([self.k, k[0]], 1), torch.cat([self.v, v[0]], 1)
            pos = torch.cat([self.pos, new_pos], 1)
            valid = torch.cat([self.valid, torch.ones(hkv, tb, dtype=torch.bool)], 1)
            score = torch.cat([self.score, torch.zeros(hkv, tb)], 1)
        n_old = keys.shape[1] - tb
        allowed = valid[:, None, None, :].expand(hkv, 1, tb, keys.shape[1]).clone()
        allowed[..., n_old:] &= torch.ones(tb, tb, dtype=torch.bool).tril()
        s = torch.einsum("hgtd,hnd->hgtn", q[0].reshape(hkv, hq // hkv, tb, d).float(), keys.float()) * scaling
        p = torch.softmax(s.masked_fill(~allowed, float("-inf")), -1)
        out = torch.einsum("hgtn,hnd->hgtd", p, vals.float()).reshape(hq, tb, d)
        if self.policy.score == "h2o":
            score = score + p.sum((1, 2))
        else:
            score = p[:, :, -1, :].mean(1)
        self.next_pos += tb
        self._evict(keys, vals, pos, score, valid)
        return out.to(q.dtype).permute(1, 0, 2)[None]

    def _evict(self, keys: Tensor, vals: Tensor, pos: Tensor, score: Tensor, valid: Tensor) -> None:
        newest = self.next_pos - 1
        protected = (pos < self.policy.sinks) | (pos > newest - self.policy.window)
        priority = torch.where(protected, torch.full_like(score, float("inf")), score)
        priority = priority.masked_fill(~valid, float("-inf"))
        room = min(int(self.budgets.max()), keys.shape[1])
        if keys.shape[1] > int(self.budgets.min()):
            top = priority.topk(room, dim=1).indices.sort(dim=1).values
            rank = priority.gather(1, top).argsort(1, descending=True).argsort(1)
            keep_valid = (rank < self.budgets[:, None]) & (priority.gather(1, top) > float("-inf"))
            gather = top[..., None].expand(-1, -1, keys.shape[-1])
            keys, vals = keys.gather(1, gather), vals.gather(1, gather)
            pos, score, valid = pos.gather(1, top), score.gather(1, top), keep_valid
        self.k, self.v, self.pos, self.score, self.valid = keys, vals, pos, score, valid

    def snapshot(self) -> tuple:
        return (self.k, self.v, self.pos, self.score, self.valid, self.next_pos)

    def restore(self, snap: tuple) -> None:
        self.k, self.v, self.pos, self.score, self.valid, self.next_pos = snap

    def kept(self) -> list[int]:
        return [int(x) for x in self.valid.sum(1)] if self.valid is not None else []


def exact_token_attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Any,
                          scaling: float | None = None, dropout: float = 0.0, **kwargs: Any) -> tuple[Tensor, None]:
    """The registered kernel: attend to the module's kept tokens + the new ones, then evict (see module doc)."""
    layer = getattr(module, _STATE_ATTR, None)
    if layer is None:
        raise ConfigError(f"{type(module).__name__}: the '{KERNEL}' attention kernel runs only inside an "
                          "ExactTokenModel (it holds the kept tokens)")
    if kwargs.get("softcap") or kwargs.get("s_aux") is not None or kwargs.get("sliding_window"):
        raise ConfigError(f"{type(module).__name__}: ExactTokenModel does not model softcap / learned sinks / "
                          "the model's own sliding window; use a Llama-style model")
    return layer.attend(query, key, value, scaling if scaling is not None else query.shape[-1] ** -0.5), None


def _register() -> None:
    from transformers import AttentionInterface  # noqa: PLC0415 - transformers is only needed when used

    AttentionInterface.register(KERNEL, exact_token_attention)


class ExactTokenModel:
    """The original causal LM with a decode state of exact tokens chosen by ``policy`` (batch 1).

    ``prefill(ids)`` starts a sequence, ``step(token)`` appends one; both return the final hidden states
    (apply ``lm_head`` for logits). ``snapshot()`` / ``restore()`` fork a sequence.
    """

    def __init__(self, model: nn.Module, policy: ExactTokenPolicy) -> None:
        self.model, self.policy = model, policy
        self.attention = [m for m in model.modules() if hasattr(m, "layer_idx") and hasattr(m, "o_proj")]
        if not self.attention:
            raise ConfigError(f"ExactTokenModel: {type(model).__name__} has no attention module with a layer_idx "
                              "and o_proj (a transformers decoder such as Llama, Qwen2, Mistral)")
        cfg = model.config
        kv = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        self.layers = [_LayerTokens(torch.tensor([policy.sinks + policy.window + h for h in
                                                  policy.heavy_of(m.layer_idx, kv)]), policy) for m in self.attention]
        self.lm_head = model.get_output_embeddings()
        _register()

    @contextlib.contextmanager
    def _installed(self) -> Iterator[None]:
        cfg = self.model.config
        before = cfg._attn_implementation
        for m, layer in zip(self.attention, self.layers):
            setattr(m, _STATE_ATTR, layer)
        cfg._attn_implementation = KERNEL
        try:
            yield
        finally:
            cfg._attn_implementation = before
            for m in self.attention:
                delattr(m, _STATE_ATTR)

    @torch.no_grad()
    def _run(self, ids: Tensor) -> Tensor:
        outs = []
        with self._installed():
            for s in range(0, ids.shape[1], self.policy.block):
                chunk = ids[:, s:s + self.policy.block]
                start = self.layers[0].next_pos
                position_ids = torch.arange(start, start + chunk.shape[1])[None]
                outs.append(self.model.model(input_ids=chunk, position_ids=position_ids,
                                             use_cache=False).last_hidden_state)
        return torch.cat(outs, 1)

    def prefill(self, ids: Tensor) -> Tensor:
        """Start a new sequence with ``ids`` (1, T); returns its hidden states (1, T, hidden)."""
        for layer in self.layers:
            layer.restore((None, None, None, None, None, 0))
        return self._run(ids)

    def step(self, token: int) -> Tensor:
        """Append one token; returns its hidden state (1, 1, hidden)."""
        with self._installed():
            pos = self.layers[0].next_pos
            return self.model.model(input_ids=torch.tensor([[token]]), position_ids=torch.tensor([[pos]]),
                                    use_cache=False).last_hidden_state

    @torch.no_grad()
    def generate(self, ids: Tensor, max_new_tokens: int, eos_token_id: int | None = None) -> list[int]:
        """Greedy continuation of ``ids`` (1, T): the new tokens (stops after ``eos_token_id``)."""
        hidden = self.prefill(ids)
        out: list[int] = []
        for _ in range(max_new_tokens):
            out.append(int(self.lm_head(hidden[0, -1]).argmax()))
            if out[-1] == eos_token_id or len(out) == max_new_tokens:
                break
            hidden = self.step(out[-1])
        return out

    def snapshot(self) -> list[tuple]:
        return [layer.snapshot() for layer in self.layers]

    def restore(self, snap: list[tuple]) -> None:
        for layer, s in zip(self.layers, snap):
            layer.restore(s)

    def kept_tokens(self) -> list[list[int]]:
        """Kept tokens per layer and kv head now."""
        return [layer.kept() for layer in self.layers]
