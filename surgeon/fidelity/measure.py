"""Per-prompt fidelity measurements of a converted model (or a baseline) against the original.

For each prompt the original is run once: its greedy continuation of ``new_tokens`` tokens, its log-
probabilities along it, and its negative log-likelihood of the prompt. Each candidate is then prefilled
once and forked: fed the original's continuation (teacher-forced top-1 agreement and KL(original ‖
candidate) per position) and left to continue greedily (position-wise agreement, tokens until the first
divergence). Passkey trials: every answer token must be the candidate's argmax.

A *runner* is anything with ``prefill(ids) -> hidden``, ``step(token) -> hidden``, ``snapshot()``,
``restore(s)`` and ``lm_head``: :class:`HFRunner` wraps a transformers causal LM (the original, or a
surgeon-converted one with its own cache), :class:`~surgeon.fidelity.exact_tokens.ExactTokenModel` the
exact-token baselines.

Example:
    >>> import torch, transformers
    >>> cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
    ...     num_attention_heads=4, num_key_value_heads=2, vocab_size=50)
    >>> model = transformers.LlamaForCausalLM(cfg).eval()
    >>> ref = reference(HFRunner(model), list(range(1, 30)), new_tokens=5)
    >>> row = measure(HFRunner(model), ref)           # the original against itself
    >>> row["top1"], row["greedy"], row["first_divergence"], round(row["kl"], 6)
    (1.0, 1.0, 5, 0.0)
"""
from __future__ import annotations

import copy
from typing import Any, Protocol

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

LM_CHUNK = 512


class Runner(Protocol):
    lm_head: nn.Module

    def prefill(self, ids: Tensor) -> Tensor: ...
    def step(self, token: int) -> Tensor: ...
    def snapshot(self) -> Any: ...
    def restore(self, snap: Any) -> None: ...


class HFRunner:
    """A transformers causal LM run through its own cache (batch 1): the original or a converted model."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model.eval()
        self.lm_head = model.get_output_embeddings()
        self.cache: Any = None

    @torch.no_grad()
    def prefill(self, ids: Tensor) -> Tensor:
        out = self.model.model(input_ids=ids, use_cache=True)
        self.cache = out.past_key_values
        return out.last_hidden_state

    @torch.no_grad()
    def step(self, token: int) -> Tensor:
        out = self.model.model(input_ids=torch.tensor([[token]]), cache=self.cache, use_cache=True)
        self.cache = out.past_key_values
        return out.last_hidden_state

    def snapshot(self) -> Any:
        return copy.deepcopy(self.cache)

    def restore(self, snap: Any) -> None:
        self.cache = copy.deepcopy(snap)


@torch.no_grad()
def prompt_nll(lm_head: nn.Module, hidden: Tensor, ids: Tensor) -> float:
    """Summed next-token NLL of ``ids`` (1, T) from the hidden states (1, T, h), in chunks of the vocabulary
    projection (an 8K prompt's full logits would take GBs)."""
    total = 0.0
    for s in range(0, ids.shape[1] - 1, LM_CHUNK):
        logits = lm_head(hidden[0, s:min(s + LM_CHUNK, ids.shape[1] - 1)]).float()
        total += float(F.cross_entropy(logits, ids[0, s + 1:s + 1 + logits.shape[0]], reduction="sum"))
    return total


def _logprobs(runner: Runner, hidden: Tensor) -> Tensor:
    return F.log_softmax(runner.lm_head(hidden[0, -1]).float(), -1)


@torch.no_grad()
def reference(original: Runner, ids: list[int], new_tokens: int = 32) -> dict[str, Any]:
    """The original's side of a prompt: its greedy continuation, log-probabilities along it, prompt NLL."""
    x = torch.tensor([ids])
    hidden = original.prefill(x)
    nll = prompt_nll(original.lm_head, hidden, x)
    cont, logps = [], []
    lp = _logprobs(original, hidden)
    for _ in range(new_tokens):
        logps.append(lp)
        cont.append(int(lp.argmax()))
        lp = _logprobs(original, original.step(cont[-1]))
    return {"ids": ids, "continuation": cont, "logprobs": torch.stack(logps), "nll": nll, "tokens": len(ids) - 1}


@torch.no_grad()
def measure(runner: Runner, ref: dict[str, Any]) -> dict[str, Any]:
    """A candidate on one prompt: prompt NLL, teacher-forced top-1 / KL and greedy agreement on the original's
    continuation ``ref`` (from :func:`reference`)."""
    x = torch.tensor([ref["ids"]])
    hidden = runner.prefill(x)
    nll = prompt_nll(runner.lm_head, hidden, x)
    first = _logprobs(runner, hidden)
    snap = runner.snapshot()
    cont, t_lp = ref["continuation"], ref["logprobs"]
    top1, kl, lp = [], [], first
    for i, token in enumerate(cont):
        top1.append(int(lp.argmax()) == token)
        kl.append(float((t_lp[i].exp() * (t_lp[i] - lp)).sum()))
        if i + 1 < len(cont):
            lp = _logprobs(runner, runner.step(token))
    runner.restore(snap)
    greedy, lp = [], first
    for i in range(len(cont)):
        greedy.append(int(lp.argmax()))
        if i + 1 < len(cont):
            lp = _logprobs(runner, runner.step(greedy[-1]))
    same = [g == c for g, c in zip(greedy, cont)]
    return {"nll": nll, "tokens": len(ref["ids"]) - 1, "top1": sum(top1) / len(top1), "kl": sum(kl) / len(kl),
            "greedy": sum(same) / len(same), "first_divergence": same.index(False) if False in same else len(same),
            "greedy_tokens": greedy}


@torch.no_grad()
def needle_hit(runner: Runner, ids: list[int], answer_start: int) -> bool:
    """Every answer token (from ``answer_start``) is the runner's argmax given the tokens before it."""
    lp = _logprobs(runner, runner.prefill(torch.tensor([ids[:answer_start]])))
    for i, token in enumerate(ids[answer_start:]):
        if int(lp.argmax()) != token:
            return False
        if answer_start + i + 1 < len(ids):
            lp = _logprobs(runner, runner.step(token))
    return True
