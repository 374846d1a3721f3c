"""A tiny Llama shared by the fidelity tests (GQA: 6 query heads over 2 kv heads; vocabulary of the byte tokenizer)."""
from __future__ import annotations

import pytest
import torch
import transformers


@pytest.fixture(scope="module")
def llama():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=6,
                                   num_key_value_heads=2, vocab_size=259, max_position_embeddings=512)
    return transformers.LlamaForCausalLM(cfg).eval()
