"""SmolLM2-135M-Instruct (real weights, offline) loads, and linearized end to end it still decodes."""
from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

import surgeon
from surgeon.models.smollm2 import load_smollm2
from surgeon.passes import LinearizeAttention


@pytest.fixture(scope="module")
def smollm2():
    return load_smollm2()


def test_loads_with_its_architecture_and_answers(smollm2):
    model, tok = smollm2
    cfg = model.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads) == (30, 576, 9, 3)
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=12, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids["input_ids"].shape[1]:])


def test_linearized_all_layers_generates_and_decodes_like_prefill(smollm2):
    model, tok = smollm2
    s = surgeon.apply(model, LinearizeAttention(feature_map="hedgehog", window=64))
    report = s.report["LinearizeAttention"]
    assert len(report.rows) == 30
    assert report.totals["params_added"] == 30 * ((9 + 3) * 64 * 64 + 9 + 9)   # feature maps, γ and λ per head
    costs = report.notes[-1]
    assert "32,768" in costs and "softmax_kv_MiB" in costs
    text = tok("The Python language reference describes the syntax and core semantics of the language. "
               "It is terse, but attempts to be exact and complete.", return_tensors="pt").input_ids
    ids = torch.cat([text, text, text], dim=1)[:, :90]   # 90 tokens: the 64-token window fills and slides
    with torch.no_grad():
        full = s.model(ids).logits
        cache = DynamicCache(config=s.model.config)
        steps = [s.model(ids[:, :20], past_key_values=cache, use_cache=True).logits]
        for t in range(20, ids.shape[1]):
            steps.append(s.model(ids[:, t:t + 1], past_key_values=cache, use_cache=True).logits)
    assert (torch.cat(steps, 1) - full).abs().max().item() <= 1e-4
    out = s.model.generate(text, max_new_tokens=10, do_sample=False, min_new_tokens=10)
    assert out.shape[1] == text.shape[1] + 10 and torch.isfinite(full).all()
