"""Retrieval heads: where the original model looks when it copies a passkey from far back.

A few attention heads do the copying when a model retrieves a fact from its context (Wu et al. 2024,
"Retrieval Head Mechanistically Explains Long-Context Factuality"; DuoAttention keeps full caches for
them). :func:`retrieval_heads` measures them on the *original* model with probes such as
:func:`~surgeon.distill.evaluate.make_niah_trials`: for each layer and head, the attention mass that
the queries predicting the answer put on the answer's earlier occurrence in the prompt. A layer's
score (its best head) tells :func:`~surgeon.distill.planning.plan_memory` where memory slots recall
what the window has lost.

Example:
    >>> import torch, transformers
    >>> cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
    ...                                num_attention_heads=4, num_key_value_heads=2, vocab_size=50)
    >>> model = transformers.LlamaForCausalLM(cfg).eval()
    >>> probe = (torch.tensor([5, 7, 8, 9, 3, 4, 6, 2, 7, 8]), 8)      # the answer [7, 8] occurs at 1..2
    >>> mass = retrieval_heads(model, [probe])
    >>> mass.shape, bool((mass >= 0).all() and (mass <= 1).all())
    (torch.Size([2, 4]), True)
"""
from __future__ import annotations

import torch
import torch.nn as nn
from torch import Tensor

from surgeon.core.errors import ConfigError


def answer_source(ids: Tensor, start: int) -> int:
    """Where the answer ``ids[start:]`` last occurs in the prompt ``ids[:start]`` (a clear error if nowhere)."""
    answer, n = ids[start:].tolist(), ids.shape[0] - start
    prompt = ids[:start].tolist()
    for at in range(start - n, -1, -1):
        if prompt[at:at + n] == answer:
            return at
    raise ConfigError(f"retrieval probe: the answer {answer} does not occur in its prompt ({start} tokens); a "
                      "retrieval probe copies its answer from the context (make_niah_trials builds such probes)")


@torch.no_grad()
def retrieval_heads(model: nn.Module, trials: list[tuple[Tensor, int]]) -> Tensor:
    """Mean attention mass (layers, heads) that the queries predicting each probe's answer put on its source.

    ``model``: the original Hugging Face causal LM (run with eager attention for the weights, then set
    back); ``trials``: ``(ids, answer_start)`` probes whose answer is copied from earlier in the prompt.
    """
    if not trials:
        raise ConfigError("retrieval_heads: no probes; build them with surgeon.distill.evaluate.make_niah_trials")
    before = getattr(model.config, "_attn_implementation", None)
    model.set_attn_implementation("eager")
    try:
        total = None
        for ids, start in trials:
            src, n = answer_source(ids, start), ids.shape[0] - start
            att = model(input_ids=ids[None], output_attentions=True, use_cache=False).attentions
            # query start-1+j predicts answer token j; its mass on the whole source span, averaged over j
            mass = torch.stack([a[0, :, start - 1:start - 1 + n, src:src + n].sum(-1).mean(-1) for a in att])
            total = mass if total is None else total + mass
    finally:
        if before is not None:
            model.set_attn_implementation(before)
    return total / len(trials)


__all__ = ["answer_source", "retrieval_heads"]
