"""Retrieval heads: the attention mass of the answer-predicting queries on the answer's source, checked against
the closed form of uniform attention; the model's attention implementation is set back; bad probes are refused."""
from __future__ import annotations

import pytest
import torch

from surgeon.core.errors import ConfigError
from surgeon.distill.retrieval import answer_source, retrieval_heads
from tests.distill.test_planning import tiny_llama


def test_uniform_attention_gives_the_closed_form_mass():
    """q_proj = 0: every query attends uniformly to its t + 1 positions, so the query at start − 1 + j puts
    n / (start + j) on an n-token source; the mass is that, averaged over the n answer tokens."""
    model = tiny_llama(layers=2)
    for layer in model.model.layers:
        torch.nn.init.zeros_(layer.self_attn.q_proj.weight)
    ids = torch.tensor([9, 3, 11, 12, 13, 4, 5, 6, 7, 8, 2, 3, 11, 12, 13])   # answer [11, 12, 13] at 2..4
    start, n = 12, 3
    assert answer_source(ids, start) == 2
    want = sum(n / (start + j) for j in range(n)) / n
    mass = retrieval_heads(model, [(ids, start), (ids, start)])
    assert mass.shape == (2, 4)
    assert torch.allclose(mass, torch.full((2, 4), want), atol=1e-6)


def test_the_attention_implementation_is_set_back_and_a_trained_head_differs():
    model = tiny_llama(layers=2)
    model.set_attn_implementation("sdpa")
    ids = torch.tensor([1, 20, 21, 5, 6, 7, 8, 9, 20, 21])
    mass = retrieval_heads(model, [(ids, 8)])
    assert model.config._attn_implementation == "sdpa"
    assert ((mass >= 0) & (mass <= 1)).all() and mass.std() > 0      # random weights: heads differ


def test_bad_probes_are_refused():
    model = tiny_llama(layers=2)
    with pytest.raises(ConfigError, match=r"the answer \[30, 31\] does not occur in its prompt \(6 tokens\)"):
        retrieval_heads(model, [(torch.tensor([1, 2, 3, 4, 5, 6, 30, 31]), 6)])
    with pytest.raises(ConfigError, match="no probes"):
        retrieval_heads(model, [])
