"""Helpers for the Linearizer tests: small invertible chains with non-trivial parameters."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from surgeon.ops.invertible import ActNorm, AffineCoupling, InvertibleLinear, InvertibleSequential


def randomize(g: nn.Module, seed: int = 0, scale: float = 0.5) -> nn.Module:
    """Give couplings / ActNorms non-trivial parameters (they start at the identity)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in g.modules():
            if isinstance(m, AffineCoupling):
                last = m.net[2]
                last.weight.copy_(torch.randn(last.weight.shape, generator=gen) * scale)
                last.bias.copy_(torch.randn(last.bias.shape, generator=gen) * scale)
            if isinstance(m, ActNorm):
                m.shift.copy_(torch.randn(m.features, generator=gen))
                m.log_scale.copy_(torch.randn(m.features, generator=gen) * 0.3)
    return g


def chain(d: int, seed: int = 0, dim: int = -1) -> InvertibleSequential:
    torch.manual_seed(seed)
    g = InvertibleSequential(ActNorm(d, dim=dim), InvertibleLinear(d, dim=dim, init="random", seed=seed),
                             AffineCoupling(d, hidden=16, dim=dim), InvertibleLinear(d, dim=dim, init="random", seed=seed + 1),
                             AffineCoupling(d, hidden=16, dim=dim, swap=True))
    return randomize(g, seed)




def tiny_llama_factory():
    """A seeded 4-layer Llama (the CLI's ``--linearity lin_helpers:tiny_llama_factory``)."""
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                                   num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval()



@pytest.fixture
def tiny_llama():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=5,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval()


@pytest.fixture
def token_batches():
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, 64, (4, 16), generator=g) for _ in range(4)]


@pytest.fixture(autouse=True)
def _one_thread():
    """These tests use small tensors: one thread is much faster on a shared 2-core box."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
