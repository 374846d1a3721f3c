"""Chunked prefill (transformers' ``prefill_chunk_size``, on by default for linearized causal LMs): a long prompt
read in blocks through the cache gives the same logits as one forward over it."""
from __future__ import annotations

import pytest
import torch

import surgeon
from surgeon.passes import LinearizeAttention
from surgeon.passes.attention.prefill import PREFILL_CHUNK

from attention_models import tiny_llama


@pytest.mark.parametrize("kind", [dict(window=8, sinks=2), dict(window=0), dict(window=4, gate="learned")])
def test_chunked_prefill_gives_the_one_shot_logits(kind):
    model = surgeon.apply(tiny_llama(), LinearizeAttention(**kind)).model.eval()
    assert model.generation_config.prefill_chunk_size == PREFILL_CHUNK
    ids = torch.randint(0, 90, (2, 150), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0                                      # left padding in one row
    logits = []
    for chunk in (None, 32):                             # 150 = 4 chunks of 32 + a partial one
        model.generation_config.prefill_chunk_size = chunk
        out = model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False, output_logits=True,
                             return_dict_in_generate=True)
        logits.append(torch.stack(out.logits, 1))
    assert logits[0].shape == (2, 4, 97)
    assert (logits[0] - logits[1]).abs().max().item() <= 1e-5 * logits[0].abs().max().item()


def test_a_prefill_chunk_size_the_user_set_is_kept():
    base = tiny_llama()
    base.generation_config.prefill_chunk_size = 512
    model = surgeon.apply(base, LinearizeAttention(window=4)).model
    assert model.generation_config.prefill_chunk_size == 512
